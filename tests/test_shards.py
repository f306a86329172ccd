"""WebDataset tar shards as a data source: packing, reading orders, damage, and the stages that read them."""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_RUN
from vqar.bundle import load, save_pretrained
from vqar.cli import main
from vqar.data import DataConfig, MnistDataset, evaluation_loader, open_dataset, training_loader
from vqar.data.codes import CodeDataset, read_manifest
from vqar.data.extraction import extract_codes
from vqar.data.pack import pack_shards
from vqar.data.shards import ShardDataset, decode_sample, scan_shard, shard_samples
from vqar.text.captions import digit_captions


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    """300 digits with generated captions, in source order, 64 per shard (5 shards, the last one short)."""
    out = tmp_path_factory.mktemp("shards") / "digits"
    pack_shards("mnist", out, shard_size=64, captions="digits", max_images=300, shuffle=False)
    return out


def _all_items(dataset: ShardDataset) -> list:
    """Every sample of every shard, in shard order, decoded."""
    return [dataset.decode(i, raw) for shard in dataset.shards for i, raw in shard_samples(shard)]


def test_packed_digits_read_back_as_the_source(digit_shards):
    index = json.loads((digit_shards / "shards.json").read_text())
    assert [entry["nsamples"] for entry in index["shardlist"]] == [64, 64, 64, 64, 44]
    assert index["class_names"] == [str(d) for d in range(10)] and index["captions"] is True
    dataset = open_dataset(DataConfig(source=str(digit_shards / "shards.json"), image_size=32, channels=1))
    source = MnistDataset(32, 1, max_images=300)
    assert isinstance(dataset, ShardDataset) and len(dataset) == 300 and dataset.num_classes == 10
    items = _all_items(dataset)
    assert [item.index for item in items] == list(range(300))
    for item, expected in zip(items, (source[i] for i in range(300)), strict=True):
        assert torch.equal(item.image, expected.image) and item.label == expected.label
        assert item.captions == digit_captions(expected.label)


def test_a_pattern_or_list_file_without_an_index_is_scanned_to_the_same_counts(digit_shards, tmp_path):
    pattern = str(digit_shards / "shard-{000000..000004}.tar")
    listing = tmp_path / "shards.txt"
    listing.write_text("# five shards\n" + "\n".join(str(p) for p in sorted(digit_shards.glob("*.tar"))) + "\n")
    for source in (pattern, str(listing)):
        dataset = open_dataset(DataConfig(source=source, image_size=32, channels=1))
        assert [s.count for s in dataset.shards] == [64, 64, 64, 64, 44]
        assert dataset.num_classes == 10 and dataset.captioned


def test_shuffled_packing_is_a_seeded_permutation(tmp_path):
    keys = {}
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        pack_shards("mnist", out, shard_size=50, max_images=100, seed=seed)
        with tarfile.open(out / "shard-000000.tar") as tar:
            keys[seed] = [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".png")]
    again = tmp_path / "again"
    pack_shards("mnist", again, shard_size=50, max_images=100, seed=0)
    assert (again / "shard-000000.tar").read_bytes() == (tmp_path / "seed0" / "shard-000000.tar").read_bytes()
    assert keys[0] != keys[1] and keys[0] != sorted(keys[0])
    with pytest.raises(FileExistsError, match="--overwrite"):
        pack_shards("mnist", again, shard_size=50, max_images=100)


def test_split_holds_out_whole_shards(digit_shards):
    dataset = open_dataset(DataConfig(source=str(digit_shards / "shards.json"), image_size=32, channels=1))
    train, val = dataset.split(0.2, seed=3)
    assert len(val.shards) == 1 and len(train.shards) == 4
    assert {s.url for s in train.shards}.isdisjoint(s.url for s in val.shards)
    assert [s.url for s in dataset.split(0.2, seed=3)[1].shards] == [s.url for s in val.shards]
    single = dataset._with(dataset.shards[:1])
    with pytest.raises(ValueError, match="single shard"):
        single.split(0.1, seed=0)
    assert len(dataset.first(100)) == 100 and [s.used for s in dataset.first(100).shards] == [64, 36]


def _indices(loader) -> list[list[int]]:
    return [batch.indices.tolist() for batch in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_training_stream_is_seeded_and_resumes_exactly(digit_shards, workers):
    dataset = open_dataset(DataConfig(source=str(digit_shards / "shards.json"), image_size=32, channels=1,
                                      shuffle_buffer=20))  # fmt: skip

    def batches(epoch=0, start=0, seed=0, rank=0, world=1, count=8):
        return _indices(training_loader(dataset, epoch=epoch, start=start, batches=count, batch_size=16, seed=seed,
                                        rank=rank, world_size=world, num_workers=workers))  # fmt: skip

    whole = batches()
    assert len(whole) == 8 and all(len(b) == 16 for b in whole)
    assert len({i for b in whole for i in b}) == 128  # one pass over the shards: no sample twice
    assert batches() == whole and batches(start=5) == whole[5:]
    assert batches(epoch=1) != whole and batches(seed=1) != whole
    # Each reader (rank x worker) reads its own shards; 2 batches (+ the 20 read ahead into the shuffle buffer) stay
    # within the smallest share (the 44 samples of the last shard), so no reader starts a second pass.
    ranks = [batches(rank=r, world=2, count=2) for r in (0, 1)]
    seen = [{i for b in mine for i in b} for mine in ranks]
    assert len(seen[0]) == len(seen[1]) == 32 and not seen[0] & seen[1]
    shards_read = [{i // 64 for i in mine} for mine in seen]
    assert not shards_read[0] & shards_read[1]


def _evaluated(loader) -> list[int]:
    """The indices a rank scores: each batch's first `counted`, the rest padding."""
    return [i for batch, counted in loader for i in batch.indices[:counted].tolist()]


def test_evaluation_loader_gives_each_rank_its_share_in_order(digit_shards):
    dataset = open_dataset(DataConfig(source=str(digit_shards / "shards.json"), image_size=32, channels=1))
    assert _evaluated(evaluation_loader(dataset, batch_size=32)) == list(range(300))
    shares = [_evaluated(evaluation_loader(dataset, batch_size=32, rank=r, world_size=2)) for r in (0, 1)]
    assert shares[0] == list(range(0, 300, 2)) and shares[1] == list(range(1, 300, 2))


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_shares_of_an_uneven_split_count_each_sample_once(digit_shards, workers):
    dataset = open_dataset(DataConfig(source=str(digit_shards / "shards.json"), image_size=32, channels=1))
    shares = [list(evaluation_loader(dataset, batch_size=16, rank=r, world_size=7, num_workers=workers))
              for r in range(7)]  # fmt: skip
    assert {sum(len(batch) for batch, _ in share) for share in shares} == {43}  # 300 = 7 * 43 - 1: rank 6 pads
    scored = [_evaluated(share) for share in shares]
    assert sorted(i for share in scored for i in share) == list(range(300))
    assert sorted(scored[0]) == list(range(0, 300, 7)) and len(scored[6]) == 42  # workers interleave batches


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_webdataset_index_without_class_names_or_captions_still_gives_them(tmp_path):
    """webdataset's own index (wids: shardlist with nsamples only) skipped the scan that finds the classes and
    captions: a store of 0 classes and no captions, although every sample had cls and txt members."""
    for shard in range(2):
        members = []
        for i in range(3):
            key = f"s{shard}{i}"
            members += [(f"{key}.png", _png(40 * i)), (f"{key}.cls", str(i).encode()), (f"{key}.txt", key.encode())]
        _write_tar(tmp_path / f"train-{shard}.tar", members)
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1,
             "shardlist": [{"url": f"train-{shard}.tar", "nsamples": 3} for shard in range(2)]}  # fmt: skip
    (tmp_path / "wids.json").write_text(json.dumps(index))
    dataset = open_dataset(DataConfig(source=str(tmp_path / "wids.json"), image_size=8, channels=1))
    assert len(dataset) == 6 and dataset.class_names == ["0", "1", "2"] and dataset.captioned
    ours = json.loads((tmp_path / "wids.json").read_text()) | {"class_names": ["a", "b", "c"], "captions": False}
    (tmp_path / "ours.json").write_text(json.dumps(ours))  # pack-shards' index names them: taken as they are
    dataset = open_dataset(DataConfig(source=str(tmp_path / "ours.json"), image_size=8, channels=1))
    assert dataset.class_names == ["a", "b", "c"] and not dataset.captioned


def test_a_shard_holding_more_than_its_index_names_is_said_to(tmp_path, caplog):
    """Samples after the count an index names were left out without a word (the opposite, fewer, was warned)."""
    from vqar.data.shards import Shard, shard_samples

    _write_tar(tmp_path / "grown.tar", [(f"s{i}.png", _png(i)) for i in range(6)])
    with caplog.at_level(logging.WARNING, logger="vqar"):
        assert [i for i, _ in shard_samples(Shard(str(tmp_path / "grown.tar"), 4, 0, 4))] == [0, 1, 2, 3]
        assert len(list(shard_samples(Shard(str(tmp_path / "grown.tar"), 6, 0, 6)))) == 6  # counted right
        assert len(list(shard_samples(Shard(str(tmp_path / "grown.tar"), 6, 0, 2)))) == 2  # a --max-images cut
    assert caplog.text.count("holds more samples than the 4 its index names: the rest were left out") == 1
    assert caplog.text.count("holds more samples") == 1


def test_the_folder_pack_shards_wrote_and_an_upper_case_tar_are_read_as_shards(digit_shards, tmp_path):
    """`--data SHARDS_FOLDER` said "no image files under it (looked for extensions ...)", and `--data SHARD.TAR`
    "expected a .npz or .npy file"."""
    import shutil

    from vqar.eval.sources import open_source

    folder = digit_shards
    through_index = open_dataset(DataConfig(source=str(folder / "shards.json")))
    assert len(open_dataset(DataConfig(source=str(folder)))) == len(through_index)
    assert len(open_source(folder)) == len(through_index)
    first = sorted(folder.glob("*.tar"))[0]
    shutil.copy(first, tmp_path / "SHARD.TAR")
    assert len(open_dataset(DataConfig(source=str(tmp_path / "SHARD.TAR")))) == len(open_dataset(DataConfig(
        source=str(first))))  # fmt: skip


def test_corrupt_members_and_truncated_shards_are_skipped_and_counted(tmp_path):
    first = [("x0.png", _png(10)), ("x0.cls", b"1"), ("x1.png", b"not a png"), ("x1.cls", b"0")]
    first += [("x2.png", _png(30)), ("x2.cls", b"2"), ("x3.txt", b"no image")]
    _write_tar(tmp_path / "a-0.tar", first)
    _write_tar(tmp_path / "a-1.tar", [(f"y{i}.png", _png(i)) for i in range(6)])
    full = (tmp_path / "a-1.tar").read_bytes()
    (tmp_path / "a-1.tar").write_bytes(full[: len(full) // 2 + 100])  # cut inside the samples
    assert scan_shard(str(tmp_path / "a-0.tar")).count == 4
    dataset = open_dataset(DataConfig(source=str(tmp_path / "a-{0..1}.tar"), image_size=8, channels=1))
    assert dataset.num_classes == 3 and [s.count for s in dataset.shards][0] == 4
    items = _all_items(dataset)
    assert len(items) == len(dataset)
    bad = [item for item in items if not hasattr(item, "image")]
    assert [b.index for b in bad[:2]] == [1, 3] and "x1" in bad[0].path and "no image member" in bad[1].error
    good = [item for item in items if hasattr(item, "image")]
    assert [g.label for g in good[:2]] == [1, 2] and good[0].image.mean() == pytest.approx(10 / 127.5 - 1)

    # the truncated shard: its readable samples, then one BadSample per missing position naming the shard
    tail = [item for item in items if item.index >= 4]
    assert tail and any(hasattr(item, "image") for item in tail)
    for item in tail:
        if not hasattr(item, "image"):
            assert item.path == str(tmp_path / "a-1.tar")


def test_extraction_counts_every_lost_sample_and_says_what_it_stored(untrained_tokenizer, tmp_path, caplog):
    """A shard cut short lost the 7 samples its index promised under one path: the summary said "1 unreadable image
    file" and "encoded 20 images" where 13 were stored."""
    images = tmp_path / "digits.npz"
    np.savez(images, arr_0=np.random.default_rng(0).integers(0, 255, (20, 8, 8), dtype=np.uint8),
             arr_1=np.arange(20) % 3)  # fmt: skip
    assert main(["pack-shards", str(images), "--out", str(tmp_path / "shards"), "--shard-size", "7"]) == 0
    with open(tmp_path / "shards" / "shard-000001.tar", "r+b") as shard:
        shard.truncate(600)  # inside its first member: all 7 samples are lost
    out = tmp_path / "codes"
    with caplog.at_level(logging.INFO, logger="vqar"):
        assert main(["extract-codes", "--tokenizer", str(untrained_tokenizer), "--data",
                     str(tmp_path / "shards" / "shards.json"), "--out", str(out)]) == 0  # fmt: skip
    manifest = read_manifest(out)
    assert manifest["num_items"] == 13 and manifest["skipped_files"] == 1 and manifest["skipped_samples"] == 7
    assert "skipped 7 unreadable samples in 1 file" in caplog.text
    assert re.search(r"encoded 13 images in ", caplog.text), caplog.text


def test_a_class_id_beyond_the_index_class_names_makes_its_sample_unusable(tmp_path):
    """Stored as it was, a class id the index names no class for was refused only when an AR model trained on the
    code store, after the whole extraction."""
    members = []
    for i in range(3):
        members += [(f"s{i}.png", _png(40 * i)), (f"s{i}.cls", str(i).encode())]
    _write_tar(tmp_path / "train-0.tar", members)
    index = {"shardlist": [{"url": "train-0.tar", "nsamples": 3}], "class_names": ["a", "b"], "captions": False}
    (tmp_path / "index.json").write_text(json.dumps(index))
    items = _all_items(open_dataset(DataConfig(source=str(tmp_path / "index.json"), image_size=8, channels=1)))
    assert [item.label for item in items[:2]] == [0, 1]
    assert not hasattr(items[2], "image") and "class id 2 is beyond the 2 class names of the index" in items[2].error
    raw = {"__key__": "x0", "png": _png(10), "cls": b"7"}  # an index naming no classes takes any id
    assert decode_sample(raw, 0, image_size=8, channels=1, captioned=False).label == 7


def test_a_caption_that_is_no_unicode_text_makes_its_sample_unusable():
    # JSON can escape a lone surrogate; such a caption cannot be tokenized or written to a caption store as UTF-8.
    raw = {"__key__": "x0", "png": _png(10), "json": b'{"caption": "caf\\udce9"}'}
    bad = decode_sample(raw, 0, image_size=8, channels=1, captioned=True)
    assert not hasattr(bad, "image") and "not Unicode text" in bad.error
    raw["json"] = b'{"caption": "caf\\u00e9"}'  # an escaped character is fine
    assert decode_sample(raw, 0, image_size=8, channels=1, captioned=True).captions == ["caf\u00e9"]


@pytest.mark.parametrize(("member", "captions", "error"), [
    (b'{"caption": {"en": "a cat", "de": "eine Katze"}}', None, 'the .json member\'s "caption" holds an object'),
    (b'{"captions": ["a dog", null]}', ["a dog"], None),  # a null among captions is a missing one, not "None"
    (b'{"captions": [1, 2.5]}', None, 'the .json member\'s "captions" holds a number (1)'),
    (b'{"caption": 0}', None, 'the .json member\'s "caption" holds a number (0)'),
    (b'{"caption": null, "text": "a bird"}', ["a bird"], None),  # the first key that holds a caption
    (b'{"caption": "\\u200b"}', [], None),  # nothing visible: the empty caption, guidance's null condition
    (b'{"caption": "first line\\nsecond   line"}', ["first line second line"], None),
])
def test_a_shard_s_json_captions_are_read_as_a_caption_file_s(member, captions, error):
    """Captions that were not strings became caption text (a dict's keys, "None", "2.5") or vanished ({"caption":
    0}); an invisible caption was the null caption; a line break was kept, and broke the one-caption-per-line files
    a run writes. A shard's captions now follow the caption files' rules."""
    sample = decode_sample({"__key__": "x0", "png": _png(10), "json": member}, 0, image_size=8, channels=1,
                           captioned=True)  # fmt: skip
    if error is None:
        assert sample.captions == captions
    else:
        assert not hasattr(sample, "image") and error in sample.error, sample


def test_a_shard_s_txt_captions_lose_a_bom_and_name_text_that_is_not_utf8():
    raw = {"__key__": "x0", "png": _png(10), "txt": "\ufeffa caption\n\u200b\n  two  spaces ".encode()}
    assert decode_sample(raw, 0, image_size=8, channels=1, captioned=True).captions == ["a caption", "two spaces"]
    raw["txt"] = "caf\u00e9".encode("latin-1")
    bad = decode_sample(raw, 0, image_size=8, channels=1, captioned=True)
    assert "the .txt caption is not UTF-8 text" in bad.error


def test_shards_whose_readable_images_have_no_caption_say_so(untrained_tokenizer, tmp_path, capsys):
    """Only a sample without an image had a caption: all readable images were left out as uncaptioned, and the
    error said 'no readable images'."""
    _write_tar(tmp_path / "a-0.tar", [("x0.png", _png(10)), ("x0.cls", b"1"), ("x1.txt", b"a caption, no image")])
    out = tmp_path / "codes"
    args = ["extract-codes", "--tokenizer", str(untrained_tokenizer), "--data", str(tmp_path / "a-0.tar")]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "none of the 1 readable images" in err and "has a caption" in err and "--captions none" in err, err
    assert not out.exists() and not (tmp_path / ".codes.partial").exists()
    assert main([*args, "--out", str(out), "--captions", "none"]) == 0  # the advice works
    assert len(CodeDataset(out)) == 1

def test_shards_that_cannot_be_fetched_are_not_called_damaged(tmp_path, monkeypatch, caplog):
    """Offline, every remote shard fails before its first sample: that is said, not 'damaged after 0 samples' and
    'hold no samples'."""
    import vqar.data.shards as shards

    def unreachable(url):
        return shards.ShardScan(error="OSError: curl exit 6 (could not resolve host)")

    monkeypatch.setattr(shards, "scan_shard", unreachable)
    listing = tmp_path / "remote.txt"
    listing.write_text("https://example.invalid/a-000000.tar\nhttps://example.invalid/a-000001.tar\n")
    with caplog.at_level(logging.WARNING, logger="vqar"), pytest.raises(ValueError) as err:
        open_dataset(DataConfig(source=str(listing), image_size=8, channels=1))
    assert "none of the 2 shards" in str(err.value) and "could not resolve host" in str(err.value)
    assert "could not be read" in caplog.text and "damaged" not in caplog.text


def test_a_negative_packing_seed_is_named(tmp_path, capsys):
    """`--seed -1` ended in NumPy's "expected non-negative integer", naming no option."""
    with pytest.raises(ValueError, match=r"^--seed must be >= 0, got -1$"):
        pack_shards("mnist", tmp_path / "a", seed=-1)
    with pytest.raises(SystemExit) as stop:  # argparse's own refusal
        main(["pack-shards", "mnist", "--out", str(tmp_path / "b"), "--seed", "-1"])
    assert stop.value.code == 2 and "argument --seed: must be an integer >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_folder_packs_with_labels_and_captions_leaving_out_unreadable_files(tmp_path, caplog):
    folder = tmp_path / "photos"
    for name in ("cats", "dogs"):
        (folder / name).mkdir(parents=True)
    Image.fromarray(np.full((16, 16, 3), 40, dtype=np.uint8)).save(folder / "cats" / "a.jpg", quality=90)
    Image.fromarray(np.full((16, 16, 3), 90, dtype=np.uint8)).save(folder / "dogs" / "b.png")
    Image.fromarray(np.full((16, 16, 3), 140, dtype=np.uint8)).save(folder / "dogs" / "c.bmp")
    (folder / "dogs" / "broken.png").write_bytes(b"\x89PNG broken")
    captions = [{"file": "cats/a.jpg", "caption": "a grey cat"}, {"file": "dogs/c.bmp", "caption": "a pale dog"}]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in captions))
    with caplog.at_level(logging.WARNING, logger="vqar.data"):
        report = pack_shards(str(folder), tmp_path / "out", shard_size=2, shuffle=False)
    assert report.written == 3 and len(report.skipped) == 1 and report.skipped[0].endswith("broken.png")
    # it named Pillow's buffer, "cannot identify image file <_io.BytesIO object at 0x...>"
    broken = folder / "dogs" / "broken.png"
    assert f"{broken}: UnidentifiedImageError: cannot identify image file {str(broken)!r}" in caplog.text
    assert report.index["class_names"] == ["cats", "dogs"] and report.index["captions"] is True
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert tar.extractfile("00000000.jpg").read() == (folder / "cats" / "a.jpg").read_bytes()  # bytes kept
    assert names == ["00000000.cls", "00000000.jpg", "00000000.txt", "00000001.cls", "00000001.png", "00000001.txt"]
    with tarfile.open(tmp_path / "out" / "shard-000001.tar") as tar:
        assert tar.getnames() == ["00000003.cls", "00000003.png", "00000003.txt"]  # the bmp, as PNG; 2 is broken
    dataset = open_dataset(DataConfig(source=str(tmp_path / "out" / "shards.json"), image_size=16, channels=3))
    items = _all_items(dataset)
    assert [(i.label, i.captions) for i in items] == [(0, ["a grey cat"]), (1, []), (1, ["a pale dog"])]


def test_high_depth_images_pack_as_the_folder_reads_them(tmp_path):
    """A float TIFF in [0, 1] packed black and a 16-bit one almost white: packing clipped them at 255 where the
    folder reader scales them to 8 bits."""
    folder = tmp_path / "deep"
    folder.mkdir()
    ramp = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    Image.fromarray(ramp).save(folder / "unit.tiff")  # mode F
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(folder / "sixteen.tiff")  # mode I;16
    config = {"image_size": 16, "channels": 1}
    direct = list(open_dataset(DataConfig(source=str(folder), **config)))
    pack_shards(str(folder), tmp_path / "out", shuffle=False)
    packed = _all_items(open_dataset(DataConfig(source=str(tmp_path / "out" / "shards.json"), **config)))
    assert len(packed) == len(direct) == 2
    for before, after in zip(direct, packed, strict=True):
        assert before.image.std() > 0.5 and torch.equal(after.image, before.image)


def test_a_tokenizer_trains_from_shards(digit_shards, tmp_path):
    source = f"data.source={digit_shards / 'shards.json'}"
    args = ["train", "tokenizer", "rqvae-mnist", "--out", str(tmp_path / "tok"), *TINY_RUN, source,
            "data.val_fraction=0.2", "steps=6", "train.eval_every=6", "train.log_every=3"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "tok" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert [r["step"] for r in train_rows] == [3, 6] and any(r.get("split") == "val" for r in rows)
    assert (tmp_path / "tok" / "model.safetensors").is_file()


def test_extraction_from_shards_equals_extraction_from_the_folder(tiny_pipeline, tmp_path):
    folder = tmp_path / "digits"
    for i in range(12):
        (folder / str(i % 3)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32), 20 * i, dtype=np.uint8)).save(folder / str(i % 3) / f"{i:02d}.png")
    (folder / "1" / "zz-broken.png").write_bytes(b"not a png")
    captions = [{"file": f"{i % 3}/{i:02d}.png", "caption": f"shade {i}"} for i in range(12) if i != 4]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in captions))
    pack_shards(str(folder), tmp_path / "shards", shard_size=5, shuffle=False)
    tokenizer = load(tiny_pipeline / "tokenizer")
    for name, source in (("from-folder", folder), ("from-shards", tmp_path / "shards" / "shards.json")):
        extract_codes(tokenizer, DataConfig(source=str(source), eval_batch_size=4), tmp_path / name, views="flip")
    one, other = CodeDataset(tmp_path / "from-folder"), CodeDataset(tmp_path / "from-shards")
    assert len(one) == len(other) == 11  # 12 readable images, one without a caption
    assert one.num_classes == other.num_classes == 3
    for a, b in zip((one[i] for i in range(11)), (other[i] for i in range(11)), strict=True):
        assert torch.equal(a.codes, b.codes) and a.label == b.label and a.captions == b.captions


def test_pack_shards_command(tmp_path, capsys):
    assert main(["pack-shards", "mnist", "--out", str(tmp_path / "s"), "--shard-size", "40", "--max-images",
                 "100"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "packed 100 images into 3 shards" in out and "data.source=" in out
    assert main(["pack-shards", "mnist", "--out", str(tmp_path / "s")]) == 2
    assert "already exists" in capsys.readouterr().err
    # A source that is not there: what pack-shards packs, not the data sources' list, which offers tar shards too.
    assert main(["pack-shards", str(tmp_path / "typo"), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err == f"vqar: error: source '{tmp_path / 'typo'}' not found; pack-shards packs 'mnist', an image folder " \
                  "or a .npz/.npy file\n", err  # fmt: skip
    assert not (tmp_path / "t").exists()


def test_pack_shards_says_one_image_shard_class_and_file_in_the_singular(tmp_path, capsys):
    """It said 'packed 1 images into 1 shards (1 classes, 1 unreadable files left out)'."""
    (tmp_path / "images" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / "cat" / "a.png")
    (tmp_path / "images" / "cat" / "b.png").write_bytes(b"not an image")
    assert main(["pack-shards", str(tmp_path / "images"), "--out", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"packed 1 image into 1 shard in {tmp_path / 's'} (1 class, 1 unreadable file left out)"
    )
    # a source without labels: "(0 classes)" read as if its classes had been lost
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "flat" / "a.png")
    assert main(["pack-shards", str(tmp_path / "flat"), "--out", str(tmp_path / "u")]) == 0
    said = capsys.readouterr().out.splitlines()[0]
    assert said == f"packed 1 image into 1 shard in {tmp_path / 'u'} (no class labels)"


def _index_with(digit_shards, tmp_path, first: dict) -> str:
    """A copy of the digits' shard index (absolute URLs) whose first entry is replaced by `first`."""
    index = json.loads((digit_shards / "shards.json").read_text())
    for entry in index["shardlist"]:
        entry["url"] = str(digit_shards / entry["url"])
    index["shardlist"][0] = {**index["shardlist"][0], **first}
    path = tmp_path / "index.json"
    path.write_text(json.dumps(index))
    return str(path)


@pytest.fixture(scope="module")
def untrained_tokenizer(tmp_path_factory):
    from vqar.tokenizers import Tokenizer
    from vqar.train.tokenizer import load_run_config

    folder = tmp_path_factory.mktemp("tokenizer") / "tok"
    save_pretrained(Tokenizer(load_run_config("rqvae-mnist", TINY_RUN).model), folder)
    return folder


def test_an_index_cannot_run_commands_unless_allowed(digit_shards, untrained_tokenizer, tmp_path, capsys, caplog):
    marker = tmp_path / "ran"
    command = f"pipe:touch {marker}; cat {digit_shards / 'shard-000000.tar'}"
    index = _index_with(digit_shards, tmp_path, {"url": command})
    listing = tmp_path / "shards.txt"
    listing.write_text(command + "\n")
    for source in (index, str(listing), command):  # an index, a list file, the source itself
        with pytest.raises(ValueError, match="shell command .* data.allow_pipe=true"):
            open_dataset(DataConfig(source=source, image_size=32, channels=1))
    extract = ["extract-codes", "--tokenizer", str(untrained_tokenizer), "--data", index, "--out"]
    capsys.readouterr()
    assert main([*extract, str(tmp_path / "codes")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allow-pipe" in err and f"touch {marker}" in err
    assert not marker.exists() and not (tmp_path / "codes").exists()
    with caplog.at_level(logging.WARNING, logger="vqar.data"):  # asked for: it runs, and says what it runs first
        assert main([*extract, str(tmp_path / "codes"), "--allow-pipe"]) == 0
    assert marker.exists() and f"running the shard command: touch {marker}" in caplog.text
    assert len(CodeDataset(tmp_path / "codes")) == 300
    dataset = open_dataset(DataConfig(source=index, image_size=32, channels=1, allow_pipe=True))  # the API's opt-in
    assert len(dataset) == 300


@pytest.mark.timeout(120)  # it wrote a warning per missing sample, 10^7 of them, and never ended
def test_an_index_that_promises_more_samples_than_a_shard_holds(digit_shards, untrained_tokenizer, tmp_path,
                                                               caplog):  # fmt: skip
    index = _index_with(digit_shards, tmp_path, {"nsamples": 10_000_000})
    tokenizer = load(untrained_tokenizer)
    with caplog.at_level(logging.WARNING, logger="vqar.data"):
        manifest = extract_codes(tokenizer, DataConfig(source=index, eval_batch_size=64), tmp_path / "codes")
    warnings = [r.getMessage() for r in caplog.records if "shard-000000.tar" in r.getMessage()]
    assert len(warnings) == 1, warnings[:3]  # one summary for the shard, not one line per missing sample
    assert "9999936 samples" in warnings[0] and "ended after 64 of the 10000000" in warnings[0]
    assert manifest["num_items"] == 300  # every sample the shards hold


@pytest.mark.parametrize("count", [-5, 2.5, "many", None, True])
def test_a_bad_sample_count_in_an_index_is_one_line(digit_shards, untrained_tokenizer, tmp_path, capsys, count):
    index = _index_with(digit_shards, tmp_path, {"nsamples": count})
    with pytest.raises(ValueError, match="needs a 'url' and an 'nsamples' count >= 0"):
        open_dataset(DataConfig(source=index, image_size=32, channels=1))
    args = ["extract-codes", "--tokenizer", str(untrained_tokenizer), "--data", index, "--out", str(tmp_path / "c")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nsamples" in err and "Traceback" not in err


def test_a_subset_keeps_the_keys_and_classes_of_the_whole_source(tmp_path):
    """With --max-images the keys were positions in the subset (key 1 held source image 4, though keys are to
    trace a sample back to its source), and an .npz's classes shrank to the subset's largest label (9 of 10)."""
    pixels = (np.arange(20, dtype=np.uint8)[:, None, None, None] * 10).repeat(8, 1).repeat(8, 2)
    np.savez(tmp_path / "digits.npz", arr_0=pixels, arr_1=np.arange(20) % 10)
    out = tmp_path / "shards"
    pack_shards(str(tmp_path / "digits.npz"), out, shard_size=10, max_images=5, shuffle=False)
    assert json.loads((out / "shards.json").read_text())["class_names"] == [str(d) for d in range(10)]
    with tarfile.open(out / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted(name.split(".")[0] for name in members if name.endswith(".png"))
    assert keys == ["00000000", "00000004", "00000008", "00000012", "00000016"]
    for key in keys:  # each key names the source row its picture came from
        picture = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])))
        assert int(picture.flat[0]) == int(key) * 10 and members[f"{key}.cls"] == str(int(key) % 10).encode()
