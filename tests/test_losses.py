"""The training losses against direct computations: the stage-1 generator loss (reconstruction, quantizer, GAN
terms and their weights) and the AR loss (image cross-entropy, soft targets, weighted caption loss)."""

from __future__ import annotations

import pytest
import torch

from vqar.ar import ModelOutput, RQTransformer, RQTransformerConfig
from vqar.quantize import QuantizerConfig
from vqar.tokenizers import ConvConfig, Tokenizer, TokenizerConfig
from vqar.tokenizers.losses import TokenizerLossConfig, TokenizerObjective
from vqar.train.ar import ARTask
from vqar.train.ar_config import LossConfig


# ---------------------------------------------------------------- stage 1
def tiny_tokenizer(ema: bool = True) -> Tokenizer:
    conv = ConvConfig(in_channels=1, out_channels=1, resolution=16, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1,
                      attn_resolutions=[], z_channels=8, norm_groups=4)  # fmt: skip
    quantizer = QuantizerConfig(kind="rq", codebook_size=16, dim=6, depth=3, shared_codebook=False, beta=0.3, ema=ema,
                                restart_dead=False)  # fmt: skip
    return Tokenizer(TokenizerConfig(conv=conv, quantizer=quantizer)).eval()


def reference_quantizer_loss(tokenizer: Tokenizer, images: torch.Tensor) -> torch.Tensor:
    """beta * mean_d ||z - sum_{i<=d} e_i||^2 (+ mean_d ||e_d - r_d||^2 for gradient codebooks), by brute force."""
    with torch.no_grad():
        z = tokenizer.encode_latent(images).reshape(-1, 6).double()
    quantizer = tokenizer.quantizer
    residual, total, commitments, codebook_losses = z.clone(), torch.zeros_like(z), [], []
    for d in range(3):
        vectors = quantizer.codebook(d).weight.detach().double()
        e = vectors[((residual[:, None] - vectors[None]) ** 2).sum(-1).argmin(1)]
        codebook_losses.append(((e - residual) ** 2).mean())
        residual, total = residual - e, total + e
        commitments.append(((z - total) ** 2).mean())
    loss = quantizer.beta * torch.stack(commitments).mean()
    return loss if quantizer.codebook(0).ema else loss + torch.stack(codebook_losses).mean()


@pytest.mark.parametrize(("recon", "ema"), [("l2", True), ("l1", False)])
def test_generator_loss_is_the_weighted_reconstruction_plus_the_weighted_quantizer_loss(recon, ema):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(ema)
    cfg = TokenizerLossConfig(recon=recon, recon_weight=2.0, quantizer_weight=0.5, perceptual_weight=0.0)
    objective = TokenizerObjective(cfg, image_channels=1)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    out = tokenizer(images)
    loss, metrics = objective.generator_loss(images, out, tokenizer.last_layer(), step=0)
    diff = (out.recon.detach() - images).double()
    rec = (diff**2).mean() if recon == "l2" else diff.abs().mean()
    quantizer = reference_quantizer_loss(tokenizer, images)
    assert metrics["rec_loss"].item() == pytest.approx(float(rec), rel=1e-5)
    assert out.quant.loss.item() == pytest.approx(float(quantizer), rel=1e-4)
    assert loss.item() == pytest.approx(float(2.0 * rec + 0.5 * quantizer), rel=1e-5)


def test_generator_loss_adds_the_gan_term_from_disc_start_on():
    torch.manual_seed(1)
    tokenizer = tiny_tokenizer()
    cfg = TokenizerLossConfig(perceptual_weight=0.0, quantizer_weight=1.0, disc_weight=0.3, disc_start=5,
                              adaptive_disc_weight=False, disc_channels=8, disc_layers=2)  # fmt: skip
    objective = TokenizerObjective(cfg, image_channels=1).eval()  # eval: the discriminator's norm is deterministic
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    out = tokenizer(images)
    nll = ((out.recon.detach() - images) ** 2).mean() + out.quant.loss.detach()
    before, metrics = objective.generator_loss(images, out, tokenizer.last_layer(), step=4)
    assert before.item() == pytest.approx(nll.item(), rel=1e-6) and "g_loss" not in metrics
    at_start, metrics = objective.generator_loss(images, out, tokenizer.last_layer(), step=5)
    with torch.no_grad():
        gan = -objective.discriminator(out.recon).mean()  # the hinge generator loss: -D(fake)
    assert metrics["g_loss"].item() == pytest.approx(gan.item(), rel=1e-5)
    assert at_start.item() == pytest.approx((nll + 0.3 * gan).item(), rel=1e-5)


class QuadraticCritic(torch.nn.Module):
    """D(x) = <w, x> + ||x||^2 per image: its input gradient is w + 2x, so R1 = mean_i ||w + 2 x_i||^2 by hand."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(1, 1, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w + x**2).flatten(1).sum(1, keepdim=True)


def test_discriminator_loss_is_the_hinge_loss_plus_half_gamma_times_r1():
    torch.manual_seed(4)
    objective = TokenizerObjective(TokenizerLossConfig(perceptual_weight=0.0, disc_weight=0.1, r1_weight=4.0),
                                   image_channels=1)  # fmt: skip
    critic = QuadraticCritic()
    images, recon = torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(3, 1, 8, 8) * 2 - 1
    loss, metrics = objective.discriminator_step_loss(images, recon, discriminator=critic)
    with torch.no_grad():
        real, fake = critic(images).double(), critic(recon).double()
        hinge = 0.5 * ((1 - real).clamp_min(0).mean() + (1 + fake).clamp_min(0).mean())
        r1 = (critic.w + 2 * images).double().pow(2).flatten(1).sum(1).mean()
    assert metrics["d_loss"].item() == pytest.approx(float(hinge), rel=1e-5)
    assert metrics["r1"].item() == pytest.approx(float(r1), rel=1e-5)
    assert loss.item() == pytest.approx(float(hinge + 4.0 / 2 * r1), rel=1e-5)


# ---------------------------------------------------------------- stage 2
def loss_task(model=None, **loss) -> ARTask:
    """An ARTask holding only what its loss reads (the loss config, the model and its registry entry)."""
    from vqar.ar import get_architecture

    task = object.__new__(ARTask)
    task.cfg = type("Cfg", (), {"loss": LossConfig(**loss)})()
    task.model = model
    task.arch = get_architecture(model.arch if model is not None else "gpt")
    return task


def reference_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of -log softmax(logits)[target] over every row, in float64."""
    log_probs = logits.double().reshape(-1, logits.shape[-1]).log_softmax(-1)
    return -log_probs.gather(1, targets.reshape(-1, 1)).mean()


def test_ar_loss_weights_the_image_and_caption_cross_entropies():
    torch.manual_seed(2)
    logits, codes = torch.randn(2, 2, 2, 3, 16), torch.randint(16, (2, 2, 2, 3))
    text_logits, caption = torch.randn(2, 5, 40), torch.randint(40, (2, 6))
    task = loss_task(txt_weight=0.25, img_weight=0.75)
    loss, parts = task._loss(ModelOutput(logits, text_logits), codes, caption)
    image = reference_cross_entropy(logits, codes)
    text = reference_cross_entropy(text_logits, caption[:, 1:])  # position t predicts caption token t + 1
    assert parts["image_loss"].item() == pytest.approx(float(image), rel=1e-5)
    assert parts["text_loss"].item() == pytest.approx(float(text), rel=1e-5)
    assert loss.item() == pytest.approx(float(0.75 * image + 0.25 * text), rel=1e-5)
    # Without a text head: the image cross-entropy alone, unweighted.
    loss, parts = task._loss(ModelOutput(logits), codes, None)
    assert loss.item() == pytest.approx(float(image), rel=1e-5) and parts == {}


def test_ar_soft_target_loss_matches_a_direct_computation():
    torch.manual_seed(3)
    cfg = RQTransformerConfig(vocab_size=8, code_shape=[2, 2, 3], code_dim=4, dim=16, n_head=2, n_layer=1,
                              n_depth_layer=1, num_classes=2, shared_codebook=False)  # fmt: skip
    books = torch.randn(3, 8, 4)
    model = RQTransformer(cfg, code_embeddings=books)
    codes, logits = torch.randint(8, (2, 2, 2, 3)), torch.randn(2, 2, 2, 3, 8)
    loss, _ = loss_task(model, soft_targets=True, soft_temperature=0.7)._loss(ModelOutput(logits), codes, None)
    # Depth d's target: softmax(-||r_d - e_k||^2 / T) over depth d's codebook, r_d the sum of the code vectors of
    # depths >= d of that position; the loss is the cross-entropy against it, averaged over every code.
    total, count = 0.0, 0
    for index in torch.cartesian_prod(*(torch.arange(n) for n in codes.shape[:3])).tolist():
        stack = codes[tuple(index)]
        for d in range(3):
            r = sum(books[i, stack[i]].double() for i in range(d, 3))
            target = (-((r - books[d].double()) ** 2).sum(-1) / 0.7).softmax(-1)
            total -= float((target * logits[tuple(index)][d].double().log_softmax(-1)).sum())
            count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
