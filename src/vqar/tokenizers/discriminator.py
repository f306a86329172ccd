"""PatchGAN discriminator and GAN losses for stage-1 tokenizer training.

The discriminator is the N-layer PatchGAN of pix2pix ("Image-to-Image Translation with Conditional
Adversarial Networks", Isola et al., CVPR 2017) in the form VQGAN ("Taming Transformers for High-Resolution
Image Synthesis", Esser et al., CVPR 2021) and RQ-VAE use: it scores overlapping patches, giving a grid of
logits per image. The adaptive generator weight is VQGAN's balance between the reconstruction and adversarial
gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PatchGANDiscriminator",
    "adaptive_generator_weight",
    "discriminator_loss",
    "generator_loss",
]

_NORMS = ("batch", "group", "none")
_LOSS_KINDS = ("hinge", "vanilla")


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        if channels % 32:
            raise ValueError(f"norm='group' uses 32 groups, but a layer has {channels} channels")
        return nn.GroupNorm(32, channels)
    # Identity keeps the slot, so `main.{i}` indices match the normalised variants and the reference.
    return nn.Identity()


class PatchGANDiscriminator(nn.Module):
    """N-layer PatchGAN; `forward` maps (B, C, H, W) images to (B, 1, H', W') patch logits.

    With `num_layers` = L the grid is H / 2**L - 2 per side (e.g. 2x2 for 32x32 and 6x6 for 64x64 at L = 3).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(_NORMS)}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        # A normalisation layer's shift makes a conv bias redundant; with no normalisation the bias is kept.
        bias = norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=bias),
                _norm_layer(norm, channels * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    """DCGAN-style init, as in pix2pix and VQGAN: conv N(0, 0.02), norm scale N(1, 0.02), biases zero."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _check_gan_loss(gan_loss: str) -> None:
    if gan_loss not in _LOSS_KINDS:
        raise ValueError(f"unknown GAN loss kind {gan_loss!r}; valid: {', '.join(_LOSS_KINDS)}")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, gan_loss: str = "hinge") -> torch.Tensor:
    """Discriminator loss: "hinge" (Lim & Ye, 2017) or "vanilla" (the original GAN's cross-entropy), each
    the mean of the real and fake terms as in VQGAN."""
    _check_gan_loss(gan_loss)
    if gan_loss == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


def generator_loss(fake_logits: torch.Tensor, gan_loss: str = "hinge") -> torch.Tensor:
    """Generator (decoder) adversarial loss: "hinge" is -mean(D(fake)), "vanilla" is the non-saturating
    mean(softplus(-D(fake)))."""
    _check_gan_loss(gan_loss)
    if gan_loss == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def adaptive_generator_weight(
    rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN's adaptive weight ||grad rec_loss|| / (||grad gan_loss|| + 1e-4), gradients taken w.r.t.
    `last_layer` (the decoder's conv_out weight), clamped to [0, max_weight] and detached.

    The graphs are retained so that the caller can still backpropagate the total loss afterwards.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
