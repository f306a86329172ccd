"""Named model sizes (DiT's `DiT_models` idea): the architecture fields a size fixes; data-dependent fields
(vocabulary, code grid, classes) come from the code store or the caller.

Parameter counts of the paper sizes (ImageNet: K=16384, 1000 classes):
GPT-B 111M, GPT-L 343M, GPT-XL 775M, GPT-XXL 1.4B, GPT-3B 3.1B (LlamaGen, 16x16 codes);
RQ-480M, RQ-821M, RQ-1.4B, RQ-3.8B (RQ-Transformer, 8x8x4 codes);
VIM-Base 650M, VIM-Large 1.7B (VIM, 8192 codes on a 32x32 grid).
"""

from __future__ import annotations

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
    "RQ-480M": {"embed_dim": 1536, "n_head": 24, "body_layers": 12, "head_layers": 4},
    "RQ-821M": {"embed_dim": 1536, "n_head": 24, "body_layers": 24, "head_layers": 4},
    "RQ-1.4B": {"embed_dim": 1536, "n_head": 24, "body_layers": 42, "head_layers": 6},
    "RQ-3.8B": {"embed_dim": 2560, "n_head": 40, "body_layers": 42, "head_layers": 6},
    # CPU-sized
    "RQ-S": {"embed_dim": 256, "n_head": 8, "body_layers": 6, "head_layers": 2},
    "RQ-XS": {"embed_dim": 128, "n_head": 4, "body_layers": 4, "head_layers": 2},
}


VIM_SIZES: dict[str, dict] = {
    "VIM-Base": {"embed_dim": 1536, "n_head": 16, "n_layer": 24},
    "VIM-Large": {"embed_dim": 2048, "n_head": 32, "n_layer": 36},
    # CPU-sized
    "VIM-S": {"embed_dim": 256, "n_head": 8, "n_layer": 6},
    "VIM-XS": {"embed_dim": 128, "n_head": 4, "n_layer": 4},
}


def size_fields(arch: str, size: str) -> dict:
    table = {"gpt": GPT_SIZES, "rq": RQ_SIZES, "vim": VIM_SIZES}[arch]
    if size not in table:
        raise ValueError(f"unknown {arch} size {size!r}; known: {', '.join(table)}")
    return dict(table[size])
