"""The process's CPU thread policy: how many intra-op threads torch uses and how its OpenMP threads wait.

torch's defaults (one intra-op thread per physical core, OpenMP threads that spin between parallel regions) are
fast on an idle machine and collapse on a busy one: when another process holds a core, a thread of every parallel
region waits for the descheduled one, spinning, and a sampler beside a second PyTorch job ran at 2-32% of its idle
speed. The policy below:

- `VQAR_THREADS=N` uses N intra-op threads; `VQAR_THREADS=torch` leaves everything to torch (the old behaviour);
- `OMP_NUM_THREADS` / `MKL_NUM_THREADS`, when given, are respected (torch reads them itself);
- a thread count set with `torch.set_num_threads` before vqar's entry point runs is kept;
- under torchrun each process takes the available cores divided by `LOCAL_WORLD_SIZE` (torchrun's own
  placeholder `OMP_NUM_THREADS=1`, which it sets for every multi-process launch, counts as not given; set
  `VQAR_THREADS=1` for one thread per process);
- otherwise the available cores (the CPU affinity mask, capped by a cgroup CPU quota), no more than torch's own
  choice;
- the OpenMP threads spin only briefly before they sleep when they wait (`GOMP_SPINCOUNT=2000` instead of GNU
  OpenMP's 300,000; `KMP_BLOCKTIME=0` for Intel's OpenMP), unless the environment says otherwise. Measured on 2
  cores (`benchmarks/contention.py`): never spinning (`OMP_WAIT_POLICY=PASSIVE`) holds up best beside other work
  but costs an idle machine a third to a half of its sampling speed, as every small op then wakes a sleeping
  thread; 2,000 spins keep most of the idle speed and, beside a busy core, 42-59% of it. OpenMP reads this
  once, when torch loads it, so `prepare_openmp` runs when vqar is imported, before torch; if torch was imported
  first it can no longer change anything and the threads keep torch's long spin.

`benchmarks/contention.py` measures the effect (idle vs a busy core, for sampling and training).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

POLICY_VARIABLE = "VQAR_THREADS"
# The waiting behaviour the policy asks of OpenMP: GNU OpenMP (torch's Linux builds) reads GOMP_SPINCOUNT (spins
# before sleeping), Intel's reads KMP_BLOCKTIME (milliseconds of spinning before sleeping).
WAIT_SETTINGS = {"GOMP_SPINCOUNT": "2000", "KMP_BLOCKTIME": "0"}
# Any of these set by the user means the user chose how OpenMP waits.
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
COUNT_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

# torch's thread count as it chose it, read once vqar has imported torch (None when torch was imported before vqar:
# then its current count may be the user's choice, and it is kept).
_torch_default: int | None = None
_torch_loaded_first = "torch" in sys.modules
_applied: ThreadPlan | None = None


@dataclass(frozen=True)
class ThreadPlan:
    """What the policy decided: `threads` intra-op threads (None: leave torch's count as it is) and why."""

    threads: int | None
    reason: str


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(str(value).strip())
    except ValueError:
        return None
    return number if number >= 1 else None


def policy_off(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(POLICY_VARIABLE, "").strip().lower() == "torch"


def prepare_openmp(environ: dict | None = None, torch_loaded: bool | None = None) -> dict[str, str]:
    """Sets the OpenMP wait policy in `environ` (default `os.environ`) where the user set none, the policy is on and
    torch is not loaded yet (OpenMP reads it when torch loads it). Returns what it set."""
    environ = os.environ if environ is None else environ
    torch_loaded = "torch" in sys.modules if torch_loaded is None else torch_loaded
    if torch_loaded or policy_off(environ) or any(name in environ for name in WAIT_VARIABLES):
        return {}
    for name, value in WAIT_SETTINGS.items():
        environ[name] = value
    return dict(WAIT_SETTINGS)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPU quota of this process's cgroup in whole cores (rounded up), or None when there is none (v2
    `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota_us / period_us)) if quota_us > 0 and period_us > 0 else None


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask), capped by its cgroup's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, limit) if limit else cores)


def plan_threads(environ: Mapping[str, str], cores: int, torch_default: int | None, current: int) -> ThreadPlan:
    """The policy's decision (see the module docstring) from the environment, the available cores, torch's own
    default count (None when unknown: torch was imported before vqar) and torch's current count."""
    setting = environ.get(POLICY_VARIABLE, "").strip()
    if setting.lower() == "torch":
        return ThreadPlan(None, f"{POLICY_VARIABLE}=torch: torch's defaults")
    if setting and setting.lower() != "auto":
        count = _positive_int(setting)
        if count is None:
            raise ValueError(f"{POLICY_VARIABLE} must be a positive thread count, 'auto' or 'torch', got {setting!r}")
        return ThreadPlan(count, f"{POLICY_VARIABLE}={count}")
    local_world = _positive_int(environ.get("LOCAL_WORLD_SIZE"))
    for name in COUNT_VARIABLES:
        count = _positive_int(environ.get(name))
        torchrun_placeholder = name == "OMP_NUM_THREADS" and count == 1 and (local_world or 1) > 1
        if count is not None and not torchrun_placeholder:
            return ThreadPlan(None, f"{name}={count}")
    if torch_default is None or current != torch_default:
        return ThreadPlan(None, f"torch.set_num_threads({current}) kept")
    if local_world is not None:
        return ThreadPlan(max(1, cores // local_world), f"torchrun: {cores} cores / {local_world} local processes")
    return ThreadPlan(max(1, min(cores, torch_default)), f"{cores} available cores")


def apply_thread_policy() -> ThreadPlan:
    """Applies the policy once per process (entry points call it first; later calls return the first plan)."""
    global _applied
    if _applied is not None:
        return _applied
    import torch

    plan = plan_threads(os.environ, available_cores(), _torch_default, torch.get_num_threads())
    if plan.threads is not None and plan.threads != torch.get_num_threads():
        torch.set_num_threads(plan.threads)
    _applied = plan
    return plan


def thread_summary() -> str:
    """One line for reports: threads in use, how OpenMP waits, and why."""
    import torch

    wait = next((f"{name}={os.environ[name]}" for name in WAIT_VARIABLES if name in os.environ), "spin (default)")
    reason = _applied.reason if _applied is not None else "policy not applied"
    return f"{torch.get_num_threads()} threads ({reason}), OpenMP wait {wait}"


def record_torch_default() -> None:
    """Remembers torch's own thread count; called by vqar's import right after it loads torch."""
    global _torch_default
    if _torch_loaded_first or _torch_default is not None:
        return
    import torch

    _torch_default = torch.get_num_threads()


# On import (vqar's package import does it first), while torch may not be loaded yet.
prepare_openmp()
