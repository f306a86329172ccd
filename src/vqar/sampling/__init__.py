"""Sampling: one settings type, one generation loop over the models' KV caches, and `draw`, which turns classes,
prompts or nothing into decoded images for every entry point."""

from vqar.sampling.conditions import Conditions, make_conditions
from vqar.sampling.draw import SampleResult, draw, for_sampling, warm_up
from vqar.sampling.filters import filter_logits, guide, sample_logits
from vqar.sampling.generate import generate, image_noise
from vqar.sampling.settings import SamplingSettings

__all__ = [
    "Conditions",
    "SampleResult",
    "SamplingSettings",
    "draw",
    "filter_logits",
    "for_sampling",
    "generate",
    "guide",
    "image_noise",
    "make_conditions",
    "sample_logits",
    "warm_up",
]
