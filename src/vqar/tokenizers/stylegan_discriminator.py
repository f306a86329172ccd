"""A StyleGAN2-style discriminator ("Analyzing and Improving the Image Quality of StyleGAN", Karras et al., CVPR
2020), which ViT-VQGAN trains against instead of a PatchGAN, with the R1 gradient penalty on real images ("Which
Training Methods for GANs do actually Converge?", Mescheder et al., ICML 2018).

Residual blocks (two 3x3 convs with leaky ReLU, a 2x average-pool downsample, and a 1x1 skip, summed with a
1/sqrt(2) gain) halve the resolution down to 4x4; a minibatch standard-deviation channel, a conv and two linear
layers give one logit per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ResidualDown(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.avg_pool2d(F.leaky_relu(self.conv2(h), 0.2), 2)
        return (h + F.avg_pool2d(self.skip(x), 2)) / math.sqrt(2)


def minibatch_stddev(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Appends the mean standard deviation over groups of samples as one more channel."""
    b, c, h, w = x.shape
    g = min(group, b)
    while b % g:
        g -= 1
    y = x.view(g, -1, c, h, w)
    std = (y.var(0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (b / g,)
    std = std.view(-1, 1, 1, 1).repeat(g, 1, h, w)
    return torch.cat([x, std], dim=1)


class StyleGANDiscriminator(nn.Module):
    """Images (B, C, S, S) with S a power of 2 >= 8 -> logits (B, 1)."""

    def __init__(self, in_channels: int = 3, image_size: int = 256, channels: int = 64, max_channels: int = 512):
        super().__init__()
        levels = int(math.log2(image_size)) - 2
        if 2 ** (levels + 2) != image_size or levels < 1:
            raise ValueError(f"the StyleGAN discriminator needs a power-of-2 image size >= 8, got {image_size}")
        widths = [min(channels * 2**i, max_channels) for i in range(levels + 1)]
        self.from_rgb = nn.Conv2d(in_channels, widths[0], 1)
        self.blocks = nn.ModuleList(ResidualDown(widths[i], widths[i + 1]) for i in range(levels))
        self.final_conv = nn.Conv2d(widths[-1] + 1, widths[-1], 3, padding=1)
        self.final_linear = nn.Linear(widths[-1] * 16, widths[-1])
        self.out = nn.Linear(widths[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.from_rgb(x), 0.2)
        for block in self.blocks:
            h = block(h)
        h = F.leaky_relu(self.final_conv(minibatch_stddev(h)), 0.2)
        return self.out(F.leaky_relu(self.final_linear(h.flatten(1)), 0.2))


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """E ||grad_x D(x)||^2 over real images (multiply by gamma / 2)."""
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(real).sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()
