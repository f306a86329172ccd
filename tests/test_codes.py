"""The code store: extraction views, the manifest, reading back, damage detection, and the options of
`vqar extract-codes`."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from vqar.bundle import load
from vqar.data import DataConfig, build_datasets
from vqar.data.codes import CodeDataset, read_manifest
from vqar.data.extraction import extract_codes


def test_store_layout_and_codes_match_the_tokenizer(tiny_pipeline):
    store = CodeDataset(tiny_pipeline / "codes")
    manifest = read_manifest(tiny_pipeline / "codes")
    assert manifest["views"] == ["image", "mirror"] and manifest["num_items"] == 600 == len(store)
    assert store.code_shape == (4, 4, 4) and store.codebook_size == 64 and store.num_classes == 10
    assert (tiny_pipeline / "codes" / "tokenizer" / "model.safetensors").is_file()
    tokenizer = load(store.tokenizer_path)
    images, labels = [], []
    full = DataConfig(source="mnist", max_images=600, val_fraction=0.0)
    dataset = build_datasets(full)[0]
    for i in (0, 123, 599):
        sample = dataset[i]
        item = store[i]
        assert item.label == sample.label
        images.append(sample.image)
        labels.append(item.codes)
    images = torch.stack(images)
    codes = torch.stack(labels)
    assert torch.equal(codes[:, 0], tokenizer.encode(images))
    assert torch.equal(codes[:, 1], tokenizer.encode(images.flip(-1)))
    assert store.evaluation_view == 0  # the image as it is


def test_ten_crop_views(tiny_pipeline, tmp_path):
    tokenizer = load(tiny_pipeline / "tokenizer")
    data = DataConfig(source="mnist", max_images=20)
    manifest = extract_codes(tokenizer, data, tmp_path / "tc", views="ten-crop", crop_range=1.25)
    store = CodeDataset(tmp_path / "tc")
    assert len(manifest["views"]) == 10 and store[0].codes.shape == (10, 4, 4, 4)
    assert manifest["crop_range"] == 1.25
    # Crops 5..9 are the mirror images of crops 0..4.
    big = build_datasets(DataConfig(source="mnist", max_images=20, image_size=40, val_fraction=0.0))[0][3].image
    center = big[None, :, 4:36, 4:36]
    assert torch.equal(store[3].codes[4], tokenizer.encode(center)[0])
    assert torch.equal(store[3].codes[9], tokenizer.encode(center.flip(-1))[0])
    assert store.evaluation_view == 4  # validation scores the centre crop (it scored the top-left corner)


@pytest.mark.parametrize("crop_range", [float("nan"), float("inf"), 0.5, 1e9])  # 1e9: an OverflowError traceback
def test_a_crop_range_that_is_no_finite_factor_is_refused(tokenizer_folder, tmp_path, crop_range):
    with pytest.raises(ValueError, match=r"crop_range must be a number from 1 to 8 \(LlamaGen's is 1.1"):
        extract_codes(load(tokenizer_folder), DataConfig(source="mnist", max_images=20), tmp_path / "tc",
                      views="ten-crop", crop_range=crop_range)  # fmt: skip
    assert not (tmp_path / "tc").exists()


def test_existing_store_is_not_overwritten_and_damage_is_detected(tiny_pipeline, tmp_path):
    tokenizer = load(tiny_pipeline / "tokenizer")
    data = DataConfig(source="mnist", max_images=20)
    extract_codes(tokenizer, data, tmp_path / "codes")
    with pytest.raises(FileExistsError, match="--overwrite"):
        extract_codes(tokenizer, data, tmp_path / "codes")
    manifest = json.loads((tmp_path / "codes" / "manifest.json").read_text())
    shard = tmp_path / "codes" / manifest["shards"][0]["codes"]
    codes = np.load(shard)
    codes[0, 0, 0, 0, 0] = (int(codes[0, 0, 0, 0, 0]) + 1) % 64
    np.save(shard, codes)
    with pytest.raises(ValueError, match="damaged"):
        CodeDataset(tmp_path / "codes")
    with pytest.raises(FileNotFoundError, match="extract-codes"):
        CodeDataset(tmp_path)
    assert not list(tmp_path.glob(".codes.tmp-*"))


def test_shards_of_a_captioned_folder_hold_what_one_shard_holds(tiny_pipeline, tmp_path):
    folder = tmp_path / "photos"
    (folder / "squares").mkdir(parents=True)
    for i in range(7):
        Image.fromarray(np.full((32, 32), 30 * i, dtype=np.uint8)).save(folder / "squares" / f"{i}.png")
    (folder / "squares" / "broken.png").write_bytes(b"not a png")
    captions = [{"file": f"squares/{i}.png", "caption": f"square {i}"} for i in (0, 2, 3, 5)]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in captions))
    tokenizer = load(tiny_pipeline / "tokenizer")
    data = DataConfig(source=str(folder), eval_batch_size=2)
    whole = extract_codes(tokenizer, data, tmp_path / "whole")
    sharded = extract_codes(tokenizer, data, tmp_path / "sharded", shard_size=3)
    # units are ranges of three source files (broken.png and uncaptioned images included), so 0,2 | 3,5 | none
    assert [s["count"] for s in sharded["shards"]] == [2, 2] and len(whole["shards"]) == 1
    for manifest in (whole, sharded):
        assert manifest["num_items"] == 4 and manifest["uncaptioned_images"] == 3 and manifest["skipped_files"] == 1
    one, many = CodeDataset(tmp_path / "whole"), CodeDataset(tmp_path / "sharded")
    assert [many[i].captions for i in range(4)] == [[f"square {i}"] for i in (0, 2, 3, 5)]
    assert all(torch.equal(one[i].codes, many[i].codes) and one[i].captions == many[i].captions for i in range(4))


def test_a_failed_extraction_keeps_the_previous_store_and_resumes_where_it_stopped(
    tiny_pipeline, tmp_path, monkeypatch, caplog
):
    tokenizer = load(tiny_pipeline / "tokenizer")
    data = DataConfig(source="mnist", max_images=40, eval_batch_size=8)
    extract_codes(tokenizer, data, tmp_path / "codes")
    before = (tmp_path / "codes" / "manifest.json").read_text()
    fresh = extract_codes(tokenizer, data, tmp_path / "fresh", shard_size=8)
    encode, calls = type(tokenizer).encode, []

    def failing_encode(self, images):
        calls.append(len(images))
        if len(calls) == 4:  # after three shards were written
            raise RuntimeError("out of memory")
        return encode(self, images)

    monkeypatch.setattr(type(tokenizer), "encode", failing_encode)
    with pytest.raises(RuntimeError, match="out of memory"):
        extract_codes(tokenizer, data, tmp_path / "codes", overwrite=True, shard_size=8)
    assert (tmp_path / "codes" / "manifest.json").read_text() == before
    assert len(CodeDataset(tmp_path / "codes")) == 40
    work = tmp_path / ".codes.partial"
    assert sorted(p.name for p in work.glob("part-*.json")) == [f"part-0000{u}.json" for u in range(3)]

    calls.clear()
    with caplog.at_level(logging.INFO, logger="vqar"):
        resumed = extract_codes(tokenizer, data, tmp_path / "codes", overwrite=True, shard_size=8)
    assert calls == [8, 8]  # only the two shards the failed run had not finished
    assert "encoded 16 images in" in caplog.text  # the rate it reports is of those, not of all 40
    assert resumed["shards"] == fresh["shards"] and resumed["num_items"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes", "fresh"]
    one, other = CodeDataset(tmp_path / "codes"), CodeDataset(tmp_path / "fresh")
    assert all(torch.equal(one[i].codes, other[i].codes) and one[i].label == other[i].label for i in range(40))


def test_a_resumed_extraction_starts_again_when_its_settings_changed(tiny_pipeline, tmp_path, monkeypatch):
    tokenizer = load(tiny_pipeline / "tokenizer")
    data = DataConfig(source="mnist", max_images=24, eval_batch_size=8)
    encode, calls = type(tokenizer).encode, []

    def failing_encode(self, images):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return encode(self, images)

    monkeypatch.setattr(type(tokenizer), "encode", failing_encode)
    with pytest.raises(RuntimeError, match="out of memory"):
        extract_codes(tokenizer, data, tmp_path / "codes", shard_size=8)
    calls.clear()
    monkeypatch.setattr(
        type(tokenizer), "encode", lambda self, images: calls.append(len(images)) or encode(self, images)
    )
    extract_codes(tokenizer, data, tmp_path / "codes", shard_size=8, views="flip")
    assert calls == [16, 16, 16]  # a flip extraction shares nothing with the plain one: every shard again
    store = CodeDataset(tmp_path / "codes")
    assert len(store) == 24 and store[0].codes.shape[0] == 2


def test_a_resumed_extraction_follows_its_captions_not_the_spelling_of_its_folder(tiny_pipeline, tmp_path,
                                                                                     monkeypatch, caplog):  # fmt: skip
    """Resumed with another caption file (or the same one edited), the store mixed both sets of captions; resumed
    with `imgs/` for `imgs`, all the finished shards were thrown away; Ctrl-C before the first shard left the work
    folder behind."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((32, 32), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    for version in ("old", "new"):
        (tmp_path / f"{version}.tsv").write_text("".join(f"{i}.png\t{version} {i}\n" for i in range(6)))
    tokenizer = load(tiny_pipeline / "tokenizer")
    encode, calls = type(tokenizer).encode, []

    def encode_then(stop, at, images):
        calls.append(len(images))
        if stop is not None and len(calls) == at:
            raise stop
        return encode(tokenizer, images)

    def extract(source, captions, stop=None, at=2):
        calls.clear()
        patched = lambda self, images: encode_then(stop, at, images)  # noqa: E731
        monkeypatch.setattr(type(tokenizer), "encode", patched)
        data = DataConfig(source=source, captions=str(tmp_path / captions), eval_batch_size=2)
        return extract_codes(tokenizer, data, tmp_path / "store", shard_size=2)

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the first batch: no shard finished, nothing to resume
        extract(str(folder), "old.tsv", stop=KeyboardInterrupt(), at=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "new.tsv", "old.tsv"]
    with pytest.raises(RuntimeError):  # the first shard done, then a failure: kept to resume
        extract(str(folder), "old.tsv", stop=RuntimeError("out of memory"))
    with caplog.at_level(logging.INFO, logger="vqar"), monkeypatch.context() as patch:
        patch.chdir(tmp_path)
        extract("imgs/", "old.tsv")  # the same folder, spelt otherwise (relative, with a slash)
    assert calls == [2, 2] and "1 of 3 shards are done" in caplog.text
    store = CodeDataset(tmp_path / "store")
    assert [store[i].captions for i in range(6)] == [[f"old {i}"] for i in range(6)]

    import shutil

    shutil.rmtree(tmp_path / "store")
    with pytest.raises(RuntimeError):
        extract(str(folder), "old.tsv", stop=RuntimeError("out of memory"))
    extract(str(folder), "new.tsv")  # another caption file: every shard again
    assert calls == [2, 2, 2]
    store = CodeDataset(tmp_path / "store")
    assert [store[i].captions for i in range(6)] == [[f"new {i}"] for i in range(6)]

    # An image edited between the failure and the rerun, the count unchanged: resumed, the store kept its old codes
    # (and an image moved between class folders was stored twice, another not at all).
    shutil.rmtree(tmp_path / "store")
    with pytest.raises(RuntimeError):
        extract(str(folder), "new.tsv", stop=RuntimeError("out of memory"))
    Image.fromarray(np.full((32, 32), 255, dtype=np.uint8)).save(folder / "0.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vqar"):
        extract(str(folder), "new.tsv")
    assert calls == [2, 2, 2] and "holds an extraction with other settings or of other files" in caplog.text
    fresh = extract_codes(tokenizer, DataConfig(source=str(folder), captions=str(tmp_path / "new.tsv"),
                                                eval_batch_size=2), tmp_path / "fresh", shard_size=2)  # fmt: skip
    assert fresh["num_items"] == 6
    assert torch.equal(CodeDataset(tmp_path / "store")[0].codes, CodeDataset(tmp_path / "fresh")[0].codes)


def test_overwrite_refuses_a_store_or_shard_folder_holding_other_files(tiny_pipeline, tmp_path):
    """`extract-codes --data store/mine.npz --out store --overwrite` deleted mine.npz (the very images it was
    reading) and the notes beside it with the old store; so did pack-shards with its folder."""
    from vqar.data.pack import pack_shards

    tokenizer = load(tiny_pipeline / "tokenizer")
    extract_codes(tokenizer, DataConfig(source="mnist", max_images=8), tmp_path / "store")
    pack_shards("mnist", tmp_path / "shards", max_images=8)
    for folder in ("store", "shards"):
        np.savez(tmp_path / folder / "mine.npz", arr_0=np.zeros((4, 32, 32), np.uint8))
        (tmp_path / folder / "NOTES.txt").write_text("mine")
    message = r"is {} but also holds NOTES.txt, mine.npz, which it is not made of: --overwrite would delete them"
    with pytest.raises(FileExistsError, match=message.format("a code store")):
        extract_codes(tokenizer, DataConfig(source=str(tmp_path / "store" / "mine.npz")), tmp_path / "store",
                      overwrite=True)  # fmt: skip
    with pytest.raises(FileExistsError, match=message.format("a folder of tar shards")):
        pack_shards(str(tmp_path / "shards" / "mine.npz"), tmp_path / "shards", overwrite=True)
    for folder in ("store", "shards"):
        assert (tmp_path / folder / "NOTES.txt").read_text() == "mine" and (tmp_path / folder / "mine.npz").is_file()
    (tmp_path / "store" / "NOTES.txt").unlink()
    (tmp_path / "store" / "mine.npz").unlink()
    extract_codes(tokenizer, DataConfig(source="mnist", max_images=8), tmp_path / "store", overwrite=True)


# ---------------------------------------------------------------- vqar extract-codes options, refused before any work
@pytest.mark.parametrize("view", [[], ["--flip"]])
def test_a_crop_range_without_ten_crop_is_refused(tokenizer_folder, tmp_path, capsys, view):
    """It was silently ignored: the store held the uncropped views and a manifest crop_range of None."""
    out = tmp_path / "codes"
    code, err = run_cli(["extract-codes", "--tokenizer", str(tokenizer_folder), "--data", "mnist", "--out", str(out),
                         "--crop-range", "1.5", *view], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "--crop-range has no effect without --ten-crop" in err, err
    assert not out.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "0.5", "1e9"])  # 1e9 was an OverflowError traceback, status 1
def test_a_crop_range_that_is_no_finite_factor_is_refused_naming_it(tokenizer_folder, tmp_path, capsys, value):
    out = tmp_path / "codes"
    code, err = run_cli(["extract-codes", "--tokenizer", str(tokenizer_folder), "--data", "mnist", "--out", str(out),
                         "--ten-crop", "--crop-range", value], capsys)  # fmt: skip
    assert code == 2 and "--crop-range" in err and "must be a number from 1 to 8" in err and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / ".codes.partial").exists()


def test_extract_codes_names_its_own_options(tokenizer_folder, tmp_path, capsys):
    """An --image-size the tokenizer cannot tile was found at the first batch, as 'image height and width must be
    multiples of ...' naming no option; --captions digits off the digits was told as `data.captions=digits`."""
    images = tmp_path / "images.npz"
    np.savez(images, arr_0=np.zeros((4, 32, 32), np.uint8))
    out = tmp_path / "codes"
    for args, message in (
        (["--data", "mnist", "--image-size", "10"], "--image-size 10 is not a positive multiple of the tokenizer's "
                                                    "downsampling factor 8"),
        (["--data", str(images), "--captions", "digits"], "(--captions digits) writes captions for the bundled "
                                                          "digits only (data.source=mnist, --data mnist)"),
    ):  # fmt: skip
        code, err = run_cli(["extract-codes", "--tokenizer", str(tokenizer_folder), *args, "--out", str(out)], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["images.npz"]


def test_images_beside_class_folders_are_warned_at_extraction_and_refused_by_a_class_run(
    tokenizer_folder, tmp_path, capsys, caplog
):
    """Images directly in a folder of class folders got label -1 silently; a class-conditional run on their codes
    trained, then failed at its first evaluation ('class ids must lie in [0, 2), got [-1, 1]') with nothing saved."""
    images = tmp_path / "images"
    for name in ("cats", "dogs"):
        (images / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((28, 28), 30 * i, dtype=np.uint8)).save(images / name / f"{i}.png")
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(images / "loose.png")
    codes = tmp_path / "codes"
    with caplog.at_level(logging.WARNING, logger="vqar.data"):
        assert run_cli(["extract-codes", "--tokenizer", str(tokenizer_folder), "--data", str(images), "--out",
                        str(codes)], capsys)[0] == 0  # fmt: skip
    assert (f"1 of the 7 images lie directly in {images}, beside its 2 class folders: they have no class (label -1), "
            "which a class-conditional model cannot train on (first: loose.png)") in caplog.text  # fmt: skip
    run = tmp_path / "run"
    code, err = run_cli(["train", "ar", "rq-mnist", f"codes={codes}", "size=RQ-XS", "--out", str(run)], capsys)
    assert code == 2 and err == (f"vqar: error: the code store {codes} holds 1 of its 7 items without a class (label "
                                 "-1: images that lay directly in the image folder, beside its class folders), which "
                                 "a class-conditional model cannot train on: move those images into a class folder, "
                                 "or out of the folder, and extract the codes again\n")  # fmt: skip
    assert not run.exists()
    # From an .npz the advice was the folder's; it is the array's now.
    pixels = np.zeros((4, 28, 28, 1), dtype=np.uint8)
    np.savez(tmp_path / "digits.npz", arr_0=pixels, arr_1=np.array([-1, 0, 1, 1]))
    array_codes = tmp_path / "array_codes"
    assert run_cli(["extract-codes", "--tokenizer", str(tokenizer_folder), "--data", str(tmp_path / "digits.npz"),
                    "--out", str(array_codes)], capsys)[0] == 0  # fmt: skip
    code, err = run_cli(["train", "ar", "rq-mnist", f"codes={array_codes}", "size=RQ-XS", "--out", str(run)], capsys)
    assert code == 2 and err == (f"vqar: error: the code store {array_codes} holds 1 of its 4 items without a class "
                                 f"(label -1: images whose label in {tmp_path / 'digits.npz'} is -1, or all of them "
                                 "where it holds no labels), which a class-conditional model cannot train on: give "
                                 "those images a class id >= 0, or leave them out of the array, and extract the codes "
                                 "again\n")  # fmt: skip
    assert not run.exists()


def test_a_folder_with_a_file_name_that_is_not_utf8_is_extracted(tiny_pipeline, tmp_path, capsys):
    """`vqar extract-codes` of a folder holding `caf\\xe9.png` (a Latin-1 name) stopped on "'utf-8' codec can't
    encode character '\\udce9'", naming no file: the resume digest encoded the names as UTF-8."""
    import os

    folder = tmp_path / "images"
    folder.mkdir()
    for i, name in enumerate([b"caf\xe9.png", b"plain.png"]):
        Image.fromarray(np.full((28, 28), 60 * i, np.uint8)).save(os.fsdecode(bytes(folder) + b"/" + name))
    args = ["extract-codes", "--tokenizer", str(tiny_pipeline / "tokenizer"), "--data", str(folder), "--out",
            str(tmp_path / "codes")]  # fmt: skip
    code, err = run_cli(args, capsys)
    assert code == 0, err
    assert len(CodeDataset(tmp_path / "codes")) == 2
