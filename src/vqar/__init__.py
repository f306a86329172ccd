"""vqar: autoregressive image generation over discrete image tokens.

Stage 1 (`vqar.tokenizers`, `vqar.quantize`) turns images into integer codes and back; stage 2 learns the
distribution of those codes. `vqar.load(folder)` loads any model vqar saved; `vqar.load_pretrained(path)` also
reads the official RQ-VAE / RQ-Transformer releases and LlamaGen / NPP checkpoints.
"""

__version__ = "0.1.0"

from vqar.interop import load_pretrained  # noqa: E402
from vqar.pretrained import load, save_pretrained  # noqa: E402
from vqar.quantize import ResidualQuantizer, VectorQuantizer  # noqa: E402
from vqar.tokenizers import Tokenizer, TokenizerConfig  # noqa: E402

__all__ = [
    "ResidualQuantizer",
    "Tokenizer",
    "TokenizerConfig",
    "VectorQuantizer",
    "load",
    "load_pretrained",
    "save_pretrained",
]
