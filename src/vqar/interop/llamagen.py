"""LlamaGen's checkpoint format ("Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation",
Sun et al., 2024), which Next Patch Prediction (arXiv 2412.15321) also uses for its GPTs.

Files carry weights only: the architecture comes from a preset name (`VQ-16`, `VQ-8`, `GPT-B` ... `GPT-3B`) or
from the upstream constructor fields (`ModelArgs`), given as a dict or a JSON file. VQ tokenizers are stored as
`{"model": ...}` (maybe with `"ema"`); GPTs as DDP `{"model": ...}` or as a raw (FSDP-consolidated) state dict.

The GPT's module names are LlamaGen's, as are vqar's, but for the condition (`cls_embedding` there,
`cond_embedding` here: `GPT_NAMES`). The VQ tokenizer's encoder/decoder are taming's with other names:
`conv_blocks.i.res.j` for `down.i.block.j`, `mid.0/1/2` for `mid.block_1/attn_1/block_2`, and the decoder's
levels counted from the lowest resolution.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch

from vqar.ar import GPT, GPT_SIZES, GPTConfig
from vqar.interop.state import (
    NoEMAWeights,
    StateDictAdapter,
    build_fitting,
    load_into,
    strip_wrapper_prefixes,
    tensors_only,
)
from vqar.quantize import QuantizerConfig
from vqar.tokenizers import Tokenizer, TokenizerConfig
from vqar.tokenizers.conv import ConvConfig

# Upstream VQ_models: the two released tokenizers (256px, 16384 codes of dimension 8, l2-normalised).
VQ_PRESETS: dict[str, dict] = {
    "VQ-16": {"encoder_ch_mult": [1, 1, 2, 2, 4], "decoder_ch_mult": [1, 1, 2, 2, 4]},
    "VQ-8": {"encoder_ch_mult": [1, 2, 2, 4], "decoder_ch_mult": [1, 2, 2, 4]},
}
VQ_DEFAULTS = {
    "codebook_size": 16384,
    "codebook_embed_dim": 8,
    "codebook_l2_norm": True,
    "commit_loss_beta": 0.25,
    "entropy_loss_ratio": 0.0,
    "z_channels": 256,
    "dropout_p": 0.0,
    "ch": 128,
    "num_res_blocks": 2,
    "image_size": 256,
    "in_channels": 3,
    "out_channels": 3,
    "norm_type": "group",
}
GPT_DEFAULTS = {
    "vocab_size": 16384,
    "block_size": 256,
    "num_classes": 1000,
    "cls_token_num": 1,
    "class_dropout_prob": 0.1,
    "model_type": "c2i",
    "n_kv_head": None,
    "multiple_of": 256,
    "ffn_dim_multiplier": None,
    "rope_base": 10000,
    "norm_eps": 1e-5,
    "initializer_range": 0.02,
    "token_dropout_p": 0.1,
    "attn_dropout_p": 0.0,
    "resid_dropout_p": 0.1,
    "ffn_dropout_p": 0.1,
}
# Fields of the upstream ModelArgs that do not change the computation of a loaded model.
IGNORED_FIELDS = {
    "codebook_show_usage",
    "caption_dim",
    "max_batch_size",
    "max_seq_len",
    "drop_path_rate",
    "resamp_with_conv",
    "downsample_factor",
}


class ConfigNeeded(ValueError):
    """A LlamaGen checkpoint (`what`: "VQ" or "GPT") was given without the architecture it does not record."""

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what


def read_config(config: str | dict | Path | None, presets: dict[str, dict], what: str) -> dict:
    """Upstream constructor fields from a preset name, a dict (optionally with "preset") or a JSON file."""
    if config is None:
        raise ConfigNeeded(
            f"a LlamaGen {what} checkpoint does not record its architecture: pass config= (--config) a preset name "
            f"({', '.join(presets)}), a dict of the upstream constructor fields, or a JSON file of them",
            what,
        )
    if isinstance(config, str) and config.lstrip().startswith("{"):
        try:
            config = json.loads(config)
        except ValueError as err:
            raise ValueError(f"the {what} config is not valid JSON: {err}") from None
    if isinstance(config, Path) or (isinstance(config, str) and config.endswith(".json")):
        path = Path(config)
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the {what} config {path}: {err}") from None
    if isinstance(config, str) and not presets:  # e.g. "[1,2]": nothing to look up
        raise ValueError(f"the {what} config is a dict of its fields or a JSON file of one (it has no presets), got "
                         f"{config!r}")  # fmt: skip
    if isinstance(config, str):
        config = {"preset": config}
    if not isinstance(config, dict):
        raise TypeError(f"config must be a preset name, a dict or a JSON path, got {type(config).__name__}")
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    preset = fields.pop("preset", None)
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"unknown {what} preset {preset!r}; known: {', '.join(presets)}")
        fields = {**presets[preset], **fields}
    return fields


def check_fields(fields: dict, known: dict, what: str) -> None:
    """ValueError naming a field `known` (name -> an example value) lacks, or one whose value is not of the
    example's kind (`"dim": "sixty"`, `"n_layer": 2.0`): the constructors would fail with a bare TypeError."""
    unknown = sorted(set(fields) - set(known) - IGNORED_FIELDS)
    if unknown:
        raise ValueError(f"unknown {what} config fields {unknown}; known: {', '.join(sorted(known))}")
    for name, value in fields.items():
        example = known.get(name)
        if example is None:  # no kind to compare with (a field whose null is a setting of its own)
            continue
        if not _same_kind(value, example):
            kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                    list: "a list", tuple: "a list"}.get(type(example), type(example).__name__)  # fmt: skip
            raise ValueError(f"{what} config field {name!r} takes {kind}, got {value!r}")


def _same_kind(value, example) -> bool:
    if isinstance(example, bool):
        return isinstance(value, bool)
    if isinstance(example, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(example, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(example, list | tuple):
        return isinstance(value, list | tuple) and all(_same_kind(item, example[0]) for item in value) if example \
            else isinstance(value, list | tuple)
    return isinstance(value, type(example))


# ---------------------------------------------------------------- VQ tokenizer
def vq_config(config: str | dict | Path | None) -> TokenizerConfig:
    fields = {**VQ_DEFAULTS, **read_config(config, VQ_PRESETS, "VQ")}
    check_fields(fields, {**VQ_DEFAULTS, **VQ_PRESETS["VQ-16"]}, "VQ")
    if list(fields["encoder_ch_mult"]) != list(fields["decoder_ch_mult"]):
        raise ValueError("vqar's conv tokenizer needs encoder_ch_mult == decoder_ch_mult")
    if fields["norm_type"] != "group":
        raise ValueError(f"norm_type {fields['norm_type']!r} is not supported (only 'group')")
    ch_mult = list(fields["encoder_ch_mult"])
    lowest = fields["image_size"] // 2 ** (len(ch_mult) - 1)
    conv = ConvConfig(
        in_channels=fields["in_channels"],
        out_channels=fields["out_channels"],
        resolution=fields["image_size"],
        ch=fields["ch"],
        ch_mult=ch_mult,
        num_res_blocks=fields["num_res_blocks"],
        attn_resolutions=[lowest],  # LlamaGen attends at the lowest level only (and in the middle block)
        z_channels=fields["z_channels"],
        dropout=fields["dropout_p"],
    )
    quantizer = QuantizerConfig(
        kind="vq",
        codebook_size=fields["codebook_size"],
        dim=fields["codebook_embed_dim"],
        l2_norm=bool(fields["codebook_l2_norm"]),
        beta=fields["commit_loss_beta"],
        entropy_weight=fields["entropy_loss_ratio"],
        ema=False,
        restart_dead=False,
    )
    return TokenizerConfig(conv=conv, quantizer=quantizer)


_MID = {"0": "block_1", "1": "attn_1", "2": "block_2"}


def convert_vq_state(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key == "quantize.codebook_used":
            continue  # a training-time usage counter
        new = key.replace("quantize.embedding.weight", "quantizer.codebook.weight")
        new = re.sub(r"^(encoder|decoder)\.mid\.(\d)\.", lambda m: f"{m[1]}.mid.{_MID[m[2]]}.", new)
        new = re.sub(r"^encoder\.conv_blocks\.(\d+)\.res\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.conv_blocks\.(\d+)\.", r"encoder.down.\1.", new)
        match = re.match(r"^decoder\.conv_blocks\.(\d+)\.(res|attn|upsample)\.(.*)$", new)
        if match:
            level = levels - 1 - int(match[1])
            part = "block" if match[2] == "res" else match[2]
            new = f"decoder.up.{level}.{part}.{match[3]}"
        out[new] = value
    return out


def build_vq(state: dict[str, torch.Tensor], config, source: str) -> Tokenizer:
    cfg = vq_config(config)
    model = Tokenizer(cfg)
    ours = convert_vq_state(state, len(cfg.conv.ch_mult))
    for key in ("quantizer.codebook.cluster_size_ema", "quantizer.codebook.initialized"):
        ours.setdefault(key, model.state_dict()[key])
    load_into(model, ours, source, file_state=state)
    return model.eval()


# ---------------------------------------------------------------- GPT
def gpt_config(config, state: dict[str, torch.Tensor] | None = None) -> GPTConfig:
    """The GPTConfig for upstream fields; vocabulary and class count, when not given, are read off the weights."""
    fields = read_config(config, GPT_SIZES, "GPT")
    if state is not None:  # unstated vocabulary and class count: read them off the weights
        fields.setdefault("vocab_size", state["tok_embeddings.weight"].shape[0])
        table = state.get("cls_embedding.embedding_table.weight")
        if table is not None:
            fields.setdefault("num_classes", table.shape[0] - 1)
    fields = {**GPT_DEFAULTS, **fields}
    check_fields(fields, {**GPT_DEFAULTS, "dim": 0, "n_layer": 0, "n_head": 0}, "GPT")
    if fields["model_type"] != "c2i":
        raise ValueError(f"model_type {fields['model_type']!r} is not supported yet (class-conditional 'c2i' only)")
    grid = math.isqrt(fields["block_size"])
    if grid * grid != fields["block_size"]:
        raise ValueError(f"block_size {fields['block_size']} is not a square number of codes")
    if fields["cls_token_num"] != 1:
        raise ValueError(f"cls_token_num {fields['cls_token_num']} is not supported (class-conditional GPTs use 1)")
    fields["rope_base"] = float(fields["rope_base"])
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    return GPTConfig(code_shape=[grid, grid], **{k: v for k, v in fields.items() if k in names})


GPT_NAMES = StateDictAdapter([("cls_embedding.", "cond_embedding.")])


def build_gpt(state: dict[str, torch.Tensor], config, source: str) -> GPT:
    cfg = gpt_config(config, state)
    ignore = ("freqs_cis", "causal_mask", "k_cache", "v_cache")
    model = build_fitting(lambda: GPT(cfg), GPT_NAMES.from_upstream(state), source, ignore, file_state=state,
                          names=GPT_NAMES)  # fmt: skip
    return model.eval()


# ---------------------------------------------------------------- containers
def checkpoint_state(checkpoint, path: Path, ema: bool) -> dict[str, torch.Tensor]:
    """The state dict in a LlamaGen checkpoint: `ema`, `model` or `state_dict` entries, or a raw state dict."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} does not hold a state dict")
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        if ema:
            raise NoEMAWeights(f"{path} is a raw (FSDP-consolidated) state dict with no separate EMA weights")
        return strip_wrapper_prefixes(checkpoint)
    key = "ema" if ema else next((k for k in ("model", "state_dict") if k in checkpoint), None)
    if key is None or key not in checkpoint:
        error = NoEMAWeights if ema else ValueError
        raise error(f"{path} has no {'ema' if ema else 'model'} weights; it holds {sorted(checkpoint)}")
    return strip_wrapper_prefixes(tensors_only(checkpoint[key], f"{path}[{key!r}]"))


def looks_like_vq(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("encoder.", "quantize.")) for k in state)


def looks_like_gpt(state: dict[str, torch.Tensor]) -> bool:
    return "tok_embeddings.weight" in state
