"""The stage-1 quantizer contract: what a `Tokenizer`, its training task and the code store ask of a quantizer.

A quantizer turns channels-last latents (B, h, w, dim) into integer codes and back. Codes come in one of three
layouts (`layout`):

* "grid": one code per latent position, codes (B, h, w) (VQ-VAE, VQGAN, ViT-VQGAN, LlamaGen);
* "stack": D codes per position, coarse to fine, codes (B, h, w, D) (RQ-VAE);
* "scales": K token maps of growing side p_0 < ... < p_{K-1}, flattened scale by scale into (B, L) with
  L = sum p_k^2 (VAR's multi-scale residual quantization).

`levels` is how many coarse-to-fine prefixes the codes have (1, D or K): `embed(codes, depth=k)` gives the latent of
the first k of them, and usage statistics are reported per level. Adding a quantizer = its module (a subclass of
`Quantizer`) + one line in `vqar.quantize.registry.QUANTIZERS`.
"""

from __future__ import annotations

import contextlib
import operator
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from vqar.configs import changed_settings
from vqar.quantize.output import QuantizerOutput

if TYPE_CHECKING:
    from vqar.quantize.config import QuantizerConfig

LAYOUTS = ("grid", "stack", "scales")


class Quantizer(nn.Module):
    """Base class of the stage-1 quantizers. Subclasses set the class attributes and implement the methods below.

    Attributes:
        layout: "grid" | "stack" | "scales" (module docstring).
        code_axes: names of the per-sample code axes, for messages: ("h", "w"), ("h", "w", "D"), ("L",).
        level_prefix: prefix of the per-level metrics (`usage_d0`, `usage_s3`, ...).
        codebook_per_depth: whether each depth may have a codebook of its own (`shared_codebook=false`).
        codebook_size: number of codes K of each codebook.
        dim: latent dimension of the input and output.
        depth: codes per latent position (1, or D for a stack).
    """

    layout: ClassVar[str]
    code_axes: ClassVar[tuple[str, ...]]
    level_prefix: ClassVar[str] = "d"
    codebook_per_depth: ClassVar[bool] = False  # whether `shared_codebook=false` can give each depth its own
    codebook_size: int
    dim: int
    depth: int

    # ---------------------------------------------------------------- configuration
    @classmethod
    def from_config(cls, cfg: QuantizerConfig) -> Quantizer:
        """The quantizer a validated `QuantizerConfig` describes."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: QuantizerConfig, latent_side: int | None = None) -> None:
        """ValueError for fields this kind does not take or values it cannot use; `latent_side` is the side of the
        latent grid the tokenizer gives it, when known."""

    # ---------------------------------------------------------------- description
    @property
    def levels(self) -> int:
        """Coarse-to-fine prefixes of the codes (1 for a grid)."""
        return 1

    def code_shape(self, latent_side: int) -> tuple[int, ...]:
        """Per-sample code shape for a square latent grid of side `latent_side`."""
        raise NotImplementedError

    def level_codes(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """The codes (B, *code_shape) split by level, each flattened: what per-level usage is counted over."""
        return [codes.reshape(-1)]

    def code_vectors(self) -> torch.Tensor:
        """The code vectors (books, K, dim) that codes stand for (one book unless depths have their own)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- computation
    def forward(self, z: torch.Tensor) -> QuantizerOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def embed(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Channels-last latents (B, h, w, dim) of codes (B, *code_shape), from the first `depth` levels (all by
        default)."""
        raise NotImplementedError

    def check_depth(self, depth: int | None) -> int:
        """`depth` (None = all levels) validated against `levels`."""
        if depth is None:
            return self.levels
        depth = _integer_depth(depth, self.levels)
        if self.levels == 1 and depth != 1:
            raise ValueError(f"depth={depth} only applies to residual (stacked or multi-scale) codes; these have "
                             "one level")  # fmt: skip
        if not 1 <= depth <= self.levels:
            raise ValueError(f"depth must be in [1, {self.levels}], got {depth}")
        return depth


def in_float32(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` computed in float32 whatever dtype the model was cast to. Quantizers run in float32 (distances in
    bf16 pick wrong codes), so a layer of theirs cast with the model (`.to(torch.bfloat16)`, `vqar sample
    --precision bf16` on a GPU) would meet float32 inputs: its weights are used in float32 instead."""
    x = x.float()
    if all(param.dtype == torch.float32 for param in layer.parameters()):  # the usual case: no copies
        return layer(x)
    return torch.func.functional_call(layer, {name: param.float() for name, param in layer.named_parameters()}, (x,))


def _integer_depth(depth, levels: int) -> int:
    """`depth` as a Python int; TypeError for anything that is not an integer. A float slices nothing (torch's
    "slice indices must be integers" from deep in embed) and a bool would be read as depth 0 or 1 without a word."""
    whole = None
    boolean = isinstance(depth, bool) or (isinstance(depth, torch.Tensor) and depth.dtype == torch.bool)
    if not boolean and not (isinstance(depth, torch.Tensor) and depth.dim()):
        with contextlib.suppress(TypeError):
            whole = operator.index(depth)  # ints, NumPy integers and 0-d integer tensors
    if whole is None:
        raise TypeError(f"depth must be an integer in [1, {levels}] (or None for every level), got {depth!r} "
                        f"({type(depth).__name__})")  # fmt: skip
    return whole


def refuse_scales(cfg, kind: str) -> None:
    """ValueError for the scale settings (patch_nums, and the Phi convolutions' phi_ratio and phi_share) on a
    quantizer without scales: left over from a VAR preset whose kind was changed, or given for it, they would
    otherwise be saved in run.yaml and ignored without a word."""
    if cfg.patch_nums:
        raise ValueError(f"patch_nums {list(cfg.patch_nums)} apply to 'multiscale' quantizers only, not {kind!r}: "
                         "set model.quantizer.patch_nums=[] (or keep kind=multiscale)")  # fmt: skip
    for name, value in changed_settings(cfg, ("phi_ratio", "phi_share")).items():
        raise ValueError(f"{name}={value} applies to 'multiscale' quantizers only (the Phi convolutions between their "
                         f"scales), not {kind!r}: leave model.quantizer.{name} out")  # fmt: skip
