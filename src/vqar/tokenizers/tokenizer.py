"""Stage 1: a `Tokenizer` turns images into integer codes and back.

encoder -> 1x1 conv to the quantizer dimension -> quantizer -> 1x1 conv back -> decoder, as in VQGAN, RQ-VAE and
LlamaGen's VQ models. Images are float tensors in [-1, 1], channels first. Codes are int64 of shape (B, h, w) for
a vector quantizer and (B, h, w, D) for a residual one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vqar.quantize import QuantizerConfig, QuantizerOutput, build_quantizer
from vqar.tokenizers.conv import ConvConfig, ConvDecoder, ConvEncoder
from vqar.tokenizers.vit import VIT_SIZES, ViTConfig, ViTDecoder, ViTEncoder

TOKENIZER_ARCHS = ("conv", "vit")


@dataclass
class TokenizerConfig:
    """`arch` "conv" (VQGAN / RQ-VAE / LlamaGen encoder-decoder, shaped by `conv`) or "vit" (ViT-VQGAN, `vit`)."""

    arch: str = "conv"
    conv: ConvConfig = field(default_factory=ConvConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    @property
    def backbone(self) -> ConvConfig | ViTConfig:
        """The encoder-decoder config in use."""
        return self.vit if self.arch == "vit" else self.conv

    def validate(self) -> None:
        if self.arch not in TOKENIZER_ARCHS:
            raise ValueError(f"tokenizer arch must be one of {TOKENIZER_ARCHS}, got {self.arch!r}")
        self.backbone.validate()
        self.quantizer.validate()


@dataclass
class TokenizerOutput:
    recon: torch.Tensor
    quant: QuantizerOutput


class Tokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        if cfg.arch == "vit":
            self.encoder, self.decoder = ViTEncoder(cfg.vit), ViTDecoder(cfg.vit)
            enc_out, dec_in = VIT_SIZES[cfg.vit.encoder]["dim"], VIT_SIZES[cfg.vit.decoder]["dim"]
        else:
            self.encoder, self.decoder = ConvEncoder(cfg.conv), ConvDecoder(cfg.conv)
            enc_out = dec_in = cfg.conv.z_channels
        self.quant_conv = nn.Conv2d(enc_out, cfg.quantizer.dim, 1)
        self.quantizer = build_quantizer(cfg.quantizer)
        self.post_quant_conv = nn.Conv2d(cfg.quantizer.dim, dec_in, 1)

    # ---------------------------------------------------------------- description
    @property
    def in_channels(self) -> int:
        return self.cfg.backbone.in_channels

    @property
    def image_size(self) -> int:
        """The resolution the tokenizer was built for (any multiple of `downsample_factor` works)."""
        return self.cfg.vit.image_size if self.cfg.arch == "vit" else self.cfg.conv.resolution

    @property
    def downsample_factor(self) -> int:
        return self.cfg.backbone.downsample_factor

    @property
    def codebook_size(self) -> int:
        return self.cfg.quantizer.codebook_size

    @property
    def depth(self) -> int:
        return self.quantizer.depth

    @property
    def is_residual(self) -> bool:
        return self.cfg.quantizer.kind == "rq"

    def code_shape(self, image_size: int | None = None) -> tuple[int, ...]:
        """(h, w) or (h, w, D) for square images of `image_size` (default: the built resolution)."""
        side = (image_size or self.image_size) // self.downsample_factor
        return (side, side, self.depth) if self.is_residual else (side, side)

    def code_vectors(self) -> torch.Tensor:
        """The code vectors (books, K, dim) that codes stand for: one codebook, or one per depth when a residual
        quantizer does not share its codebook."""
        q = self.quantizer
        if self.is_residual:
            return torch.stack([book.vectors() for book in q.codebooks])
        return q.codebook.vectors()[None]

    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight, where the adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight

    # ---------------------------------------------------------------- stage-1 API
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous latents before quantization, channels-last (B, h, w, dim)."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images)).permute(0, 2, 3, 1)

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Images from channels-last latents (B, h, w, dim)."""
        return self.decoder(self.post_quant_conv(latent.permute(0, 3, 1, 2)))

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        quant = self.quantizer(self.encode_latent(images))
        return TokenizerOutput(recon=self.decode_latent(quant.quantized), quant=quant)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """int64 codes, (B, h, w) or (B, h, w, D). Does not update the codebook, whatever the module mode."""
        was_training = self.quantizer.training
        self.quantizer.eval()
        try:
            return self.quantizer(self.encode_latent(images)).codes
        finally:
            self.quantizer.train(was_training)

    @torch.no_grad()
    def soft_codes(self, images: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
        """Soft code assignments (B, h, w, D, K) of a residual tokenizer; see `ResidualQuantizer.soft_codes`."""
        if not self.is_residual:
            raise ValueError("soft codes are defined for residual (RQ) tokenizers")
        return self.quantizer.soft_codes(self.encode_latent(images), temperature)

    def decode(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Images (B, C, H, W) from codes; for a residual tokenizer `depth=d` uses only the first d codes of
        each stack (coarse to fine)."""
        expected = 4 if self.is_residual else 3
        if not isinstance(codes, torch.Tensor) or codes.dim() != expected:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            layout = "(B, h, w, D)" if self.is_residual else "(B, h, w)"
            raise ValueError(f"this tokenizer decodes codes of shape {layout}, got {shape}")
        if self.is_residual:
            latent = self.quantizer.embed(codes, depth=depth)
        else:
            if depth not in (None, 1):
                raise ValueError(f"depth={depth} only applies to residual tokenizers; this one has depth 1")
            latent = self.quantizer.embed(codes)
        return self.decode_latent(latent.to(self.post_quant_conv.weight.dtype))

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(f"images must be a float tensor in [-1, 1], got {kind} (uint8 images: x / 127.5 - 1)")
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"images must have shape (B, {self.in_channels}, H, W) for this tokenizer, got {tuple(images.shape)}"
            )
        f = self.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"image height and width must be multiples of the downsampling factor {f}, "
                f"got {images.shape[2]}x{images.shape[3]}"
            )
