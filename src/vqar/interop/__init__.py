"""Reading the official released checkpoints: the kakaobrain RQ-VAE / RQ-Transformer release format and
LlamaGen's (and NPP's) `.pt` files, with a pickle allow-list (`safe_load`)."""

from vqar.interop.load import load_pretrained
from vqar.utils.safe_load import UnsafeCheckpointError, load_checkpoint

__all__ = ["UnsafeCheckpointError", "load_checkpoint", "load_pretrained"]
