"""Samples for a reproduction, drawn into resumable shards, in one process or under torchrun.

The n images of a run are cut into shards of `shard_size` consecutive images (`shard-00000.npz`, ...: uint8 NHWC
`arr_0`, labels `arr_1`, their positions `index`), each written atomically when it is complete. Image j draws from
the random stream (seed, j) alone (`vqar.sampling.generate.image_noise`) and a shard is drawn in the same batches
whichever process draws it, so a run on any number of processes, or one killed and started again, gives the same
images as one uninterrupted process. A restarted run draws only the shards that are missing, spread over its
processes; `plan.json` records the settings, and a folder drawn with other settings is refused rather than mixed.

At the end rank 0 packs the shards, in order, into `samples.npz` (ADM's layout: `arr_0` uint8 (N, H, W, 3), `arr_1`
labels), streamed shard by shard so memory holds one shard at a time; the ADM evaluator reads it as it is.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vqar.ar import ARModel
from vqar.parallel import Parallel
from vqar.sampling import SamplingSettings
from vqar.sampling.conditions import Conditions, make_conditions
from vqar.sampling.draw import draw
from vqar.utils.images import to_uint8
from vqar.utils.io import atomic_path, atomic_write_text, remove_leftovers

# Fault injection for the tests of resumption: a process exits at once (as if killed) after writing this many shards.
EXIT_AFTER_ENV = "VQAR_REPRODUCE_EXIT_AFTER_SHARDS"
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class SamplePlan:
    """Everything that decides the images; a folder's shards are reused only under the same plan."""

    release: str
    n: int
    shard_size: int
    batch_size: int
    conditions: str
    settings: dict
    image_size: int
    eval_size: int

    @property
    def shards(self) -> int:
        return math.ceil(self.n / self.shard_size)

    def span(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.n)


def shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.npz"


def make_run_conditions(model: ARModel, scheme: str, n: int, seed: int, prompts: list[str] | None = None) -> Conditions:
    """The conditions of the n images: per-class (equal consecutive blocks of each class, n / classes each when it
    divides), random-classes (uniform ids drawn from `seed`, the same on every process), unconditional, or prompts
    (one image per prompt)."""
    if scheme == "prompts":
        if not prompts:
            raise ValueError("this release is text-to-image: give the captions to draw with --prompts FILE")
        return make_conditions(model, prompts=prompts, n_per_condition=1, strict_prompts=False)
    if scheme == "unconditional":
        return make_conditions(model, n_per_condition=n)
    classes = model.num_classes
    if not classes:
        raise ValueError(f"the protocol draws {scheme} but the model is not class-conditional")
    if scheme == "per-class":
        labels = torch.arange(n) * classes // n
    elif scheme == "random-classes":
        labels = torch.randint(classes, (n,), generator=torch.Generator().manual_seed(seed))
    else:
        raise ValueError(f"unknown conditions {scheme!r}")
    return Conditions(labels.clone(), labels)


def _eval_pixels(images: torch.Tensor, eval_size: int) -> np.ndarray:
    """Decoded images in [-1, 1] -> uint8 NHWC RGB at the evaluation size (bicubic, as LlamaGen's 384 -> 256)."""
    if images.shape[-1] != eval_size:
        images = F.interpolate(images.float(), size=(eval_size, eval_size), mode="bicubic")
    pixels = to_uint8(images)
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def _check_plan(folder: Path, plan: SamplePlan, par: Parallel) -> None:
    path = folder / PLAN_FILE
    if par.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        remove_leftovers(folder)  # temporary shards of a killed run
        if not path.is_file():
            atomic_write_text(path, json.dumps(asdict(plan), indent=1, sort_keys=True) + "\n")
    par.barrier()
    found = json.loads(path.read_text())
    if found != json.loads(json.dumps(asdict(plan))):
        changed = sorted(k for k in set(found) | set(asdict(plan)) if found.get(k) != asdict(plan).get(k))
        raise ValueError(f"{folder} holds samples drawn with other settings ({', '.join(changed)} differ); use "
                         "another --out or remove that folder")  # fmt: skip


def draw_shards(model: ARModel, conditions: Conditions, settings: SamplingSettings, folder: str | Path,
                plan: SamplePlan, par: Parallel | None = None, *, precision: str = "fp32",
                compile: bool = False) -> dict:  # fmt: skip
    """Draws the missing shards of `plan` into `folder`, each process its share; returns this run's counts and
    seconds (on every rank: the totals of all ranks)."""
    par = par or Parallel()
    folder = Path(folder)
    _check_plan(folder, plan, par)
    missing = [k for k in range(plan.shards) if not shard_path(folder, k).is_file()]
    par.barrier()  # every rank listed the same folder before any shard of this run is written
    mine = missing[par.rank :: par.world_size]
    exit_after = int(os.environ.get(EXIT_AFTER_ENV, "0") or 0)
    seconds = 0.0
    for done, shard in enumerate(mine, start=1):
        lo, hi = plan.span(shard)
        part = Conditions(None if conditions.rows is None else conditions.rows[lo:hi], conditions.labels[lo:hi],
                          conditions.prompts)  # fmt: skip
        result = draw(model, part, settings, batch_size=plan.batch_size, precision=precision, compile=compile,
                      index=torch.arange(lo, hi), progress=par.is_main)  # fmt: skip
        seconds += result.seconds
        pixels = _eval_pixels(result.images, plan.eval_size)
        with atomic_path(shard_path(folder, shard)) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, arr_0=pixels, arr_1=result.labels.numpy(), index=result.index.numpy(),
                     seconds=np.float64(result.seconds))  # fmt: skip
        if exit_after and done >= exit_after:
            os._exit(75)  # no cleanup, as a kill would leave it
    totals = par.gather((len(mine), seconds))
    return {"shards_drawn": sum(t[0] for t in totals), "shards_reused": plan.shards - len(missing),
            "sampling_seconds": sum(t[1] for t in totals)}  # fmt: skip


def pack_samples(folder: str | Path, plan: SamplePlan, out: str | Path) -> Path:
    """Concatenates the shards, in order, into an ADM `.npz` at `out` (atomically), one shard in memory at a time."""
    folder, out = Path(folder), Path(out)
    first = np.load(shard_path(folder, 0))["arr_0"]
    shape = (plan.n, *first.shape[1:])
    labels = []
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": shape}  # fmt: skip
            np.lib.format.write_array_header_1_0(member, header)
            for shard in range(plan.shards):
                with np.load(shard_path(folder, shard)) as data:
                    pixels, index = data["arr_0"], data["index"]
                    lo, hi = plan.span(shard)
                    if pixels.shape != (hi - lo, *shape[1:]) or not np.array_equal(index, np.arange(lo, hi)):
                        raise ValueError(f"{shard_path(folder, shard)} does not hold images {lo}..{hi - 1} of "
                                         f"size {shape[1:]}; remove it to draw it again")  # fmt: skip
                    member.write(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
                    labels.append(data["arr_1"])
        with archive.open("arr_1.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.concatenate(labels).astype(np.int64))
    return out


def sampling_seconds(folder: str | Path, plan: SamplePlan) -> float:
    """The device-seconds all shards took to draw, over every run that drew them."""
    total = 0.0
    for shard in range(plan.shards):
        with np.load(shard_path(Path(folder), shard)) as data:
            total += float(data["seconds"])
    return total
