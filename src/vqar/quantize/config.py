"""Configuration of a quantizer and the factory that builds it (the kinds are in `vqar.quantize.registry`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vqar.quantize.contract import Quantizer
from vqar.quantize.multiscale import VAR_PHI_SHARE
from vqar.quantize.registry import QUANTIZERS, quantizer_class


@dataclass
class QuantizerConfig:
    """One flat config for every kind; each kind reads the fields it needs and refuses the ones it cannot use.

    `kind`: "vq" (one code per position), "rq" (a stack of `depth` codes per position) or "multiscale" (VAR: token
    maps of side `patch_nums`, refined by `phi_share` Phi convolutions of weight `phi_ratio`)."""

    kind: str = "vq"
    codebook_size: int = 16384
    dim: int = 256
    depth: int = 1
    shared_codebook: bool = True
    lookup_dim: int | None = None
    l2_norm: bool = False
    beta: float = 0.25
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    ema: bool = True
    decay: float = 0.99
    eps: float = 1e-5
    kmeans_init: bool = False
    kmeans_iters: int = 10
    restart_dead: bool = True
    dead_threshold: float = 1.0
    patch_nums: list[int] = field(default_factory=list)
    phi_ratio: float = 0.5
    phi_share: int = VAR_PHI_SHARE

    def validate(self, latent_side: int | None = None) -> None:
        """ValueError for an unusable config; `latent_side` (the tokenizer's latent grid side) when known."""
        cls = quantizer_class(self.kind)
        if self.codebook_size < 2 or self.dim < 1 or self.depth < 1:
            raise ValueError(
                f"need codebook_size >= 2, dim >= 1 and depth >= 1, got {self.codebook_size}, {self.dim}, {self.depth}"
            )
        if self.lookup_dim is not None and self.lookup_dim < 0:  # else a traceback building the projection
            raise ValueError(f"lookup_dim must be positive (or null or 0: no factorized lookup), got {self.lookup_dim}")
        lookup = self.lookup_dim or self.dim
        if self.l2_norm and lookup < 2:  # trained without a word, and its usage read 2 of the codebook's codes
            what = "lookup_dim" if self.lookup_dim else "dim"
            raise ValueError(f"l2_norm=true puts each code on the unit sphere, which in {what}={lookup} holds two "
                             f"points (+1 and -1): 2 of the codebook's {self.codebook_size} codes could ever be used; "
                             f"give {what} >= 2, or l2_norm=false")  # fmt: skip
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative, got {self.beta}")
        if self.ema and not self.eps > 0:  # the EMA update divides by the counts plus eps: 0 or less gives NaN codes
            raise ValueError(f"eps (the EMA codebook's Laplace smoothing) must be positive, got {self.eps}")
        if self.ema and not 0.0 < self.decay < 1.0:  # else the codebook's own check, which names no setting
            raise ValueError(f"model.quantizer.decay (the EMA codebook's decay) must be in (0, 1), got {self.decay}")
        if not self.shared_codebook and not cls.codebook_per_depth:  # else saved, and ignored: one codebook
            raise ValueError(f"shared_codebook=false gives each depth of a residual stack (kind rq) a codebook of "
                             f"its own; a {self.kind} quantizer has one codebook: leave it out")  # fmt: skip
        cls.check_config(self, latent_side)

    def codebook_options(self) -> dict:
        """The `Codebook` keyword arguments of this config."""
        return dict(
            ema=self.ema,
            decay=self.decay,
            eps=self.eps,
            kmeans_init=self.kmeans_init,
            kmeans_iters=self.kmeans_iters,
            restart_dead=self.restart_dead,
            dead_threshold=self.dead_threshold,
        )


def build_quantizer(cfg: QuantizerConfig) -> Quantizer:
    cfg.validate()
    return QUANTIZERS[cfg.kind].from_config(cfg)
