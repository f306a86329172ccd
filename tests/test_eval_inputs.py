"""Evaluation inputs: a wrong image set or tokenizer is refused in a moment, before the FID Inception is loaded (or
downloaded) and before any image is run through it."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from vqar.cli import main
from vqar.eval import inception as inception_module

NOWHERE = "no image folder, .npz or .npy file, sample run or tar shards at"


@pytest.fixture
def no_inception(monkeypatch):
    """Fails the test wherever the Inception is loaded or run."""
    import vqar.eval.generation as generation
    import vqar.eval.rfid as rfid

    monkeypatch.setattr(inception_module, "Inception", lambda *a, **k: pytest.fail("the Inception was loaded"))
    monkeypatch.setattr(generation, "_own_outputs", lambda *a, **k: pytest.fail("an Inception pass ran"))
    monkeypatch.setattr(rfid, "_reconstruct", lambda *a, **k: pytest.fail("images were reconstructed"))


def bad_image_sets(root):
    """(path, the start of its one-line error) for paths that name no image set."""
    (root / "empty").mkdir()
    (root / "junk.npz").write_bytes(b"not an archive")
    (root / "junk.png").write_bytes(b"not an image")
    np.savez(root / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    return [
        (root / "nope", f"{NOWHERE} {root / 'nope'}"),
        (root / "empty", f"{root / 'empty'} contains no image files (.png, .jpg, .webp"),
        (root / "junk.png", f"{NOWHERE} {root / 'junk.png'}"),
        (root / "junk.npz", f"cannot read images from {root / 'junk.npz'}: File is not a zip file"),
        (root / "stats.npz", f"{root / 'stats.npz'} holds reference statistics (mu, sigma), not images (arr_0): use "
                             f"it as the reference of `vqar eval fid SAMPLES --ref {root / 'stats.npz'}`"),
    ]  # fmt: skip


def test_stats_of_a_path_naming_no_image_set_fails_before_the_inception_is_loaded(tmp_path, no_inception, capsys):
    """`eval stats` loaded (or downloaded) the Inception before it looked at DATA."""
    for data, error in bad_image_sets(tmp_path)[:-1]:  # the statistics: see the next test
        assert main(["eval", "stats", str(data), "--out", str(tmp_path / "out.npz")]) == 2
        assert capsys.readouterr().err.startswith(f"vqar: error: {error}")
    assert not (tmp_path / "out.npz").exists()


def test_stats_of_an_npz_of_statistics_says_it_already_holds_them(tmp_path, no_inception, capsys):
    """It was 'stats.npz has no arr_0 image array (keys: ['mu', 'sigma'])', which hid that the work is done."""
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(3), sigma=np.eye(3))
    assert main(["eval", "stats", str(stats), "--out", str(tmp_path / "out.npz")]) == 2
    assert capsys.readouterr().err == (
        f"vqar: error: {stats} already holds reference statistics (mu, sigma) and no images (arr_0) to compute them "
        f"from: it is usable as it is, as `vqar eval fid SAMPLES --ref {stats}`\n"
    )
    assert not (tmp_path / "out.npz").exists()


def test_stats_into_a_folder_that_cannot_be_made_fails_before_the_inception_is_loaded(tmp_path, no_inception,
                                                                                         capsys):  # fmt: skip
    """It ran the whole Inception pass, then failed to write: '[Errno 17] File exists: 'notes.txt''."""
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "ref.npz"
    with pytest.raises(SystemExit) as stop:  # argparse's refusal of the --out argument itself
        main(["eval", "stats", "mnist", "--max-images", "4", "--out", str(out)])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (f"vqar eval stats: error: argument --out: {out} cannot be made: "
                                       f"{tmp_path / 'notes.txt'} is a file, not a folder (see vqar eval stats "
                                       "--help)\n")  # fmt: skip
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_single_image_is_refused_naming_its_set_before_the_inception_is_loaded(tmp_path, no_inception, capsys):
    """It was 'need at least 2 feature vectors (N, dim), got shape (1, 2048)' after the Inception pass."""
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    np.savez(one, arr_0=np.zeros((1, 8, 8, 1), dtype=np.uint8))
    np.savez(two, arr_0=np.zeros((2, 8, 8, 1), dtype=np.uint8))
    cases = [(["fid", str(one), "--ref", str(two)], one), (["fid", str(two), "--ref", str(one), "--no-pr"], one)]
    for args, named in cases:
        assert main(["eval", *args]) == 2
        assert capsys.readouterr().err == f"vqar: error: {named} holds 1 image; FID statistics need at least 2\n"
    # a set made that small by the limit given: the limit is named (it said the digits held 1 image)
    limited = [(["stats", "mnist", "--max-images", "1", "--out", str(tmp_path / "ref.npz")],
                "--max-images 1 keeps 1 image of the bundled MNIST digits"),
               (["fid", str(two), "--ref", str(two), "--num-samples", "1"], f"--num-samples 1 keeps 1 image of {two}")]
    for args, said in limited:
        assert main(["eval", *args]) == 2
        assert capsys.readouterr().err == f"vqar: error: {said}; FID statistics need at least 2\n"
    empty = tmp_path / "empty.npz"  # it said "holds 0 image"
    np.savez(empty, arr_0=np.zeros((0, 8, 8, 1), dtype=np.uint8))
    assert main(["eval", "fid", str(empty), "--ref", str(two)]) == 2
    assert capsys.readouterr().err == f"vqar: error: {empty} holds 0 images; FID statistics need at least 2\n"


def test_rfid_of_a_single_image_is_refused_before_the_tokenizer_and_the_inception_are_loaded(
    tmp_path, tokenizer_folder, no_inception, monkeypatch, capsys
):
    """It failed after reconstructing, with numpy's 'need at least 2 feature vectors'; --no-fid still measures."""
    from vqar.bundle import load
    from vqar.eval.rfid import evaluate_tokenizer

    one = tmp_path / "one.npz"
    np.savez(one, arr_0=np.zeros((1, 32, 32, 1), dtype=np.uint8))
    assert main(["eval", "rfid", str(one), "--tokenizer", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err == (f"vqar: error: {one} holds 1 image; FID statistics need at least 2 (--no-fid "
                                       "measures the rest without them)\n")  # fmt: skip
    with pytest.raises(ValueError, match=f"^{one} holds 1 image; FID statistics need at least 2$"):
        evaluate_tokenizer(load(tokenizer_folder), one, inception=object())  # refused before it is used
    monkeypatch.undo()  # the images are reconstructed now
    assert main(["eval", "rfid", str(one), "--tokenizer", str(tokenizer_folder), "--no-fid", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1


def test_rfid_of_a_wrong_image_set_or_tokenizer_fails_before_the_inception_is_loaded(
    tmp_path, tokenizer_folder, no_inception, capsys
):
    """`eval rfid` loaded the Inception before it opened DATA; the tokenizer is checked before the Inception too."""
    fine = tmp_path / "fine.npz"
    np.savez(fine, arr_0=np.zeros((2, 32, 32, 1), dtype=np.uint8))
    cases = [([str(data), "--tokenizer", str(tokenizer_folder)], error) for data, error in bad_image_sets(tmp_path)]
    cases += [
        ([str(fine), "--tokenizer", str(tmp_path / "none")], f"no model at {tmp_path / 'none'}: the local path does "
                                                              "not exist"),
        ([str(fine), "--tokenizer", str(tmp_path / "empty")], f"{tmp_path / 'empty'} is an empty folder, not a model"),
        ([str(fine), "--tokenizer", str(tokenizer_folder), "--image-size", "12"], "--image-size 12 is not a positive "
                                                                                  "multiple"),
    ]  # fmt: skip
    for args, error in cases:
        assert main(["eval", "rfid", *args]) == 2
        assert capsys.readouterr().err.startswith(f"vqar: error: {error}")


def test_rfid_takes_an_opened_image_source_as_it_is(tokenizer_folder, tmp_path):
    """`evaluate_tokenizer` reads the source the command opened (and limited) up front, not the path again."""
    from vqar.bundle import load
    from vqar.eval.rfid import evaluate_tokenizer
    from vqar.eval.sources import open_source

    images = tmp_path / "images.npz"
    np.savez(images, arr_0=np.random.default_rng(0).integers(0, 256, (5, 32, 32, 1), dtype=np.uint8))
    result = evaluate_tokenizer(load(tokenizer_folder), open_source(images, 3), None, batch_size=2)
    assert result["images"] == 3 and result["image_size"] == 32


def test_a_training_run_given_as_images_is_named_with_what_to_pass_instead(tmp_path, no_inception, capsys):
    """A training run was evaluated as a folder of images: its samples_grid.png, one picture of many samples, was
    'holds 1 image', and a run with no picture yet 'contains no image files', as if it were an empty image folder."""
    from PIL import Image

    fake = tmp_path / "fake.npz"
    np.savez(fake, arr_0=np.zeros((4, 8, 8, 1), dtype=np.uint8))
    ar, tokenizer, stopped = tmp_path / "ar-run", tmp_path / "tok-run", tmp_path / "stopped"
    for run, config in ((ar, "arch: gpt\n"), (tokenizer, "model:\n  kind: vq\n")):
        run.mkdir()
        (run / "run.yaml").write_text(config)
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(run / "samples_grid.png")
    (stopped / "checkpoints").mkdir(parents=True)
    sample = "draw samples from {} with `vqar sample --model {} --out SAMPLES` and pass SAMPLES"
    cases = [
        (["fid", str(ar), "--ref", str(fake)], ar, "run.yaml", sample.format("its model", ar)),
        (["fid", str(fake), "--ref", str(ar)], ar, "run.yaml", sample.format("its model", ar)),
        (["stats", str(stopped), "--out", str(tmp_path / "ref.npz")], stopped, "checkpoints/",
         sample.format("the model it trains", stopped)),
        (["rfid", str(tokenizer), "--tokenizer", str(tokenizer)], tokenizer, "run.yaml",
         f"a tokenizer is evaluated with `vqar eval rfid IMAGES --tokenizer {tokenizer}`"),
    ]  # fmt: skip
    for args, run, held, instead in cases:
        assert main(["eval", *args]) == 2
        assert capsys.readouterr().err == (f"vqar: error: {run} is a training run (it holds {held}), not a set of "
                                           f"images: {instead}\n")  # fmt: skip


def test_precision_recall_of_three_images_or_fewer_is_refused_before_the_inception_is_loaded(tmp_path, no_inception,
                                                                                             capsys):  # fmt: skip
    """Sets of 3 images or fewer were run through the Inception, then refused by the metric: 'precision/recall with
    k=3 needs more than 3 samples in each set', naming neither the set nor --no-pr."""
    from vqar.eval.generation import open_eval_sets

    three, thirty = tmp_path / "three.npz", tmp_path / "thirty.npz"
    np.savez(three, arr_0=np.zeros((3, 8, 8, 1), dtype=np.uint8))
    np.savez(thirty, arr_0=np.zeros((30, 8, 8, 1), dtype=np.uint8))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4), features=np.zeros((3, 4), dtype=np.float32))
    need = "precision/recall (k=3 nearest neighbours) need more than 3 in each set: pass --no-pr, or more images"
    cases = [(three, thirty, f"{three} holds 3 images"), (thirty, three, f"{three} holds 3 images"),
             (thirty, tmp_path / "stats.npz", f"{tmp_path / 'stats.npz'} (its stored features) holds 3 images")]
    for samples, ref, named in cases:
        assert main(["eval", "fid", str(samples), "--ref", str(ref)]) == 2
        assert capsys.readouterr().err == f"vqar: error: {named}; {need}\n"
        assert open_eval_sets(samples, ref, with_pr=False).ref == ref  # --no-pr: nothing to refuse


def test_stats_written_over_the_samples_they_are_read_from_is_refused(tmp_path, no_inception, capsys):
    """`vqar eval stats RUN --out RUN/samples.npz --overwrite` replaced the samples with their statistics."""
    run = tmp_path / "samples"
    run.mkdir()
    np.savez(run / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8), arr_1=np.zeros(4, np.int64))
    before = (run / "samples.npz").read_bytes()
    for data in (run, run / "samples.npz"):
        assert main(["eval", "stats", str(data), "--out", str(run / "samples.npz"), "--overwrite"]) == 2
        assert capsys.readouterr().err == (f"vqar: error: --out {run / 'samples.npz'} is the file the images are "
                                           "read from; --overwrite would replace them with their statistics: write "
                                           "the statistics to another file\n")  # fmt: skip
    assert (run / "samples.npz").read_bytes() == before


def test_an_image_folder_is_read_with_every_format_training_reads(tmp_path):
    """Evaluation knew 8 suffixes and passed over the rest without a word (a folder of 20 images, PNG, PPM and JFIF:
    statistics of 8), while training read them all."""
    from PIL import Image

    from vqar.data.datasets import ImageFolderDataset
    from vqar.eval.sources import open_source

    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, (suffix, fmt) in enumerate([(".png", "PNG"), (".PNG", "PNG"), (".ppm", "PPM"), (".jfif", "JPEG"),
                                        (".pgm", "PPM")]):  # fmt: skip
        Image.fromarray(np.full((8, 8), 30 * i, dtype=np.uint8)).save(folder / f"{i}{suffix}", format=fmt)
    assert len(open_source(folder)) == len(ImageFolderDataset(folder, 8, 1)) == 5


def test_damaged_or_meaningless_reference_statistics_are_named_not_computed_with(tmp_path):
    """A damaged member (its CRC), text in mu, an empty .npy were tracebacks; a sigma of negative variances gave
    `fid: 0.0000` (a negative distance clamped: a perfect match) and NaN features precision and recall of 0."""
    import zipfile

    from vqar.eval.generation import read_stored_reference
    from vqar.eval.sources import open_source

    rng = np.random.default_rng(0)
    features = rng.normal(size=(20, 4))
    good = dict(mu=features.mean(0), sigma=np.cov(features, rowvar=False), features=features)
    cases = {
        "negative": ({**good, "sigma": -np.eye(4)}, "its sigma is no covariance (it has negative variances"),
        "text": ({**good, "mu": np.array(["a", "b", "c", "d"])}, "its 'mu' holds <U1 values, not real numbers"),
        "objects": ({**good, "mu": np.array([1, "b"], dtype=object)}, "its 'mu' holds Python objects, not numbers"),
        "nan": ({**good, "features": np.where(features > 1, np.nan, features)}, "its features hold NaN or infinite"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}.npz: {message}")):
            read_stored_reference(tmp_path / f"{name}.npz", need_features=True)
    np.savez(tmp_path / "good.npz", **good)
    assert read_stored_reference(tmp_path / "good.npz", need_features=True).features.shape == (20, 4)
    data = bytearray((tmp_path / "good.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "good.npz") as archive:
        info = archive.getinfo("sigma.npy")
    data[info.header_offset + 30 + len(info.filename) + 140] ^= 0xFF  # a byte of sigma's values
    (tmp_path / "crc.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'crc.npz'} is damaged: Bad CRC-32")):
        read_stored_reference(tmp_path / "crc.npz")
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"cannot read images from {tmp_path / 'empty.npy'}: the file is")):
        open_source(tmp_path / "empty.npy")


@pytest.mark.parametrize("kind", ["npz", "npz-compressed", "npy", "folder"])
def test_a_limit_on_the_images_keeps_them_spread_over_the_set(tmp_path, kind):
    """`--max-images` / `--num-samples` kept the first N: of a class-sorted set (`vqar sample` writes one, the
    digits come so) the statistics of its first classes (`eval stats mnist --max-images 12`: twelve 0s)."""
    from PIL import Image

    from vqar.eval.sources import open_source

    images = np.repeat(np.arange(100, dtype=np.uint8), 16).reshape(100, 4, 4, 1)  # image i is all i
    path = tmp_path / f"set.{kind[:3]}"
    if kind == "folder":
        path.mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image[..., 0]).save(path / f"{i:03d}.png")
    elif kind == "npy":
        np.save(path, images)
    else:
        (np.savez_compressed if kind == "npz-compressed" else np.savez)(path, arr_0=images)
    source = open_source(path, 10)
    assert len(source) == 10 and source.limit == 10
    assert source.read(slice(0, 10)).images[:, 0, 0, 0].tolist() == list(range(0, 100, 10))
    assert source.read(slice(3, 6)).images[:, 0, 0, 0].tolist() == [30, 40, 50]  # a rank's share of them
    everything = open_source(path)
    assert everything.read(slice(0, 100)).images[:, 0, 0, 0].tolist() == list(range(100))
    assert everything.read(slice(97, 100)).images[:, 0, 0, 0].tolist() == [97, 98, 99]


def test_stats_json_prints_json(tmp_path, capsys, monkeypatch):
    """`vqar eval stats --json` was documented ("print the result as JSON") and printed the plain line."""
    np.savez(tmp_path / "set.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    import vqar.commands.evaluate as evaluate

    outputs = type("Out", (), {"count": 4, "features": np.random.default_rng(0).normal(size=(4, 3)), "images": None})
    monkeypatch.setattr("vqar.eval.generation.source_outputs", lambda *args, **kwargs: outputs)
    monkeypatch.setattr("vqar.eval.generation.save_stats", lambda *args, **kwargs: None)
    inception = type("Inception", (), {"path": tmp_path / "net.pt", "resize": "tf-bilinear"})()
    monkeypatch.setattr(evaluate, "_inception", lambda args, device: inception)
    assert main(["eval", "stats", str(tmp_path / "set.npz"), "--out", str(tmp_path / "s.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"images": 4, "inception": "net.pt", "resize": "tf-bilinear",
                                                   "out": str(tmp_path / "s.npz")}


def test_a_folder_of_images_beside_a_samples_npz_is_not_read_as_the_npz_alone(tmp_path):
    """12 pictures beside a samples.npz of 4 were evaluated as the 4 (`samples: 4`), without a word; a sample run's
    own grid.png and images/ are its samples, and are read as the npz."""
    from PIL import Image

    from vqar.eval.sources import open_source

    folder = tmp_path / "photos"
    (folder / "images").mkdir(parents=True)
    np.savez(folder / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    for name in ("grid.png", "images/class0000_000000.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / name)
    assert len(open_source(folder)) == 4  # a sample run
    for i in range(12):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / f"photo{i:02d}.png")
    with pytest.raises(ValueError, match=re.escape(f"{folder} holds samples.npz and 12 other image files (such as "
                                                   f"photo00.png): name the set to evaluate")):  # fmt: skip
        open_source(folder)


def test_an_npz_keyed_as_training_reads_it_and_a_text_npy_are_read_or_named(tmp_path):
    """An .npz of `images` (or `x`), which training and the linear probe take, was refused as having no arr_0, naming
    the file twice; a text file named .npy got numpy's advice to load it unsafely, as a pickle."""
    from vqar.eval.sources import open_source

    images = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8, 1)
    for key in ("images", "x"):
        np.savez(tmp_path / f"{key}.npz", **{key: images, "y": np.arange(3)})
        np.testing.assert_array_equal(open_source(tmp_path / f"{key}.npz").read(slice(0, 3)).images, images)
    np.savez(tmp_path / "other.npz", pictures=images)
    with pytest.raises(ValueError) as error:
        open_source(tmp_path / "other.npz")
    assert str(error.value) == (f"cannot read images from {tmp_path / 'other.npz'}: it has no image array (arr_0, "
                                "images, x; keys: ['pictures'])")  # fmt: skip
    (tmp_path / "notes.npy").write_text("just some notes\n")
    with pytest.raises(ValueError, match="it is not a NumPy array file") as error:
        open_source(tmp_path / "notes.npy")
    assert "unsafely" not in str(error.value)


def test_a_set_that_reads_as_one_image_is_named_before_its_inception_pass(tmp_path, no_inception, capsys,
                                                                           monkeypatch):  # fmt: skip
    """Four files, three of them empty: 'need at least 2 feature vectors (N, dim), got shape (1, 2048)' after the
    Inception pass, naming neither the set nor why. (Files are read after the network loads: a stand-in here.)"""
    from PIL import Image

    import vqar.commands.evaluate as evaluate

    monkeypatch.setattr(evaluate, "_inception", lambda args, device: object())

    folder = tmp_path / "onegood"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    for name in ("b.png", "c.png", "d.png"):
        (folder / name).write_bytes(b"")
    assert main(["eval", "stats", str(folder), "--out", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err
    assert f"vqar: error: only 1 of the 4 image files in {folder} could be read; FID statistics need at least 2" in err


def test_stats_refuses_an_out_another_process_writes(tmp_path, no_inception, capsys):
    """Two `eval stats` into one --out both passed its check; the one that finished last replaced the other's
    statistics without a word."""
    from conftest import locked_by_another_process

    out = tmp_path / "ref.npz"
    with locked_by_another_process(out) as holder:
        assert main(["eval", "stats", "mnist", "--max-images", "4", "--out", str(out)]) == 2
        assert f"another vqar process (pid {holder.pid}) is writing {out}" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_damaged_image_npz_is_named_when_all_of_it_is_read(tmp_path):
    """A stored `arr_0` is read from its offsets, past the zip module's CRC check: a flipped byte in the images was
    evaluated without a word (`fid: 106.9999`), where training refuses the same file."""
    import zipfile

    from vqar.eval.sources import open_source

    images = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)  # past one zip read
    np.savez(tmp_path / "good.npz", arr_0=images)
    np.testing.assert_array_equal(open_source(tmp_path / "good.npz").read(slice(0, 6)).images, images)
    assert len(open_source(tmp_path / "good.npz").read(slice(2, 4)).images) == 2  # a share: no check, no cost
    data = bytearray((tmp_path / "good.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "good.npz") as archive:
        info = archive.getinfo("arr_0.npy")
    data[info.header_offset + 30 + len(info.filename) + 20000] ^= 0xFF  # a pixel of the images
    (tmp_path / "bad.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(f"cannot read images from {tmp_path / 'bad.npz'}: the file is "
                                                   "damaged: arr_0.npy fails its CRC-32 check")):  # fmt: skip
        open_source(tmp_path / "bad.npz").read(slice(0, 6))
