"""Stage-2 autoregressive models over discrete codes: LlamaGen's GPT and the RQ-Transformer."""

from vqar.ar.gpt import GPT, GPTConfig
from vqar.ar.presets import GPT_SIZES, RQ_SIZES, VIM_SIZES, size_fields
from vqar.ar.rq_transformer import RQTransformer, RQTransformerConfig
from vqar.ar.vim import VIM, VIMConfig

__all__ = [
    "GPT",
    "GPTConfig",
    "GPT_SIZES",
    "RQTransformer",
    "RQTransformerConfig",
    "RQ_SIZES",
    "VIM",
    "VIMConfig",
    "VIM_SIZES",
    "size_fields",
]
