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


# Float32 copies of a run's images `vqar sample` holds at its peak: the images themselves, then briefly their
# concatenation from batches, or the copies writing them makes (the grid, uint8 pictures, the npz's RGB array):
# measured, writing added 1.6 to 2.7 times the images' own size.
SAMPLE_COPIES = 4


def sample_bytes(model, copies: int = 1) -> int:
    """The memory one sampled image of an AR model takes until it is written: `copies` of the float32 image its
    tokenizer decodes, its codes (int64), its label and index."""
    tokenizer, pixels = model.tokenizer, 0
    if tokenizer is not None:
        channels = getattr(tokenizer, "out_channels", None) or getattr(tokenizer, "in_channels", 3)
        pixels = int(channels) * int(getattr(tokenizer, "image_size", 256)) ** 2
    return 4 * pixels * copies + 8 * math.prod(model.cfg.code_shape) + 16


def check_count_holdable(count: int | float, what: str, advice: str) -> int | float:
    """`count` (of images; a float from a division), or ValueError where it is past what any machine holds (an
    acceptance rate of 1e-310 asked for infinitely many images, and the arithmetic overflowed in a traceback)."""
    if (isinstance(count, float) and not math.isfinite(count)) or count > 1e15:  # an int is compared exactly
        raise ValueError(f"{what} is more images than any machine holds: {advice}")
    return count
