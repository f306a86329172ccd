"""The convolutional encoder and decoder of VQGAN ("Taming Transformers for High-Resolution Image Synthesis",
Esser et al., CVPR 2021), used unchanged by RQ-VAE, LlamaGen's VQ tokenizer and VAR's VQVAE.

Each resolution level holds residual blocks (GroupNorm, SiLU, 3x3 convs) and, at the listed resolutions,
single-head self-attention; levels are joined by a stride-2 convolution (after an asymmetric (0,1,0,1) pad) on the
way down and by nearest-neighbour upsampling plus a 3x3 convolution on the way up. The decoder has one more
residual block per level than the encoder. Module names follow the taming layout so that released weights map
one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ConvConfig:
    """Shape of the convolutional encoder/decoder pair.

    `resolution` is the training image size; attention is placed at the levels whose feature-map size is in
    `attn_resolutions`. The latent grid is resolution / 2**(len(ch_mult) - 1).
    """

    in_channels: int = 3
    out_channels: int = 3
    resolution: int = 256
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [8])
    z_channels: int = 256
    dropout: float = 0.0
    norm_groups: int = 32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        """The image size the pair is built for (`resolution`)."""
        return self.resolution

    def validate(self) -> None:
        if not self.ch_mult:
            raise ValueError("ch_mult must list at least one level")
        # Widths and counts below 1 failed inside torch (a ZeroDivisionError for norm_groups=0), and a negative
        # num_res_blocks silently built fewer blocks than 0.
        for name in ("in_channels", "out_channels", "resolution", "ch", "z_channels", "norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.ch_mult) < 1 or self.num_res_blocks < 0:
            raise ValueError(f"ch_mult's entries must be >= 1 and num_res_blocks >= 0, got ch_mult="
                             f"{list(self.ch_mult)}, num_res_blocks={self.num_res_blocks}")  # fmt: skip
        for width in [self.ch * m for m in self.ch_mult]:
            if width % self.norm_groups:
                raise ValueError(
                    f"every level width (ch * ch_mult = {width}) must be divisible by norm_groups={self.norm_groups}"
                )
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution {self.resolution} is not divisible by the downsampling factor {self.downsample_factor} "
                f"implied by ch_mult={list(self.ch_mult)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        sizes = [self.resolution // 2**level for level in range(len(self.ch_mult))]
        unused = [size for size in self.attn_resolutions if size not in sizes]
        if unused:  # else no attention there, without a word
            raise ValueError(f"attn_resolutions {unused} match no level: the feature maps are "
                             f"{', '.join(map(str, sizes))} wide at resolution {self.resolution}")  # fmt: skip


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c), as in VQGAN
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _mid(channels: int, dropout: float, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, dropout, groups)
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Residual blocks of one resolution level, each followed by its attention block where there is one."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class ConvEncoder(nn.Module):
    """Images (B, in_channels, H, W) -> features (B, z_channels, H/f, W/f)."""

    def __init__(self, cfg: ConvConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, res = cfg.ch, cfg.resolution
        for i, block_out in enumerate(widths):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout, g))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, g))
            level = _level(blocks, attns)
            if i != len(widths) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _mid(block_in, cfg.dropout, g)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)
        self.out_channels = cfg.z_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class ConvDecoder(nn.Module):
    """Features (B, z_channels, h, w) -> images (B, out_channels, h*f, w*f), unclamped."""

    def __init__(self, cfg: ConvConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        block_in = widths[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.in_channels = cfg.z_channels
        self.mid = _mid(block_in, cfg.dropout, g)
        levels: list[nn.Module] = []
        for i in reversed(range(len(widths))):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, widths[i], cfg.dropout, g))
                block_in = widths[i]
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, g))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)
        # Indexed by resolution level (0 = full resolution), run from the last.
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
