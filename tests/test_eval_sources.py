"""Evaluation image sources: tar shards beside folders and arrays, reading a range of a source (what one torchrun
rank reads), and unreadable shard samples. A small TorchScript stand-in for the Inception keeps these fast; the
real network and real torchrun launches are in tests/test_eval.py and tests/test_eval_distributed.py."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from test_eval import _FakeStyleGANInception
from vqar.cli import main
from vqar.data.datasets import ImageFolderDataset, spread_indices
from vqar.data.pack import pack_shards
from vqar.eval import array_sources, sources
from vqar.eval.generation import evaluate_samples, source_outputs
from vqar.eval.inception import Inception
from vqar.eval.shards import read_share, share
from vqar.eval.sources import ImageSource, PartSummary, load_images, open_source
from vqar.parallel import Parallel

COUNT, SHARD = 23, 5  # five shards: 5, 5, 5, 5 and 3 samples


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    """The same 23 RGB images as an .npz (stored and compressed), a folder of PNGs and tar shards."""
    root = tmp_path_factory.mktemp("sources")
    images = np.random.default_rng(0).integers(0, 256, (COUNT, 20, 20, 3), dtype=np.uint8)
    np.savez(root / "images.npz", arr_0=images)
    np.savez_compressed(root / "compressed.npz", arr_0=images)
    np.save(root / "images.npy", images)
    (root / "folder").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / "folder" / f"{i:03d}.png")
    pack_shards(str(root / "folder"), root / "shards", shard_size=SHARD, shuffle=False)
    (root / "list.txt").write_text("\n".join(f"shards/shard-{i:06d}.tar" for i in range(5)) + "\n")
    return root, images


def _names(root) -> dict[str, str]:
    return {
        "npz": str(root / "images.npz"),
        "compressed npz": str(root / "compressed.npz"),
        "npy": str(root / "images.npy"),
        "folder": str(root / "folder"),
        "shard index": str(root / "shards" / "shards.json"),
        "brace pattern": str(root / "shards" / "shard-{000000..000004}.tar"),
        "shard list": str(root / "list.txt"),
    }


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "fake_inception.pt"
    torch.jit.script(_FakeStyleGANInception()).save(str(path))
    return Inception(path)


@pytest.mark.parametrize("total, batch, world", [(20, 6, 2), (5, 8, 2), (100, 7, 3), (64, 16, 4), (3, 1, 5)])
def test_shares_are_contiguous_blocks_of_whole_batches(total, batch, world):
    shares = [share(total, batch, Parallel(rank=r, world_size=world)) for r in range(world)]
    assert [i for s in shares for i in range(total)[s]] == list(range(total))  # each image once, in order
    assert all(s.start % batch == 0 for s in shares)  # whole batches: a rank's batches are one process's
    assert share(total, batch, Parallel()) == slice(0, total)


@pytest.mark.parametrize("kind", ["npz", "compressed npz", "npy", "folder", "shard index", "brace pattern",
                                  "shard list"])  # fmt: skip
def test_every_source_reads_any_range_as_a_slice_of_the_whole(image_set, kind):
    root, images = image_set
    name = _names(root)[kind]
    np.testing.assert_array_equal(load_images(name), images)  # same images, same order as the folder
    # a limit keeps images spread over a folder or an array (a class-sorted set keeps every class), and the first
    # ones of tar shards (packed shards are shuffled), as training's data.max_images does
    kept = images[:7] if kind in ("shard index", "brace pattern", "shard list") else images[spread_indices(COUNT, 7)]
    np.testing.assert_array_equal(load_images(name, max_images=7), kept)
    source = open_source(name)
    assert len(source) == COUNT and len(open_source(name, max_images=12)) == 12
    # The shares of 3 ranks in batches of 4 (one starting inside a shard), and an empty range.
    for rank in range(3):
        part = share(COUNT, 4, Parallel(rank=rank, world_size=3))
        got = source.read(part)
        np.testing.assert_array_equal(got.images, images[part])
        assert got.summary == PartSummary(len(images[part]), len(images[part]), frozenset({(20, 20, 3)}))
    assert len(source.read(slice(5, 5)).images) == 0


def test_a_share_opens_only_its_files_and_shards(image_set, monkeypatch):
    root, images = image_set
    decoded, opened = [], []
    read_image, shard_samples = sources._read_image, sources.shard_samples
    monkeypatch.setattr(sources, "_read_image", lambda path, mode: decoded.append(path.name) or read_image(path, mode))
    monkeypatch.setattr(sources, "shard_samples", lambda shard: opened.append(shard.name) or shard_samples(shard))

    folder = open_source(root / "folder")
    assert decoded == []  # opening reads headers only
    assert len(folder.read(slice(12, 18)).images) == 6
    assert decoded == [f"{i:03d}.png" for i in range(12, 18)]

    shards = open_source(_names(root)["shard index"])
    opened.clear()  # opening peeks at the first samples (grey or RGB), as a folder opens its first headers
    np.testing.assert_array_equal(shards.read(slice(12, 18)).images, images[12:18])
    assert opened == ["shard-000002.tar", "shard-000003.tar"]  # samples 10-14 and 15-19


@pytest.mark.parametrize("kind", ["npz", "compressed npz"])
def test_an_npz_share_holds_only_its_rows(tmp_path, kind, monkeypatch):
    # arr_0 cannot be memory-mapped inside an npz; the rows are streamed out of the member instead of loading it,
    # through a buffer of NPZ_CHUNK bytes (made smaller here to fit the small array).
    monkeypatch.setattr(array_sources, "NPZ_CHUNK", 1 << 18)
    images = np.random.default_rng(1).integers(0, 256, (400, 64, 64, 3), dtype=np.uint8)  # 4.9 MB
    path = tmp_path / "big.npz"
    (np.savez if kind == "npz" else np.savez_compressed)(path, arr_0=images)
    source = open_source(path)
    tracemalloc.start()
    try:
        rows = source.read(slice(350, 375)).images
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(rows, images[350:375])
    assert peak < 0.25 * images.nbytes, f"reading 25 of 400 rows took {peak} bytes at peak"


def _tar(path, samples: list[tuple[str, str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, suffix, data in samples:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_unreadable_shard_samples_are_skipped_and_counted(tmp_path, caplog):
    images = np.random.default_rng(2).integers(0, 256, (4, 12, 12, 3), dtype=np.uint8)
    _tar(tmp_path / "a.tar", [("s0", "png", _png(images[0])), ("s1", "png", b"not an image"),
                              ("s2", "png", _png(images[1]))])  # fmt: skip
    _tar(tmp_path / "b.tar", [("s3", "cls", b"1"), ("s4", "png", _png(images[2])), ("s5", "png", _png(images[3]))])
    (tmp_path / "list.txt").write_text("a.tar\nb.tar\n")
    with caplog.at_level(logging.WARNING, logger="vqar.eval"):
        got = load_images(tmp_path / "list.txt")
    np.testing.assert_array_equal(got, images)  # the readable ones, in order
    assert "skipping unreadable sample" in caplog.text and "a.tar:s1" in caplog.text and "b.tar:s3" in caplog.text
    assert "2 of 6 samples" in caplog.text
    source = open_source(tmp_path / "list.txt")
    share_images, count = read_share(source, 3, Parallel())
    assert count == len(share_images) == 4
    # A share with no readable image is fine, as long as the whole set has one; none at all is an error.
    assert source.read(slice(3, 4)).summary == PartSummary(1, 0, frozenset())
    _tar(tmp_path / "bad.tar", [("x", "png", b"junk"), ("y", "txt", b"no image")])
    with pytest.raises(ValueError, match="none of the 2 samples"):
        load_images(tmp_path / "bad.tar")


def test_16_bit_and_float_greys_are_scaled_to_8_bits_not_clipped_white(tmp_path):
    # Pillow's own convert clips them at 255: a 16-bit picture read almost all white, and its FID measured on that.
    greys = np.random.default_rng(3).integers(0, 256, (3, 12, 12), dtype=np.uint8)
    (tmp_path / "folder").mkdir()
    for i, grey in enumerate(greys[:2]):
        Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "folder" / f"{i}.png")  # mode I;16
    Image.fromarray(greys[2].astype(np.float32) * 257).save(tmp_path / "folder" / "2.tiff")  # mode F
    np.testing.assert_array_equal(load_images(tmp_path / "folder"), greys[..., None])  # and read as grey
    _tar(tmp_path / "a.tar", [("s0", "png", _png(greys[0].astype(np.uint16) * 257))])
    np.testing.assert_array_equal(load_images(tmp_path / "a.tar"), greys[:1, :, :, None])


def test_the_whole_set_is_checked_from_every_share():
    source = ImageSource("set")
    one, other = frozenset({(8, 8, 3)}), frozenset({(9, 9, 3)})
    assert source.check([PartSummary(4, 0), PartSummary(4, 3, one)]) == 3  # a share without images is fine
    with pytest.raises(ValueError, match="different sizes"):
        source.check([PartSummary(4, 4, one), PartSummary(4, 4, other)])  # each share alone has one size
    with pytest.raises(ValueError, match="none of the 8 images"):
        source.check([PartSummary(4, 0), PartSummary(4, 0)])
    with pytest.raises(ValueError, match="rank 1: OSError"):
        source.check([PartSummary(4, 4, one), PartSummary(problem="rank 1: OSError: gone")])


def test_a_folder_of_several_sizes_is_refused_before_any_pass_also_as_the_reference(tmp_path, monkeypatch):
    """The reference's images are read after the samples' whole pass, so a reference folder of mixed sizes was
    refused only then (with 50,000 samples, after their Inception pass). Their headers tell it at once."""
    from vqar.eval.generation import open_eval_sets

    for name, sizes in (("same", [(16, 16)] * 3), ("mixed", [(16, 16), (16, 16), (20, 12)])):
        (tmp_path / name).mkdir()
        for i, (height, width) in enumerate(sizes):
            Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "same" / "broken.png").write_bytes(b"not a png")  # left to the decoding, which skips it
    decoded = []
    monkeypatch.setattr(sources, "_read_image", lambda *args: decoded.append(args))
    # a file of each size is named: the odd one out was left to be found among them all
    message = r"^images in .*mixed have different sizes \(height, width\): \(16, 16\) as 0.png, \(20, 12\) as 2.png;"
    for samples, ref in (("same", "mixed"), ("mixed", "same")):
        with pytest.raises(ValueError, match=message):
            open_eval_sets(tmp_path / samples, tmp_path / ref, with_pr=False)
    assert decoded == []  # told from the headers: no image was decoded
    open_eval_sets(tmp_path / "same", tmp_path / "same", with_pr=False)


def test_shard_sources_give_the_folder_statistics_and_fid(image_set, inception, tmp_path, capsys):
    root, _ = image_set
    names = _names(root)
    folder = source_outputs(names["folder"], inception, batch_size=6, probabilities=True)
    for kind in ("shard index", "brace pattern", "shard list"):
        shards = source_outputs(names[kind], inception, batch_size=6, probabilities=True)
        assert shards.count == folder.count == COUNT
        np.testing.assert_array_equal(shards.features, folder.features)
        np.testing.assert_array_equal(shards.probabilities, folder.probabilities)
    # FID of the shards against the folder (as an image reference and as saved statistics) and the other way.
    fake = {"samples": COUNT, "fid": pytest.approx(0.0, abs=1e-6), "precision": 1.0, "recall": 1.0}
    as_shards = evaluate_samples(names["shard index"], names["folder"], inception, batch_size=6)
    assert as_shards.items() >= fake.items()
    assert main(["eval", "stats", names["brace pattern"], "--out", str(tmp_path / "ref.npz"), "--inception",
                 str(inception.path), "--with-images", "--batch-size", "6"]) == 0  # fmt: skip
    assert f"statistics of {COUNT} images" in capsys.readouterr().out
    with np.load(tmp_path / "ref.npz") as ref:
        np.testing.assert_array_equal(ref["arr_0"], load_images(names["folder"]))
        np.testing.assert_allclose(ref["features"], folder.features.astype(np.float32))
    assert main(["eval", "fid", names["folder"], "--ref", str(tmp_path / "ref.npz"), "--inception",
                 str(inception.path), "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["fid"] == pytest.approx(as_shards["fid"], abs=1e-6)
    assert result["inception_score"] == pytest.approx(as_shards["inception_score"])


def test_stats_of_grey_images_store_them_as_adm_rgb(inception, tmp_path, capsys):
    """`eval stats --with-images` of grey images wrote arr_0 with one channel, which ADM's evaluator and vqar's own
    reference reader (`vqar reproduce --reference`) refuse: it is repeated to RGB, as `vqar sample` writes."""
    from vqar.eval.adm import read_reference

    grey = np.random.default_rng(1).integers(0, 256, (12, 16, 16, 1), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", arr_0=grey)
    assert main(["eval", "stats", str(tmp_path / "grey.npz"), "--out", str(tmp_path / "ref.npz"), "--inception",
                 str(inception.path), "--with-images", "--batch-size", "6"]) == 0  # fmt: skip
    capsys.readouterr()
    with np.load(tmp_path / "ref.npz") as ref:
        np.testing.assert_array_equal(ref["arr_0"], np.repeat(grey, 3, axis=3))
    np.savez(tmp_path / "images_only.npz", arr_0=np.load(tmp_path / "ref.npz")["arr_0"])
    assert read_reference(tmp_path / "images_only.npz").image_shape == (12, 16, 16, 3)


def test_rfid_reads_shards_and_images_of_mixed_sizes(tiny_pipeline, tmp_path):
    from vqar.bundle import load
    from vqar.data.mnist import load_mnist_digits
    from vqar.eval.rfid import center_crop_resize, evaluate_tokenizer

    tokenizer = load(tiny_pipeline / "tokenizer")
    digits = load_mnist_digits()[0][:12, :, :, None]
    np.savez(tmp_path / "digits.npz", arr_0=digits)
    pack_shards(str(tmp_path / "digits.npz"), tmp_path / "shards", shard_size=5, shuffle=False)
    from_shards = evaluate_tokenizer(tokenizer, str(tmp_path / "shards" / "shards.json"), None, batch_size=4)
    assert from_shards == evaluate_tokenizer(tokenizer, tmp_path / "digits.npz", None, batch_size=4)
    # Images of several sizes: each is center-cropped and resized as it is read, as the whole set was before.
    (tmp_path / "mixed").mkdir()
    for i, digit in enumerate(digits):
        big = np.asarray(Image.fromarray(digit[..., 0]).resize((40 + 4 * (i % 2), 48)))
        Image.fromarray(big).save(tmp_path / "mixed" / f"{i:02d}.png")
    (tmp_path / "cropped").mkdir()
    for path in sorted((tmp_path / "mixed").iterdir()):
        cropped = center_crop_resize(np.asarray(Image.open(path))[None, ..., None], tokenizer.image_size)
        Image.fromarray(cropped[0, ..., 0]).save(tmp_path / "cropped" / path.name)
    mixed = evaluate_tokenizer(tokenizer, tmp_path / "mixed", None, batch_size=4)
    assert mixed["images"] == 12 and mixed == evaluate_tokenizer(tokenizer, tmp_path / "cropped", None, batch_size=4)


def test_an_image_folder_is_walked_as_training_walks_it(tmp_path):
    """Evaluation and `vqar reconstruct` see the images a training run of the same folder sees: hidden files
    (macOS "._x.png" forks) are skipped, a symlinked folder is followed, and a link cycle is walked once."""
    for name in ("a.png", "._a.png", "sub/b.png", ".ipynb_checkpoints/c.png", "elsewhere/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(tmp_path / name, format="PNG")
    folder = tmp_path / "set"
    folder.mkdir()
    for name in ("a.png", "._a.png", "sub", ".ipynb_checkpoints"):
        (folder / name).symlink_to(tmp_path / name)
    (folder / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path / "sub")
    found = [path.relative_to(folder).as_posix() for path in sources.image_files(folder)]
    assert found == ["a.png", "linked/d.png", "sub/b.png"]


def test_a_link_to_a_class_folder_inside_the_folder_is_not_a_class_of_its_own(tmp_path, caplog):
    """An alias sorted before its target (a-cats -> cats) was walked first: every cat took its name, and the real
    folder, walked once, was skipped, so the class "cats" vanished. A link to a hidden folder is still followed."""
    folder = tmp_path / "pets"
    for name in ("cats/1.png", "cats/2.png", "dogs/3.png", ".stash/4.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(folder / name, format="PNG")
    (folder / "a-cats").symlink_to(folder / "cats")
    (folder / "birds").symlink_to(folder / ".stash")
    with caplog.at_level(logging.WARNING, logger="vqar.data"):
        dataset = ImageFolderDataset(folder, image_size=8, channels=1)
    assert dataset.class_names == ["birds", "cats", "dogs"] and dataset.labels == [0, 1, 1, 2]
    cats = os.path.realpath(folder / "cats")
    assert f"skipped {folder / 'a-cats'}: it links to {cats} inside the same folder" in caplog.text


def test_two_class_folders_linking_to_one_folder_outside_are_said_to_be_one(tmp_path, caplog):
    """cats -> ../shared and dogs -> ../shared: the images were read once, as cats, and the class dogs vanished
    without a word (the walk reads each real folder once)."""
    for name in ("shared/1.png", "pets/birds/2.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(tmp_path / name, format="PNG")
    folder = tmp_path / "pets"
    (folder / "cats").symlink_to(tmp_path / "shared")
    (folder / "dogs").symlink_to(tmp_path / "shared")
    with caplog.at_level(logging.WARNING, logger="vqar.data"):
        dataset = ImageFolderDataset(folder, image_size=8, channels=1)
    assert dataset.class_names == ["birds", "cats"]
    shared = os.path.realpath(tmp_path / "shared")
    said = f"skipped {folder / 'dogs'}: it leads to {shared}, whose images were read as {folder / 'cats'}"
    assert said in caplog.text


def test_a_named_pipe_with_an_image_name_is_skipped_and_a_broken_link_kept(tmp_path, caplog):
    """`vqar reconstruct FOLDER` (and evaluation, and training) waited forever on a FIFO named like an image in the
    folder; a link that leads nowhere is still listed, to be reported unreadable with the other bad files."""
    folder = tmp_path / "set"
    (folder / "sub").mkdir(parents=True)
    Image.new("L", (8, 8)).save(folder / "sub" / "a.png", format="PNG")
    os.mkfifo(folder / "sub" / "pipe.png")
    (folder / "gone.png").symlink_to(tmp_path / "missing.png")
    with caplog.at_level(logging.WARNING, logger="vqar.data"):
        found = [path.relative_to(folder).as_posix() for path in sources.image_files(folder)]
    assert found == ["gone.png", "sub/a.png"]
    assert f"skipped {folder / 'sub' / 'pipe.png'}: it is not a regular file (a named pipe" in caplog.text


def test_an_npy_of_another_layout_is_named_with_the_layout_evaluation_reads(tmp_path):
    """A .npy, which training reads, was "no image folder, .npz file, sample run or tar shards at" it, as if missing."""
    np.save(tmp_path / "floats.npy", np.zeros((4, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"floats.npy: evaluation reads uint8 images \(N, H, W, 1 or 3\), got float32 "
                                         r"\(4, 3, 8, 8\); save them in that layout"):  # fmt: skip
        open_source(tmp_path / "floats.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"cannot read images from .*objects.npy: "):  # a pickle is never loaded
        open_source(tmp_path / "objects.npy")


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_a_decompression_bomb_is_skipped_and_counted(tmp_path, monkeypatch, caplog, kind):
    """A header past twice Pillow's pixel limit raises DecompressionBombError, no OSError: eval stats, rfid and fid
    ended in its traceback, where training skips and counts the file."""
    images = np.random.default_rng(3).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    Image.new("RGB", (32, 32)).save(folder / "bomb.png")
    source = folder
    if kind == "shards":
        pack_shards(str(folder), tmp_path / "shards", shard_size=2, shuffle=False)
        source = tmp_path / "shards" / "shards.json"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # an 8x8 image is fine, a 32x32 one (1024 > 2 x 100) a bomb
    with caplog.at_level(logging.WARNING, logger="vqar.eval"):
        got = load_images(source)
    np.testing.assert_array_equal(got, images)
    assert "DecompressionBombError" in caplog.text and "1 of 4" in caplog.text


def test_a_colour_image_after_many_grey_ones_keeps_its_colour(tmp_path, caplog):
    """The first 16 files decided: a red image after 16 grey ones was read as grey 76, without a word."""
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(20):
        Image.new("L", (8, 8), color=10 * i).save(folder / f"{i:02d}.png")
    Image.new("RGB", (8, 8), color=(255, 0, 0)).save(folder / "99-red.png")
    got = load_images(folder)
    assert got.shape == (21, 8, 8, 3) and tuple(got[-1, 0, 0]) == (255, 0, 0)
    assert tuple(got[3, 0, 0]) == (30, 30, 30)  # grey ones repeated to RGB
    assert load_images(folder, max_images=20).shape == (20, 8, 8, 1)  # a grey set stays one channel
    # shards are not read through to decide: a colour sample past the first 16 is said
    pack_shards(str(folder), tmp_path / "shards", shard_size=8, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="vqar.eval"):
        greyed = load_images(tmp_path / "shards" / "shards.json")
    assert greyed.shape == (21, 8, 8, 1)
    assert "is a colour image in shards whose first 16 samples are grey" in caplog.text
