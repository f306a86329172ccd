"""The official VAR transformer checkpoints ("Visual Autoregressive Modeling: Scalable Image Generation via
Next-Scale Prediction", Tian et al., NeurIPS 2024): `var_d16.pth` ... `var_d36.pth` and files of the same layout.

They are plain state dicts (no wrapper, no optimizer; read with the safe loader) that do not record their
configuration, so it is read off the weights: width from `pos_1LC`, depth from the block count, heads from the
per-head attention scale (`attn_l2_norm`) or the official rule (heads = depth), shared AdaLN from `shared_ada_lin`,
classes from `class_emb` (its last row is the null class), the scales from `lvl_1L` (each scale's token count).
The buffers `lvl_1L`, `attn_bias_for_masking` and `blocks.{i}.attn.zero_k_bias` are accepted and rebuilt by vqar.
The VQVAE the transformer needs (its codebook and Phi convolutions) is a separate file (`load_var_vqvae`).
"""

from __future__ import annotations

import math

import torch

from vqar.ar.var import PATCH_NUMS_256, PATCH_NUMS_512, VAR, VARConfig
from vqar.interop.state import (
    SELF_DESCRIBED_HINT,
    StateDictAdapter,
    build_fitting,
    read_state,
)

# Official name prefix -> vqar's (the first matching rule renames a key).
VAR_NAMES = StateDictAdapter([
    ("class_emb.", "cond_embedding.embedding_table."),
    ("pos_1LC", "pos_emb"),
    ("lvl_embed.", "level_emb."),
    ("word_embed.", "tok_embeddings."),
    ("shared_ada_lin.1.", "shared_adaln."),
    ("blocks.{i}.attn.mat_qkv.", "layers.{i}.attention.wqkv."),
    ("blocks.{i}.attn.scale_mul_1H11", "layers.{i}.attention.log_scale"),
    ("blocks.{i}.attn.proj.", "layers.{i}.attention.wo."),
    ("blocks.{i}.attn.", "layers.{i}.attention."),  # q_bias, v_bias
    ("blocks.{i}.ffn.fc1.", "layers.{i}.feed_forward.w1."),
    ("blocks.{i}.ffn.fc2.", "layers.{i}.feed_forward.w2."),
    ("blocks.{i}.ada_lin.1.", "layers.{i}.adaln."),
    ("blocks.{i}.ada_gss", "layers.{i}.adaln_offset"),
    ("head_nm.ada_lin.1.", "norm.adaln."),
    ("head.", "output."),
])  # fmt: skip
# Buffers of the official model that vqar derives from the configuration.
VAR_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")
REQUIRED_KEYS = ("pos_1LC", "pos_start", "lvl_embed.weight", "word_embed.weight", "class_emb.weight", "head.weight")


def is_var_transformer_state(state) -> bool:
    """Whether `state` (a dict of tensors) looks like an official VAR transformer's."""
    return isinstance(state, dict) and all(key in state for key in REQUIRED_KEYS)


def _patch_nums(state: dict[str, torch.Tensor], length: int, scales: int, source: str) -> list[int]:
    levels = state.get("lvl_1L")
    if levels is not None:
        counts = torch.bincount(levels.reshape(-1).long(), minlength=scales).tolist()
        sides = [math.isqrt(c) for c in counts]
        if len(counts) != scales or any(s * s != c for s, c in zip(sides, counts, strict=True)):
            raise ValueError(f"{source}: lvl_1L does not hold {scales} square scales (token counts {counts})")
        return sides
    for known in (PATCH_NUMS_256, PATCH_NUMS_512):  # a file without the buffer: the released scale lists
        if len(known) == scales and sum(p * p for p in known) == length:
            return list(known)
    raise ValueError(f"{source}: no lvl_1L buffer and {scales} scales of {length} tokens match no released "
                     "patch_nums; pass patch_nums=")  # fmt: skip


def var_transformer_config(state: dict[str, torch.Tensor], source: str = "the state dict",
                           **overrides) -> VARConfig:  # fmt: skip
    """The VARConfig of an official state dict; `overrides` set VARConfig fields (checked against the weights
    when the file records them)."""
    if not is_var_transformer_state(state):
        missing = [key for key in REQUIRED_KEYS if key not in state]
        raise ValueError(f"{source} is not a VAR transformer state dict (missing {missing[:3]})")
    _, length, dim = state["pos_1LC"].shape
    scales = state["lvl_embed.weight"].shape[0]
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    scale_mul = state.get("blocks.0.attn.scale_mul_1H11")
    fields = {
        "vocab_size": state["head.weight"].shape[0],
        "num_classes": state["class_emb.weight"].shape[0] - 1,  # the last row is the null class
        "class_dropout_prob": 0.1,  # the official cond_drop_rate, which gives it that null row
        "code_dim": state["word_embed.weight"].shape[1],
        "dim": dim,
        "n_layer": depth,
        "n_head": scale_mul.shape[1] if scale_mul is not None else depth,  # official: heads = depth
        "mlp_ratio": state["blocks.0.ffn.fc1.weight"].shape[0] / dim if depth else 4.0,
        "shared_adaln": "shared_ada_lin.1.weight" in state,
        "attn_l2_norm": scale_mul is not None,
        "drop_path_rate": 0.1 * depth / 24,
    }
    if "patch_nums" not in overrides:
        fields["patch_nums"] = _patch_nums(state, length, scales, source)
    for key, value in overrides.items():
        if key in fields and key not in ("class_dropout_prob", "drop_path_rate", "n_head") and value != fields[key]:
            raise ValueError(f"{source}: {key}={value!r} contradicts the weights ({key}={fields[key]!r})")
        fields[key] = value
    fields["code_shape"] = [sum(p * p for p in fields["patch_nums"])]
    return VARConfig(**fields)


def load_var_transformer(path_or_state, tokenizer=None, num_classes: int | None = None, *, source: str | None = None,
                         **overrides) -> VAR:  # fmt: skip
    """An official VAR transformer (`var_d16.pth` ...) as a vqar `VAR` in eval mode.

    Args:
        path_or_state: the `.pth` file (read with `torch.load(weights_only=True)`) or its state dict.
        tokenizer: the VAR tokenizer (`load_var_vqvae`) to attach; needed to train or sample.
        num_classes: checked against the class embedding when given (the file records it).
        source: how errors name the checkpoint.
        overrides: VARConfig fields, e.g. patch_nums for a file without the `lvl_1L` buffer.
    """
    state, source = read_state(path_or_state, source, "VAR")
    if not is_var_transformer_state(state):
        if any(key.startswith(("encoder.", "decoder.", "quantize.")) for key in state):
            raise ValueError(f"{source} is a VAR VQVAE (tokenizer), not the transformer: load it with load_var_vqvae")
        raise ValueError(f"{source} is not a VAR transformer checkpoint (no pos_1LC / lvl_embed / word_embed / "
                         f"class_emb weights); first keys: {list(state)[:5]}")  # fmt: skip
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    cfg = var_transformer_config(state, source, **overrides)
    ours = VAR_NAMES.from_upstream(state)
    model = build_fitting(lambda: VAR(cfg), ours, source, ignore=VAR_BUFFERS, hint=SELF_DESCRIBED_HINT,
                          file_state=state, names=VAR_NAMES)  # fmt: skip
    if tokenizer is not None:
        model.attach(tokenizer)
    return model.eval()


def var_transformer_to_upstream(model: VAR) -> dict[str, torch.Tensor]:
    """`model`'s weights under the official names, with the official buffers, loadable by the official VAR with
    `load_state_dict(strict=True)`."""
    state = VAR_NAMES.to_upstream({k: v.detach() for k, v in model.state_dict().items()})
    levels = model.level_ids[None].clone()
    state["lvl_1L"] = levels
    mask = torch.zeros(model.block_mask.shape).masked_fill_(~model.block_mask.cpu(), float("-inf"))
    state["attn_bias_for_masking"] = mask[None, None]
    for i in range(model.cfg.n_layer):
        state[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(model.cfg.dim)
    return state
