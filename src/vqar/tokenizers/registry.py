"""The stage-1 encoder-decoder pairs by `TokenizerConfig.arch`: adding one is its module plus one line here.

An entry names the encoder and decoder classes (built from the config section named like the arch: `conv:`, `vit:`)
and the section's field that holds the image size the pair is built for (and whether it takes that size alone).
Encoders expose `out_channels`, decoders `in_channels` and `conv_out` (the last layer, where the adaptive GAN weight
is measured); the configs expose `image_size`, `in_channels`, `out_channels`, `downsample_factor` and `validate()`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vqar.tokenizers.conv import ConvDecoder, ConvEncoder
from vqar.tokenizers.vit import ViTDecoder, ViTEncoder


@dataclass(frozen=True)
class Backbone:
    name: str
    encoder: type[nn.Module]
    decoder: type[nn.Module]
    size_field: str
    description: str
    label: str  # in messages: "a ViT tokenizer"
    own_size_only: bool = False  # encodes images of its built size alone (a ViT learned its patches' positions)


BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("conv", ConvEncoder, ConvDecoder, "resolution",
             "the convolutional VQGAN encoder-decoder (VQGAN, RQ-VAE, LlamaGen, VAR)", "convolutional"),
    Backbone("vit", ViTEncoder, ViTDecoder, "image_size", "the ViT encoder-decoder of ViT-VQGAN", "ViT",
             own_size_only=True),
)}  # fmt: skip


def backbone(arch: str) -> Backbone:
    if arch not in BACKBONES:
        raise ValueError(f"tokenizer arch must be one of {tuple(BACKBONES)}, got {arch!r}")
    return BACKBONES[arch]
