"""The official VAR VQVAE checkpoints ("Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction", Tian et al., NeurIPS 2024): `vae_ch160v4096z32.pth` and files of the same layout.

They are plain state dicts (no wrapper, no optimizer; read with the safe loader) that do not record their
configuration. The encoder-decoder is taming's, as is vqar's conv backbone (channel multipliers (1, 1, 2, 2, 4),
attention at the deepest level and in the middle, 3x3 `quant_conv` / `post_quant_conv`), so the VQVAE is a vqar
`Tokenizer` with a `MultiScaleQuantizer`. Read off the weights: the codebook (V, Cvae), the widths (`ch`, the
multipliers), the blocks per level, attention, the Phi convolutions and how they are shared. Not recorded, given
as arguments with the release's values as defaults: the scales (`patch_nums`), the Phi weight (`quant_resi`) and
beta. Names differ in three places (`VQVAE_NAMES`): the attention's fused `qkv` (split into q, k, v), the
codebook (`quantize.embedding`) and the Phi convolutions, whose key layout depends on `share_quant_resi`
(0 -> `quantize.quant_resi.{j}`, 1 -> `quantize.quant_resi.qresi`, n >= 2 -> `quantize.quant_resi.qresi_ls.{j}`).
The usage statistic `quantize.ema_vocab_hit_SV` (per-scale code hit EMA, any number of scales) is accepted and
dropped. The official codebook learns by gradient, and so does the loaded one (no restarts); change
`quantizer.ema` / `restart_dead` in its config to fine-tune otherwise.

The transformer checkpoints (`var_d16.pth` ...) are read by `vqar.interop.var_transformer`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from vqar.interop.state import (
    SELF_DESCRIBED_HINT,
    StateDictAdapter,
    build_fitting,
    read_state,
)
from vqar.quantize import QuantizerConfig
from vqar.quantize.multiscale import PATCH_NUMS_256
from vqar.tokenizers import Tokenizer, TokenizerConfig
from vqar.tokenizers.conv import ConvConfig

# The release's values of what the files do not record (VAR's `build_vae_var` / VQVAE defaults).
QUANT_RESI, BETA = 0.5, 0.25
USAGE_BUFFER = "quantize.ema_vocab_hit_SV"
_REQUIRED = ("quantize.embedding.weight", "encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight")
_QKV = re.compile(r"^(.*\.attn(?:_1|\.\d+))\.qkv\.(weight|bias)$")
_PHI_LAYOUTS = {  # official Phi prefix by how the convolutions are shared
    "ls": "quantize.quant_resi.qresi_ls.{i}.",
    "one": "quantize.quant_resi.qresi.",
    "each": "quantize.quant_resi.{i}.",
}


def is_var_vqvae_state(state) -> bool:
    """Whether `state` (a loaded checkpoint) looks like an official VAR VQVAE's: a flat dict with taming's encoder
    names, a `quantize.embedding` codebook and VAR's quantizer buffers (usage EMA or Phi convolutions)."""
    if not isinstance(state, dict) or not all(key in state for key in _REQUIRED):
        return False
    return any(isinstance(key, str) and key.startswith(("quantize.quant_resi.", USAGE_BUFFER)) for key in state)


def vqvae_names(phi_layout: str | None) -> StateDictAdapter:
    """The official -> vqar renaming for a file whose Phi convolutions are laid out as `phi_layout` ("ls", "one",
    "each" or None for none); the fused attention `qkv` is split separately (`from_upstream`)."""
    rules = [("quantize.embedding.", "quantizer.codebook.")]
    if phi_layout == "one":
        rules.append((_PHI_LAYOUTS["one"], "quantizer.phis.0."))
    elif phi_layout is not None:
        rules.append((_PHI_LAYOUTS[phi_layout], "quantizer.phis.{i}."))
    return StateDictAdapter(rules)


def phi_layout(state: dict[str, torch.Tensor]) -> tuple[str | None, int]:
    """(layout, number of Phi convolutions) of an official state dict."""
    for layout in ("ls", "one", "each"):
        pattern = re.compile(re.escape(_PHI_LAYOUTS[layout]).replace(re.escape("{i}"), r"(\d+)") + "weight$")
        found = [m for m in map(pattern.match, state) if m]
        if found:
            return layout, 1 if layout == "one" else 1 + max(int(m[1]) for m in found)
    return None, 0


def from_upstream(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official VQVAE state dict under vqar's names (without the usage EMA)."""
    layout, _ = phi_layout(state)
    out = {}
    for key, value in vqvae_names(layout).from_upstream(state).items():
        if key == USAGE_BUFFER:
            continue
        match = _QKV.match(key)
        if match:
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{match[1]}.{name}.{match[2]}"] = part.clone()
        else:
            out[key] = value
    return out


def to_upstream(tokenizer: Tokenizer, phi_layout_name: str = "ls") -> dict[str, torch.Tensor]:
    """`tokenizer`'s weights under the official names, loadable by the official VQVAE with `strict=True` (the
    usage EMA is written as zeros, which the official model starts from)."""
    quantizer = tokenizer.quantizer
    state = {k: v.detach() for k, v in tokenizer.state_dict().items()
             if not k.startswith(("quantizer.codebook.cluster_size_ema", "quantizer.codebook.initialized",
                                  "quantizer.codebook.embed_ema"))}  # fmt: skip
    for key in [k for k in state if re.search(r"\.attn(?:_1|\.\d+)\.q\.(weight|bias)$", k)]:
        stem, kind = key.rsplit(".q.", 1)
        state[f"{stem}.qkv.{kind}"] = torch.cat([state.pop(f"{stem}.{n}.{kind}") for n in "qkv"])
    layout = phi_layout_name if len(quantizer.phis) > 1 else ("one" if len(quantizer.phis) else None)
    state = vqvae_names(layout).to_upstream(state)
    state[USAGE_BUFFER] = torch.zeros(quantizer.num_scales, quantizer.codebook_size)
    return state


def var_vqvae_config(state: dict[str, torch.Tensor], patch_nums: Sequence[int] | None = None, *,
                     phi_ratio: float = QUANT_RESI, beta: float = BETA,
                     source: str = "the state dict") -> TokenizerConfig:  # fmt: skip
    """The vqar TokenizerConfig of an official VQVAE state dict (official names); see the module docstring."""
    if not is_var_vqvae_state(state):
        raise ValueError(_not_vqvae(state, source))
    if patch_nums is None:
        _check_release_scales_fit(state, source)
    patch_nums = list(PATCH_NUMS_256 if patch_nums is None else patch_nums)
    codebook_size, dim = state["quantize.embedding.weight"].shape
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(m[1]) for m in map(re.compile(r"^encoder\.down\.(\d+)\.").match, state) if m)
    ch_mult = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)]
    blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
    deepest_attn = any(k.startswith(f"encoder.down.{levels - 1}.attn.") for k in state)
    if "encoder.mid.attn_1.qkv.weight" not in state:
        raise ValueError(f"{source}: a VQVAE without middle attention (using_mid_sa=False) is not supported")
    downsample = 2 ** (levels - 1)
    conv = ConvConfig(
        in_channels=state["encoder.conv_in.weight"].shape[1],
        out_channels=state["decoder.conv_out.weight"].shape[0],
        resolution=downsample * patch_nums[-1],
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=blocks,
        attn_resolutions=[patch_nums[-1]] if deepest_attn else [],
        z_channels=state["encoder.conv_out.weight"].shape[0],
        dropout=0.0,
        norm_groups=32,
    )
    _, phis = phi_layout(state)
    quantizer = QuantizerConfig(
        kind="multiscale",
        codebook_size=codebook_size,
        dim=dim,
        beta=beta,
        ema=False,  # the official codebook learns by gradient
        restart_dead=False,
        patch_nums=patch_nums,
        phi_ratio=abs(phi_ratio) if phis else 0.0,
        phi_share=phis,
    )
    kernel = state["quant_conv.weight"].shape[-1]
    cfg = TokenizerConfig(arch="conv", conv=conv, quantizer=quantizer, quant_conv_kernel=kernel)
    try:
        cfg.validate()
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return cfg


def load_var_vqvae(path_or_state, patch_nums: Sequence[int] | None = None, *, phi_ratio: float = QUANT_RESI,
                   beta: float = BETA, source: str | None = None) -> Tokenizer:  # fmt: skip
    """An official VAR VQVAE (`vae_ch160v4096z32.pth` ...) as a vqar `Tokenizer` in eval mode.

    Args:
        path_or_state: the `.pth` file (read with `torch.load(weights_only=True)`) or its state dict.
        patch_nums: the scales (default: the 256px release's 1, 2, 3, 4, 5, 6, 8, 10, 13, 16); the built image
            size is 16 x the last.
        phi_ratio: the Phi weight rho (the official `quant_resi`, 0.5 in the release).
        beta: the commitment weight (0.25 in the release).
        source: how errors name the checkpoint.
    """
    state, source = read_state(path_or_state, source, "VAR VQVAE")
    if not is_var_vqvae_state(state):
        raise ValueError(_not_vqvae(state, source))
    cfg = var_vqvae_config(state, patch_nums, phi_ratio=phi_ratio, beta=beta, source=source)
    ours, names = from_upstream(state), vqvae_names(phi_layout(state)[0])
    # Training statistics of vqar's codebook that the official file has no counterpart of.
    ours["quantizer.codebook.cluster_size_ema"] = torch.zeros(cfg.quantizer.codebook_size)
    ours["quantizer.codebook.initialized"] = torch.tensor(True)
    return build_fitting(lambda: Tokenizer(cfg), ours, source, hint=SELF_DESCRIBED_HINT, file_state=state,
                         names=names).eval()  # fmt: skip


def _check_release_scales_fit(state: dict[str, torch.Tensor], source: str) -> None:
    """ValueError when a VQVAE read at the release's scales (none given) was trained at another number of them:
    the file records no scales, but its usage statistic keeps one row per scale, and read at the release's ten a
    VQVAE of other scales builds without a word and codes at scales no transformer of it knows."""
    usage = state.get(USAGE_BUFFER)
    if isinstance(usage, torch.Tensor) and usage.dim() == 2 and usage.shape[0] != len(PATCH_NUMS_256):
        release = ", ".join(map(str, PATCH_NUMS_256))
        raise ValueError(f"{source} was trained at {usage.shape[0]} scales (its {USAGE_BUFFER} has a row per scale), "
                         f"not at the release's {len(PATCH_NUMS_256)} ({release}) it would be read at: give its scales "
                         f"as config patch_nums (`--config '{{\"patch_nums\": [1, 2, ...]}}'`), or load it beside the "
                         "VAR transformer it serves, which knows them")  # fmt: skip


def _not_vqvae(state: dict, source: str) -> str:
    keys = list(state)[:4] if isinstance(state, dict) else type(state).__name__
    if isinstance(state, dict) and "pos_1LC" in state and "word_embed.weight" in state:
        return f"{source} is a VAR transformer, not its VQVAE: load it with load_var_transformer"
    missing = [k for k in _REQUIRED if not isinstance(state, dict) or k not in state][:2]
    what = f"missing {missing}" if missing else "no quantize.quant_resi / ema_vocab_hit_SV entries"
    return f"{source} is not a VAR VQVAE state dict ({what}; first keys: {keys})"
