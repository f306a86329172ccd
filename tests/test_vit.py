"""ViT-VQGAN (ViT encoder/decoder, factorized l2 codes, logit-laplace loss, StyleGAN discriminator with R1) and
VIM (the decoder-only transformer over its codes)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import vqar
from vqar.ar import VIM, VIM_SIZES, VIMConfig
from vqar.quantize import VectorQuantizer
from vqar.sampling import SamplingSettings, generate
from vqar.testing import generate_uncached
from vqar.tokenizers import Tokenizer
from vqar.tokenizers.losses import TokenizerLossConfig, TokenizerObjective, logit_laplace_loss
from vqar.tokenizers.stylegan_discriminator import StyleGANDiscriminator, r1_penalty
from vqar.tokenizers.vit import patchify, unpatchify
from vqar.train.tokenizer import load_run_config, train_tokenizer


def test_patchify_round_trip_and_layout():
    images = torch.randn(2, 3, 16, 24)
    tokens = patchify(images, 4)
    assert tokens.shape == (2, 4 * 6, 4 * 4 * 3)
    # Token 1 is the second patch of the first row, row-major pixels, channels last.
    assert torch.equal(tokens[0, 1].view(4, 4, 3), images[0, :, 0:4, 4:8].permute(1, 2, 0))
    assert torch.equal(unpatchify(tokens, 4, 4, 3), images)


def test_factorized_l2_codes_have_unit_norm_in_the_lookup_space():
    vq = VectorQuantizer(64, 32, lookup_dim=8, l2_norm=True, ema=False).eval()  # training would restart dead codes
    z = torch.randn(5, 7, 32) * 3
    out = vq(z)
    assert out.quantized.shape == z.shape and out.codes.shape == (5, 7)
    lookup = vq.project_in(z.reshape(-1, 32))
    assert vq.codebook.vectors().shape == (64, 8)
    assert torch.allclose(vq.codebook.vectors().norm(dim=-1), torch.ones(64), atol=1e-5)
    # The code is the nearest by cosine similarity in the 8-d space.
    expected = (F.normalize(lookup, dim=-1) @ vq.codebook.vectors().T).argmax(-1)
    assert torch.equal(out.codes.flatten(), expected)
    q = vq.codebook.vectors()[out.codes.flatten()]
    assert torch.allclose(out.quantized.reshape(-1, 32), vq.project_out(q), atol=1e-5)


def test_logit_laplace_loss_matches_a_direct_computation():
    torch.manual_seed(0)
    images, recon = torch.rand(2, 1, 4, 4) * 2 - 1, torch.rand(2, 1, 4, 4) * 2 - 1
    eps = 0.1
    total = 0.0
    for x, x_hat in zip(images.flatten().tolist(), recon.flatten().tolist(), strict=True):
        y = (1 - 2 * eps) * (x + 1) / 2 + eps
        mu = math.log(((1 - 2 * eps) * (x_hat + 1) / 2 + eps) / (1 - ((1 - 2 * eps) * (x_hat + 1) / 2 + eps)))
        density = 1 / (2 * y * (1 - y)) * math.exp(-abs(math.log(y / (1 - y)) - mu))
        total += -math.log(density)
    assert logit_laplace_loss(recon, images, eps).item() == pytest.approx(total / images.numel(), rel=1e-5)
    assert logit_laplace_loss(images, images) < logit_laplace_loss(recon, images)


def test_r1_penalty_is_the_squared_input_gradient():
    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(1, 3, 8, 8))

        def forward(self, x):
            return (x * self.w).flatten(1).sum(1, keepdim=True) + (x**2).flatten(1).sum(1, keepdim=True)

    d, x = Linear(), torch.randn(4, 3, 8, 8)
    penalty = r1_penalty(d, x)
    expected = (d.w + 2 * x).pow(2).flatten(1).sum(1).mean()
    assert torch.allclose(penalty, expected, rtol=1e-5)
    penalty.backward()  # differentiable with respect to the discriminator's weights
    assert d.w.grad is not None and d.w.grad.abs().sum() > 0
    disc = StyleGANDiscriminator(1, 32, channels=8)
    assert disc(torch.randn(4, 1, 32, 32)).shape == (4, 1)
    with pytest.raises(ValueError, match="power-of-2"):
        StyleGANDiscriminator(1, 24)


def test_stylegan_objective_adds_r1():
    objective = TokenizerObjective(
        TokenizerLossConfig(disc_weight=0.1, disc_arch="stylegan", r1_weight=10.0, perceptual_weight=0.0), 1, 32
    )
    images = torch.rand(4, 1, 32, 32) * 2 - 1
    loss, metrics = objective.discriminator_step_loss(images, images.flip(-1))
    assert "r1" in metrics and torch.isfinite(loss)
    assert loss.item() == pytest.approx(metrics["d_loss"].item() + 5.0 * metrics["r1"].item(), rel=1e-5)


@pytest.mark.parametrize(("override", "message"), [
    ("model.vit.patch_size=0", "patch_size and image_size must be >= 1, got 0 and 32"),  # was "a multiple of 0"
    ("model.vit.dropout=1.5", "dropout must be in \\[0, 1\\), got 1.5"),  # was torch's, in training
    ("model.quantizer.lookup_dim=-3", "lookup_dim must be positive .*got -3"),  # was a traceback in training
])  # fmt: skip
def test_impossible_vit_vqgan_settings_are_named_at_configuration(override, message):
    with pytest.raises(ValueError, match=message):
        load_run_config("vitvqgan-mnist", [override])


def test_vit_tokenizer_trains_and_its_loss_goes_down(tmp_path, capsys):
    overrides = ["steps=40", "data.max_images=400", "train.eval_every=40", "train.log_every=5",
                 "train.warmup_steps=5", "data.batch_size=32"]  # fmt: skip
    cfg = load_run_config("vitvqgan-mnist", overrides)
    assert cfg.model.arch == "vit" and cfg.loss.logit_laplace_weight == 0.1
    train_tokenizer(cfg, tmp_path / "vit")
    lines = [line for line in (tmp_path / "vit" / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    losses = [json.loads(line)["loss"] for line in lines]
    assert losses[-1] < losses[0] * 0.7
    model = vqar.load_pretrained(tmp_path / "vit")
    assert isinstance(model, Tokenizer) and model.cfg.arch == "vit"
    codes = model.encode(torch.rand(3, 1, 32, 32) * 2 - 1)
    assert codes.shape == (3, 8, 8) and model.decode(codes).shape == (3, 1, 32, 32)

    # The stage-1 commands take a ViT tokenizer unchanged.
    from PIL import Image

    from vqar.cli import main
    from vqar.data import load_mnist_digits

    digits, _ = load_mnist_digits()
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(digits[i * 500]).save(folder / f"digit{i}.png")
    run = str(tmp_path / "vit")
    assert main(["reconstruct", "--tokenizer", run, "--out", str(tmp_path / "recon"), str(folder / "digit0.png")]) == 0
    assert len(list((tmp_path / "recon").glob("*.png"))) == 1
    assert main(["extract-codes", "--tokenizer", run, "--data", str(folder), "--out", str(tmp_path / "codes")]) == 0
    manifest = json.loads((tmp_path / "codes" / "manifest.json").read_text())
    assert manifest["num_items"] == 6 and list(manifest["code_shape"]) == [8, 8]
    capsys.readouterr()
    assert main(["eval", "rfid", "--tokenizer", run, "mnist", "--max-images", "64", "--no-fid", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["psnr_db"] > 10 and 0 < report["codebook_usage_percent"][0] <= 100


def tiny_vim(**overrides) -> VIM:
    fields = dict(vocab_size=32, code_shape=[3, 4], dim=32, n_head=4, n_layer=2, num_classes=5,
                  class_dropout_prob=0.1, resid_dropout_p=0.0)  # fmt: skip
    return VIM(VIMConfig(**{**fields, **overrides})).eval()


def test_a_vit_tokenizer_refuses_images_and_codes_of_another_grid():
    """Other sizes gave raw PyTorch errors, or, for a smaller grid, latents whose patches took the position
    embeddings of the built grid's first rows."""
    tokenizer = Tokenizer(load_run_config("vitvqgan-mnist", []).model).eval()  # 32 px, 4-pixel patches
    assert tokenizer.encode(torch.zeros(1, 1, 32, 32)).shape == (1, 8, 8)
    for side in (16, 48):
        with pytest.raises(ValueError, match=f"^this ViT tokenizer takes 32x32 images \\(a 8x8 grid of 4-pixel "
                           f"patches, whose positions it learned\\), got {side}x32: resize them to 32x32$"):
            tokenizer.encode(torch.zeros(1, 1, side, 32))
    with pytest.raises(ValueError, match="^this ViT tokenizer decodes a 8x8 grid of codes .*, got 4x4$"):
        tokenizer.decode(torch.zeros(1, 4, 4, dtype=torch.long))


def test_vim_cached_generation_matches_teacher_forcing():
    torch.manual_seed(1)
    model = tiny_vim()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    cond = torch.tensor([0, 3, 4])
    codes = generate(model, cond, SamplingSettings(greedy=True))
    assert codes.shape == (3, 3, 4)
    assert torch.equal(model(codes, cond).logits.argmax(-1), codes)
    assert torch.equal(generate_uncached(model, cond, SamplingSettings(greedy=True)), codes)
    guided = generate(model, cond, SamplingSettings(greedy=True, cfg_scale=2.0))
    null, conditional = model(guided, None).logits, model(guided, cond).logits
    assert torch.equal((null + 2.0 * (conditional - null)).argmax(-1), guided)
    assert not torch.equal(guided, codes)  # guidance changed some choices


def test_vim_loss_decreases_and_sizes_match_the_paper():
    torch.manual_seed(0)
    model = tiny_vim().train()
    codes, cond = torch.randint(0, 32, (8, 3, 4)), torch.randint(0, 5, (8,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = F.cross_entropy(model(codes, cond).logits.flatten(0, -2), codes.flatten())
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first * 0.5
    with torch.device("meta"):
        base = VIM(VIMConfig(**VIM_SIZES["VIM-Base"]))
        large = VIM(VIMConfig(**VIM_SIZES["VIM-Large"]))
    blocks = [sum(p.numel() for p in m.layers.parameters()) / 1e6 for m in (base, large)]
    # The paper rounds to 650M and 1.7B; the transformer blocks alone hold 680M and 1812M.
    assert blocks[0] == pytest.approx(680, rel=0.01) and blocks[1] == pytest.approx(1812, rel=0.01)
