"""vqar: autoregressive image generation over discrete image tokens.

Stage 1 (`vqar.tokenizers`, `vqar.quantize`) turns images into integer codes and back; stage 2 (`vqar.ar`) learns
the distribution of those codes, and `vqar.sampling` draws new images from it. `vqar.load(folder)` loads any model
vqar saved; `vqar.load_pretrained(path)` also reads the official RQ-VAE / RQ-Transformer releases and LlamaGen /
NPP checkpoints.
"""

from vqar.bundle import load, save_pretrained, vqar_version
from vqar.interop import load_pretrained
from vqar.quantize import ResidualQuantizer, VectorQuantizer
from vqar.sampling import SamplingSettings, draw, generate, make_conditions
from vqar.tokenizers import Tokenizer, TokenizerConfig

__version__ = vqar_version()

__all__ = [
    "ResidualQuantizer",
    "SamplingSettings",
    "Tokenizer",
    "TokenizerConfig",
    "VectorQuantizer",
    "draw",
    "generate",
    "load",
    "load_pretrained",
    "make_conditions",
    "save_pretrained",
]
