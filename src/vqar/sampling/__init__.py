"""Sampling: logits filters, classifier-free guidance and the KV-cached generation loops."""

from vqar.sampling.filters import check_sampling_args, filter_logits, guide, sample_logits
from vqar.sampling.generate import generate_gpt, generate_rq

__all__ = ["check_sampling_args", "filter_logits", "generate_gpt", "generate_rq", "guide", "sample_logits"]
