"""The stage-1 training objective of VQGAN / RQ-VAE.

    L_G = w_rec * L_rec + w_q * L_quantizer + w_p * LPIPS + lambda * w_d * L_gan       (after disc_start)
    L_D = hinge (or vanilla) loss of a PatchGAN on real images vs reconstructions     (after disc_start)

lambda is VQGAN's adaptive weight ||grad L_nll|| / (||grad L_gan|| + 1e-4) on the decoder's last layer, with
L_nll = w_rec * L_rec + w_p * LPIPS ("Taming Transformers", Esser et al., CVPR 2021; kept by RQ-VAE).

ViT-VQGAN (Yu et al., ICLR 2022) adds a logit-laplace term (DALL-E's) to L_nll and trains a StyleGAN
discriminator with an R1 penalty; its weights are 1.0 L2, 0.1 logit-laplace, 0.1 perceptual, 0.1 adversarial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqar.configs import changed_settings
from vqar.tokenizers.discriminator import (
    PatchGANDiscriminator,
    adaptive_generator_weight,
    discriminator_loss,
    generator_loss,
)
from vqar.tokenizers.lpips import build_perceptual_loss
from vqar.tokenizers.stylegan_discriminator import StyleGANDiscriminator, r1_penalty
from vqar.tokenizers.tokenizer import TokenizerOutput

RECON_LOSSES = ("l2", "l1")
GAN_LOSSES = ("hinge", "vanilla")
DISC_ARCHS = ("patchgan", "stylegan")


DISCRIMINATOR_FIELDS = ("disc_arch", "r1_weight", "disc_start", "disc_loss", "gen_loss", "disc_layers", "disc_channels",
                        "disc_norm", "disc_lr", "adaptive_disc_weight")  # fmt: skip


@dataclass
class TokenizerLossConfig:
    """Weights and switches of the stage-1 losses. `disc_weight: 0` trains without a discriminator; the
    perceptual loss needs VGG16 weights (`lpips_vgg`: a torchvision vgg16 state dict) and LPIPS linear layers
    (`lpips_lin`, e.g. LPIPS' weights/v0.1/vgg.pth); without them it is off, and says so once."""

    recon: str = "l2"
    recon_weight: float = 1.0
    logit_laplace_weight: float = 0.0
    logit_laplace_eps: float = 0.1
    quantizer_weight: float = 1.0
    perceptual_weight: float = 1.0
    lpips_vgg: str | None = None
    lpips_lin: str | None = None
    disc_weight: float = 0.0
    disc_arch: str = "patchgan"
    r1_weight: float = 0.0  # gamma of the R1 penalty (the StyleGAN discriminator's regulariser)
    disc_start: int = 0
    disc_loss: str = "hinge"
    gen_loss: str = "hinge"
    disc_layers: int = 3
    disc_channels: int = 64
    disc_norm: str = "batch"
    disc_lr: float | None = None
    adaptive_disc_weight: bool = True

    def validate(self) -> None:
        if self.recon not in RECON_LOSSES:
            raise ValueError(f"loss.recon must be one of {RECON_LOSSES}, got {self.recon!r}")
        for name in ("disc_loss", "gen_loss"):
            if getattr(self, name) not in GAN_LOSSES:
                raise ValueError(f"loss.{name} must be one of {GAN_LOSSES}, got {getattr(self, name)!r}")
        if self.disc_arch not in DISC_ARCHS:
            raise ValueError(f"loss.disc_arch must be one of {DISC_ARCHS}, got {self.disc_arch!r}")
        if not 0 < self.logit_laplace_eps < 0.5:
            raise ValueError(f"loss.logit_laplace_eps must be in (0, 0.5), got {self.logit_laplace_eps}")
        for name in ("recon_weight", "quantizer_weight", "perceptual_weight", "disc_weight", "logit_laplace_weight",
                     "r1_weight"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_start < 0 or self.disc_layers < 1:
            raise ValueError("loss.disc_start must be >= 0 and loss.disc_layers >= 1")
        if self.disc_channels < 1:
            raise ValueError(f"loss.disc_channels must be >= 1, got {self.disc_channels}")
        if self.disc_lr is not None and not (math.isfinite(self.disc_lr) and self.disc_lr > 0):
            raise ValueError(f"loss.disc_lr must be a positive learning rate (or null: train.lr's), got {self.disc_lr}")
        perceptual = self.perceptual_weight > 0 and self.lpips_vgg is not None and self.lpips_lin is not None
        if not (self.recon_weight or self.logit_laplace_weight or perceptual or self.disc_weight):
            # trained with a loss of 0: weight decay alone moved the weights, and validation said 5 dB
            raise ValueError("no loss reaches the decoder: loss.recon_weight, loss.logit_laplace_weight and "
                             "loss.disc_weight are 0 and the perceptual loss is off (it needs loss.lpips_vgg and "
                             "loss.lpips_lin); set one of them above 0")  # fmt: skip
        if self.perceptual_weight == 0:  # saved in run.yaml, never read: a wrong path would go unnoticed too
            self._refuse_changed(("lpips_vgg", "lpips_lin"), "holds the perceptual loss's weights, which "
                                 "loss.perceptual_weight=0 leaves out: set loss.perceptual_weight above 0 to use "
                                 "them, or leave it out (null)")  # fmt: skip
        # Settings of a discriminator that is not built would be saved in run.yaml and do nothing.
        if self.disc_weight == 0:
            self._refuse_changed(DISCRIMINATOR_FIELDS, "shapes the discriminator, which loss.disc_weight=0 leaves "
                                 "out: set loss.disc_weight above 0 to train one, or leave it out")  # fmt: skip
        elif self.disc_arch == "stylegan":
            self._refuse_changed(("disc_layers", "disc_norm"), "shapes the PatchGAN discriminator, and "
                                 "loss.disc_arch=stylegan builds the StyleGAN one: leave it out")  # fmt: skip

    def _refuse_changed(self, names: tuple[str, ...], why: str) -> None:
        for name, value in changed_settings(self, names).items():
            raise ValueError(f"loss.{name}={value} {why}")


class TokenizerObjective(nn.Module):
    """Holds the frozen perceptual network and the discriminator; computes both players' losses."""

    def __init__(self, cfg: TokenizerLossConfig, image_channels: int, image_size: int = 256):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.perceptual = build_perceptual_loss(cfg.lpips_vgg, cfg.lpips_lin, cfg.perceptual_weight)
        self.discriminator = None
        if cfg.disc_weight > 0 and cfg.disc_arch == "stylegan":
            self.discriminator = StyleGANDiscriminator(image_channels, image_size, cfg.disc_channels)
        elif cfg.disc_weight > 0:
            self.discriminator = PatchGANDiscriminator(
                image_channels, cfg.disc_channels, cfg.disc_layers, norm=cfg.disc_norm
            )

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.disc_start

    def generator_loss(
        self, images: torch.Tensor, out: TokenizerOutput, last_layer: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        recon = out.recon.float()
        rec = F.mse_loss(recon, images) if cfg.recon == "l2" else F.l1_loss(recon, images)
        nll = cfg.recon_weight * rec
        metrics = {"rec_loss": rec.detach()}
        if cfg.logit_laplace_weight > 0:
            laplace = logit_laplace_loss(recon, images, cfg.logit_laplace_eps)
            nll = nll + cfg.logit_laplace_weight * laplace
            metrics["logit_laplace"] = laplace.detach()
        if self.perceptual is not None:
            perceptual = self.perceptual(recon, images).mean()
            nll = nll + cfg.perceptual_weight * perceptual
            metrics["lpips"] = perceptual.detach()
        loss = nll + cfg.quantizer_weight * out.quant.loss
        if self.gan_active(step):
            g_loss = generator_loss(self.discriminator(recon), cfg.gen_loss)
            weight = torch.tensor(1.0, device=recon.device)
            if cfg.adaptive_disc_weight:
                weight = adaptive_generator_weight(nll, g_loss, last_layer)
            loss = loss + cfg.disc_weight * weight * g_loss
            metrics.update(g_loss=g_loss.detach(), disc_adaptive_weight=weight.detach())
        metrics["loss"] = loss.detach()
        return loss, metrics

    def discriminator_step_loss(
        self, images: torch.Tensor, recon: torch.Tensor, discriminator: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`discriminator`: the module to run (a DDP wrapper of `self.discriminator` under torchrun)."""
        disc = discriminator if discriminator is not None else self.discriminator
        real = disc(images)
        fake = disc(recon.detach().float())
        loss = discriminator_loss(real, fake, self.cfg.disc_loss)
        metrics = {"d_loss": loss.detach(), "logits_real": real.mean().detach(), "logits_fake": fake.mean().detach()}
        if self.cfg.r1_weight > 0:
            penalty = r1_penalty(disc, images)
            loss = loss + self.cfg.r1_weight / 2 * penalty
            metrics["r1"] = penalty.detach()
        return loss, metrics


def logit_laplace_loss(recon: torch.Tensor, images: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Mean negative log-likelihood of `images` under a logit-Laplace distribution centred on `recon` (both in
    [-1, 1]), with DALL-E's pixel mapping x -> (1 - 2 eps) x + eps of [0, 1] pixels into (eps, 1 - eps).

    The decoder predicts the location only, so the scale is 1: per pixel, with y and y_hat the mapped pixels,
    |logit(y) - logit(y_hat)| + log(y (1 - y)) + log 2. The last two terms do not depend on the model; they keep
    the value a proper NLL."""

    def mapped(x: torch.Tensor) -> torch.Tensor:
        return (1 - 2 * eps) * ((x.float() + 1) / 2).clamp(0, 1) + eps

    y, y_hat = mapped(images), mapped(recon)
    nll = (torch.logit(y) - torch.logit(y_hat)).abs() + torch.log(y * (1 - y)) + math.log(2.0)
    return nll.mean()
