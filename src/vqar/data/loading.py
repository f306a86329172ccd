"""Batching: a collate function that tolerates unreadable files, a resumable sharded sampler, and a report of
the files that were skipped."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vqar.data.samples import BadSample, Sample, readable_own_items
from vqar.data.shard_streams import shard_evaluation_loader, shard_training_loader
from vqar.data.shards import ShardDataset

logger = logging.getLogger("vqar.data")


@dataclass
class Batch:
    """Stacked good samples plus the items that could not be read.

    When every item of a batch was unreadable, `images` is an empty tensor of shape (0,) (the image shape
    cannot be known) and `len(batch) == 0`; callers skip such batches.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    bad: list[BadSample] = field(default_factory=list)
    captions: list[list[str]] | None = None  # per image, from a source with captions

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def collate_samples(items: Sequence[Sample | BadSample]) -> Batch:
    """DataLoader collate function: stack `Sample`s, set `BadSample`s aside in `Batch.bad`."""
    good: list[Sample] = []
    bad: list[BadSample] = []
    for item in items:
        if isinstance(item, Sample):
            good.append(item)
        elif isinstance(item, BadSample):
            bad.append(item)
        else:
            raise TypeError(f"expected Sample or BadSample items, got {type(item).__name__}")
    if not good:
        empty = torch.empty(0, dtype=torch.int64)
        return Batch(images=torch.empty(0), labels=empty, indices=empty.clone(), bad=bad)
    captioned = good[0].captions is not None
    return Batch(
        images=torch.stack([sample.image for sample in good]),
        labels=torch.tensor([sample.label for sample in good], dtype=torch.int64),
        indices=torch.tensor([sample.index for sample in good], dtype=torch.int64),
        bad=bad,
        captions=[sample.captions or [] for sample in good] if captioned else None,
    )


class EpochSampler(Sampler[int]):
    """Indices for one rank, reproducible from (seed, epoch) alone and resumable mid-epoch.

    The epoch's order is a permutation drawn from a torch.Generator seeded with `seed + epoch`. It is padded by
    wrapping around to a multiple of `world_size`, so every rank gets ceil(N / world_size) items and ranks stay in
    lock-step; rank r takes positions r, r + world_size, ... .
    `set_epoch(epoch, start)` skips the first `start` items of this rank's share without loading them, so a
    run restored from a mid-epoch checkpoint sees exactly the batches it had not seen yet.
    """

    def __init__(self, num_items: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_items < 1:
            raise ValueError(f"num_items must be positive, got {num_items}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.num_items = num_items
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.per_rank = math.ceil(num_items / world_size)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start must be in [0, {self.per_rank}], got {start}")
        self.epoch = epoch
        self.start = start

    def _order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_items, generator=generator)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        total = self.per_rank * self.world_size
        padded = order[torch.arange(total) % self.num_items]
        share = padded[self.rank :: self.world_size]
        return iter(share[self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    sampler: Sampler[int],
    num_workers: int = 0,
    drop_last: bool = False,
    seed: int = 0,
    collate_fn=collate_samples,
) -> DataLoader:
    """A DataLoader yielding `Batch`es. Workers are not persistent because a resumed epoch swaps the sampler
    state, and pinned memory is left off since most runs here are on CPU; both are cheap to turn on later.

    The loader draws its worker seed from its own generator seeded with `seed`: with the default global
    generator, every new iterator would consume a random number and a resumed run would diverge."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        persistent_workers=False,
        pin_memory=False,
        generator=torch.Generator().manual_seed(seed),
    )


def training_loader(dataset: Dataset | ShardDataset, *, epoch: int, start: int, batches: int, batch_size: int,
                    seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                    collate_fn=collate_samples) -> DataLoader:  # fmt: skip
    """One rank's training batches `start` .. `batches` - 1 of `epoch`, a pure function of (seed, epoch): an
    `EpochSampler` over a map-style dataset, the seeded shard streams of tar shards (`ShardDataset`)."""
    if isinstance(dataset, ShardDataset):
        return shard_training_loader(dataset, epoch=epoch, start=start, batches=batches, batch_size=batch_size,
                                     seed=seed, rank=rank, world_size=world_size, num_workers=num_workers,
                                     collate=collate_fn)  # fmt: skip
    sampler = EpochSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)  # type: ignore[arg-type]
    sampler.set_epoch(epoch, start=start * batch_size)
    return make_loader(dataset, batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                       seed=seed + epoch, collate_fn=collate_fn)  # fmt: skip


def evaluation_loader(dataset: Dataset | ShardDataset, *, batch_size: int, rank: int = 0, world_size: int = 1,
                      num_workers: int = 0, collate_fn=collate_samples) -> DataLoader:  # fmt: skip
    """One rank's share of `dataset` in order: every world_size-th item, padded by wrapping to equal counts, so
    that under FSDP every rank runs the same forwards. It yields `(batch, counted)`: the batch's first `counted`
    items are the rank's own, the rest repeat an image another rank scores, and a metric that sums over ranks
    sums over those first `counted` alone (else an odd split counts one image twice)."""
    if isinstance(dataset, ShardDataset):
        return shard_evaluation_loader(dataset, batch_size=batch_size, rank=rank, world_size=world_size,
                                       num_workers=num_workers, collate=collate_fn)  # fmt: skip
    per_rank = math.ceil(len(dataset) / world_size)  # type: ignore[arg-type]
    positions = range(rank, per_rank * world_size, world_size)
    return make_loader(_PaddedShare(dataset), batch_size, sampler=positions, num_workers=num_workers,  # type: ignore[arg-type]
                       collate_fn=functools.partial(_collate_counting_own, collate_fn))  # fmt: skip


class _PaddedShare(Dataset):
    """A dataset read at positions past its end too: position N + i is item i again, marked as padding."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.size = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, position: int) -> tuple[object, bool]:
        return self.dataset[position % self.size], position < self.size


def _collate_counting_own(collate_fn, pairs: Sequence[tuple[object, bool]]) -> tuple[object, int]:
    items = [item for item, _ in pairs]
    return collate_fn(items), readable_own_items(items, [own for _, own in pairs])


class BadFileReport:
    """Warns once per unreadable file and counts them, so a corrupt file met every epoch is logged once; a shard cut
    short counts the samples it lost too (one `BadSample` stands for them all)."""

    def __init__(self) -> None:
        self._lost: dict[str, int] = {}  # path -> the samples lost with it

    @property
    def count(self) -> int:
        return len(self._lost)

    def add(self, bad: Sequence[BadSample]) -> None:
        for item in bad:
            if item.path in self._lost:
                self._lost[item.path] = max(self._lost[item.path], item.count)
                continue
            self._lost[item.path] = item.count
            if item.count > 1:
                logger.warning("skipping %d samples of %s: %s", item.count, item.path, item.error)
            else:
                logger.warning("skipping unreadable image %s: %s", item.path, item.error)

    def summary(self) -> str | None:
        if not self._lost:
            return None
        noun = "file" if self.count == 1 else "files"
        samples = sum(self._lost.values())
        if samples > self.count:
            return f"skipped {samples} unreadable samples in {self.count} {noun}"
        return f"skipped {self.count} unreadable image {noun}"
