"""Stage-1 tokenizers: images <-> integer codes."""

from vqar.tokenizers.conv import ConvConfig, ConvDecoder, ConvEncoder
from vqar.tokenizers.tokenizer import Tokenizer, TokenizerConfig, TokenizerOutput

__all__ = ["ConvConfig", "ConvDecoder", "ConvEncoder", "Tokenizer", "TokenizerConfig", "TokenizerOutput"]
