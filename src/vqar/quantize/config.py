"""Configuration of a quantizer and the factory that builds it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vqar.quantize.residual import ResidualQuantizer
from vqar.quantize.vector import VectorQuantizer

QUANTIZER_KINDS = ("vq", "rq")


@dataclass
class QuantizerConfig:
    """`kind` "vq" (one code per position) or "rq" (a stack of `depth` codes per position)."""

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

    def validate(self) -> None:
        if self.kind not in QUANTIZER_KINDS:
            raise ValueError(f"quantizer kind must be one of {QUANTIZER_KINDS}, got {self.kind!r}")
        if self.kind == "vq" and self.depth != 1:
            raise ValueError(f"a 'vq' quantizer has depth 1 (got depth={self.depth}); use kind='rq' for depth > 1")
        if self.kind == "rq" and (self.lookup_dim not in (None, self.dim) or self.l2_norm):
            raise ValueError("lookup_dim and l2_norm apply to 'vq' quantizers only")
        if self.codebook_size < 2 or self.dim < 1 or self.depth < 1:
            raise ValueError(
                f"need codebook_size >= 2, dim >= 1 and depth >= 1, got {self.codebook_size}, {self.dim}, {self.depth}"
            )
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative, got {self.beta}")
        if self.entropy_weight and (self.kind != "vq" or self.entropy_temperature <= 0):
            raise ValueError("entropy_weight applies to 'vq' quantizers and needs entropy_temperature > 0")


def build_quantizer(cfg: QuantizerConfig) -> nn.Module:
    cfg.validate()
    common = dict(
        beta=cfg.beta,
        ema=cfg.ema,
        decay=cfg.decay,
        eps=cfg.eps,
        kmeans_init=cfg.kmeans_init,
        kmeans_iters=cfg.kmeans_iters,
        restart_dead=cfg.restart_dead,
        dead_threshold=cfg.dead_threshold,
    )
    if cfg.kind == "rq":
        return ResidualQuantizer(cfg.codebook_size, cfg.dim, cfg.depth, shared_codebook=cfg.shared_codebook, **common)
    return VectorQuantizer(
        cfg.codebook_size,
        cfg.dim,
        lookup_dim=cfg.lookup_dim,
        l2_norm=cfg.l2_norm,
        entropy_weight=cfg.entropy_weight,
        entropy_temperature=cfg.entropy_temperature,
        **common,
    )
