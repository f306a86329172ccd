"""The architecture registry: one entry per stage-2 model family, naming its config class, model class and named
sizes (DiT's `DiT_models` idea). Training, presets, `vqar.load_pretrained` and the checkpoint converters all look
architectures up here; a size fixes the width and depth, the data-dependent fields (vocabulary, code shape,
classes) come from the code store or the caller.

Parameter counts of the paper sizes (ImageNet: K=16384, 1000 classes):
GPT-B 111M, GPT-L 343M, GPT-XL 775M, GPT-XXL 1.4B, GPT-3B 3.1B (LlamaGen, 16x16 codes);
RQ-480M, RQ-821M, RQ-1.4B, RQ-3.8B (RQ-Transformer, 8x8x4 codes);
VIM-Base 650M, VIM-Large 1.7B (VIM, 8192 codes on a 32x32 grid);
VAR-d16 310M, VAR-d20 600M, VAR-d24 1.0B, VAR-d30 2.0B, VAR-d36 2.3B (VAR, 4096 codes on 10 scales; sizes in
`vqar.ar.var`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from vqar.ar import losses
from vqar.ar.contract import ARConfig, ARModel
from vqar.ar.gpt import GPT, GPTConfig
from vqar.ar.rq_transformer import RQTransformer, RQTransformerConfig
from vqar.ar.var import PATCH_NUMS_256, PATCH_NUMS_512, VAR, VAR_SIZES, VARConfig
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


def _no_store_fields(manifest: Mapping[str, Any], tokenizer: Mapping[str, Any]) -> dict:
    return {}


def _grid_store_fields(manifest: Mapping[str, Any], tokenizer: Mapping[str, Any]) -> dict:
    """Nothing beyond the common fields; refuses VAR's scales, which a raster model would otherwise report only as
    a code_shape it cannot take."""
    if tokenizer["quantizer"].get("kind") == "multiscale":
        raise ValueError("its codes are the scales of a multi-scale (VAR) tokenizer, not a grid: train arch=var on "
                         "it (the var-mnist AR preset, say)")  # fmt: skip
    return {}


def _rq_store_fields(manifest: Mapping[str, Any], tokenizer: Mapping[str, Any]) -> dict:
    """The tokenizer's code vectors an RQ-Transformer embeds codes with."""
    _grid_store_fields(manifest, tokenizer)
    shape = list(manifest.get("code_shape", [0, 0, 0]))  # `vqar bench sample` gives no store
    if len(shape) != 3:  # said here, naming the store, rather than by the model config's check of code_shape
        raise ValueError(f"an RQ-Transformer models stacks of codes (a residual tokenizer's height x width x depth), "
                         f"and these are {'x'.join(map(str, shape))}: train arch=gpt or arch=vim on them")  # fmt: skip
    quantizer = tokenizer["quantizer"]
    return {"code_dim": int(quantizer["dim"]), "shared_codebook": bool(quantizer.get("shared_codebook", True))}


def _embed_with_codebook(model: ARModel, tokenizer) -> None:
    if tokenizer is None:
        raise ValueError("an RQ-Transformer embeds codes with its tokenizer's codebook; pass the tokenizer")
    model.set_code_embeddings(tokenizer.code_vectors())


def _keep_nothing(model: ARModel, tokenizer) -> None:
    return None


def _one_code(grid: int, depth: int) -> dict:
    if depth != 1:
        raise ValueError(f"this architecture predicts one code per position; d={depth} needs an RQ-Transformer (a "
                         "model=RQ-... size)")  # fmt: skip
    return {"kind": "vq"}


def _code_stack(grid: int, depth: int) -> dict:
    return {"kind": "rq", "depth": depth}


def _scale_store_fields(manifest: Mapping[str, Any], tokenizer: Mapping[str, Any]) -> dict:
    """The scales of a multi-scale tokenizer and the size of its code vectors, which VAR's inputs are made of."""
    quantizer = tokenizer["quantizer"]
    # By kind, not by the presence of patch_nums: every saved quantizer config has that field (empty but for VAR).
    if quantizer.get("kind") != "multiscale":
        raise ValueError(f"VAR models the codes of a multi-scale tokenizer (quantizer kind 'multiscale'), not of "
                         f"kind {quantizer.get('kind')!r}: extract codes with one (the var-mnist tokenizer preset, "
                         "say)")  # fmt: skip
    return {"patch_nums": [int(p) for p in quantizer["patch_nums"]], "code_dim": int(quantizer["dim"])}


def _read_with_quantizer(model: ARModel, tokenizer) -> None:
    if tokenizer is None:
        raise ValueError("VAR builds its inputs with its tokenizer's quantizer; pass the tokenizer")
    model.attach(tokenizer)


def _scales(grid: int, depth: int) -> dict:
    if depth != 1:
        raise ValueError(f"VAR predicts one code per position of each scale; d={depth} needs an RQ-Transformer (a "
                         "model=RQ-... size)")  # fmt: skip
    sides = {16: PATCH_NUMS_256, 32: PATCH_NUMS_512}.get(grid, range(1, grid + 1))
    return {"kind": "multiscale", "patch_nums": list(sides)}


def _all_blocks(model: nn.Module) -> list[nn.Module]:
    """Every module held in a ModuleList: one FSDP unit per transformer block."""
    return [block for child in model.modules() if isinstance(child, nn.ModuleList) for block in child]


def _var_block_parts(model: nn.Module) -> list[nn.Module]:
    """A VAR block's attention and feed-forward, one FSDP unit each. Not the whole block: VAR computes every
    block's AdaLN modulation up front from the class (`VAR.modulations`), outside the block's forward, where FSDP
    would not have gathered a sharded block's weights; those small linears stay with the root unit."""
    return [part for block in model.layers for part in (block.attention, block.feed_forward)]


@dataclass(frozen=True)
class Architecture:
    """One stage-2 family and everything that differs between families, in the manner of torchtitan's TrainSpec:
    how to build it (`config`, `model`, `sizes`, `prepare` with the tokenizer), which data fields besides the
    common ones (`ARConfig.DATA_FIELDS`) it reads from a code store (`store_fields`, given the store's manifest
    and its tokenizer's config), what a run may ask of it (`options`), its image loss (`loss`, see
    `vqar.ar.losses`) and its FSDP units. Upstream checkpoint names are mapped by the readers of `vqar.interop`.

    `options` names what a run may switch on: "captions" (text-to-image stores), "caption_loss" (a text head
    that predicts the caption, its loss weighted by `loss.txt_weight`), "soft_targets",
    "next_patch" (NPP training), "label_smoothing", and in sampling "speculative" (speculative Jacobi decoding,
    which drafts positions one after another). `bench_quantizer(grid, d)` gives the quantizer config fields of
    a random tokenizer whose codes the family models (`vqar bench sample`), `bench_depth` its d where none is
    given."""

    name: str
    config: type[ARConfig]
    model: type[ARModel]
    sizes: Mapping[str, Mapping[str, Any]]
    description: str
    store_fields: Callable[[Mapping[str, Any], Mapping[str, Any]], dict] = _no_store_fields
    prepare: Callable[[ARModel, Any], None] = _keep_nothing
    options: frozenset[str] = frozenset({"captions", "label_smoothing", "speculative"})
    loss: Callable = losses.cross_entropy
    fsdp_units: Callable[[nn.Module], list[nn.Module]] = _all_blocks
    bench_quantizer: Callable[[int, int], dict] = _one_code
    bench_depth: int = 1  # codes per position of the bench's tokenizer where `d` is not given

    def size_fields(self, size: str) -> dict:
        """The config fields a named size sets."""
        if size not in self.sizes:
            raise ValueError(f"unknown {self.name} size {size!r}; known: {', '.join(self.sizes)}")
        return dict(self.sizes[size])

    def build(self, cfg: ARConfig, tokenizer=None) -> ARModel:
        """The model of `cfg`, given what it needs of its tokenizer (an RQ-Transformer's code vectors, VAR's
        quantizer)."""
        model = self.model(cfg)
        self.prepare(model, tokenizer)
        return model

    def check_option(self, option: str, setting: str) -> None:
        """ValueError naming `setting` when this family does not take `option`."""
        if option not in self.options:
            takers = [a.name for a in ARCHITECTURES.values() if option in a.options]
            raise ValueError(f"{setting} applies to arch={'|'.join(takers) or 'none'}, not arch={self.name}")


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("gpt", GPTConfig, GPT, GPT_SIZES, "LlamaGen's GPT: one code per position",
                     store_fields=_grid_store_fields,
                     options=frozenset({"captions", "next_patch", "label_smoothing", "speculative"})),
        Architecture("rq", RQTransformerConfig, RQTransformer, RQ_SIZES, "RQ-Transformer: D codes per position",
                     store_fields=_rq_store_fields, prepare=_embed_with_codebook,
                     options=frozenset({"captions", "caption_loss", "soft_targets", "label_smoothing",
                                               "speculative"}),
                     loss=losses.soft_target_cross_entropy, bench_quantizer=_code_stack, bench_depth=4),
        Architecture("vim", VIMConfig, VIM, VIM_SIZES, "VIM: a GPT-2 style decoder over ViT-VQGAN codes",
                     store_fields=_grid_store_fields, options=frozenset({"label_smoothing", "speculative"})),
        Architecture("var", VARConfig, VAR, VAR_SIZES, "VAR: next-scale prediction over multi-scale codes",
                     store_fields=_scale_store_fields, prepare=_read_with_quantizer,
                     options=frozenset({"label_smoothing"}), loss=losses.per_scale_cross_entropy,
                     fsdp_units=_var_block_parts, bench_quantizer=_scales),
    )
}  # fmt: skip


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def find_size(size: str) -> Architecture:
    """The architecture that has the named size (`GPT-B`, `RQ-1.4B`, ...)."""
    for arch in ARCHITECTURES.values():
        if size in arch.sizes:
            return arch
    known = ", ".join(name for arch in ARCHITECTURES.values() for name in arch.sizes)
    raise ValueError(f"unknown model size {size!r}; known: {known}")
