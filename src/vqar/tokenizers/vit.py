"""The ViT encoder and decoder of ViT-VQGAN ("Vector-quantized Image Modeling with Improved VQGAN", Yu et al.,
ICLR 2022).

The encoder cuts an image into non-overlapping p x p patches (p = 8 for 256px in the paper), embeds each with a
linear map, adds learned position embeddings and runs pre-LN transformer blocks; its output tokens, laid out on the
(H/p) x (W/p) grid, are the latents. The decoder mirrors it and maps every token back to a p x p patch with a
two-layer feed-forward head with tanh in between, as in the paper. Codes are quantized between the two by the
factorized, l2-normalised `VectorQuantizer`.

Sizes (blocks / heads / width / MLP): Small 8 / 8 / 512 / 2048, Base 12 / 12 / 768 / 3072, Large 32 / 16 / 1280 /
5120; the paper pairs them as encoder-decoder SS, BB and SL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

VIT_SIZES: dict[str, dict] = {
    "S": {"depth": 8, "heads": 8, "dim": 512, "mlp_dim": 2048},
    "B": {"depth": 12, "heads": 12, "dim": 768, "mlp_dim": 3072},
    "L": {"depth": 32, "heads": 16, "dim": 1280, "mlp_dim": 5120},
    # CPU-sized
    "XS": {"depth": 4, "heads": 4, "dim": 128, "mlp_dim": 512},
    "XXS": {"depth": 2, "heads": 4, "dim": 64, "mlp_dim": 256},
}


@dataclass
class ViTConfig:
    """A ViT encoder-decoder pair. `encoder` / `decoder` name sizes in `VIT_SIZES` (the paper's SS, BB, SL)."""

    image_size: int = 256
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int = 8
    encoder: str = "B"
    decoder: str = "B"
    dropout: float = 0.0

    @property
    def downsample_factor(self) -> int:
        return self.patch_size

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def validate(self) -> None:
        for name in (self.encoder, self.decoder):
            if name not in VIT_SIZES:
                raise ValueError(f"unknown ViT size {name!r}; known: {', '.join(VIT_SIZES)}")
        if self.patch_size < 1 or self.image_size < 1:
            raise ValueError(f"patch_size and image_size must be >= 1, got {self.patch_size} and {self.image_size}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if not 0.0 <= self.dropout < 1.0:  # as the conv pair checks it, not torch's unnamed refusal in training
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in (self.encoder, self.decoder):
            size = VIT_SIZES[name]
            if size["dim"] % size["heads"]:
                raise ValueError(f"ViT size {name}: dim must be divisible by heads")


class Block(nn.Module):
    """Pre-LN transformer block with bidirectional attention."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, size: str, tokens: int, dropout: float):
        super().__init__()
        s = VIT_SIZES[size]
        self.dim = s["dim"]
        self.pos_emb = nn.Parameter(torch.randn(1, tokens, s["dim"]) * 0.02)
        self.blocks = nn.ModuleList(Block(s["dim"], s["heads"], s["mlp_dim"], dropout) for _ in range(s["depth"]))
        self.norm = nn.LayerNorm(s["dim"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_emb[:, : x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p) * (W/p), p * p * C), patches in raster order."""
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)


def unpatchify(tokens: torch.Tensor, p: int, height: int, channels: int) -> torch.Tensor:
    """The inverse of `patchify` for an image `height` patches tall."""
    return rearrange(tokens, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=height, p1=p, p2=p, c=channels)


class ViTEncoder(nn.Module):
    """Images (B, C, H, W) -> latents (B, dim, H/p, W/p), at the built size only: the position embeddings are
    learned for its grid, and a smaller image's patches would take the positions of the grid's first rows."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        dim = VIT_SIZES[cfg.encoder]["dim"]
        self.patch_embed = nn.Linear(cfg.patch_size**2 * cfg.in_channels, dim)
        self.transformer = Transformer(cfg.encoder, cfg.grid**2, cfg.dropout)
        self.out_channels = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p, grid = self.cfg.patch_size, self.cfg.grid
        h, w = images.shape[2] // p, images.shape[3] // p
        if (h, w) != (grid, grid):
            raise ValueError(f"this ViT tokenizer takes {grid * p}x{grid * p} images (a {grid}x{grid} grid of "
                             f"{p}-pixel patches, whose positions it learned), got {images.shape[2]}x"
                             f"{images.shape[3]}: resize them to {grid * p}x{grid * p}")  # fmt: skip
        tokens = self.transformer(self.patch_embed(patchify(images, p)))
        return rearrange(tokens, "b (h w) d -> b d h w", h=h, w=w)


class ViTDecoder(nn.Module):
    """Latents (B, dim, h, w) -> images (B, C, h*p, w*p), unclamped; the head is Linear -> tanh -> Linear."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        size = VIT_SIZES[cfg.decoder]
        self.in_channels = size["dim"]
        self.transformer = Transformer(cfg.decoder, cfg.grid**2, cfg.dropout)
        patch = cfg.patch_size**2 * cfg.out_channels
        self.head = nn.Sequential(nn.Linear(size["dim"], size["mlp_dim"]), nn.Tanh(), nn.Linear(size["mlp_dim"], patch))

    @property
    def conv_out(self) -> nn.Linear:
        """The last layer, where the adaptive GAN weight is measured (named as in the conv decoder)."""
        return self.head[2]

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h, grid = latents.shape[2], self.cfg.grid
        if tuple(latents.shape[2:]) != (grid, grid):
            raise ValueError(f"this ViT tokenizer decodes a {grid}x{grid} grid of codes (the positions it learned), "
                             f"got {latents.shape[2]}x{latents.shape[3]}")  # fmt: skip
        tokens = self.transformer(rearrange(latents, "b d h w -> b (h w) d"))
        return unpatchify(self.head(tokens), self.cfg.patch_size, h, self.cfg.out_channels)
