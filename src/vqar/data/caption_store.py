"""The captions of a text-to-image code store: one caption shard beside each code shard, read lazily.

    captions-00000.jsonl          one JSON list of an item's captions per line, UTF-8
    captions-00000.offsets.npy    (n + 1,) int64: item i is the bytes [offsets[i], offsets[i + 1]) of the .jsonl

Stores made before kept every caption in one `captions.json`, which every process and every loader worker read
whole: at CC-3M scale (3.3M captions) that is hundreds of MB of Python lists each. Opening a sharded store reads
only the offsets' .npy headers, their first and last values and the file sizes (plus the checksums when verifying,
streamed); an item's captions are two positioned reads when it is asked for. A worker keeps a few file descriptors
and no captions, and pickles to a few hundred bytes, so forked and spawned loader workers copy nothing. Old stores
are still read, the old way (`open_captions`).
"""

from __future__ import annotations

import json
import operator
import os
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqar.utils.io import atomic_write, sha256_file

LAYOUT = "jsonl+offsets"
KEYS = ("captions", "caption_offsets")  # a shard entry's caption files, beside its "codes" and "labels"
LEGACY_FILE = "captions.json"
OPEN_FILES = 16  # file descriptors a process keeps open per store (shards are visited in random order)


def shard_names(unit: int) -> dict[str, str]:
    return {"captions": f"captions-{unit:05d}.jsonl", "caption_offsets": f"captions-{unit:05d}.offsets.npy"}


def write_caption_shard(folder: Path, names: dict[str, str], captions: list[list[str]]) -> None:
    """Writes the captions of a shard's items (in item order) as `names` in `folder`, each file atomically."""
    lines = [(json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8") for item in captions]
    offsets = np.zeros(len(lines) + 1, dtype="<i8")
    np.cumsum([len(line) for line in lines], out=offsets[1:])

    def save_offsets(path: Path) -> None:
        with open(path, "wb") as handle:  # np.save(path) would append ".npy" to the temporary name
            np.save(handle, offsets)

    atomic_write(folder / names["captions"], lambda path: path.write_bytes(b"".join(lines)))
    atomic_write(folder / names["caption_offsets"], save_offsets)


def open_captions(root: Path, manifest: dict, verify: bool) -> Sequence[list[str]] | None:
    """The captions of the store at `root` by item index (None when it has none), in either layout."""
    entry = manifest.get("captions")
    if not entry:
        return None
    if "file" in entry:  # a store made before caption shards: one captions.json
        file = root / entry["file"]
        if not file.is_file() or (verify and sha256_file(file) != entry.get("sha256")):
            raise ValueError(f"code store {root}: {entry['file']} is missing or damaged; extract again")
        try:
            captions = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"code store {root}: {entry['file']} is damaged ({err}); extract again") from None
        # A list of each item's captions; anything else (one string per item, a dict by index) trained on single
        # letters or failed in the first batch with a KeyError.
        if not isinstance(captions, list) or not all(
            isinstance(item, list) and all(isinstance(text, str) for text in item) for item in captions
        ):
            raise ValueError(f"code store {root}: {entry['file']} is damaged (not a list of each item's list of "
                             "captions); extract again")  # fmt: skip
        return captions
    if entry.get("layout") != LAYOUT:
        raise ValueError(f"code store {root} keeps its captions in an unknown layout {entry.get('layout')!r}; "
                         "it was made by a newer vqar: upgrade vqar or extract the codes again")  # fmt: skip
    return CaptionShards(root, manifest["shards"], verify)


@dataclass(frozen=True)
class _Shard:
    captions: Path
    offsets: Path
    data_start: int  # where the offsets' values begin in their .npy


class CaptionShards(Sequence):
    """Item index -> its list of captions, read from the caption shards on demand (see the module docstring).

    Every open checks each shard's offsets against its item count and the size of its .jsonl, so a truncated or
    mismatched shard is a one-line error at once; `verify=True` also compares both files with their checksums.
    Its cache of open files is per process and unlocked: share an instance between processes, not threads."""

    def __init__(self, root: Path, entries: list[dict], verify: bool):
        self.root = Path(root)
        self.shards = [self._check(entry, verify) for entry in entries]
        self.starts = np.cumsum([0] + [int(entry["count"]) for entry in entries])
        self._files: OrderedDict[Path, int] = OrderedDict()  # this process's open descriptors, least recent first

    def _damaged(self, name: str, problem: str) -> ValueError:
        problem = " ".join(problem.split())  # one line, whatever the decoder said
        return ValueError(f"code store {self.root}: caption shard {name} is damaged ({problem}); extract the codes "
                          "again")  # fmt: skip

    def _check(self, entry: dict, verify: bool) -> _Shard:
        if any(key not in entry for key in KEYS):
            raise ValueError(f"code store {self.root}: shard {entry.get('codes')} lists no caption files")
        for key in KEYS:
            file = self.root / entry[key]
            if not file.is_file():
                raise FileNotFoundError(f"code store {self.root} is missing {entry[key]}")
            if verify and sha256_file(file) != entry["sha256"][key]:
                raise self._damaged(entry[key], "checksum mismatch")
        count, offsets = int(entry["count"]), self.root / entry["caption_offsets"]
        with open(offsets, "rb") as handle:
            try:
                version = np.lib.format.read_magic(handle)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                shape, fortran, dtype = read_header[version](handle)
            except (ValueError, KeyError) as err:
                raise self._damaged(entry["caption_offsets"], f"not a readable .npy: {err}") from None
            if dtype != np.dtype("<i8") or shape != (count + 1,) or fortran:
                raise self._damaged(entry["caption_offsets"], f"{shape} {dtype} offsets for {count} items")
            data_start = handle.tell()
            ends = _read_at(handle.fileno(), 8, data_start) + _read_at(handle.fileno(), 8, data_start + 8 * count)
        if len(ends) != 16:
            raise self._damaged(entry["caption_offsets"], "truncated")
        first, last = struct.unpack("<2q", ends)
        size = (self.root / entry["captions"]).stat().st_size
        if first != 0 or last != size:
            raise self._damaged(entry["captions"], f"{size} bytes where its offsets run from {first} to {last}")
        return _Shard(self.root / entry["captions"], offsets, data_start)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = operator.index(index)
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(f"caption index {index} out of range for {len(self)} items")
        s = int(np.searchsorted(self.starts, position, side="right")) - 1
        shard, local = self.shards[s], position - int(self.starts[s])
        start, stop = struct.unpack("<2q", self._read(shard.offsets, 16, shard.data_start + 8 * local))
        if not 0 <= start <= stop:
            raise self._damaged(shard.offsets.name, f"offsets {start}, {stop} of item {local}")
        try:
            captions = json.loads(self._read(shard.captions, stop - start, start))
        except (ValueError, UnicodeDecodeError) as err:
            raise self._damaged(shard.captions.name, f"item {local} does not decode: {err}") from None
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise self._damaged(shard.captions.name, f"item {local} is not a list of captions")
        return captions

    def _read(self, path: Path, size: int, position: int) -> bytes:
        fd = self._files.pop(path, None)
        if fd is None:
            if len(self._files) >= OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._files[path] = fd
        data = _read_at(fd, size, position)
        if len(data) != size:
            raise self._damaged(path.name, f"{len(data)} of {size} bytes at {position}: truncated")
        return data

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])

    def __del__(self) -> None:
        if getattr(self, "_files", None):
            self.close()

    def __getstate__(self) -> dict:
        """Pickled (for a spawned loader worker) without the open files: the worker opens its own."""
        return {**self.__dict__, "_files": OrderedDict()}


def _read_at(fd: int, size: int, position: int) -> bytes:
    """`size` bytes at `position` without moving a file offset that forked processes share (os.pread), where the
    platform has it."""
    if hasattr(os, "pread"):
        return os.pread(fd, size, position)
    os.lseek(fd, position, os.SEEK_SET)
    return os.read(fd, size)
