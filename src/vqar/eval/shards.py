"""Evaluation under torchrun: each process takes one contiguous block of whole batches of the images, and rank 0
gathers every block's rows in image order.

Every batch a rank runs is a batch that one process would run, so rank 0 ends with the rows of a single-process
run, and computes the same metrics from them. In one process (`world_size == 1`) the share is everything and the
gather passes the rows through, so the single-process and distributed paths are the same code.

A rank reads only its share of an image source (`read_share`): the share is a range of the source's entries, so
with unreadable entries (skipped) a rank's batches can hold other images than one process's batches would; the
images and their order stay the same, and per-image network outputs agree to float rounding.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from vqar.eval.sources import ImagePart, ImageSource, PartSummary, Transform
from vqar.parallel import Parallel


def share(total: int, batch_size: int, par: Parallel) -> slice:
    """This rank's images: of the n batches of `batch_size`, batches rank * n / W up to (rank + 1) * n / W."""
    count = -(-total // batch_size)
    first = count * par.rank // par.world_size
    last = count * (par.rank + 1) // par.world_size
    return slice(first * batch_size, min(last * batch_size, total))


def read_share(
    source: ImageSource, batch_size: int, par: Parallel, transform: Transform | None = None
) -> tuple[np.ndarray, int]:
    """This rank's images of `source` (its `share` of the entries, in order) and how many images all ranks read
    together. Every rank checks the summaries of all shares, so a set that one process would reject (no readable
    image, several sizes, a read error on any rank) raises the same error on every rank rather than leaving the
    others waiting in a collective; rank 0 alone reports skipped entries."""
    part = share(len(source), batch_size, par)
    own_error: Exception | None = None
    try:
        got = source.read(part, transform, progress=par.is_main)
    except Exception as err:
        if not par.distributed:
            raise
        own_error = err
        got = ImagePart(np.empty(0, np.uint8), PartSummary(problem=f"rank {par.rank}: {type(err).__name__}: {err}"))
    summaries = par.gather(got.summary)
    if own_error is not None:
        raise own_error  # its rank keeps the original error (and traceback); the others raise the summary's
    return got.images, source.check(summaries, report=par.is_main)


def gather_rows(rows: dict[str, torch.Tensor], par: Parallel) -> dict[str, torch.Tensor] | None:
    """Every rank's rows, concatenated in rank order (so in image order) on rank 0; None on the other ranks.

    The rows travel as files through a temporary folder that rank 0 makes (features only, unless images are asked
    for: 50,000 x 2048 float64 features are 800 MB); on several nodes, point TMPDIR at a folder they all share.
    A rank with no images passes empty 1-D tensors of the rows' dtypes (the concatenation skips them)."""
    if not par.distributed:
        return rows
    folder = Path(par.gather(tempfile.mkdtemp(prefix="vqar-eval-") if par.is_main else None)[0])
    try:
        unseen = [rank for rank, seen in enumerate(par.gather(folder.is_dir())) if not seen]
        if unseen:  # checked before anything is written, so every rank stops here alike
            raise FileNotFoundError(f"ranks {unseen} do not see rank 0's gather folder {folder}: when the processes "
                                    "run on several machines, set TMPDIR to a folder they all share")  # fmt: skip
        return par.gather_to_main(rows, folder)
    finally:
        if par.is_main:
            shutil.rmtree(folder, ignore_errors=True)
