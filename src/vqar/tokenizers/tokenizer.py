"""Stage 1: a `Tokenizer` turns images into integer codes and back.

encoder -> conv to the quantizer dimension -> quantizer -> conv back -> decoder, as in VQGAN, RQ-VAE, LlamaGen's VQ
models and VAR's VQVAE (1x1 convs, 3x3 for VAR: `quant_conv_kernel`). Images are float tensors in [-1, 1],
channels first. Codes are int64 of shape (B, *code_shape): (B, h, w) for a vector quantizer, (B, h, w, D) for a
residual one and (B, L) for a multi-scale one (see `vqar.quantize.contract`). The encoder-decoder pair is chosen
by `arch` (`vqar.tokenizers.registry`), the quantizer by `quantizer.kind` (`vqar.quantize.registry`).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from vqar.quantize import QuantizerConfig, QuantizerOutput, build_quantizer
from vqar.tokenizers.conv import ConvConfig
from vqar.tokenizers.registry import backbone
from vqar.tokenizers.vit import ViTConfig

_RANGE_MARGIN = 0.5  # how far past [-1, 1] encode takes pixels (see `_check_pixels`)


@dataclass
class TokenizerConfig:
    """`arch` names the encoder-decoder pair, shaped by the config section of that name (`conv`: VQGAN / RQ-VAE /
    LlamaGen / VAR; `vit`: ViT-VQGAN). `quant_conv_kernel` is the kernel size of the convolutions around the
    quantizer (1 in VQGAN and RQ-VAE, 3 in VAR)."""

    arch: str = "conv"
    conv: ConvConfig = field(default_factory=ConvConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    quant_conv_kernel: int = 1

    @property
    def backbone(self) -> ConvConfig | ViTConfig:
        """The encoder-decoder config in use."""
        return getattr(self, backbone(self.arch).name)

    @property
    def latent_side(self) -> int:
        """Side of the latent grid of images of the built size."""
        return self.backbone.image_size // self.backbone.downsample_factor

    def validate(self) -> None:
        backbone(self.arch)
        self.backbone.validate()
        if self.quant_conv_kernel < 1 or self.quant_conv_kernel % 2 == 0:
            raise ValueError(f"quant_conv_kernel must be a positive odd size, got {self.quant_conv_kernel}")
        self.quantizer.validate(self.latent_side)


@dataclass
class TokenizerOutput:
    recon: torch.Tensor
    quant: QuantizerOutput


class Tokenizer(nn.Module):
    """Stage 1 of every system here: `encode` maps images in [-1, 1] to int64 codes, `decode` maps codes (or the
    first `depth` levels of them) back to images; `forward` is the training pass, reconstruction plus the
    quantizer's losses and statistics. Build one from a `TokenizerConfig`, or load a trained or released one with
    `vqar.load_pretrained`."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        pair = backbone(cfg.arch)
        self.encoder, self.decoder = pair.encoder(cfg.backbone), pair.decoder(cfg.backbone)
        k, dim = cfg.quant_conv_kernel, cfg.quantizer.dim
        self.quant_conv = nn.Conv2d(self.encoder.out_channels, dim, k, padding=k // 2)
        self.quantizer = build_quantizer(cfg.quantizer)
        self.post_quant_conv = nn.Conv2d(dim, self.decoder.in_channels, k, padding=k // 2)

    # ---------------------------------------------------------------- description
    @property
    def in_channels(self) -> int:
        return self.cfg.backbone.in_channels

    @property
    def image_size(self) -> int:
        """The resolution the tokenizer was built for (any multiple of `downsample_factor` works, but for a ViT,
        whose position embeddings fix its grid, and a multi-scale quantizer, whose scales fix the latent size)."""
        return self.cfg.backbone.image_size

    def check_image_size(self, size: int, option: str = "image_size") -> None:
        """ValueError for a square image size this tokenizer cannot encode, naming it as `option` (`--image-size`),
        so that a command refuses it before reading any image (encoding would, naming latents)."""
        built, factor = self.image_size, self.downsample_factor
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1 or size % factor:
            raise ValueError(f"{option} {size!r} is not a positive multiple of the tokenizer's downsampling factor "
                             f"{factor} (its resolution: {built})")  # fmt: skip
        pair = backbone(self.cfg.arch)
        if size != built and (self.layout == "scales" or pair.own_size_only):
            kind = "multi-scale (VAR)" if self.layout == "scales" else pair.label
            raise ValueError(f"{option} {size}: a {kind} tokenizer encodes images of its own size only ({built})")

    @property
    def downsample_factor(self) -> int:
        return self.cfg.backbone.downsample_factor

    @property
    def codebook_size(self) -> int:
        return self.cfg.quantizer.codebook_size

    @property
    def depth(self) -> int:
        """Codes per latent position (D for a residual stack, else 1)."""
        return self.quantizer.depth

    @property
    def levels(self) -> int:
        """Coarse-to-fine prefixes of the codes that `decode(codes, depth=k)` can show: D depths, K scales or 1."""
        return self.quantizer.levels

    @property
    def layout(self) -> str:
        """The code layout: "grid", "stack" or "scales" (`vqar.quantize.contract`)."""
        return self.quantizer.layout

    @property
    def is_residual(self) -> bool:
        """Whether codes are stacks of D residual codes per position (RQ-VAE)."""
        return self.layout == "stack"

    def code_shape(self, image_size: int | None = None) -> tuple[int, ...]:
        """(h, w), (h, w, D) or (L,) for square images of `image_size` (default: the built resolution); a size
        `encode` refuses is refused (0 stood for the default, 33 gave the codes of 32)."""
        if image_size is None:
            image_size = self.image_size
        self.check_image_size(image_size)
        return self.quantizer.code_shape(int(image_size) // self.downsample_factor)

    def code_vectors(self) -> torch.Tensor:
        """The code vectors (books, K, dim) that codes stand for: one codebook, or one per depth when a residual
        quantizer does not share its codebook."""
        return self.quantizer.code_vectors()

    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight, where the adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight

    # ---------------------------------------------------------------- stage-1 API
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous latents before quantization, channels-last (B, h, w, dim), on the tokenizer's device."""
        self._check_images(images)
        # Float images of any precision or device mean the same pixels: float64 ones from NumPy, float32 ones for a
        # bf16 tokenizer or CPU ones for a CUDA tokenizer would otherwise stop the first conv with a dtype/device
        # RuntimeError (decode likewise takes codes wherever they are).
        weight = self.quant_conv.weight
        images = images.to(device=weight.device, dtype=weight.dtype)
        return self.quant_conv(self.encoder(images)).permute(0, 2, 3, 1)

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Images from channels-last latents (B, h, w, dim)."""
        return self.decoder(self.post_quant_conv(latent.permute(0, 3, 1, 2)))

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        quant = self.quantizer(self.encode_latent(images))
        return TokenizerOutput(recon=self.decode_latent(quant.quantized), quant=quant)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """int64 codes (B, *code_shape), on the tokenizer's device, of float images (B, C, H, W) in [-1, 1] of any
        float dtype, on any device. Does not update the codebook, whatever the module mode."""
        self._check_pixels(images)
        was_training = self.quantizer.training
        self.quantizer.eval()
        try:
            return self.quantizer(self.encode_latent(images)).codes
        finally:
            self.quantizer.train(was_training)

    @torch.no_grad()
    def soft_codes(self, images: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
        """Soft code assignments (B, h, w, D, K) of a residual tokenizer; see `ResidualQuantizer.soft_codes`."""
        soft_codes = getattr(self.quantizer, "soft_codes", None)
        if soft_codes is None:
            raise ValueError("soft codes are defined for residual (RQ) tokenizers")
        self._check_pixels(images)
        return soft_codes(self.encode_latent(images), temperature)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Images (B, C, H, W), in the tokenizer's dtype on its device, from integer codes (B, *code_shape) on any
        device; `depth=k` decodes the first k levels only, coarse to fine (the first k codes of each residual stack,
        or the first k scales). Without autograd, as `encode` (`decode_latent(quantizer.embed(codes))` keeps it, to
        fine-tune the decoder)."""
        axes = self.quantizer.code_axes
        if not isinstance(codes, torch.Tensor) or codes.dim() != len(axes) + 1:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"this tokenizer decodes codes of shape (B, {', '.join(axes)}), got {shape}")
        if 0 in codes.shape[1:]:  # a grid of no positions: else a conv's kernel-size error
            raise ValueError(f"codes of shape {tuple(codes.shape)} hold no positions to decode")
        weight = self.post_quant_conv.weight
        latent = self.quantizer.embed(codes.to(weight.device), depth=depth)
        return self.decode_latent(latent.to(weight.dtype))

    def _check_pixels(self, images: torch.Tensor) -> None:
        """NaN or inf pixels (a failed normalisation, a damaged file) and pixels far outside [-1, 1] would still be
        given codes (whichever code is nearest to a NaN latent), so they are refused here. Not in `forward`: training
        would pay a sync per step."""
        self._check_images(images)
        bad = int(images.numel() - torch.isfinite(images).sum())
        if bad:
            raise ValueError(f"images hold {bad} non-finite value{'s' if bad > 1 else ''} (NaN or inf) of "
                             f"{images.numel()}: encode takes finite pixels in [-1, 1]")  # fmt: skip
        # Pixels of 0..255 as floats were given codes without a word. A margin lets through the overshoot that a
        # bicubic resize adds to pixels in [-1, 1].
        low, high = (float(v) for v in torch.aminmax(images)) if images.numel() else (0.0, 0.0)
        if low < -1 - _RANGE_MARGIN or high > 1 + _RANGE_MARGIN:
            raise ValueError(f"images hold values in [{low:.4g}, {high:.4g}], far outside the [-1, 1] encode takes "
                             "(pixels of 0..255: x / 127.5 - 1; of 0..1: x * 2 - 1)")  # fmt: skip

    def _check_images(self, images: torch.Tensor) -> None:
        if isinstance(images, np.ndarray):
            hint = "torch.from_numpy(array)" + (", then x / 127.5 - 1" if images.dtype == np.uint8 else "")
            raise TypeError(f"images must be a float tensor in [-1, 1], got a NumPy array of {images.dtype} ({hint})")
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(f"images must be a float tensor in [-1, 1], got {kind} (uint8 images: x / 127.5 - 1)")
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"images must have shape (B, {self.in_channels}, H, W) for this tokenizer, got {tuple(images.shape)}"
            )
        f = self.downsample_factor
        if not images.shape[2] or not images.shape[3]:  # 0 is a multiple of f; the first conv then fails
            raise ValueError(f"images of {images.shape[2]}x{images.shape[3]} pixels hold no pixels to encode")
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"image height and width must be multiples of the downsampling factor {f}, "
                f"got {images.shape[2]}x{images.shape[3]}"
            )
