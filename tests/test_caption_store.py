"""Caption shards of text-to-image code stores (`vqar.data.caption_store`): what extraction writes reads back item by
item, unicode included; stores with the old single captions.json still open; opening reads no captions and a
loader worker copies none; damaged or truncated shards are one-line errors."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import vqar
from vqar.data import DataConfig
from vqar.data.caption_store import CaptionShards, shard_names, write_caption_shard
from vqar.data.codes import FORMAT, CodeDataset, collate_codes
from vqar.data.extraction import extract_codes
from vqar.utils.io import sha256_file

# Awkward text for JSON and UTF-8 alike: accents, CJK, an emoji ZWJ sequence, quotes, backslashes, control characters.
UNICODE = [
    "naïve café ☕",
    "猫がソファに座っている",
    "a black cat 🐈‍⬛",
    'a "quoted" \\ backslash',
    "line\nbreak\ttab",
    "",
]


def _store(root, shards: list[list[list[str]]]) -> None:
    """A code store holding `shards` (each a list of items' caption lists), with one-code items, written the way
    extraction writes one."""
    root.mkdir(parents=True)
    entries = []
    for u, items in enumerate(shards):
        names = {"codes": f"codes-{u:05d}.npy", "labels": f"labels-{u:05d}.npy", **shard_names(u)}
        np.save(root / names["codes"], np.full((len(items), 1, 1, 1), u, dtype=np.uint16))
        np.save(root / names["labels"], np.full(len(items), -1, dtype=np.int64))
        write_caption_shard(root, names, items)
        entries.append({**names, "count": len(items), "sha256": {k: sha256_file(root / f) for k, f in names.items()}})
    manifest = {"format": FORMAT, "version": 1, "code_shape": [1, 1], "codebook_size": 4, "views": ["image"],
                "num_items": sum(map(len, shards)), "num_classes": 0, "class_names": [], "shards": entries,
                "captions": {"layout": "jsonl+offsets"}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))


def _to_old_layout(root) -> list[list[str]]:
    """Rewrites the store at `root` as vqar wrote stores before caption shards: one captions.json of every item's
    captions, listed in the manifest with its checksum. Returns the captions."""
    manifest = json.loads((root / "manifest.json").read_text())
    captions = list(CodeDataset(root).captions)
    (root / "captions.json").write_text(json.dumps(captions, ensure_ascii=False), encoding="utf-8")
    for shard in manifest["shards"]:
        for key in ("captions", "caption_offsets"):
            (root / shard.pop(key)).unlink()
            shard["sha256"].pop(key)
    manifest["captions"] = {"file": "captions.json", "sha256": sha256_file(root / "captions.json")}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return captions


def _one_line_error(error_type, root, match: str, **kwargs) -> str:
    with pytest.raises(error_type, match=match) as caught:
        CodeDataset(root, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and str(root) in message
    return message


def test_extraction_writes_caption_shards_that_read_back_per_item(tiny_pipeline, tmp_path, caplog):
    folder = tmp_path / "photos"
    (folder / "misc").mkdir(parents=True)
    for i in range(8):
        Image.fromarray(np.full((32, 32), 30 * i, dtype=np.uint8)).save(folder / "misc" / f"{i}.png")
    # Caption files give whitespace-normalised, non-empty captions: the first four of UNICODE, which store as is.
    table = {i: [UNICODE[i % 4], f"picture {i}"] for i in (0, 1, 2, 4, 5, 7)}
    table[1].append(UNICODE[1] + UNICODE[2])  # three captions for one image
    lines = [{"file": f"misc/{i}.png", "caption": c} for i, captions in table.items() for c in captions]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    tokenizer = vqar.load_pretrained(tiny_pipeline / "tokenizer")
    with caplog.at_level(logging.WARNING):  # 3 and 6 have no caption
        manifest = extract_codes(tokenizer, DataConfig(source=str(folder), eval_batch_size=2), tmp_path / "codes",
                                 shard_size=3)  # fmt: skip
    expected = [table[i] for i in sorted(table)]
    # units of three source files: 0,1,2 | 4,5 | 7, each shard with its own caption files and checksums
    assert [s["count"] for s in manifest["shards"]] == [3, 2, 1] and manifest["captions"] == {"layout": "jsonl+offsets"}
    assert [s["captions"] for s in manifest["shards"]] == [f"captions-0000{u}.jsonl" for u in range(3)]
    assert all(set(s["sha256"]) == {"codes", "labels", "captions", "caption_offsets"} for s in manifest["shards"])
    assert not (tmp_path / "codes" / "captions.json").exists()
    assert not list((tmp_path / "codes").glob("part-*.json"))
    store = CodeDataset(tmp_path / "codes")
    assert isinstance(store.captions, CaptionShards) and len(store.captions) == len(store) == 6
    assert [store.captions[i] for i in range(6)] == expected == [store[i].captions for i in range(6)]
    assert store.captions[-1] == expected[-1] and store.captions[1:3] == expected[1:3]
    with pytest.raises(IndexError):
        store.captions[6]
    # Two forked loader workers read the same captions on their own.
    loader = DataLoader(store, batch_size=2, shuffle=True, num_workers=2, collate_fn=collate_codes)
    seen = {int(i): c for batch in loader for i, c in zip(batch.indices, batch.captions, strict=True)}
    assert [seen[i] for i in range(6)] == expected


def test_a_store_with_the_old_single_captions_file_still_opens(tmp_path):
    shards = [[["a dog", UNICODE[0]], [UNICODE[1]]], [[UNICODE[2], UNICODE[3]], [UNICODE[4]], ["x"]]]
    _store(tmp_path / "codes", shards)
    assert _to_old_layout(tmp_path / "codes") == [item for shard in shards for item in shard]
    assert not list((tmp_path / "codes").glob("captions-*"))
    store = CodeDataset(tmp_path / "codes")
    assert [store[i].captions for i in range(5)] == [item for shard in shards for item in shard]
    assert torch.equal(store[3].codes, torch.ones(1, 1, 1, dtype=torch.long))
    (tmp_path / "codes" / "captions.json").write_text("[]")
    _one_line_error(ValueError, tmp_path / "codes", "captions.json is missing or damaged")


@pytest.mark.parametrize("damage", ["no checksum", "one string per item", "a dict by index", "not JSON"])
def test_an_old_captions_file_that_is_damaged_is_one_line(tmp_path, damage):
    """A manifest entry without its checksum was a KeyError traceback; a file of one string per item trained on
    its single letters without a word; a dict by index failed in the first batch with a KeyError."""
    root = tmp_path / "codes"
    _store(root, [[["a dog"], ["a cat"]]])
    captions = _to_old_layout(root)
    manifest = json.loads((root / "manifest.json").read_text())
    if damage == "no checksum":
        manifest["captions"].pop("sha256")
    else:
        text = {"one string per item": json.dumps([item[0] for item in captions]),
                "a dict by index": json.dumps(dict(enumerate(captions))), "not JSON": "[[\"a dog\"], ["}[damage]
        (root / "captions.json").write_text(text)
        manifest["captions"]["sha256"] = sha256_file(root / "captions.json")
    (root / "manifest.json").write_text(json.dumps(manifest))
    expected = "is missing or damaged" if damage == "no checksum" else "captions.json is damaged"
    _one_line_error(ValueError, root, expected)


def test_opening_reads_no_captions_and_workers_copy_none(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    _store(small, [[[f"caption {i}"] for i in range(10)]] * 2)
    _store(large, [[[f"a much longer caption, number {i}", UNICODE[i % 6]] for i in range(5000)]] * 2)
    store = CodeDataset(large)
    assert isinstance(store.captions, CaptionShards) and not store.captions._files  # not a file opened yet
    # What a spawned worker receives: the shard list, whatever the number of captions (a list would be ~0.5 MB).
    sizes = [len(pickle.dumps(CodeDataset(root).captions)) for root in (small, large)]
    assert abs(sizes[0] - sizes[1]) < 64 and sizes[1] < 2000
    assert store.captions[7000] == ["a much longer caption, number 2000", UNICODE[2]] and store.captions._files
    copy = pickle.loads(pickle.dumps(store.captions))
    assert not copy._files and copy[4999] == store.captions[4999]
    # Bytes changed in place (same size, so the offsets still match): an unverified open does not notice, which
    # shows it never reads them; the damaged shard fails when read, the other shard is unaffected.
    jsonl = large / "captions-00001.jsonl"
    jsonl.write_bytes(b"\xff" * jsonl.stat().st_size)
    unverified = CodeDataset(large, verify=False)
    assert unverified.captions[4999][0] == "a much longer caption, number 4999"
    with pytest.raises(ValueError, match=r"captions-00001\.jsonl is damaged \(item 1 does not decode") as caught:
        unverified.captions[5001]
    assert "\n" not in str(caught.value)
    _one_line_error(ValueError, large, r"captions-00001\.jsonl is damaged \(checksum mismatch\)")


def test_truncated_or_mismatched_caption_shards_are_one_line_errors(tmp_path):
    root = tmp_path / "codes"
    _store(root, [[[UNICODE[i % 6], f"item {i}"] for i in range(50)], [["last"]]])
    jsonl, offsets = root / "captions-00000.jsonl", root / "captions-00000.offsets.npy"
    whole_jsonl, whole_offsets = jsonl.read_bytes(), offsets.read_bytes()

    jsonl.write_bytes(whole_jsonl[:-10])  # a copy cut short
    message = _one_line_error(ValueError, root, r"captions-00000\.jsonl is damaged", verify=False)
    assert f"{len(whole_jsonl) - 10} bytes where its offsets run from 0 to {len(whole_jsonl)}" in message
    _one_line_error(ValueError, root, r"captions-00000\.jsonl is damaged \(checksum mismatch\)")
    jsonl.write_bytes(whole_jsonl)

    offsets.write_bytes(whole_offsets[:-8])
    _one_line_error(ValueError, root, r"captions-00000\.offsets\.npy is damaged \(truncated\)", verify=False)
    offsets.write_bytes(whole_offsets[:40])  # the header cut
    _one_line_error(ValueError, root, r"captions-00000\.offsets\.npy is damaged \(not a readable \.npy", verify=False)
    np.save(offsets, np.zeros(51, dtype=np.int32))
    _one_line_error(ValueError, root, r"\(51,\) int32 offsets for 50 items", verify=False)
    offsets.write_bytes(whole_offsets)

    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "captions": {"layout": "parquet"}}))
    _one_line_error(ValueError, root, "unknown layout 'parquet'.*newer vqar")
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "captions-00001.offsets.npy").unlink()
    _one_line_error(FileNotFoundError, root, r"missing captions-00001\.offsets\.npy")


def test_a_resumed_extraction_merges_the_captions_of_both_runs(tiny_pipeline, tmp_path, monkeypatch):
    """Units finished by an interrupted run and those of the run that resumes it make one store, whose captions
    are those of a store made in one go (the units of ranks under torchrun are merged the same way)."""
    tokenizer = vqar.load_pretrained(tiny_pipeline / "tokenizer")
    data = DataConfig(source="mnist", max_images=40, eval_batch_size=8, captions="digits")
    fresh = extract_codes(tokenizer, data, tmp_path / "fresh", shard_size=8)
    encode, calls = type(tokenizer).encode, []

    def failing_encode(self, images):
        calls.append(len(images))
        if len(calls) == 3:  # after two shards were written
            raise RuntimeError("out of memory")
        return encode(self, images)

    monkeypatch.setattr(type(tokenizer), "encode", failing_encode)
    with pytest.raises(RuntimeError, match="out of memory"):
        extract_codes(tokenizer, data, tmp_path / "codes", shard_size=8)
    monkeypatch.setattr(type(tokenizer), "encode", encode)
    resumed = extract_codes(tokenizer, data, tmp_path / "codes", shard_size=8)
    assert resumed["shards"] == fresh["shards"] and len(resumed["shards"]) == 5
    one, other = CodeDataset(tmp_path / "fresh"), CodeDataset(tmp_path / "codes")
    assert list(one.captions) == list(other.captions) and len(one.captions) == 40
    assert {c for item in one.captions for c in item} > {"a handwritten seven", "the digit 7"}
