"""vqar: autoregressive image generation over discrete image tokens.

Stage 1 (`vqar.tokenizers`, `vqar.quantize`) turns images into integer codes and back; stage 2 (`vqar.ar`) learns
the distribution of those codes, and `vqar.sampling` draws new images from it. `vqar.load_pretrained(path)` is the
one way to load a model: any folder vqar saved (`vqar.save_pretrained`, a training run), a Hub repository id, the
official RQ-VAE / RQ-Transformer releases and LlamaGen / NPP checkpoints. `vqar.load` is a deprecated alias of it.
"""

from __future__ import annotations

import warnings

# First, the `vqar` program's Ctrl-C while torch is imported is one line, not a traceback (vqar.utils.startup).
import vqar.utils.startup

# Then, before anything imports torch: its import sets OpenMP's wait policy, which OpenMP reads once, when torch
# loads it (see vqar.utils.threads).
import vqar.utils.threads
from vqar.bundle import save_pretrained, vqar_version
from vqar.interop import load_pretrained
from vqar.quantize import ResidualQuantizer, VectorQuantizer
from vqar.sampling import SamplingSettings, draw, generate, make_conditions
from vqar.tokenizers import Tokenizer, TokenizerConfig

__version__ = vqar_version()
vqar.utils.threads.record_torch_default()


def load(path, device="cpu"):
    """Deprecated: use `vqar.load_pretrained`, which reads the same folders and every other format."""
    warnings.warn("vqar.load is deprecated; use vqar.load_pretrained (the same folders, and every other format "
                  "vqar reads)", DeprecationWarning, stacklevel=2)  # fmt: skip
    return load_pretrained(path, device=device)


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
