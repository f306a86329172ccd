"""The stage-1 quantizers by config `kind`: adding one is its module (a `vqar.quantize.contract.Quantizer`) plus
one line here. Each class builds itself from a `QuantizerConfig` (`from_config`) and checks the fields of its
kind (`check_config`)."""

from __future__ import annotations

from vqar.quantize.contract import Quantizer
from vqar.quantize.multiscale import MultiScaleQuantizer
from vqar.quantize.residual import ResidualQuantizer
from vqar.quantize.vector import VectorQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {
    "vq": VectorQuantizer,  # one code per position (VQ-VAE / VQGAN / ViT-VQGAN / LlamaGen)
    "rq": ResidualQuantizer,  # a stack of D codes per position (RQ-VAE)
    "multiscale": MultiScaleQuantizer,  # K token maps of growing side (VAR)
}


def quantizer_class(kind: str) -> type[Quantizer]:
    if kind not in QUANTIZERS:
        raise ValueError(f"quantizer kind must be one of {tuple(QUANTIZERS)}, got {kind!r}")
    return QUANTIZERS[kind]
