"""The architecture registry: one entry per stage-2 model family, naming its config class, model class and named
sizes (DiT's `DiT_models` idea). Training, presets, `vqar.load` and the checkpoint converters all look
architectures up here; a size fixes the width and depth, the data-dependent fields (vocabulary, code shape,
classes) come from the code store or the caller.

Parameter counts of the paper sizes (ImageNet: K=16384, 1000 classes):
GPT-B 111M, GPT-L 343M, GPT-XL 775M, GPT-XXL 1.4B, GPT-3B 3.1B (LlamaGen, 16x16 codes);
RQ-480M, RQ-821M, RQ-1.4B, RQ-3.8B (RQ-Transformer, 8x8x4 codes);
VIM-Base 650M, VIM-Large 1.7B (VIM, 8192 codes on a 32x32 grid).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vqar.ar.contract import ARConfig, ARModel
from vqar.ar.gpt import GPT, GPTConfig
from vqar.ar.rq_transformer import RQTransformer, RQTransformerConfig
from vqar.ar.vim import VIM, VIMConfig

GPT_SIZES: dict[str, dict] = {
    "GPT-B": {"n_layer": 12, "n_head": 12, "dim": 768},
    "GPT-L": {"n_layer": 24, "n_head": 16, "dim": 1024},
    "GPT-XL": {"n_layer": 36, "n_head": 20, "dim": 1280},
    "GPT-XXL": {"n_layer": 48, "n_head": 24, "dim": 1536},
    "GPT-3B": {"n_layer": 24, "n_head": 32, "dim": 3200},
    # CPU-sized
    "GPT-S": {"n_layer": 6, "n_head": 8, "dim": 256, "multiple_of": 64},
    "GPT-XS": {"n_layer": 4, "n_head": 4, "dim": 128, "multiple_of": 32},
}

RQ_SIZES: dict[str, dict] = {
    "RQ-480M": {"dim": 1536, "n_head": 24, "n_layer": 12, "n_depth_layer": 4},
    "RQ-821M": {"dim": 1536, "n_head": 24, "n_layer": 24, "n_depth_layer": 4},
    "RQ-1.4B": {"dim": 1536, "n_head": 24, "n_layer": 42, "n_depth_layer": 6},
    "RQ-3.8B": {"dim": 2560, "n_head": 40, "n_layer": 42, "n_depth_layer": 6},
    # CPU-sized
    "RQ-S": {"dim": 256, "n_head": 8, "n_layer": 6, "n_depth_layer": 2},
    "RQ-XS": {"dim": 128, "n_head": 4, "n_layer": 4, "n_depth_layer": 2},
}

VIM_SIZES: dict[str, dict] = {
    "VIM-Base": {"dim": 1536, "n_head": 16, "n_layer": 24},
    "VIM-Large": {"dim": 2048, "n_head": 32, "n_layer": 36},
    # CPU-sized
    "VIM-S": {"dim": 256, "n_head": 8, "n_layer": 6},
    "VIM-XS": {"dim": 128, "n_head": 4, "n_layer": 4},
}


@dataclass(frozen=True)
class Architecture:
    name: str
    config: type[ARConfig]
    model: type[ARModel]
    sizes: Mapping[str, Mapping[str, Any]]
    description: str

    def size_fields(self, size: str) -> dict:
        """The config fields a named size sets."""
        if size not in self.sizes:
            raise ValueError(f"unknown {self.name} size {size!r}; known: {', '.join(self.sizes)}")
        return dict(self.sizes[size])


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("gpt", GPTConfig, GPT, GPT_SIZES, "LlamaGen's GPT: one code per position"),
        Architecture("rq", RQTransformerConfig, RQTransformer, RQ_SIZES, "RQ-Transformer: D codes per position"),
        Architecture("vim", VIMConfig, VIM, VIM_SIZES, "VIM: a GPT-2 style decoder over ViT-VQGAN codes"),
    )
}


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]
