"""What a training run needs of the disk and of memory: the bytes of weights and optimizer state, and the checks
made before training (a run directory that cannot take a checkpoint fails then, not after its first steps)."""

from __future__ import annotations

import errno
import itertools
import shutil
from pathlib import Path

import torch
from torch import nn

from vqar.utils.io import check_folder_writable


def module_bytes(module: nn.Module) -> int:
    """The bytes of a module's parameters and buffers (what its weights file holds)."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers()))


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes of an optimizer's state: what it holds, or before its first step two float32 moments per
    parameter (Adam's)."""
    total = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state:
                total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
            else:
                total += 2 * 4 * param.numel()
    return total


def mib(count: float) -> str:
    return f"{count / 2**20:.1f} MiB"


def check_writable(run_dir: Path, need_bytes: int, what: str = "a checkpoint and the exported model") -> None:
    """Fails before training when the run directory cannot take a checkpoint and the export (permissions, a full
    disk)."""
    run_dir = Path(run_dir)
    check_folder_writable(run_dir)
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise OSError(
            f"only {mib(free)} free where {run_dir} lives; {what} need about {mib(need_bytes)} "
            "(and train.keep_checkpoints checkpoints are kept): free some space or use --out on another disk"
        )


def out_of_space(err: BaseException) -> bool:
    """Whether a write failed for lack of space (safetensors reports it as its own error type, with the text)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(err) or "Disk quota exceeded" in str(err)
