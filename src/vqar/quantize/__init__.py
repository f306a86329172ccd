"""Quantizers: one module per technique, on one contract (`contract.Quantizer`), by kind in `registry`."""

from vqar.quantize.codebook import Codebook, code_statistics, kmeans
from vqar.quantize.config import QuantizerConfig, build_quantizer
from vqar.quantize.contract import Quantizer
from vqar.quantize.multiscale import MultiScaleQuantizer
from vqar.quantize.output import QuantizerOutput
from vqar.quantize.registry import QUANTIZERS
from vqar.quantize.residual import ResidualQuantizer
from vqar.quantize.vector import VectorQuantizer

__all__ = [
    "QUANTIZERS",
    "Codebook",
    "MultiScaleQuantizer",
    "Quantizer",
    "QuantizerConfig",
    "QuantizerOutput",
    "ResidualQuantizer",
    "VectorQuantizer",
    "build_quantizer",
    "code_statistics",
    "kmeans",
]
