"""Encoding a dataset into a code store (see `vqar.data.codes`), on one process or many under torchrun, resumably.

The work is cut into units that depend on the source alone: ranges of `shard_size` items of an image folder or
array, or one tar shard each of a shard source. Unit u is encoded by rank u % W and becomes store shard u, written
to the work folder `.NAME.partial/` beside the store (codes, labels, captions, then a part record with checksums
and the files it skipped, each written atomically). When every unit is done, rank 0 writes the manifest, copies
the tokenizer and renames the work folder into place. The store is therefore the same on any number of
processes, and running an interrupted extraction again with the same settings encodes only the units it lacks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vqar.data import caption_store
from vqar.data.codes import FORMAT, MANIFEST, VIEWS, is_code_store
from vqar.data.config import DataConfig
from vqar.data.datasets import check_some_captioned, open_dataset
from vqar.data.loading import Batch, collate_samples
from vqar.data.shard_streams import whole_shards_loader
from vqar.data.shards import ShardDataset
from vqar.data.transforms import ten_crop
from vqar.parallel import Parallel, PeerFailed
from vqar.utils.io import (
    atomic_write,
    atomic_write_text,
    check_replaceable,
    replace_directory,
    sha256_file,
    write_lock,
)

log = logging.getLogger("vqar.data")

PLAN = "plan.json"
# What a code store is made of (its tokenizer/, the shards' files, the old single captions.json): --overwrite deletes
# the whole folder, so anything else in it is refused rather than deleted with it.
STORE_ENTRIES = re.compile(r"^(?:manifest\.json|tokenizer|captions\.json|(?:codes|labels)-\d+\.npy|"
                           r"captions-\d+\.(?:jsonl|offsets\.npy))$")
MAX_CROP_RANGE = 8.0  # how much larger than the crops the ten-crop views may resize an image


@dataclass(frozen=True)
class Unit:
    """Items [start, stop) of the source (global indices); `shard` is the tar shard they come from, if any."""

    start: int
    stop: int
    shard: int | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start


def plan_units(dataset, shard_size: int) -> list[Unit]:
    if isinstance(dataset, ShardDataset):
        return [Unit(s.start, s.start + s.used, i) for i, s in enumerate(dataset.shards) if s.used]
    total = len(dataset)
    return [Unit(start, min(start + shard_size, total)) for start in range(0, total, shard_size)]


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of the tokenizer's weights: a partial extraction is resumed only with the same tokenizer."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tokenizer.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _views(images: torch.Tensor, views: str, size: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, V, C, size, size)."""
    if views == "ten-crop":
        return ten_crop(images, size)
    if views == "flip":
        return torch.stack([images, images.flip(-1)], dim=1)
    return images[:, None]


def _encode(tokenizer, images: torch.Tensor, views: str, size: int) -> np.ndarray:
    """(B, C, S, S) images -> (B, V, h, w[, D]) codes of their views."""
    stack = _views(images, views, size)
    codes = tokenizer.encode(stack.flatten(0, 1)).view(len(stack), stack.shape[1], *tokenizer.code_shape(size))
    return codes.cpu().numpy()


@dataclass
class _OpenUnit:
    unit: Unit
    seen: int = 0
    codes: dict[int, np.ndarray] = field(default_factory=dict)
    labels: dict[int, int] = field(default_factory=dict)
    captions: dict[int, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    skipped_samples: int = 0  # a damaged shard loses several samples under one path
    uncaptioned: int = 0


class _WorkFolder:
    """The `.NAME.partial` folder of one extraction: its plan and the finished units."""

    def __init__(self, out_dir: Path):
        self.path = out_dir.parent / f".{out_dir.name}.partial"

    def part(self, u: int) -> Path:
        return self.path / f"part-{u:05d}.json"

    def finished(self, u: int) -> bool:
        """Whether unit u's part record exists and its files match their checksums."""
        record = self.part(u)
        if not record.is_file():
            return False
        try:
            part = json.loads(record.read_text())
            return all(sha256_file(self.path / part["files"][k]) == part["sha256"][k] for k in part["files"])
        except (OSError, ValueError, KeyError):
            return False

    def prepare(self, plan: dict) -> int:
        """Keeps the work of an earlier run with the same plan (returns how many units it finished), else starts
        afresh."""
        plan_file = self.path / PLAN
        if plan_file.is_file():
            with contextlib.suppress(OSError, ValueError):
                if json.loads(plan_file.read_text()) == plan:
                    return sum(self.finished(u) for u in range(len(plan["units"])))
            log.warning("%s holds an extraction with other settings or of other files (source, its files, "
                        "tokenizer, views or shard size); starting again", self.path)  # fmt: skip
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        atomic_write_text(plan_file, json.dumps(plan, indent=1))
        return 0

    def write(self, u: int, open_unit: _OpenUnit, dtype: np.dtype, captioned: bool) -> None:
        kept = sorted(open_unit.codes)
        files: dict[str, str] = {}
        if kept:
            files = {"codes": f"codes-{u:05d}.npy", "labels": f"labels-{u:05d}.npy"}
            codes = np.stack([open_unit.codes[i] for i in kept]).astype(dtype)
            labels = np.array([open_unit.labels[i] for i in kept], dtype=np.int64)
            atomic_write(self.path / files["codes"], lambda p: _save_npy(p, codes))
            atomic_write(self.path / files["labels"], lambda p: _save_npy(p, labels))
            if captioned:
                names = caption_store.shard_names(u)
                caption_store.write_caption_shard(self.path, names, [open_unit.captions[i] for i in kept])
                files.update(names)
        record = {
            "unit": asdict(open_unit.unit),
            "count": len(kept),
            "files": files,
            "sha256": {k: sha256_file(self.path / f) for k, f in files.items()},
            "skipped": open_unit.skipped,
            "skipped_samples": open_unit.skipped_samples,
            "uncaptioned": open_unit.uncaptioned,
        }
        atomic_write_text(self.part(u), json.dumps(record))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # np.save(path) would append ".npy" to the temporary name
        np.save(handle, array)


def _my_batches(dataset, units: list[Unit], batch_size: int, num_workers: int) -> DataLoader:
    """The items of `units`, in batches that never span two units."""
    if isinstance(dataset, ShardDataset):
        return whole_shards_loader(dataset, [u.shard for u in units], batch_size=batch_size, num_workers=num_workers,
                                   collate=collate_samples)  # fmt: skip
    chunks = [list(range(i, min(i + batch_size, u.stop))) for u in units for i in range(u.start, u.stop, batch_size)]
    return DataLoader(dataset, batch_sampler=chunks, num_workers=num_workers, collate_fn=collate_samples)


@torch.no_grad()
def extract_codes(
    tokenizer,
    data: DataConfig,
    out_dir: str | Path,
    *,
    views: str = "none",
    crop_range: float = 1.1,
    device: torch.device | str = "cpu",
    shard_size: int = 10_000,
    overwrite: bool = False,
    tokenizer_dir: str | Path | None = None,
    par: Parallel | None = None,
) -> dict:
    """Encodes every image of `data.source` with `tokenizer` into a code store at `out_dir`; returns the manifest.

    `data.image_size` and `data.channels` are the tokenizer's input; with `views="ten-crop"` images are first fitted
    to round(image_size * crop_range). `shard_size` is the number of source items per unit (tar sources use one
    unit per shard). `tokenizer_dir`, when given, is copied into the store (else the tokenizer is saved there).
    Under torchrun, pass the run's `par`: every rank calls this, and the store on rank 0's file system (shared by
    all ranks) is the result. A source with captions makes a text-to-image store, without its uncaptioned images."""
    par = par or Parallel()
    if views not in VIEWS:
        raise ValueError(f"views must be one of {sorted(VIEWS)}, got {views!r}")
    if not 1.0 <= crop_range <= MAX_CROP_RANGE:  # nan fails this too; 1e9 overflowed the resize in a traceback
        raise ValueError(f"crop_range must be a number from 1 to {MAX_CROP_RANGE:g} (LlamaGen's is 1.1; past that "
                         f"each crop is a sliver of the image), got {crop_range}")  # fmt: skip
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as held:

        def prepare() -> None:  # one lock for every rank: two runs at once would write the same shards
            held.enter_context(write_lock(out_dir))
            # --overwrite deletes the old store: never a folder that is something else
            check_replaceable(out_dir, overwrite, "a code store", is_code_store, own_entries=STORE_ENTRIES)

        par.main_prepares(prepare, f"the code store {out_dir}")
        return _extract(tokenizer, data, out_dir, views, crop_range, device, shard_size, tokenizer_dir, par)


def _extract(tokenizer, data: DataConfig, out_dir: Path, views: str, crop_range: float, device, shard_size: int,
             tokenizer_dir, par: Parallel) -> dict:  # fmt: skip
    """`extract_codes` once `out_dir` is checked and locked."""
    size = data.image_size
    fit = round(size * crop_range) if views == "ten-crop" else size
    dataset = open_dataset(DataConfig(**{**data.__dict__, "image_size": fit, "val_fraction": 0.0}))
    captioned = (
        dataset.captioned if isinstance(dataset, ShardDataset) else getattr(dataset, "captions", None) is not None
    )
    if not isinstance(dataset, ShardDataset):
        check_some_captioned(dataset, data.source)
    units = plan_units(dataset, shard_size)
    tokenizer = tokenizer.to(device).eval()
    plan = {
        "source": _source_key(data.source),
        "items": len(dataset),
        "units": [[u.start, u.stop] for u in units],
        "image_size": size,
        "channels": data.channels,
        "views": views,
        "crop_range": crop_range if views == "ten-crop" else None,
        "captioned": captioned,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    if captioned:  # a partial extraction of an older layout (one captions.json) starts again
        plan["caption_layout"] = caption_store.LAYOUT
    if getattr(dataset, "captions", None) is not None:  # another caption file (or the same edited) starts again
        plan["captions_sha256"] = _captions_digest(dataset.captions)
    plan["files_sha256"] = _files_digest(dataset, data.source)
    work = _WorkFolder(out_dir)
    if par.is_main:
        done = work.prepare(plan)
        if done:
            log.info("resuming the extraction in %s: %d of %d shards are done", work.path, done, len(units))
    par.barrier()
    started = time.perf_counter()
    unfinished = [u for u in range(len(units)) if not work.finished(u)]  # after the barrier: the same on every rank
    todo = [u for u in unfinished if u % par.world_size == par.rank]
    failure = None
    try:
        _encode_units(tokenizer, dataset, units, todo, work, data, views, size, device, captioned, par)
    except Exception as err:  # every rank learns of it below, instead of waiting for this one at a barrier
        failure = err
    except BaseException:  # Ctrl-C, or the launcher's stop: no rank waits at a barrier for the others now
        if par.is_main and not any(work.finished(u) for u in range(len(units))):
            shutil.rmtree(work.path, ignore_errors=True)  # nothing to resume: only litter beside --out
        raise
    if par.any(failure is not None):
        done = sum(work.finished(u) for u in range(len(units))) if par.is_main else 0
        if par.is_main and done:
            log.error("extraction stopped; %d of %d shards are done in %s: run the same command again to resume",
                      done, len(units), work.path)  # fmt: skip
        elif par.is_main:  # nothing to resume: the work folder would only be litter beside --out
            shutil.rmtree(work.path, ignore_errors=True)
        raise failure or PeerFailed("another process failed while extracting codes (see its messages)")
    manifest, problem, stored = None, None, 0
    if par.is_main:
        try:
            # A resumed extraction encoded only the shards it lacked: the count and the rate are of those.
            stored = sum(json.loads(work.part(u).read_text())["count"] for u in unfinished)
            manifest = _publish(work, out_dir, units, {**plan, "source": str(data.source)}, tokenizer, tokenizer_dir,
                                dataset, size)  # fmt: skip
        except Exception as err:
            problem = err
    if par.any(problem is not None):
        raise problem or PeerFailed("rank 0 failed to write the code store (see its messages)")
    manifest, stored = par.gather((manifest, stored))[0]
    seconds = time.perf_counter() - started
    log.info("encoded %d images in %.0f s (%.1f images/s over %d process%s)", stored, seconds,
             stored / max(seconds, 1e-9), par.world_size, "es" if par.distributed else "")  # fmt: skip
    return manifest


def _files_digest(dataset, source) -> str:
    """A digest of the image files' paths, sizes and modification times (a folder's files, or the one `.npz` /
    `.npy`): a folder whose images were edited or moved between classes, with the same count, resumed an extraction
    that then kept old codes and stored a moved image twice. Tar shards are left to their sample counts."""
    files = getattr(dataset, "files", None)
    if files is None:
        path = Path(str(source)).expanduser()
        files = [path] if path.is_file() else []
    digest = hashlib.sha256()
    for path in files:
        name = os.path.abspath(path)  # `imgs`, `imgs/` and its absolute path resume the same extraction
        try:
            stat = os.stat(path)
            about = f"\0{stat.st_size}\0{stat.st_mtime_ns}\n"
        except OSError:  # gone since the listing: its read will be skipped and counted
            about = "\0missing\n"
        digest.update(os.fsencode(name) + about.encode())  # the name's bytes: not all names are UTF-8
    return digest.hexdigest()


def _captions_digest(captions: list) -> str:
    """A digest of every item's captions, item by item (one JSON string of millions of captions would hold them all
    in memory twice)."""
    digest = hashlib.sha256()
    for item in captions:
        digest.update(json.dumps(item).encode() + b"\n")
    return digest.hexdigest()


def _source_key(source) -> str:
    """`data.source` as the plan compares it: a local path resolved, so `imgs`, `imgs/` and its absolute path
    resume the same extraction."""
    path = Path(str(source)).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def _encode_units(tokenizer, dataset, units: list[Unit], todo: list[int], work: _WorkFolder, data: DataConfig,
                  views: str, size: int, device, captioned: bool, par: Parallel) -> None:  # fmt: skip
    """Encodes units `todo` (this rank's unfinished ones), writing each as soon as all its items are in."""
    if not todo:
        return
    starts = np.array([units[u].start for u in todo])
    dtype = np.uint16 if tokenizer.codebook_size <= 65536 else np.int32
    pending = {u: _OpenUnit(units[u]) for u in todo}
    bar = tqdm(
        total=sum(units[u].size for u in todo),
        desc="extracting codes" + (f" (rank 0 of {par.world_size})" if par.distributed else ""),
        unit="img",
        dynamic_ncols=True,
        disable=not par.is_main,
    )
    with bar:
        for batch in _my_batches(dataset, [units[u] for u in todo], data.eval_batch_size, data.num_workers):
            codes = _batch_codes(tokenizer, batch, views, size, device)
            for item, unit_id in _route(batch, todo, starts):
                open_unit = pending[unit_id]
                _add(open_unit, batch, item, codes, captioned)
                if open_unit.seen == open_unit.unit.size:
                    work.write(unit_id, pending.pop(unit_id), dtype, captioned)
            bar.update(len(batch) + sum(bad.count for bad in batch.bad))
    if pending:  # a loader that delivered fewer items than planned is a bug, never a silent short store
        u = next(iter(pending))
        raise RuntimeError(f"unit {u} of the extraction received {pending[u].seen} of its {units[u].size} items")


def _batch_codes(tokenizer, batch: Batch, views: str, size: int, device) -> np.ndarray | None:
    if not len(batch):
        return None
    return _encode(tokenizer, batch.images.to(device), views, size)


def _route(batch: Batch, todo: list[int], starts: np.ndarray) -> Iterator[tuple[int | object, int]]:
    """(position in the batch, or the BadSample, unit id) for every item of `batch`."""
    for position, index in enumerate(batch.indices.tolist()):
        yield position, todo[int(np.searchsorted(starts, index, side="right")) - 1]
    for bad in batch.bad:
        yield bad, todo[int(np.searchsorted(starts, bad.index, side="right")) - 1]


def _add(open_unit: _OpenUnit, batch: Batch, item, codes: np.ndarray | None, captioned: bool) -> None:
    if not isinstance(item, int):  # a BadSample, or the samples a short shard lacks (one warning for them all)
        open_unit.seen += item.count
        open_unit.skipped.append(item.path)
        open_unit.skipped_samples += item.count
        if item.count > 1:
            log.warning("skipping %d samples of %s: %s", item.count, item.path, item.error)
        else:
            log.warning("skipping unreadable image %s: %s", item.path, item.error)
        return
    open_unit.seen += 1
    index = int(batch.indices[item])
    captions = batch.captions[item] if captioned and batch.captions is not None else None
    if captioned and not captions:
        open_unit.uncaptioned += 1
        return
    open_unit.codes[index] = codes[item]
    open_unit.labels[index] = int(batch.labels[item])
    if captions is not None:
        open_unit.captions[index] = captions


def _save_tokenizer(tokenizer, tokenizer_dir: str | Path | None, dest: Path) -> None:
    """Copies `tokenizer_dir` without its training leftovers when given, else saves `tokenizer`."""
    from vqar.bundle import save_pretrained

    shutil.rmtree(dest, ignore_errors=True)
    if tokenizer_dir is not None:
        skip = shutil.ignore_patterns("checkpoints", "*.png", "*.jsonl", "*.yaml")
        shutil.copytree(tokenizer_dir, dest, ignore=skip)
    else:
        save_pretrained(tokenizer, dest)


def _publish(work: _WorkFolder, out_dir: Path, units: list[Unit], plan: dict, tokenizer, tokenizer_dir,
             dataset, size: int) -> dict:  # fmt: skip
    """Rank 0, once every unit is done: manifest, captions and tokenizer, then the work folder becomes the store."""
    parts = []
    for u in range(len(units)):
        if not work.part(u).is_file():
            raise RuntimeError(f"shard {u} of the extraction in {work.path} is missing after every rank finished")
        parts.append(json.loads(work.part(u).read_text()))
    keys = ("codes", "labels", *(caption_store.KEYS if plan["captioned"] else ()))
    shards = [{**{k: p["files"][k] for k in keys}, "count": p["count"], "sha256": {k: p["sha256"][k] for k in keys}}
              for p in parts if p["count"]]  # fmt: skip
    if not shards:
        # Not kept to resume: its units are recorded as done, so a rerun would skip the same images again.
        shutil.rmtree(work.path, ignore_errors=True)
        uncaptioned = sum(p["uncaptioned"] for p in parts)
        if uncaptioned:  # images were read, but a store with captions keeps only the captioned ones
            raise ValueError(f"none of the {uncaptioned} readable images in {plan['source']} has a caption, and a "
                             "store with captions keeps only captioned images: caption them, or give --captions none "
                             "for a store without captions")  # fmt: skip
        raise ValueError(f"no readable images in {plan['source']}")
    manifest = {
        "format": FORMAT,
        "version": 1,
        "code_shape": list(tokenizer.code_shape(size)),
        "codebook_size": tokenizer.codebook_size,
        "image_size": size,
        "channels": plan["channels"],
        "source": plan["source"],
        "views": VIEWS[plan["views"]],
        "crop_range": plan["crop_range"],
        "num_items": int(sum(s["count"] for s in shards)),
        "num_classes": int(getattr(dataset, "num_classes", 0)),
        "class_names": list(getattr(dataset, "class_names", [])),
        "skipped_files": len({path for p in parts for path in p["skipped"]}),
        "skipped_samples": sum(p.get("skipped_samples", len(p["skipped"])) for p in parts),  # (older part records)
        "shards": shards,
    }
    if plan["captioned"]:  # each shard lists its caption files (`vqar.data.caption_store`)
        manifest["captions"] = {"layout": caption_store.LAYOUT}
        manifest["uncaptioned_images"] = sum(p["uncaptioned"] for p in parts)
    _save_tokenizer(tokenizer, tokenizer_dir, work.path / "tokenizer")
    atomic_write_text(work.path / MANIFEST, json.dumps(manifest, indent=1))
    replace_directory(work.path, out_dir)
    for leftover in [*out_dir.glob("part-*.json"), out_dir / PLAN]:
        leftover.unlink(missing_ok=True)
    files, samples = manifest["skipped_files"], manifest["skipped_samples"]
    if samples > files:
        log.warning("skipped %d unreadable samples in %d %s", samples, files, "file" if files == 1 else "files")
    elif files:
        log.warning("skipped %d unreadable image %s", files, "file" if files == 1 else "files")
    return manifest
