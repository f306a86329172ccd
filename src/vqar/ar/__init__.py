"""Stage-2 autoregressive models over discrete codes, all keeping the `ARModel` contract: LlamaGen's GPT, the
RQ-Transformer, VIM and VAR, with their registry of architectures and named sizes."""

from vqar.ar.contract import ARConfig, ARModel, Conditioning, ModelOutput, check_tokenizer
from vqar.ar.gpt import GPT, GPTConfig
from vqar.ar.registry import (
    ARCHITECTURES,
    GPT_SIZES,
    RQ_SIZES,
    VIM_SIZES,
    Architecture,
    find_size,
    get_architecture,
)
from vqar.ar.rq_transformer import RQTransformer, RQTransformerConfig
from vqar.ar.var import VAR, VAR_SIZES, VARConfig
from vqar.ar.vim import VIM, VIMConfig

__all__ = [
    "ARCHITECTURES",
    "ARConfig",
    "ARModel",
    "Architecture",
    "Conditioning",
    "GPT",
    "GPTConfig",
    "GPT_SIZES",
    "ModelOutput",
    "RQTransformer",
    "RQTransformerConfig",
    "RQ_SIZES",
    "VAR",
    "VARConfig",
    "VAR_SIZES",
    "VIM",
    "VIMConfig",
    "VIM_SIZES",
    "check_tokenizer",
    "find_size",
    "get_architecture",
]
