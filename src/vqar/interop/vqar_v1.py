"""Model folders written by vqar 0.1 (bundle format 1), before the AR models shared one vocabulary of names.

Tokenizer folders did not change. AR folders are read by renaming their config fields and weights: the GPT's
`grid` and `cls_embedding`, the RQ-Transformer's release-style names (see `rq_release.RQ_TRANSFORMER_NAMES`) and
VIM's `tok_emb` / `blocks` / `head`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from vqar.bundle import attach_companions, build, read_config, read_weights
from vqar.interop.rq_release import RQ_TRANSFORMER_NAMES, block_rules
from vqar.interop.state import StateDictAdapter, build_fitting

KINDS = {"gpt": "gpt", "rq_transformer": "rq", "vim": "vim"}
FIELDS = {
    "grid": "code_shape",
    "embed_dim": "dim",
    "body_layers": "n_layer",
    "head_layers": "n_depth_layer",
    "embd_pdrop": "token_dropout_p",
    "resid_pdrop": "resid_dropout_p",
    "attn_pdrop": "attn_dropout_p",
}
DROPPED_FIELDS = ("cls_token_num",)  # always 1
NAMES = {
    "gpt": StateDictAdapter([("cls_embedding.", "cond_embedding.")]),
    "rq": StateDictAdapter([("cond_emb.embedding_table.", "cond_embedding.embedding_table."),
                            *RQ_TRANSFORMER_NAMES.rule_pairs()]),  # fmt: skip
    "vim": StateDictAdapter([("tok_emb.", "tok_embeddings."), ("cls_embedding.", "cond_embedding."),
                             *block_rules("blocks", "layers"), ("head.", "output.")]),  # fmt: skip
}


def is_v1_ar_folder(folder: Path) -> bool:
    try:
        kind, _, format_version = read_config(folder)
    except (OSError, ValueError):
        return False
    return format_version == 1 and kind in KINDS


def load_v1(folder: Path) -> nn.Module:
    kind, fields, _ = read_config(folder)
    arch = KINDS[kind]
    fields = {FIELDS.get(k, k): v for k, v in fields.items() if k not in DROPPED_FIELDS}
    file_state = read_weights(folder)
    model = build_fitting(lambda: build(arch, fields, folder), NAMES[arch].from_upstream(file_state), str(folder),
                          file_state=file_state, names=NAMES[arch])  # fmt: skip
    attach_companions(model, folder)
    return model.eval()
