"""Packing an image folder, an array file or the bundled digits into WebDataset tar shards (`vqar pack-shards`).

Each sample is one image member (the file's own bytes for JPEG / PNG / WebP; other formats and arrays are encoded
as PNG), its class id as `cls` when the source has classes, and its captions as `txt` (one per line). Keys are the
source index zero-padded, so a sample can always be traced back to the file it came from. Samples are written in a
seeded random order by default: shards are read front to back, so a shuffled packing gives every shard (and
`data.max_images`, which takes the first samples) a fair mix of classes. Unreadable files are left out and
counted. A `shards.json` index (webdataset's `wids` layout plus class names) records the sample counts, so opening
the shards never has to scan them.

The shards are written to a work folder beside the output and renamed into place at the end: an interrupted
packing leaves the previous output as it was.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from vqar.data.config import DataConfig
from vqar.data.datasets import ArrayDataset, ImageFolderDataset, check_some_captioned, open_dataset
from vqar.data.shards import SHARD_INDEX, is_shard_source, shard_index
from vqar.data.transforms import convert_channels
from vqar.utils.images import open_image
from vqar.utils.io import atomic_write_text, check_replaceable, replace_directory, write_lock

log = logging.getLogger("vqar.data")

SHARD_FOLDER_ENTRIES = re.compile(r"^(?:shards\.json|shard-\d+\.tar)$")  # what pack_shards writes
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class PackReport:
    index: dict
    written: int
    skipped: list[str]
    out_dir: Path


def _file_member(path: Path) -> tuple[str, bytes]:
    """(suffix, bytes) of an image file: its own bytes when the format is one the shards take, else PNG. Raises
    when the file cannot be decoded, so a corrupt file never reaches a shard."""
    data = path.read_bytes()
    with open_image(data, str(path)) as image:
        image.load()  # a full decode: truncated files fail here
        kept = _KEPT_FORMATS.get(image.format or "")
        if kept:
            return kept, data
        if image.mode in ("L", "RGB", "RGBA"):
            return "png", _png(image)
        # 16-bit and float grey images are scaled to 8 bits as the folder reader scales them; Pillow's convert()
        # clips them at 255, which packed a 16-bit photograph almost white and a float one in [0, 1] black.
        grey = image.mode.startswith("I") or image.mode == "F"
        return "png", _png(convert_channels(image, 1 if grey else 3))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _array_member(pixels: np.ndarray) -> tuple[str, bytes]:
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    return "png", _png(Image.fromarray(np.ascontiguousarray(pixels)))


def pack_shards(
    source: str,
    out_dir: str | Path,
    *,
    shard_size: int = 1000,
    captions: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
    max_images: int | None = None,
    overwrite: bool = False,
) -> PackReport:
    """Writes `source` ("mnist", an image folder or a .npz/.npy file) as shards `out_dir/shard-NNNNNN.tar` of
    `shard_size` samples plus `out_dir/shards.json`; `captions` as `data.captions` (a folder's caption file is
    found by default). Returns what was written."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be positive, got {shard_size}")
    if seed < 0:  # else NumPy's "expected non-negative integer", naming no setting
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if source != "mnist" and is_shard_source(source):
        raise ValueError(f"{source} already names tar shards; point data.source at it directly")
    if source != "mnist" and not Path(source).exists():  # the data sources' own message offers tar shards too
        raise FileNotFoundError(f"source {source!r} not found; pack-shards packs 'mnist', an image folder or a "
                                ".npz/.npy file")  # fmt: skip
    out_dir = Path(out_dir)
    with write_lock(out_dir):  # a second packer of OUT would delete this one's work folder
        return _pack(source, out_dir, shard_size, captions, shuffle, seed, max_images, overwrite)


def _pack(source: str, out_dir: Path, shard_size: int, captions: str | None, shuffle: bool, seed: int,
          max_images: int | None, overwrite: bool) -> PackReport:  # fmt: skip
    """`pack_shards` once `out_dir` is locked."""
    # --overwrite deletes it, and with it anything else it holds: refused
    check_replaceable(out_dir, overwrite, "a folder of tar shards", is_shard_folder, own_entries=SHARD_FOLDER_ENTRIES)
    # image_size and channels are unused: packing keeps the images as they are.
    dataset = open_dataset(DataConfig(source=source, captions=captions, max_images=max_images, val_fraction=0.0))
    check_some_captioned(dataset, source)  # else every image packed with an empty caption, "with captions"
    captioned = getattr(dataset, "captions", None) is not None
    order = np.random.default_rng(seed).permutation(len(dataset)) if shuffle else np.arange(len(dataset))
    # Keys are positions in the whole source, also where --max-images keeps a subset of it.
    source_index = getattr(dataset, "source_indices", np.arange(len(dataset)))
    width = max(8, len(str(int(source_index[-1]) if len(source_index) else 0)))
    work = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    writer = _ShardWriter(work, shard_size)
    skipped: list[str] = []
    try:
        for index in tqdm(order.tolist(), desc="packing shards", unit="img", dynamic_ncols=True):
            member = _member(dataset, index, skipped)
            if member is None:
                continue
            sample = {"__key__": f"{int(source_index[index]):0{width}d}", member[0]: member[1]}
            label = int(dataset.labels[index])
            if label >= 0:
                sample["cls"] = str(label).encode()
            if captioned:
                sample["txt"] = "\n".join(dataset.captions[index] or []).encode("utf-8")
            writer.write(sample)
        writer.close()
        if writer.written == 0:
            raise ValueError(f"none of the {len(dataset)} images of {source} could be read")
        names = [path.name for path in writer.paths]
        index_data = shard_index(names, writer.counts, list(getattr(dataset, "class_names", [])), captioned)
        index_data["source"] = str(source)
        atomic_write_text(work / SHARD_INDEX, json.dumps(index_data, indent=1))
        replace_directory(work, out_dir)
    except BaseException:
        writer.close()
        shutil.rmtree(work, ignore_errors=True)
        raise
    if skipped:
        log.warning("left out %d unreadable image %s (first: %s)", len(skipped),
                    "file" if len(skipped) == 1 else "files", skipped[0])  # fmt: skip
    return PackReport(index_data, writer.written, skipped, out_dir)


def is_shard_folder(path: Path) -> bool:
    """Whether `path` holds the shards.json index `pack_shards` writes (what --overwrite may replace)."""
    try:
        return isinstance(json.loads((path / SHARD_INDEX).read_text()).get("shardlist"), list)
    except (OSError, ValueError, AttributeError):
        return False


def _member(dataset, index: int, skipped: list[str]) -> tuple[str, bytes] | None:
    if isinstance(dataset, ImageFolderDataset):
        path = dataset.files[index]
        try:
            return _file_member(path)
        except Exception as err:  # any decoder error means "unusable", as when training reads a folder
            log.warning("skipping unreadable image %s: %s: %s", path, type(err).__name__, err)
            skipped.append(str(path))
            return None
    if isinstance(dataset, ArrayDataset):
        return _array_member(dataset.images[index])
    raise TypeError(f"cannot pack a {type(dataset).__name__}")


class _ShardWriter:
    """Numbered tar shards of `size` samples each, each complete on disk before the next one starts."""

    def __init__(self, folder: Path, size: int):
        self.folder, self.size = folder, size
        self.paths: list[Path] = []
        self.counts: list[int] = []
        self.written = 0
        self._tar = None

    def write(self, sample: dict) -> None:
        import webdataset as wds

        if self._tar is None or self.counts[-1] == self.size:
            self._finish()
            self.paths.append(self.folder / f"shard-{len(self.paths):06d}.tar")
            self.counts.append(0)
            # mtime 0 and fixed owner: the same source packs to the same bytes
            self._tar = wds.TarWriter(str(self.paths[-1]), encoder=False, mtime=0, user="vqar", group="vqar")
        self._tar.write(sample)
        self.counts[-1] += 1
        self.written += 1

    def _finish(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> None:
        self._finish()
