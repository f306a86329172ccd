"""Image sets for evaluation, as uint8 (N, H, W, C) arrays: a folder of image files, an ADM-layout `.npz`
(`arr_0`, uint8 NHWC), a `.npy` of that layout (memory-mapped: a range reads its rows alone), a vqar sample run
(its `samples.npz`), WebDataset tar shards (a brace pattern such as
`shards/shard-{000000..000049}.tar`, a `.txt` list of shards, or the `shards.json` index `vqar pack-shards` writes)
or `mnist` (the bundled real digits).

A source is a fixed sequence of entries (files sorted by path, array rows, shard samples in shard order; a limit on
their number keeps entries spread evenly over a folder or an array, the first ones of tar shards), and any
range of them can be read on its own, so that under torchrun each rank holds only its share (`vqar.eval.shards`).
What reading entries [a, b) costs:

- a folder: the sorted names of all its files, the headers of the first 16 (they choose grey or RGB for the whole
  set, as in one process) and the decoding of files a to b - 1;
- an `.npz`: numpy cannot memory-map an array inside an npz, so `arr_0`'s rows are read from the archive member
  as a byte stream into an array of b - a rows. np.savez stores members uncompressed and the read starts at row a;
  a compressed member (np.savez_compressed) is inflated from its start and the rows before a are dropped in small
  chunks. Either way a rank never holds more than its rows;
- tar shards: the sample counts come from the index (or a scan of the tar headers); only the shards holding
  entries a to b - 1 are opened, and in the first of them the samples before a are passed over undecoded;
- mnist: the bundled 5,000 digits (5 MB) are loaded, then sliced.

Unreadable files and shard samples are skipped with a warning and counted; the reported image count is the number
of images read. All images of a set must have one size (rFID's center crop, a `transform`, makes them one size).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from vqar.data.datasets import image_extensions, scan_images, spread_indices
from vqar.data.samples import BadSample
from vqar.data.shards import IMAGE_KEYS, is_shard_source, open_shards, shard_folder_index, shard_samples
from vqar.data.transforms import convert_channels
from vqar.utils.images import open_image
from vqar.utils.runs import RUN_CONFIG, checkpoint_dir, run_kind

log = logging.getLogger("vqar.eval")

# How many samples from the start of tar shards decide whether they are read as grey ("L") or RGB (a folder's
# every header decides: they are cheap to read, and a colour image among grey ones would be greyed).
MODE_PEEK = 16
# Pillow modes of one channel: 1-bit, 8-bit, and the 16/32-bit integer and float greys (scientific and medical PNGs
# and TIFFs), which `convert_channels` scales to 8 bits.
GREY_MODES = {"1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}

Transform = Callable[[np.ndarray], np.ndarray]  # one uint8 (H, W, C) image -> another


def describe_source(source: str | Path) -> str:
    return "the bundled MNIST digits" if str(source) == "mnist" else str(source)


@dataclass(frozen=True)
class PartSummary:
    """What reading one range found: entries tried, images read, their sizes, or why the read failed. Under torchrun
    every rank sends its summary, so all ranks check the whole set alike (`ImageSource.check`)."""

    entries: int = 0
    read: int = 0
    shapes: frozenset = frozenset()
    problem: str | None = None


@dataclass
class ImagePart:
    images: np.ndarray  # (read, H, W, C); a flat empty array when nothing was read
    summary: PartSummary


class ImageSource:
    """A sequence of image entries; `read` decodes a range of them, `check` judges the summaries of all ranges."""

    unit = "images"  # what an entry is called in messages

    def __init__(self, where: str | Path):
        self.where = where
        self.limit: int | None = None  # the number of images asked for (`--max-images`), where one was

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, part: slice, transform: Transform | None = None, progress: bool = False) -> ImagePart:
        raise NotImplementedError

    def check_one_size(self) -> None:
        """ValueError for images of several sizes, where that shows without decoding them (their headers); arrays
        have one size by construction, and shards show theirs as they are read."""

    def check(self, summaries: Sequence[PartSummary], report: bool = True) -> int:
        """Raises what one process would raise for the whole set (unreadable, no image read, several sizes); warns
        about skipped entries when `report`. Returns the number of images read."""
        problems = [s.problem for s in summaries if s.problem]
        if problems:
            raise ValueError(problems[0])
        entries, read = sum(s.entries for s in summaries), sum(s.read for s in summaries)
        if read < entries and report:
            log.warning("%d of %d %s in %s could not be read and were skipped", entries - read, entries, self.unit,
                        self.where)  # fmt: skip
        if read == 0:
            raise ValueError(f"none of the {entries} {self.unit} in {self.where} could be read")
        shapes = set().union(*(s.shapes for s in summaries))
        if len(shapes) > 1:
            raise ValueError(f"images in {self.where} have different sizes {sorted(shapes)[:3]}; resize them to one "
                             "size first")  # fmt: skip
        return read


class _Stack:
    """Decoded images written into one array as they come (a list stacked at the end would hold every image twice).
    An image of another size than the first is only counted: `check` rejects such a set anyway."""

    def __init__(self, capacity: int, transform: Transform | None):
        self.capacity, self.transform = capacity, transform
        self.array: np.ndarray | None = None
        self.filled = self.read = 0
        self.shapes: set[tuple[int, ...]] = set()

    def add(self, image: np.ndarray | None) -> None:
        if image is None:  # unreadable: counted as skipped by `part`
            return
        image = image[..., None] if image.ndim == 2 else image
        if self.transform is not None:
            image = self.transform(image)
        self.read += 1
        self.shapes.add(image.shape)
        if self.array is None:
            self.array = np.empty((self.capacity, *image.shape), dtype=np.uint8)
        if image.shape == self.array.shape[1:]:
            self.array[self.filled] = image
            self.filled += 1

    def part(self, entries: int) -> ImagePart:
        images = np.empty(0, dtype=np.uint8) if self.array is None else self.array[: self.filled]
        return ImagePart(images, PartSummary(entries, self.read, frozenset(self.shapes)))


def _array_part(rows: np.ndarray, transform: Transform | None) -> ImagePart:
    if transform is not None:
        stack = _Stack(len(rows), transform)
        for row in rows:
            stack.add(row)
        return stack.part(len(rows))
    shapes = frozenset({rows.shape[1:]}) if len(rows) else frozenset()
    return ImagePart(rows, PartSummary(len(rows), len(rows), shapes))


def _bar(total: int, progress: bool):
    return tqdm(total=total, desc="reading images", unit="img", leave=False, disable=not progress)


# ---------------------------------------------------------------- the bundled digits
class MnistSource(ImageSource):
    def __init__(self, max_images: int | None):
        from vqar.data.mnist import load_mnist_digits

        super().__init__(describe_source("mnist"))
        digits = load_mnist_digits()[0]
        self.digits = digits[spread_indices(len(digits), max_images)]

    def __len__(self) -> int:
        return len(self.digits)

    def read(self, part: slice, transform: Transform | None = None, progress: bool = False) -> ImagePart:
        return _array_part(self.digits[part, :, :, None].copy(), transform)


# ---------------------------------------------------------------- .npz and .npy: in vqar.eval.array_sources
class ReferenceStatsError(ValueError):
    """An `.npz` of reference statistics (`mu`, `sigma`, as `vqar eval stats` writes them) given as images: it is
    the `--ref` of `vqar eval fid`, which a generic "no arr_0" error would not tell."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(f"{path} holds reference statistics (mu, sigma), not images (arr_0): use it as the reference "
                         f"of `vqar eval fid SAMPLES --ref {path}`")  # fmt: skip


# ---------------------------------------------------------------- a folder of image files
def image_files(folder: Path, required: bool = False) -> list[Path]:
    """The image files under `folder`, recursively, in sorted order, walked as a training folder is
    (`scan_images`: hidden files skipped, symlinked folders followed once); with `required`, a ValueError naming
    the folder where there are none."""
    files = scan_images(folder, image_extensions())  # training's: a format it reads was skipped here unsaid
    if required and not files:
        hint = "; for tar shards name their index (shards.json)" if (folder / "shards.json").is_file() else ""
        raise ValueError(f"{folder} contains no image files (.png, .jpg, .webp, .tif ... any format Pillow "
                         f"opens){hint}")  # fmt: skip
    return files


# What Pillow raises for a file it cannot read: a decompression bomb (a header past twice Image.MAX_IMAGE_PIXELS)
# is no OSError, and it ended eval in a traceback where training skips and counts the file.
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def _decode(image: Image.Image, mode: str) -> np.ndarray:
    # Through the data module's conversion, not Pillow's convert: that clips 16-bit and float greys at 255, which
    # turns a 16-bit picture almost entirely white (the FID of saturated images, without a word).
    return np.asarray(convert_channels(image, 1 if mode == "L" else 3))


def _read_image(path: Path, mode: str) -> np.ndarray | None:
    try:
        with open_image(path) as image:
            image.load()
            return _decode(image, mode)
    except UNREADABLE as err:
        log.warning("skipping unreadable image %s: %s: %s", path, type(err).__name__, err)
        return None


def _common_mode(openers: Iterable[Callable[[], Image.Image]]) -> str:
    """Grey ("L") when the readable images all are, else "RGB" (stopping at the first colour one). Only headers are
    read; unreadable ones are left to the decoding, which skips and counts them."""
    grey = False
    for opener in openers:
        with contextlib.suppress(*UNREADABLE), opener() as image:
            if image.mode not in GREY_MODES:
                return "RGB"
            grey = True
    return "L" if grey else "RGB"


class FolderSource(ImageSource):
    unit = "image files"

    def __init__(self, folder: Path, max_images: int | None):
        super().__init__(folder)
        files = image_files(folder, required=True)
        self.files = [files[i] for i in spread_indices(len(files), max_images)]
        self.mode = _common_mode(lambda f=f: Image.open(f) for f in self.files)

    def __len__(self) -> int:
        return len(self.files)

    def check_one_size(self) -> None:
        first_of_size: dict[tuple[int, int], Path] = {}  # a file of each size: the odd one out is often a stray
        for path in self.files:  # Pillow reads the header alone until the pixels are asked for
            with contextlib.suppress(*UNREADABLE), Image.open(path) as image:
                first_of_size.setdefault(image.size[::-1], path)
        if len(first_of_size) > 1:
            examples = ", ".join(f"{size} as {path.relative_to(Path(self.where))}"
                                 for size, path in sorted(first_of_size.items())[:3])  # fmt: skip
            raise ValueError(f"images in {self.where} have different sizes (height, width): {examples}; resize them "
                             "to one size first")  # fmt: skip

    def read(self, part: slice, transform: Transform | None = None, progress: bool = False) -> ImagePart:
        files = self.files[part]
        stack = _Stack(len(files), transform)
        for path in tqdm(files, desc="reading images", unit="img", leave=False, disable=not progress):
            stack.add(_read_image(path, self.mode))
        return stack.part(len(files))


# ---------------------------------------------------------------- WebDataset tar shards
def _sample_image(raw: dict) -> Image.Image:
    key = next((k for k in IMAGE_KEYS if k in raw), None)
    if key is None:
        found = sorted(k for k in raw if not k.startswith("_"))
        raise ValueError(f"no image member (.{', .'.join(IMAGE_KEYS)}) among {found}")
    return open_image(raw[key], f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}")


class ShardSource(ImageSource):
    """The samples of tar shards in shard order, each image at its own size (not resized as training does)."""

    unit = "samples"

    def __init__(self, source: str, max_images: int | None):
        super().__init__(source)
        # image_size and channels only matter to the dataset's own (training) decoding, which is not used here.
        self.data = open_shards(source, image_size=0, channels=3, max_images=max_images)
        self.offsets = np.cumsum([0, *(shard.used for shard in self.data.shards)]).tolist()
        self.mode = _common_mode(lambda raw=raw: _sample_image(raw) for raw in self._first_samples(MODE_PEEK))
        self._greyed = False  # a colour sample was read as grey (said once)

    def __len__(self) -> int:
        return len(self.data)

    def _first_samples(self, count: int) -> Iterator[dict]:
        for shard in self.data.shards:
            with contextlib.closing(shard_samples(shard)) as samples:
                for _, raw in samples:
                    if count <= 0:
                        return
                    count -= 1
                    if not isinstance(raw, BadSample):
                        yield raw

    def read(self, part: slice, transform: Transform | None = None, progress: bool = False) -> ImagePart:
        start, stop, _ = part.indices(len(self))
        stack = _Stack(max(0, stop - start), transform)
        last_problem = None
        with _bar(max(0, stop - start), progress) as bar:
            for shard, first in zip(self.data.shards, self.offsets, strict=False):
                if first >= stop or first + shard.used <= start:
                    continue  # no entry of this range: never opened
                with contextlib.closing(shard_samples(shard)) as samples:
                    for index, raw in samples:
                        position = first + index - shard.start
                        if position < start:
                            continue  # before the range: read through, not decoded
                        if position >= stop:
                            break
                        image, last_problem = self._decode(raw, last_problem)
                        stack.add(image)
                        bar.update()
        return stack.part(max(0, stop - start))

    def _decode(self, raw: dict | BadSample, last_problem: str | None) -> tuple[np.ndarray | None, str | None]:
        if isinstance(raw, BadSample):
            # A damaged shard yields one BadSample per sample it cannot deliver, all alike: one warning for them.
            problem = f"{raw.path}: {raw.error}"
            if problem != last_problem:
                log.warning("skipping unreadable sample %s", problem)
            return None, problem
        try:
            with _sample_image(raw) as image:
                image.load()
                if self.mode == "L" and image.mode not in GREY_MODES and not self._greyed:
                    self._greyed = True
                    log.warning("%s:%s is a colour image in shards whose first %d samples are grey: read as grey, as "
                                "the set is (pack colour sets with a colour image first)", raw.get("__url__", "?"),
                                raw.get("__key__", "?"), MODE_PEEK)  # fmt: skip
                return _decode(image, self.mode), None
        except Exception as err:  # any decoder error means "this sample is unusable", as for a folder's files
            log.warning("skipping unreadable sample %s:%s: %s: %s", raw.get("__url__", "?"), raw.get("__key__", "?"),
                        type(err).__name__, err)  # fmt: skip
            return None, None


# ---------------------------------------------------------------- opening a source
def open_source(source: str | Path, max_images: int | None = None) -> ImageSource:
    """The source named `source` (see the module docstring), limited to `max_images` entries spread evenly over it,
    as training's `data.max_images` takes them (the first ones kept only the first classes of a class-sorted set:
    a sample run, the digits); tar shards give their first ones, as training's do (packed shards are shuffled)."""
    opened = _open_source(source, max_images)
    opened.limit = max_images
    return opened


def _open_source(source: str | Path, max_images: int | None) -> ImageSource:
    if str(source) == "mnist":
        return MnistSource(max_images)
    path = Path(source)
    if path.is_dir() and (path / "samples.npz").is_file():
        _check_samples_alone(path)
        path = path / "samples.npz"
    if path.is_file() and path.suffix in (".npz", ".npy"):
        from vqar.eval.array_sources import NpySource, NpzSource  # they build on this module's ImageSource

        return (NpzSource if path.suffix == ".npz" else NpySource)(path, max_images)
    if index := shard_folder_index(path):  # the folder `vqar pack-shards` wrote
        return ShardSource(index, max_images)
    if path.is_dir():
        _refuse_training_run(path)
        return FolderSource(path, max_images)
    if is_shard_source(str(source)):
        return ShardSource(str(source), max_images)
    raise FileNotFoundError(f"no image folder, .npz or .npy file, sample run or tar shards at {path}")


def _check_samples_alone(folder: Path) -> None:
    """ValueError where a folder read as a sample run (its samples.npz) holds other images too: 12 pictures beside
    a samples.npz of 4 were evaluated as the 4, without a word. A run's own grid.png and images/ are its samples."""
    others = [file for file in image_files(folder)
              if file.relative_to(folder).parts[0] not in ("grid.png", "images")]  # fmt: skip
    if others:
        raise ValueError(f"{folder} holds samples.npz and {len(others)} other image file{'s' * (len(others) > 1)} "
                         f"(such as {others[0].relative_to(folder)}): name the set to evaluate, "
                         f"{folder / 'samples.npz'} or a folder of the images alone")  # fmt: skip


def _refuse_training_run(folder: Path) -> None:
    """ValueError naming a training run given as an image set, with what to pass instead. Its pictures
    (samples_grid.png, a grid of many samples) would otherwise be evaluated as one image, or it would be said to
    hold no image files, as if it were an empty folder of them."""
    held = [name for name, there in ((RUN_CONFIG, (folder / RUN_CONFIG).is_file()),
                                     ("checkpoints/", checkpoint_dir(folder).is_dir())) if there]  # fmt: skip
    if not held:
        return
    def sampled(model: str) -> str:
        return f"draw samples from {model} with `vqar sample --model {folder} --out SAMPLES` and pass SAMPLES"

    # Looked up by the run's kind (None when run.yaml cannot tell): the advice differs per stage of the pipeline.
    advice = {"tokenizer": f"a tokenizer is evaluated with `vqar eval rfid IMAGES --tokenizer {folder}`",
              "ar": sampled("its model")}  # fmt: skip
    instead = advice.get(run_kind(folder), sampled("the model it trains"))
    raise ValueError(f"{folder} is a training run (it holds {' and '.join(held)}), not a set of images: {instead}")


def load_images(source: str | Path, max_images: int | None = None) -> np.ndarray:
    """All images of `source` (see the module docstring), at most `max_images`, as uint8 (N, H, W, C)."""
    images = open_source(source, max_images)
    part = images.read(slice(0, len(images)))
    images.check([part.summary])
    return part.images


def batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def check_enough_images(images: ImageSource | None, advice: str = "", limit_option: str = "--max-images") -> None:
    """ValueError naming a set of fewer than 2 images, of which no covariance (no FID or rFID, no statistics) can be
    made: said before its Inception pass, not by numpy after it. Where the limit the command was given
    (`limit_option`) made the set that small, the message names it."""
    if images is None or len(images) >= 2:
        return
    count = f"{len(images)} image{'s' * (len(images) != 1)}"
    said = f"{images.where} holds {count}"
    if images.limit is not None and images.limit < 2:
        said = f"{limit_option} {images.limit} keeps {count} of {images.where}"
    raise ValueError(f"{said}; FID statistics need at least 2{advice}")
