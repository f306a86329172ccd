"""Stage-2 autoregressive models over discrete codes, all keeping the `ARModel` contract: LlamaGen's GPT, the
RQ-Transformer and VIM, with their registry of architectures and named sizes."""

from vqar.ar.contract import ARConfig, ARModel, Conditioning, ModelOutput, check_tokenizer
from vqar.ar.gpt import GPT, GPTConfig
from vqar.ar.registry import ARCHITECTURES, GPT_SIZES, RQ_SIZES, VIM_SIZES, Architecture, get_architecture
from vqar.ar.rq_transformer import RQTransformer, RQTransformerConfig
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
    "VIM",
    "VIMConfig",
    "VIM_SIZES",
    "check_tokenizer",
    "get_architecture",
]
