"""Collectives that every layer may call: sums, broadcasts and agreement across ranks (the quantizers' codebook
statistics, the evaluation totals, the runtime's decisions).

Every helper is a no-op outside an initialised process group with more than one rank, so callers use them
unconditionally. The rule that keeps training from hanging: a collective is only ever skipped by *all* ranks
together. Decisions that depend on local data (is the codebook initialised? are there dead codes?) are first
agreed on with `any_rank`, and every collective has a fixed shape that does not depend on the local batch size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sums each tensor over ranks, in place."""
    if world_size() == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> None:
    """Overwrites `tensor` on every rank with rank `src`'s copy, in place."""
    if world_size() == 1:
        return
    dist.broadcast(tensor, src=src)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on at least one rank (so all ranks take the same branch)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather_batch(rows: torch.Tensor, items: int) -> torch.Tensor:
    """The rows of every rank's local batch of `items` items (`rows`: items x k rows, item-major), in the order of
    the global batch, whose item i is rank i % W's item i // W (the training sampler's split): what one process
    given the whole batch holds, so that a draw from it is the same on any number of processes. Ranks whose
    batches differ in size (the end of an epoch) are concatenated in rank order instead."""
    world = world_size()
    if world == 1:
        return rows
    sizes = torch.tensor([rows.shape[0], items], device=rows.device)
    every = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(every, sizes)
    counts = [int(size[0]) for size in every]
    if not max(counts):  # every rank empty (all know it): nothing to exchange
        return rows
    padded = torch.zeros(max(counts), *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    parts = [part[:count] for part, count in zip(gathered, counts, strict=True)]
    if len({tuple(size.tolist()) for size in every}) > 1 or items < 1 or rows.shape[0] % items:
        return torch.cat(parts)
    per_item = torch.stack([part.reshape(items, -1, *rows.shape[1:]) for part in parts], dim=1)  # items, W, k, ...
    return per_item.reshape(-1, *rows.shape[1:])
