"""Device and numeric-precision choices shared by training and inference."""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")


@contextlib.contextmanager
def evaluating(*modules: object) -> Iterator[None]:
    """Runs the body with `modules` in eval mode, then gives every submodule its own mode back. Sampling from a
    model left in training mode kept its dropout and class dropout on: draws no seed reproduced, some of them
    unconditioned."""
    # Not every tokenizer is a module: one that only decodes codes (a stand-in, a wrapper) has no mode to set.
    modes = [(sub, sub.training) for module in modules if isinstance(module, nn.Module) for sub in module.modules()]
    for sub, _ in modes:
        sub.training = False
    try:
        yield
    finally:
        for sub, training in modes:
            sub.training = training


def in_eval_mode(function: Callable) -> Callable:
    """`function(model, ...)` run with `model` in eval mode (`evaluating`)."""

    @functools.wraps(function)
    def wrapper(model, *args, **kwargs):
        with evaluating(model):
            return function(model, *args, **kwargs)

    return wrapper


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" picks CUDA when available, else the CPU; any other name is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda") and not _backend_available(device.type):
        # otherwise the first tensor moved there fails, after the model has loaded, with a traceback
        raise ValueError(f"device {name!r} was asked for but this torch has no usable {device.type} device on this "
                         f"machine; give cpu{' or cuda' if torch.cuda.is_available() else ''}")  # fmt: skip
    return device


def _backend_available(kind: str) -> bool:
    """Whether torch can run on devices of `kind` here (torch.mps, torch.xpu, ... each say; meta holds no data)."""
    is_available = getattr(getattr(torch, kind, None), "is_available", None)
    return bool(is_available and is_available())


def autocast(device: torch.device, precision: str):
    """Mixed precision for the forward pass: bf16 or fp16 autocast (fp16 training also scales the loss, see
    `vqar.train.optim.StepGuard`), or nothing for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def cpu_simd_level(flags: set[str] | None = None) -> str:
    """The widest vector instructions of this CPU that torch's kernels use: "AVX-512 bf16", "AVX-512", "AVX2" or
    "below AVX2" (from /proc/cpuinfo's flags; `torch.backends.cpu.get_cpu_capability()` where there is none)."""
    if flags is None:
        flags = _cpu_info()[1]
    if not flags:
        return {"AVX512": "AVX-512", "AVX2": "AVX2"}.get(torch.backends.cpu.get_cpu_capability(), "below AVX2")
    if "avx512f" in flags:
        return "AVX-512 bf16" if "avx512_bf16" in flags else "AVX-512"
    return "AVX2" if "avx2" in flags else "below AVX2"


def cpu_kind() -> str:
    """The CPU model and its SIMD level, for reports that state where a time was measured."""
    model, flags = _cpu_info()
    return f"{model} ({cpu_simd_level(flags)})"


def _cpu_info() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine() or "unknown CPU", set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return model, flags
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() in ("flags", "Features"):
            flags = set(value.split())
            break
    return model, flags
