"""What a dataset hands the loader: a decoded image with its label, or the reason it could not be read."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sample:
    """One image (float (C, H, W) in [-1, 1]), its class id (-1 when unlabeled), its dataset index and, for a source
    with captions, its captions (an empty list when it has none)."""

    image: torch.Tensor
    label: int
    index: int
    captions: list[str] | None = None


@dataclass
class BadSample:
    """An item that could not be read: which one, from where, and why. `count` > 1 stands for that many
    consecutive items from `index` on that can all not be read for the same reason (the samples a tar shard
    lacks after it ended early: one item for all of them, however many its index promised)."""

    index: int
    path: str
    error: str
    count: int = 1
