"""Quantizers: one module per technique."""

from vqar.quantize.codebook import Codebook, code_statistics, kmeans
from vqar.quantize.config import QuantizerConfig, build_quantizer
from vqar.quantize.output import QuantizerOutput
from vqar.quantize.residual import ResidualQuantizer
from vqar.quantize.vector import VectorQuantizer

__all__ = [
    "Codebook",
    "QuantizerConfig",
    "QuantizerOutput",
    "ResidualQuantizer",
    "VectorQuantizer",
    "build_quantizer",
    "code_statistics",
    "kmeans",
]
