"""Starting a training run in one process or as one rank of a torchrun launch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from vqar.parallel import DistConfig, Parallel, joined
from vqar.train.checkpoint import prepare_run_dir
from vqar.utils.device import resolve_device


@contextlib.contextmanager
def distributed_run(
    cfg: DistConfig, device: str, run_dir: str | Path, resume: bool, overwrite: bool
) -> Iterator[tuple[Parallel, Path]]:
    """Joins the process group (when launched by torchrun), lets rank 0 prepare the run directory, and leaves
    the group at the end. A problem on rank 0 (an existing run, say) is raised on every rank."""
    run_dir = Path(run_dir)
    with joined(cfg, resolve_device(device)) as par:
        problem: Exception | None = None
        if par.is_main:
            try:
                prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
            except (OSError, ValueError) as err:
                problem = err
        if par.any(problem is not None):
            if problem is not None:
                raise problem
            raise RuntimeError(f"rank 0 could not prepare the run directory {run_dir}; see its error")
        yield par, run_dir
