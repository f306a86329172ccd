"""Tests for the LPIPS perceptual loss and the PatchGAN discriminator (fake weights, small images)."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from vqar.configs import preset_names
from vqar.tokenizers import lpips as lpips_mod
from vqar.tokenizers.discriminator import (
    PatchGANDiscriminator,
    adaptive_generator_weight,
    discriminator_loss,
    generator_loss,
)
from vqar.tokenizers.losses import TokenizerObjective
from vqar.tokenizers.lpips import LPIPS, build_perceptual_loss
from vqar.train.tokenizer import load_run_config

CONVS = [
    (0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
    (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512),
]  # fmt: skip
SLICE_OF = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
TAP_CHANNELS = [64, 128, 256, 512, 512]


def fake_vgg(seed: int = 0) -> dict[str, torch.Tensor]:
    """Torchvision-layout VGG16 with He-scaled random weights, so activations stay O(1) through 13 layers."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for idx, cin, cout in CONVS:
        sd[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2.0 / (9 * cin))
        sd[f"features.{idx}.bias"] = torch.randn(cout, generator=g) * 0.01
    sd["classifier.0.weight"] = torch.randn(8, 4, generator=g)  # must be ignored
    return sd


def fake_lin(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # The released linear weights are non-negative, which is what makes LPIPS a non-negative distance.
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(TAP_CHANNELS)}


@pytest.fixture(scope="module")
def weights() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return fake_vgg(), fake_lin()


@pytest.fixture(scope="module")
def files(tmp_path_factory, weights) -> dict[str, object]:
    vgg, lin = weights
    d = tmp_path_factory.mktemp("lpips")
    paths: dict[str, object] = {"vgg": d / "vgg16.pth", "lin": d / "lin.pth"}
    torch.save(vgg, paths["vgg"])
    torch.save(lin, paths["lin"])
    pkg = {f"net.slice{SLICE_OF[idx]}.{idx}.{p}": vgg[f"features.{idx}.{p}"]
           for idx, _, _ in CONVS for p in ("weight", "bias")}  # fmt: skip
    pkg.update({f"lins.{i}.model.1.weight": t for i, t in enumerate(lin.values())})
    paths["pkg"] = d / "lpips_pkg.pth"
    torch.save(pkg, paths["pkg"])
    paths["combined"] = d / "combined.pth"
    torch.save({"state_dict": {**vgg, **lin}}, paths["combined"])
    paths["st"] = d / "combined.safetensors"
    save_file({k: v.contiguous() for k, v in {**vgg, **lin}.items()}, str(paths["st"]))
    return paths


@pytest.fixture(scope="module")
def metric(files) -> LPIPS:
    return LPIPS.from_files(files["vgg"], files["lin"])


def images(seed: int, shape=(2, 3, 32, 32)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_layouts_agree(files, metric):
    x, y = images(0), images(1)
    ref = metric(x, y)
    assert ref.shape == (2, 1, 1, 1) and (ref > 0).all()
    assert metric.distance(x, y).shape == (2,)
    for vgg_key, lin_key in [("pkg", None), ("combined", None), ("st", None), ("pkg", "lin"), ("st", "lin")]:
        other = LPIPS.from_files(files[vgg_key], files[lin_key] if lin_key else None)
        torch.testing.assert_close(other(x, y), ref, rtol=0, atol=0)


def test_metric_properties(metric):
    x, y = images(2), images(3)
    assert metric(x, x).abs().max().item() == 0.0
    torch.testing.assert_close(metric(x, y), metric(y, x))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    dists = [metric(x, x + s * noise).mean().item() for s in (0.05, 0.2, 0.8)]
    assert dists[0] < dists[1] < dists[2]
    gray_x, gray_y = x[:, :1], y[:, :1]
    torch.testing.assert_close(metric(gray_x, gray_y), metric(gray_x.repeat(1, 3, 1, 1), gray_y.repeat(1, 3, 1, 1)))


def test_frozen_but_differentiable(metric):
    x = images(5).requires_grad_(True)
    metric(x, images(6)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in metric.parameters())
    parent = nn.ModuleDict({"lpips": metric, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training and not metric.training
    assert not any(m.training for m in metric.modules())


def test_single_tap_by_hand(weights, tmp_path):
    vgg, lin = weights
    tap = 1  # relu2_2
    zeroed = {k: torch.zeros_like(v) for k, v in lin.items()}
    zeroed[f"lin{tap}.model.1.weight"] = lin[f"lin{tap}.model.1.weight"]
    torch.save({**vgg, **zeroed}, tmp_path / "one_tap.pth")
    model = LPIPS.from_files(tmp_path / "one_tap.pth")
    x, y = images(7, (1, 3, 32, 32)), images(8, (1, 3, 32, 32))

    def relu2_2(img: torch.Tensor) -> torch.Tensor:
        h = (img - torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)) / torch.tensor([0.458, 0.448, 0.450]).view(
            1, 3, 1, 1
        )
        for idx in (0, 2, "pool", 5, 7):
            if idx == "pool":
                h = F.max_pool2d(h, 2)
            else:
                h = F.relu(F.conv2d(h, vgg[f"features.{idx}.weight"], vgg[f"features.{idx}.bias"], padding=1))
        return h[0].double()  # (C, H, W)

    fx, fy = relu2_2(x), relu2_2(y)
    nx = fx / (fx.pow(2).sum(0).sqrt() + 1e-10)
    ny = fy / (fy.pow(2).sum(0).sqrt() + 1e-10)
    w = lin[f"lin{tap}.model.1.weight"].flatten().double()
    expected = ((nx - ny).pow(2) * w[:, None, None]).sum(0).mean()
    assert model(x, y).item() == pytest.approx(expected.item(), rel=1e-4)


def test_loading_errors(weights, files, tmp_path):
    vgg, lin = weights
    broken = {k: v for k, v in lin.items() if k != "lin2.model.1.weight"}
    torch.save(broken, tmp_path / "broken_lin.pth")
    with pytest.raises(ValueError, match=r"lin2\.model\.1\.weight") as err:
        LPIPS.from_files(files["vgg"], tmp_path / "broken_lin.pth")
    assert "broken_lin.pth" in str(err.value)
    bad = dict(vgg, **{"features.5.weight": torch.zeros(128, 64, 1, 1)})
    torch.save(bad, tmp_path / "bad_shape.pth")
    with pytest.raises(ValueError, match=r"features\.5\.weight"):
        LPIPS.from_files(tmp_path / "bad_shape.pth", files["lin"])
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        LPIPS.from_files(tmp_path / "nowhere.pth", files["lin"])
    with pytest.raises(ValueError, match="linear-layer"):
        LPIPS.from_files(files["vgg"])


@pytest.mark.parametrize(("content", "said"), [
    (b"", "is not a checkpoint: it is neither a PyTorch archive"),
    (b"junk\n", "is not a checkpoint: it is neither a PyTorch archive"),
    (b"\x80\x02" + bytes(range(200)), "is not a checkpoint vqar can read: a damaged pickle"),
])  # fmt: skip
@pytest.mark.parametrize("which", ["vgg", "lin"])
def test_a_file_that_is_no_weights_is_named_in_one_error(files, tmp_path, content, said, which):
    """An empty file ended training in EOFError, a text file in KeyError, random bytes in a message that they held
    'more than tensors'."""
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    setting = {"vgg": "the VGG16 weights (loss.lpips_vgg)", "lin": "the LPIPS linear layers (loss.lpips_lin)"}[which]
    with pytest.raises(ValueError, match=re.escape(f"{setting}: {bad} {said}")):
        LPIPS.from_files(*((bad, files["lin"]) if which == "vgg" else (files["vgg"], bad)))
    damaged = tmp_path / "bad.safetensors"
    damaged.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=re.escape(f"{setting}: {damaged} is not a safetensors file")):
        LPIPS.from_files(*((damaged, files["lin"]) if which == "vgg" else (files["vgg"], damaged)))


def test_build_perceptual_loss(files, caplog, monkeypatch):
    monkeypatch.setattr(lpips_mod, "_warned_no_vgg", False)
    assert build_perceptual_loss(None, None, 0.0) is None
    with caplog.at_level(logging.WARNING, logger="vqar.train"):
        assert build_perceptual_loss(None, None, 1.0) is None
        assert build_perceptual_loss(None, None, 1.0) is None
    warnings = [r for r in caplog.records if r.name == "vqar.train" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "loss.lpips_vgg" in warnings[0].getMessage() and "loss.lpips_lin" in warnings[0].getMessage()
    assert isinstance(build_perceptual_loss(files["vgg"], files["lin"], 1.0), LPIPS)
    with pytest.raises(ValueError, match="linear-layer"):
        build_perceptual_loss(files["vgg"], None, 1.0)


@pytest.mark.parametrize("preset", [n for n in preset_names("tokenizer") if "mnist" in n])
def test_digit_presets_train_without_the_vgg_warning(preset, caplog, monkeypatch):
    # The demo's first lines used to tell a new user to find VGG16 weights for a loss digits never used.
    monkeypatch.setattr(lpips_mod, "_warned_no_vgg", False)
    cfg = load_run_config(preset)
    with caplog.at_level(logging.WARNING, logger="vqar.train"):
        objective = TokenizerObjective(cfg.loss, cfg.data.channels, cfg.data.image_size)
    assert objective.perceptual is None
    assert not [r for r in caplog.records if "lpips" in r.getMessage().lower()]


@pytest.mark.parametrize("num_layers", [2, 3])
@pytest.mark.parametrize("size", [32, 64])
def test_discriminator_shape(num_layers, size):
    disc = PatchGANDiscriminator(channels=16, num_layers=num_layers)
    side = size // 2**num_layers - 2
    assert disc(torch.randn(2, 3, size, size)).shape == (2, 1, side, side)


def test_discriminator_keys_and_init():
    torch.manual_seed(0)
    disc = PatchGANDiscriminator()
    keys = list(disc.state_dict())
    assert all(k.startswith("main.") for k in keys)
    assert "main.0.weight" in keys and "main.11.weight" in keys and "main.2.bias" not in keys
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    big = torch.cat([c.weight.flatten() for c in convs[1:4]])
    assert abs(big.mean().item()) < 1e-3 and big.std().item() == pytest.approx(0.02, rel=0.02)
    bns = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)]
    scale = torch.cat([b.weight for b in bns])
    assert abs(scale.mean().item() - 1.0) < 5e-3 and scale.std().item() == pytest.approx(0.02, rel=0.2)
    assert all((b.bias == 0).all() for b in bns)
    group = PatchGANDiscriminator(norm="group")
    assert sum(isinstance(m, nn.GroupNorm) for m in group.modules()) == 3
    none = PatchGANDiscriminator(norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in none.modules())
    assert "main.11.weight" in none.state_dict() and "main.2.bias" in none.state_dict()
    with pytest.raises(ValueError, match="batch"):
        PatchGANDiscriminator(norm="layer")


def test_gan_losses_by_hand():
    real = torch.tensor([[2.0, 0.5], [-1.0, 0.0]])
    fake = torch.tensor([[-2.0, 0.5], [1.0, -0.25]])
    # hinge: relu(1 - real) = [0, .5, 2, 1] -> .875; relu(1 + fake) = [0, 1.5, 2, .75] -> 1.0625
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.5 * (0.875 + 1.0625))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    vanilla = 0.5 * (sum(sp(-v) for v in real.flatten().tolist()) / 4 + sum(sp(v) for v in fake.flatten().tolist()) / 4)
    assert discriminator_loss(real, fake, "vanilla").item() == pytest.approx(vanilla)
    assert generator_loss(fake, "hinge").item() == pytest.approx(0.25 * (2.0 - 0.5 - 1.0 + 0.25))
    assert generator_loss(fake, "vanilla").item() == pytest.approx(sum(sp(-v) for v in fake.flatten().tolist()) / 4)
    # A generator that fools the discriminator more (larger fake logits) must get a lower loss.
    for kind in ("hinge", "vanilla"):
        assert generator_loss(fake + 1.0, kind) < generator_loss(fake, kind)
    with pytest.raises(ValueError, match="hinge, vanilla"):
        generator_loss(fake, "wgan")
    with pytest.raises(ValueError, match="hinge, vanilla"):
        discriminator_loss(real, fake, "lsgan")


def test_adaptive_weight_by_hand():
    torch.manual_seed(0)
    decoder = nn.Linear(4, 3)
    z, target = torch.randn(5, 4), torch.randn(5, 3)
    out = decoder(z)
    rec = (out - target).pow(2).mean()
    gan = -(out * torch.tensor([0.3, -0.1, 0.2])).mean()
    # d rec / dW = 2/15 * (out - target)^T z; d gan / dW = -(1/15) * c^T (sum over rows of z)
    g_rec = (2.0 / 15.0) * (out - target).detach().T @ z
    g_gan = -(1.0 / 15.0) * torch.tensor([0.3, -0.1, 0.2])[:, None] * z.sum(0)[None, :]
    expected = g_rec.norm() / (g_gan.norm() + 1e-4)
    weight = adaptive_generator_weight(rec, gan, decoder.weight)
    assert not weight.requires_grad
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)
    (rec + weight * gan).backward()  # graph was retained for the caller
    assert decoder.weight.grad is not None

    out = decoder(z)
    tiny = 1e-12 * out.sum()
    assert adaptive_generator_weight((out - target).pow(2).mean(), tiny, decoder.weight, max_weight=50.0) == 50.0
