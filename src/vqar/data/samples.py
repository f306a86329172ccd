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


def readable_own_items(items: list, own: list[bool]) -> int:
    """How many of `items` a rank's evaluation scores: the readable ones that are its own, not the wrap-around
    padding that keeps every rank's count equal (another rank scores that image). The padding comes last in a
    rank's share, so these are the leading items of the collated batch."""
    return sum(1 for item, mine in zip(items, own, strict=True) if mine and not isinstance(item, BadSample))
