"""How much memory this machine has to spare, and refusing up front what would not fit in it."""

from __future__ import annotations

import math
import os
from pathlib import Path


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux's MemAvailable; else the physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 1 << 62  # unknown: nothing is refused


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if count < 1024 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def check_memory(need: int, what: str, advice: str) -> None:
    """Raises ValueError (one line: `what`, the memory it needs and what is available, then `advice`) when `need`
    bytes exceed the memory available now."""
    free = available_memory()
    if need > free:
        raise ValueError(f"{what} would need about {human_bytes(need)} of memory, and {human_bytes(free)} is "
                         f"available: {advice}")  # fmt: skip


def sample_bytes(model) -> int:
    """The memory one sampled image of an AR model takes until it is written: the float32 image its tokenizer
    decodes, its codes (int64), its label and index."""
    tokenizer, pixels = model.tokenizer, 0
    if tokenizer is not None:
        channels = getattr(tokenizer, "out_channels", None) or getattr(tokenizer, "in_channels", 3)
        pixels = int(channels) * int(getattr(tokenizer, "image_size", 256)) ** 2
    return 4 * pixels + 8 * math.prod(model.cfg.code_shape) + 16
