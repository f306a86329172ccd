"""Datasets yielding `Sample`s: image folders, in-memory arrays (.npz/.npy) and the bundled MNIST digits.

Every dataset returns images as float (C, H, W) tensors in [-1, 1] at one size and channel count, so the
trainer never has to know where the data came from. Unreadable files come back as `BadSample` instead of
raising, so one corrupt JPEG in a million does not kill a multi-day run; the loader collects and reports them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from vqar.data.config import DataConfig
from vqar.data.mnist import load_mnist_digits
from vqar.data.samples import BadSample, Sample
from vqar.data.shards import ShardDataset, is_shard_source, open_shards, shard_folder_index
from vqar.data.transforms import convert_channels, fit_image, to_tensor, to_uint8_nhwc
from vqar.text.captions import captions_for_files, digit_captions, find_caption_file, read_captions
from vqar.utils.images import open_image

log = logging.getLogger("vqar.data")


def spread_indices(total: int, max_images: int | None) -> np.ndarray:
    """Indices of at most `max_images` items spread evenly over `total`, in increasing order.

    Taking the first rows instead would keep only the first classes of class-sorted data (MNIST, image
    folders); evenly spaced rows keep every class and need no seed.
    """
    if max_images is None or max_images >= total:
        return np.arange(total)
    if max_images < 1:
        raise ValueError(f"max_images must be positive when set, got {max_images}")
    return (np.arange(max_images) * total) // max_images


def image_extensions() -> frozenset[str]:
    """The file name extensions of every image format Pillow opens (what training and evaluation read)."""
    # Formats Pillow can only write (PDF, Palm) are left out; MPO files are opened by the JPEG plugin.
    return frozenset(
        ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN or fmt == "MPO"
    )


def scan_images(root: Path, extensions: Iterable[str]) -> list[Path]:
    """All image files under `root`, sorted by path relative to root so every machine sees the same order.

    Hidden files and folders (".DS_Store", ".ipynb_checkpoints", macOS "._x.jpg" forks) are skipped, and so, with a
    warning, are named pipes, sockets and devices with an image's name: reading one would wait forever.
    Symlinked folders are followed, but each real folder is walked once, so that a link cycle cannot loop: a second
    way to a folder (a link to a folder the walk reaches anyway, two links to one folder outside, a cycle) is
    skipped with a warning naming the way taken.
    """
    extensions = frozenset(extensions)
    found: list[Path] = []
    walked: dict[str, Path] = {}  # real path -> the name it was read under
    real_root = os.path.realpath(root)
    pending = [Path(root)]  # depth first, each folder's entries in sorted order
    while pending:
        folder = pending.pop()
        real = os.path.realpath(folder)
        if real in walked:  # two links to one folder outside the tree, or a link cycle: said, or a class vanishes
            log.warning("skipped %s: it leads to %s, whose images were read as %s", folder, real, walked[real])
            continue
        walked[real] = folder
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError:  # an unreadable folder holds no images we can read (as os.walk passes over it)
            continue
        folders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if not _is_alias(Path(entry.path), real_root):
                    folders.append(Path(entry.path))
            elif os.path.splitext(entry.name)[1].lower() in extensions:
                # the directory entry's type costs no stat; a link that leads nowhere is kept, to be reported
                # unreadable with the others
                if entry.is_file() or (entry.is_symlink() and not os.path.exists(entry.path)):
                    found.append(Path(entry.path))
                else:
                    log.warning("skipped %s: it is not a regular file (a named pipe, socket or device)", entry.path)
        pending.extend(reversed(folders))
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def _is_alias(folder: Path, real_root: str) -> bool:
    """Whether `folder` is a link to a folder inside the walked tree that the walk reaches by its own name. Followed
    first (an alias sorted before its target), it gave the images its own name, a class of its own, and the real
    folder, already walked, was skipped, its class gone."""
    if not folder.is_symlink():
        return False
    inside = os.path.relpath(os.path.realpath(folder), real_root)
    if inside == os.pardir or inside.startswith(os.pardir + os.sep):
        return False
    if any(part.startswith(".") for part in Path(inside).parts if part != os.curdir):
        return False  # a hidden folder is not walked: the link is the only way to its images
    log.warning("skipped %s: it links to %s inside the same folder, whose images are read under that name", folder,
                os.path.realpath(folder))  # fmt: skip
    return True


def _warn_of_folders_without_images(root: Path, class_names: list[str]) -> None:
    """Says which sub-folders of root are no class for want of images: a class folder emptied by a failed copy
    numbered the classes after it one lower without a word."""
    with os.scandir(root) as listing:
        empty = sorted(entry.name for entry in listing if entry.is_dir() and not entry.is_symlink()
                       and not entry.name.startswith(".") and entry.name not in class_names)  # fmt: skip
    if empty:
        log.warning("%d sub-folder(s) of %s hold no images and are no class (%s): the %d classes are those with "
                    "images, numbered in sorted order", len(empty), root, ", ".join(empty[:5]) + (", ..." if
                    len(empty) > 5 else ""), len(class_names))  # fmt: skip


class ImageFolderDataset(Dataset[Sample | BadSample]):
    """Every image file under `root` (recursively); the first sub-folder below root names the class.

    Class ids follow the sorted class names (`class_names`); files directly in root are unlabeled (-1), and
    a folder without sub-folders gives an unlabeled dataset with `num_classes == 0`. Class names come from the
    full file list, so `max_images` (an evenly spread subset) never renumbers classes.
    """

    def __init__(self, root: str | Path, image_size: int, channels: int, max_images: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        extensions = image_extensions()
        files = scan_images(self.root, extensions)
        if not files:
            raise ValueError(
                f"no image files under {self.root} (looked for extensions: {', '.join(sorted(extensions))})"
            )
        folders = [path.relative_to(self.root).parts for path in files]
        self.class_names: list[str] = sorted({parts[0] for parts in folders if len(parts) > 1})
        class_ids = {name: i for i, name in enumerate(self.class_names)}
        if self.class_names:
            _warn_of_folders_without_images(self.root, self.class_names)
        keep = spread_indices(len(files), max_images)
        self.listed = files  # every image, where `max_images` keeps a subset: what a caption file may name
        self.source_indices = keep  # item i is file source_indices[i] of the listed ones
        self.files = [files[i] for i in keep]
        self.labels = [class_ids[folders[i][0]] if len(folders[i]) > 1 else -1 for i in keep]
        loose = [files[i].name for i in keep if len(folders[i]) == 1]
        if loose and self.class_names:  # a class-conditional run refuses them, which it learned only at its first eval
            log.warning("%d of the %d images lie directly in %s, beside its %d class folders: they have no class "
                        "(label -1), which a class-conditional model cannot train on (first: %s); move them into a "
                        "class folder or out of %s", len(loose), len(keep), self.root, len(self.class_names),
                        loose[0], self.root)  # fmt: skip
        self.image_size = image_size
        self.channels = channels
        self.captions: list[list[str]] | None = None  # per item, when the folder has a caption file

    def attach_captions(self, caption_file: str | Path) -> None:
        self.caption_file = caption_file  # named when none of the files has a caption
        self.captions = captions_for_files(self.root, self.files, read_captions(caption_file), caption_file,
                                           self.listed)  # fmt: skip

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample | BadSample:
        path = self.files[index]
        try:
            with open_image(path) as image:
                # load() forces a full decode here, so truncated or corrupt files fail inside this try.
                image.load()
                converted = convert_channels(image, self.channels)
                pixels = to_tensor(fit_image(converted, self.image_size))
        except Exception as err:
            # Decoders raise OSError, SyntaxError, ValueError, DecompressionBombError, struct.error and more;
            # all of them mean "this file is unusable", which the loader reports instead of crashing.
            return BadSample(index=index, path=str(path), error=f"{type(err).__name__}: {err}")
        captions = self.captions[index] if self.captions is not None else None
        return Sample(image=pixels, label=self.labels[index], index=index, captions=captions)


# The most classes an array's labels may name beyond its image count (ImageNet-21k has 21,841).
MAX_CLASSES = 1 << 16


def _class_ids(labels) -> np.ndarray:
    """Labels as int64 class ids (-1: unlabeled), refusing what is not a class id."""
    array = np.asarray(labels).reshape(-1)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"labels must be integer class ids, got {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not (np.isfinite(array).all() and (array == np.round(array)).all()):
        raise ValueError("labels must be integer class ids, got fractional or non-finite values")
    if array.size and (array.min() < -1 or array.max() >= 2**62):
        raise ValueError(f"labels must be class ids >= 0 (or -1 for unlabeled), got values in [{array.min()}, "
                         f"{array.max()}]")  # fmt: skip
    return array.astype(np.int64)


class ArrayDataset(Dataset[Sample]):
    """Images held in memory. Layout and range are inferred (see `to_uint8_nhwc`): NHWC when the last axis
    has 1, 3 or 4 entries and axis 1 does not, otherwise NCHW; floats are [0, 1] when none is negative, else
    [-1, 1].

    Images are resized (`fit_image`) and channel-converted per item, so a large array is not duplicated.
    `labels` may be None (every label -1); `num_classes` is len(class_names) when given, else max label + 1.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray | None,
        image_size: int,
        channels: int,
        *,
        class_names: Sequence[str] | None = None,
        max_images: int | None = None,
    ):
        pixels = to_uint8_nhwc(images)
        label_array = np.full(pixels.shape[0], -1, dtype=np.int64) if labels is None else _class_ids(labels)
        if label_array.shape[0] != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {label_array.shape[0]} labels")
        limit = max(len(label_array), MAX_CLASSES)
        if class_names is None and label_array.max(initial=-1) >= limit:
            # Class names are made for every id up to the largest: 2^40 of them would never finish.
            raise ValueError(f"class id {label_array.max()} is out of range: {len(label_array)} images take class "
                             f"ids below {limit}")  # fmt: skip
        if class_names is not None and label_array.max(initial=-1) >= len(class_names):
            raise ValueError(f"class id {label_array.max()} is out of range: the {len(class_names)} class names "
                             f"given take ids 0 to {len(class_names) - 1}")  # fmt: skip
        if class_names is None:  # from every label: a `max_images` subset without the last class keeps its id
            class_names = [str(i) for i in range(int(label_array.max(initial=-1)) + 1)]
        keep = spread_indices(pixels.shape[0], max_images)
        if len(keep) < pixels.shape[0]:
            pixels, label_array = pixels[keep], label_array[keep]
        self.source_indices = keep  # item i is row source_indices[i] of the array given
        self.images = pixels
        self.labels = label_array
        self.image_size = image_size
        self.channels = channels
        self.captions: list[list[str]] | None = None
        self.class_names: list[str] = list(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Sample:
        pixels = convert_channels(self.images[index], self.channels)
        if pixels.shape[0] != self.image_size or pixels.shape[1] != self.image_size:
            pixels = np.asarray(fit_image(Image.fromarray(np.ascontiguousarray(pixels)), self.image_size))
        captions = self.captions[index] if self.captions is not None else None
        return Sample(image=to_tensor(pixels), label=int(self.labels[index]), index=index, captions=captions)


class MnistDataset(ArrayDataset):
    """The 5,000 bundled MNIST digits (`load_mnist_digits`), classes "0".."9"."""

    def __init__(self, image_size: int = 32, channels: int = 1, max_images: int | None = None):
        images, labels = load_mnist_digits()
        names = [str(digit) for digit in range(10)]
        super().__init__(images, labels, image_size, channels, class_names=names, max_images=max_images)


# The names of the image array in an `.npz`, in the order they are looked for (ADM's samples, then common ones).
NPZ_IMAGE_KEYS = ("arr_0", "images", "x")


def load_array_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read `(images, labels or None)` from a `.npy` (images only) or `.npz` file.

    In a `.npz` the images are `arr_0` (the ADM sample layout: uint8 NHWC, labels in `arr_1` when the samples
    are class-conditional), `images` or `x`; labels are `labels`, `y` or `arr_1`. Pickles are refused because
    loading one can run arbitrary code.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise ValueError(f"expected a .npz or .npy file, got {path}")
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            image_key = next((key for key in NPZ_IMAGE_KEYS if key in keys), None)
            if image_key is None:
                raise ValueError(f"{path} has no image array 'arr_0', 'images' or 'x'; keys found: {keys}")
            label_key = next((key for key in ("labels", "y", "arr_1") if key in keys), None)
            labels = archive[label_key] if label_key is not None else None
            return archive[image_key], labels
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise ValueError(f"{path} is damaged or not a NumPy {suffix} file ({err})") from None
    except ValueError as err:
        if "pickled" in str(err):  # numpy's reading of anything that is not an array header
            raise ValueError(f"{path} is not a NumPy array file: it is damaged, or holds pickled Python objects, "
                             "which vqar does not load (they can run code)") from None  # fmt: skip
        raise


class DatasetSplit(Subset):
    """A `Subset` that still answers `num_classes` and `class_names` of the dataset it was cut from."""

    @property
    def num_classes(self) -> int:
        return int(getattr(self.dataset, "num_classes", 0))

    @property
    def class_names(self) -> list[str]:
        return list(getattr(self.dataset, "class_names", []))


def open_dataset(cfg: DataConfig) -> Dataset | ShardDataset:
    """The full dataset named by `cfg.source`: "mnist", an image folder, a `.npz`/`.npy` file or tar shards."""
    cfg.validate()
    if cfg.source != "mnist" and is_shard_source(cfg.source):
        return open_shards(cfg.source, cfg.image_size, cfg.channels, captions=cfg.captions,
                           max_images=cfg.max_images, shuffle_buffer=cfg.shuffle_buffer,
                           allow_pipe=cfg.allow_pipe)  # fmt: skip
    if cfg.source == "mnist":
        digits = MnistDataset(cfg.image_size, cfg.channels, max_images=cfg.max_images)
        if cfg.captions == "digits":
            digits.captions = [digit_captions(int(label)) for label in digits.labels]
        elif cfg.captions not in (None, "none"):
            raise ValueError("the bundled digits take data.captions=digits (generated captions) or none")
        return digits
    path = Path(cfg.source).expanduser()
    if index := shard_folder_index(path):  # the folder `vqar pack-shards` wrote: read through its index
        return open_dataset(dataclasses.replace(cfg, source=index))
    if path.is_dir():
        folder = ImageFolderDataset(path, cfg.image_size, cfg.channels, max_images=cfg.max_images)
        caption_file = find_caption_file(path) if cfg.captions is None else cfg.captions
        if caption_file not in (None, "none"):
            folder.attach_captions(caption_file)
        return folder
    if cfg.captions not in (None, "none"):
        raise ValueError("captions need an image folder (file names to match) or the bundled digits")
    if path.is_file():
        images, labels = load_array_file(path)
        try:
            return ArrayDataset(images, labels, cfg.image_size, cfg.channels, max_images=cfg.max_images)
        except ValueError as err:  # one line naming the file
            raise ValueError(f"{path}: {err}") from None
    raise FileNotFoundError(
        f"data source {cfg.source!r} not found; expected 'mnist', an image folder, a .npz/.npy file or tar shards "
        "(a pattern such as shards/train-{000000..000127}.tar, a list file or a shard index .json)"
    )


def split_dataset(dataset: Dataset, val_fraction: float, seed: int) -> tuple[DatasetSplit, DatasetSplit]:
    """Cut `dataset` into (train, val) with a permutation from a torch.Generator seeded with `seed`, so every
    call on every machine gives the same split. Validation gets round(val_fraction * N) items, at least one
    when val_fraction > 0 and N > 1, and never all of them. Indices within each part are sorted, so evaluation
    walks files in a stable order and shuffling is left to the sampler. Tar shards are split by whole shards
    (`ShardDataset.split`)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if isinstance(dataset, ShardDataset):
        return dataset.split(val_fraction, seed)
    total = len(dataset)  # type: ignore[arg-type]
    n_val = round(val_fraction * total)
    if val_fraction > 0 and total > 1:
        n_val = max(1, n_val)
    n_val = min(n_val, max(total - 1, 0))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=generator).tolist()
    return DatasetSplit(dataset, sorted(order[n_val:])), DatasetSplit(dataset, sorted(order[:n_val]))


def check_some_captioned(dataset: Dataset, source: str) -> None:
    """ValueError when a folder's caption file captions none of its images (mostly names relative to another
    folder), before any work: extraction would leave every image out, packing would write empty captions."""
    captions, total = getattr(dataset, "captions", None), len(dataset)  # type: ignore[arg-type]
    if captions is not None and total and not any(captions):
        raise ValueError(f"{getattr(dataset, 'caption_file', 'the caption file')} captions none of the {total} "
                         f"images in {source}: name them by their paths relative to that folder, or give --captions "
                         "none for no captions")  # fmt: skip


def check_readable(dataset: Dataset, source: str, tries: int = 64) -> None:
    """Raises ValueError when none of up to `tries` items spread over `dataset` can be read: a source of broken
    files is named before training starts on empty batches."""
    if isinstance(dataset, ShardDataset):
        dataset.check_readable(tries)
        return
    total = len(dataset)  # type: ignore[arg-type]
    errors = []
    for index in spread_indices(total, tries):
        item = dataset[int(index)]
        if not isinstance(item, BadSample):
            return
        errors.append(item)
    if errors:
        raise ValueError(f"no readable image in {source}: none of the {len(errors)} files tried could be read "
                         f"(first: {errors[0].path}: {errors[0].error})")  # fmt: skip


def build_datasets(cfg: DataConfig) -> tuple[DatasetSplit, DatasetSplit]:
    """(train, val) for a data config: `open_dataset` followed by `split_dataset`."""
    return split_dataset(open_dataset(cfg), cfg.val_fraction, cfg.split_seed)
