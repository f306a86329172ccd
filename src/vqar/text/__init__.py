"""Text side of text-to-image models: the caption tokenizer and caption files."""

from vqar.text.captions import read_captions
from vqar.text.tokenizer import TextTokenizer

__all__ = ["TextTokenizer", "read_captions"]
