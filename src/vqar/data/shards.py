"""WebDataset tar shards as a data source: image sets of ImageNet size and beyond, streamed from disk or a store.

A shard is a tar file of samples; the members of one sample share a key (`n01440764_10026.jpg`, `...cls`,
`...txt`). The image is the `jpg`, `jpeg`, `png` or `webp` member, the class id the `cls` member, the captions the
`txt` member (one per line) or the `json` member's "caption" / "captions" / "text". `data.source` names the shards as

- a brace pattern: `shards/train-{000000..001023}.tar` (several joined by `::`),
- a list file (`.txt`): one shard path or URL per line, relative paths taken from the list's folder,
- a shard index (`.json`, written by `vqar pack-shards`): {"shardlist": [{"url", "nsamples"}], "class_names"}.

URLs are opened by webdataset's `gopen`: local paths, http(s), and `pipe:` shell commands (`pipe:aws s3 cp
s3://b/x.tar -`). A `pipe:` source runs whatever command it names, so it is refused (in a pattern, a list file or an
index alike) unless the caller opts in (`allow_pipe=True`, `data.allow_pipe=true`, `--allow-pipe`): a downloaded
index cannot run commands on its own. Each command is logged (a warning) before it runs.

Sample counts come from the index; without one, local shards are scanned once (tar headers, plus the small `cls`
members for the class count) and remote ones are read through. Every sample has a fixed global index (the shard's
first index + its position in the shard), which is what code stores and reports use.

The validation split holds out whole shards, so evaluating never streams the training data. The loaders that
read them in training, evaluation and extraction order are in `vqar.data.shard_streams`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vqar.data.samples import BadSample, Sample
from vqar.data.transforms import convert_channels, fit_image, to_tensor
from vqar.text.captions import caption_text, check_caption_values, is_unicode
from vqar.utils.images import open_image

log = logging.getLogger("vqar.data")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
LABEL_KEY = "cls"
CAPTION_KEYS = ("txt", "json")
LIST_SUFFIXES = (".txt", ".shards")
SHARD_INDEX = "shards.json"  # the index `vqar pack-shards` writes beside its shards


def shard_folder_index(source: str | Path) -> str | None:
    """The index of a folder `vqar pack-shards` wrote, given as a data source (`--data DIR`); None otherwise."""
    index = Path(str(source)).expanduser() / SHARD_INDEX
    return str(index) if index.is_file() else None
_READ_KEYS = {*IMAGE_KEYS, LABEL_KEY, *CAPTION_KEYS}
# The members webdataset's tar reader leaves out (`__key__`-style metadata), matched the same way by the scan.
_META = re.compile(r"__[^/]*__($|/)")


PIPE = "pipe:"
# Whether `pipe:` sources may run where the caller does not say (`allow_pipe=None`): off unless a command line
# opted in for its whole run (`allow_pipe_commands`).
_PIPE_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("vqar_pipe_allowed", default=False)


def is_remote(url: str) -> bool:
    return url.startswith(PIPE) or "://" in url


@contextlib.contextmanager
def allow_pipe_commands(allowed: bool = True) -> Iterator[None]:
    """Within the block, shard sources opened without an explicit `allow_pipe` may run `pipe:` commands (the
    `--allow-pipe` option of the commands that read images)."""
    token = _PIPE_ALLOWED.set(bool(allowed))
    try:
        yield
    finally:
        _PIPE_ALLOWED.reset(token)


def check_pipe_commands(urls: Sequence[str], source: str, allow_pipe: bool | None = None) -> None:
    """Refuses shard URLs that are shell commands unless allowed: a shard list or index from elsewhere must not be
    able to run commands on this machine without the user's say."""
    commands = [url for url in urls if url.startswith(PIPE)]
    allowed = _PIPE_ALLOWED.get() if allow_pipe is None else allow_pipe
    if commands and not allowed:
        raise ValueError(
            f"{source} names {len(commands)} shell command{'s' if len(commands) > 1 else ''} as shards (first: "
            f"{commands[0][len(PIPE) :]!r}); vqar runs pipe: sources only when asked to: check the commands, then "
            "pass data.allow_pipe=true (--allow-pipe on the command line)"
        )


def _gopen(url: str):
    """webdataset's `gopen`, saying which command runs first when `url` is a `pipe:` command."""
    from webdataset.gopen import gopen

    if url.startswith(PIPE):
        log.warning("running the shard command: %s", url[len(PIPE) :])
    return gopen(url)


def is_shard_source(source: str) -> bool:
    """Whether `data.source` names tar shards (a pattern, URL, shard list or shard index) rather than images."""
    if is_remote(source) or re.search(r"\.(tar|tgz|tar\.gz)(\}|$|::)", source, flags=re.IGNORECASE):
        return True
    path = Path(source).expanduser()
    return path.is_file() and path.suffix.lower() in (*LIST_SUFFIXES, ".json")


@dataclass(frozen=True)
class Shard:
    """One tar file: where it is, its sample count, the global index of its first sample, and how many of its
    samples (from the first) the dataset uses."""

    url: str
    count: int
    start: int
    used: int

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ShardListing:
    urls: list[str]
    counts: list[int] | None
    class_names: list[str] | None
    captioned: bool | None


def _resolve(url: str, base: Path) -> str:
    if is_remote(url) or os.path.isabs(url):
        return url
    return str(base / url)


def list_shards(source: str, allow_pipe: bool | None = None) -> ShardListing:
    """The shard URLs of `source`, with counts, class names and whether captions are present when an index says.
    `pipe:` URLs are refused unless `allow_pipe` (None: as `allow_pipe_commands` says, by default not)."""
    listing = _list_shards(source)
    check_pipe_commands(listing.urls, source, allow_pipe)
    return listing


def _list_shards(source: str) -> ShardListing:
    from webdataset.shardlists import expand_urls

    path = Path(source).expanduser()
    if path.suffix == ".json" and path.is_file():
        index = json.loads(path.read_text())
        entries = index.get("shardlist") if isinstance(index, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{source} is not a shard index: it has no 'shardlist' of {{url, nsamples}} entries")
        try:
            urls = [_resolve(str(e["url"]), path.parent) for e in entries]
            counts = [_sample_count(e["nsamples"]) for e in entries]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: every shardlist entry needs a 'url' and an 'nsamples' count >= 0 "
                             f"({err})") from None  # fmt: skip
        return ShardListing(urls, counts, index.get("class_names"), index.get("captions"))
    if path.suffix in LIST_SUFFIXES and path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines()]
        urls = [_resolve(line, path.parent) for line in lines if line and not line.startswith("#")]
        if not urls:
            raise ValueError(f"the shard list {source} names no shards")
        return ShardListing(urls, None, None, None)
    return ShardListing(expand_urls(str(source)), None, None, None)


def _sample_count(value) -> int:
    count = int(value)  # TypeError / ValueError for what is no number at all
    if isinstance(value, bool) or count != float(value) or count < 0:
        raise ValueError(f"nsamples {value!r} is not a count")
    return count


def _check_local_files(urls: Sequence[str], source: str) -> None:
    missing = [url for url in urls if not is_remote(url) and not Path(url).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(urls)} shards of {source} do not exist "
                                f"(first: {missing[0]})")  # fmt: skip


def _key_and_suffix(name: str) -> tuple[str | None, str]:
    # webdataset's rule (base_plus_ext): the key is the name up to the first dot of its last component.
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else (None, "")


@dataclass
class ShardScan:
    count: int = 0
    labels: tuple[int, ...] = ()
    captioned: bool = False
    error: str | None = None


def scan_shard(url: str) -> ShardScan:
    """Counts the samples of one shard as the reader will see them. A local tar is read by its headers only (plus
    the `cls` members); a remote one is read through. A damaged tar counts the samples before the damage."""
    from webdataset.tariterators import tar_file_iterator

    scan, labels = ShardScan(), set()
    try:
        with contextlib.ExitStack() as stack:
            if is_remote(url):
                stream = stack.enter_context(contextlib.closing(_gopen(url)))
                members = ((m["fname"], lambda m=m: m["data"]) for m in tar_file_iterator(stream))
            else:  # seekable: the iteration jumps from header to header
                tar = stack.enter_context(tarfile.open(url, "r:*"))
                members = ((info.name, lambda info=info: tar.extractfile(info).read())
                           for info in tar if info.isreg() and not _is_top_level_meta(info.name))  # fmt: skip
            _count_samples(members, scan, labels)
    except Exception as err:  # a truncated or corrupt tar: the reader stops at the same place
        scan.error = f"{type(err).__name__}: {err}"
    scan.labels = tuple(sorted(labels))
    return scan


def _is_top_level_meta(name: str) -> bool:
    return "/" not in name and name.startswith("__") and name.endswith("__")


def _count_samples(members: Iterable[tuple[str, Callable[[], bytes]]], scan: ShardScan, labels: set[int]) -> None:
    last = None
    for name, read in members:
        key, suffix = _key_and_suffix(name)
        if key is None or _META.match(name):
            continue
        if key != last:
            scan.count, last = scan.count + 1, key
        if suffix == LABEL_KEY:
            with contextlib.suppress(ValueError):  # a bad class id is reported when the sample is read
                labels.add(int(read().decode().strip()))
        elif suffix in CAPTION_KEYS:
            scan.captioned = True


def decode_sample(raw: dict, index: int, image_size: int, channels: int, captioned: bool,
                  num_classes: int = 0) -> Sample | BadSample:  # fmt: skip
    """One sample's members (bytes by suffix) -> a `Sample`, or a `BadSample` naming `url:key` and the problem.
    `num_classes`: the classes the index names (0: none named, any class id taken)."""
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    try:
        key = next((k for k in IMAGE_KEYS if k in raw), None)
        if key is None:
            found = sorted(k for k in raw if not k.startswith("_"))
            raise ValueError(f"no image member (.{', .'.join(IMAGE_KEYS)}) among {found}")
        with open_image(raw[key], where) as image:
            image.load()
            pixels = to_tensor(fit_image(convert_channels(image, channels), image_size))
        label = int(raw[LABEL_KEY].decode().strip()) if LABEL_KEY in raw else -1
        if label < -1:
            raise ValueError(f"class id {label} is negative")
        if num_classes and label >= num_classes:  # else stored, and refused only when an AR model trains on it
            raise ValueError(f"class id {label} is beyond the {num_classes} class names of the index")
        captions = _captions(raw) if captioned else None
    except Exception as err:  # as for files in a folder: any decoder error means "this sample is unusable"
        return BadSample(index=index, path=where, error=f"{type(err).__name__}: {err}")
    return Sample(image=pixels, label=label, index=index, captions=captions)


def _captions(raw: dict) -> list[str]:
    """The captions of a sample's `.txt` (one per line) or `.json` member (`captions`, `caption` or `text`: a
    string or a list of strings), as a caption store keeps them (`caption_text`); those with nothing visible are
    left out. A caption of another type is a ValueError naming it."""
    if "txt" in raw:
        try:
            found = raw["txt"].decode("utf-8-sig").splitlines()  # an editor's BOM is no caption text
        except UnicodeDecodeError as err:
            raise ValueError(f"the .txt caption is not UTF-8 text ({err.reason} at byte {err.start})") from None
    elif "json" in raw:
        meta = json.loads(raw["json"].decode("utf-8"))
        key = next((k for k in ("captions", "caption", "text") if isinstance(meta, dict) and meta.get(k) is not None),
                   None)  # fmt: skip
        found = [] if key is None else meta[key]
        found = found if isinstance(found, list) else [found]
        check_caption_values(found, f'the .json member\'s "{key}"')
    else:
        return []
    captions = [text for text in (caption_text(c) for c in found if c is not None) if text is not None]
    bad = next((c for c in captions if not is_unicode(c)), None)
    if bad is not None:  # a "\udcff" escape: the caption store could not write it, so the sample is unusable
        raise ValueError(f"caption {bad!r} is not Unicode text (a lone surrogate escape)")
    return captions


_UNDERCOUNTED: set[str] = set()  # shards already said to hold more than their index names (once per process)


def _check_nothing_follows(grouped: Iterator[dict], shard: Shard) -> None:
    """Warns (once per shard) when a sample follows the last one the index counts: an index made before the shard
    grew, whose extra samples would be left out without a word."""
    try:
        extra = next(grouped, None)
    except Exception:  # a damaged tail is not this check's to report; the samples counted were all read
        return
    if extra is not None and shard.url not in _UNDERCOUNTED:
        _UNDERCOUNTED.add(shard.url)
        log.warning("shard %s holds more samples than the %d its index names: the rest were left out (an index "
                    "of the shards as they are now: vqar pack-shards writes one)", shard.url, shard.count)  # fmt: skip


def shard_samples(shard: Shard, gaps: bool = False) -> Iterator[tuple[int, dict | BadSample]]:
    """(global index, raw sample) for the first `shard.used` samples of `shard`, always accounting for that many:
    positions a damaged or short tar cannot deliver come back as `BadSample`s naming the shard (so a report counts
    the shard once): one per position, or with `gaps` one for all of them (`BadSample.count`), so a shard whose
    index promises far more samples than it holds ends when its tar ends."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    position, problem = 0, None
    try:
        stream = _gopen(shard.url)
        try:
            members = ({**member, "__url__": shard.url} for member in tar_file_iterator(stream))
            grouped = group_by_keys(members, suffixes=_READ_KEYS)
            for raw in grouped:
                if position == shard.count - 1 == shard.used - 1:  # the shard's last sample, by its index's count
                    _check_nothing_follows(grouped, shard)  # before handing it over: a reader stops at it
                yield shard.start + position, raw
                position += 1
                if position >= shard.used:
                    break
        finally:
            stream.close()
    except Exception as err:  # unreadable, truncated, or a duplicate member name
        problem = f"{type(err).__name__}: {err}"
    if position < shard.used:
        problem = problem or f"the shard ended after {position} of the {shard.count} samples its index names"
        if gaps:
            index = shard.start + position
            yield index, BadSample(index=index, path=shard.url, error=problem, count=shard.used - position)
            return
        for missing in range(position, shard.used):
            yield shard.start + missing, BadSample(index=shard.start + missing, path=shard.url, error=problem)


class ShardDataset:
    """Tar shards read as streams; holds no images. `split` and `max_images` select whole shards (or the first
    samples of the last one), so a selection never has to read what it leaves out."""

    def __init__(self, source: str, shards: list[Shard], image_size: int, channels: int, class_names: list[str],
                 captioned: bool, shuffle_buffer: int = 1000):  # fmt: skip
        self.source, self.shards = source, shards
        self.image_size, self.channels = image_size, channels
        self.class_names, self.captioned, self.shuffle_buffer = class_names, captioned, shuffle_buffer

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return sum(shard.used for shard in self.shards)

    def _with(self, shards: list[Shard]) -> ShardDataset:
        return ShardDataset(self.source, shards, self.image_size, self.channels, self.class_names, self.captioned,
                            self.shuffle_buffer)  # fmt: skip

    def first(self, max_items: int) -> ShardDataset:
        """The first `max_items` samples in shard order (`data.max_images`; packed shards are shuffled)."""
        kept, left = [], max_items
        for shard in self.shards:
            if left <= 0:
                break
            kept.append(replace(shard, used=min(shard.used, left)))
            left -= kept[-1].used
        return self._with(kept)

    def split(self, val_fraction: float, seed: int) -> tuple[ShardDataset, ShardDataset]:
        """(train, val): round(val_fraction * shards) whole shards (at least one) drawn with `seed` for validation."""
        if val_fraction == 0:
            return self, self._with([])
        n = len(self.shards)
        if n < 2:
            raise ValueError(f"{self.source} is a single shard, and the validation split holds out whole shards: "
                             "pack more shards (vqar pack-shards --shard-size)")  # fmt: skip
        n_val = min(n - 1, max(1, round(val_fraction * n)))
        order = np.random.default_rng(seed).permutation(n)
        val = set(order[:n_val].tolist())
        return (self._with([s for i, s in enumerate(self.shards) if i not in val]),
                self._with([s for i, s in enumerate(self.shards) if i in val]))  # fmt: skip

    def decode(self, index: int, raw: dict | BadSample) -> Sample | BadSample:
        if isinstance(raw, BadSample):
            return raw
        return decode_sample(raw, index, self.image_size, self.channels, self.captioned, len(self.class_names))

    def check_readable(self, tries: int = 64) -> None:
        """Raises ValueError when none of the first `tries` samples can be read."""
        errors = []
        for shard in self.shards:
            for index, raw in shard_samples(shard):
                item = self.decode(index, raw)
                if isinstance(item, Sample):
                    return
                errors.append(item)
                if len(errors) >= tries:
                    break
            if len(errors) >= tries:
                break
        if errors:
            raise ValueError(f"no readable image in {self.source}: none of the {len(errors)} samples tried could be "
                             f"read (first: {errors[0].path}: {errors[0].error})")  # fmt: skip


def open_shards(source: str, image_size: int, channels: int, *, captions: str | None = None,
                max_images: int | None = None, shuffle_buffer: int = 1000,
                allow_pipe: bool | None = None) -> ShardDataset:  # fmt: skip
    """The `ShardDataset` of `source`: its shard list, sample counts (from the index, else a scan) and classes.
    `allow_pipe`: whether `pipe:` shell commands may be run (None: as `allow_pipe_commands` says, by default not)."""
    if captions not in (None, "none"):
        raise ValueError("tar shards carry their captions in each sample's txt or json member: leave data.captions "
                         "unset (or 'none' to ignore them)")  # fmt: skip
    listing = list_shards(source, allow_pipe)
    if not listing.urls:
        raise ValueError(f"{source!r} names no shards")
    _check_local_files(listing.urls, source)
    counts, class_names, captioned = listing.counts, listing.class_names, listing.captioned
    if counts is None or class_names is None or captioned is None:
        if counts is not None:  # webdataset's own index (wids) names the counts alone: classes went unsaid
            log.info("the index of %s names no class_names or captions: reading its shards once to find them "
                     "(vqar pack-shards writes an index that names them)", source)  # fmt: skip
        scans = _scan_all(listing.urls)
        unread = [scan for scan in scans if scan.error and not scan.count]
        if len(unread) == len(scans):  # a network or path problem, not empty shards
            raise ValueError(f"none of the {len(scans)} shards of {source} could be read (the first: "
                             f"{unread[0].error})")  # fmt: skip
        counts = counts if counts is not None else [scan.count for scan in scans]
        labels = {label for scan in scans for label in scan.labels}
        if class_names is None:
            class_names = [str(i) for i in range(max(labels, default=-1) + 1)]
        if captioned is None:
            captioned = any(scan.captioned for scan in scans)
    starts = np.cumsum([0, *counts]).tolist()
    shards = [Shard(url, n, start, n) for url, n, start in zip(listing.urls, counts, starts, strict=False)]
    dataset = ShardDataset(str(source), shards, image_size, channels, list(class_names or []),
                           bool(captioned) and captions != "none", shuffle_buffer)  # fmt: skip
    if len(dataset) == 0:
        raise ValueError(f"the shards of {source} hold no samples")
    return dataset.first(max_images) if max_images is not None else dataset


def _scan_all(urls: Sequence[str]) -> list[ShardScan]:
    from tqdm.auto import tqdm

    if any(is_remote(url) for url in urls):
        log.warning("counting the samples of %d remote shards means reading them through once; a shard index "
                    "(vqar pack-shards writes one) names the counts", len(urls))  # fmt: skip
    scans = []
    for url in tqdm(urls, desc="counting shard samples", unit="shard", disable=len(urls) < 16, leave=False):
        scans.append(scan_shard(url))
        if scans[-1].error and not scans[-1].count:
            log.warning("shard %s could not be read: %s", url, scans[-1].error)
        elif scans[-1].error:
            log.warning("shard %s is damaged after %d samples: %s", url, scans[-1].count, scans[-1].error)
    return scans


def shard_index(urls: Iterable[str], counts: Iterable[int], class_names: Sequence[str], captioned: bool) -> dict:
    """A shard index in webdataset's `wids` layout, with vqar's class names and caption flag beside it."""
    return {
        "wids_version": 1,
        "shardlist": [{"url": url, "nsamples": int(n)} for url, n in zip(urls, counts, strict=True)],
        "class_names": list(class_names),
        "captions": bool(captioned),
    }
