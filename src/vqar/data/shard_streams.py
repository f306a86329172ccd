"""The reading orders of tar shards (`vqar.data.shards`), as data loaders whose workers stream and decode them.

- training: per epoch a seeded permutation of the shards; rank r's loader worker (lane) l reads every (W * L)-th
  shard through a seeded shuffle buffer and yields a fixed number of batches, so ranks stay in lock-step and a
  resumed epoch skips (without decoding) exactly the samples its batches had used;
- evaluation: the samples in source order, rank r taking every W-th one, padded like `EpochSampler`;
- whole shards (code extraction, FID statistics, the linear probe): the shards named, split over the workers.

The streams batch and collate themselves, so that a worker's batches come whole from one lane.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vqar.data.samples import BadSample, readable_own_items
from vqar.data.shards import ShardDataset, shard_samples

log = logging.getLogger("vqar.data")


def shard_training_loader(data: ShardDataset, *, epoch: int, start: int, batches: int, batch_size: int, seed: int,
                          rank: int, world_size: int, num_workers: int, collate: Callable) -> DataLoader:  # fmt: skip
    """Batches `start` to `batches` - 1 of `epoch` for one rank (see the module docstring)."""
    lanes = max(1, num_workers) * world_size
    if len(data.shards) < lanes and epoch == 0 and start == 0:
        log.warning("%d shards for %d readers (processes x data workers): every reader streams all shards and "
                    "keeps its share; pack more shards to read each once", len(data.shards), lanes)  # fmt: skip
    plan = _TrainingStream(data, epoch, start, batches, batch_size, seed, rank, world_size, collate)
    return _loader(plan, num_workers)


def shard_evaluation_loader(data: ShardDataset, *, batch_size: int, rank: int, world_size: int, num_workers: int,
                            collate: Callable) -> DataLoader:  # fmt: skip
    """Rank r's samples in source order: every world_size-th, padded by wrapping so all ranks get the same count;
    `(batch, counted)` pairs, as `vqar.data.evaluation_loader` says."""
    return _loader(_EvaluationStream(data, batch_size, rank, world_size, collate), num_workers)


def whole_shards_loader(data: ShardDataset, shard_ids: Sequence[int], *, batch_size: int, num_workers: int,
                        collate: Callable) -> DataLoader:  # fmt: skip
    """Every sample of the shards `shard_ids` (exactly `used` per shard; batches never span two shards). With
    workers, batches of different shards interleave: use the samples' indices to put them in order."""
    return _loader(_WholeShards(data, list(shard_ids), batch_size, collate), num_workers)


def _loader(stream: IterableDataset, num_workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _TrainingStream(IterableDataset):
    def __init__(self, data: ShardDataset, epoch: int, start: int, batches: int, batch_size: int, seed: int,
                 rank: int, world_size: int, collate: Callable):  # fmt: skip
        self.data, self.epoch, self.start, self.batches, self.batch_size = data, epoch, start, batches, batch_size
        self.seed, self.rank, self.world_size, self.collate = seed, rank, world_size, collate

    def __iter__(self) -> Iterator:
        worker, lanes = _worker()
        # The loader takes batches from its workers in turn, so worker w serves the epoch's batches b with
        # b % lanes == (start + w) % lanes: that lane's samples are the same whatever batch the epoch resumes at.
        lane = (self.start + worker) % lanes
        done = _congruent_below(self.start, lane, lanes)
        total = _congruent_below(self.batches, lane, lanes)
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{lane}")
        samples = _shuffled(self._lane_samples(lane, lanes), self.data.shuffle_buffer, rng)
        for _ in itertools.islice(samples, done * self.batch_size):
            pass  # batches an interrupted epoch already trained on: read, never decoded
        for chunk in itertools.islice(_batched(samples, self.batch_size), total - done):
            yield self.collate([self.data.decode(index, raw) for index, raw in chunk])

    def _lane_samples(self, lane: int, lanes: int) -> Iterator[tuple[int, dict | BadSample]]:
        """This lane's endless stream: pass after pass over its shards, each pass in a new seeded order."""
        readers = self.world_size * lanes
        reader = self.rank + self.world_size * lane
        shards = self.data.shards
        for repeat in itertools.count():
            order = np.random.default_rng([self.seed, self.epoch, repeat]).permutation(len(shards))
            if len(shards) >= readers:
                mine = (shards[i] for i in order[reader::readers])
                stream = itertools.chain.from_iterable(shard_samples(shard, gaps=True) for shard in mine)
            else:  # fewer shards than readers: read all, keep every readers-th sample
                every = itertools.chain.from_iterable(shard_samples(shards[i], gaps=True) for i in order)
                stream = itertools.islice(every, reader, None, readers)
            produced = 0
            for item in stream:
                produced += 1
                yield item
            if produced == 0:
                raise ValueError(f"the shards of {self.data.source} hold no samples for reader {reader} of {readers}")


class _EvaluationStream(IterableDataset):
    def __init__(self, data: ShardDataset, batch_size: int, rank: int, world_size: int, collate: Callable):
        self.data, self.batch_size, self.collate = data, batch_size, collate
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator:
        worker, lanes = _worker()
        total = len(self.data)
        if total == 0:
            return
        per_rank = -(-total // self.world_size)
        # Rank r's k-th sample is the ((k * W + r) mod N)-th of the split, as the map-style evaluation loader gives;
        # worker w of L takes k = w, w + L, ...
        # A position past the split's end wraps to one of its first W - 1 samples, never to one of this rank's own:
        # each position is wanted once, as the rank's own sample or as padding (see `evaluation_loader`).
        own: dict[int, bool] = {}
        for k in range(worker, per_rank, lanes):
            unwrapped = k * self.world_size + self.rank
            own[unwrapped % total] = unwrapped < total
        items = itertools.chain.from_iterable(shard_samples(shard) for shard in self.data.shards)
        for chunk in _batched(_padding_last(items, own), self.batch_size):
            decoded = [self.data.decode(index, raw) for (index, raw), _ in chunk]
            yield self.collate(decoded), readable_own_items(decoded, [mine for _, mine in chunk])


def _padding_last(items: Iterable, own: dict[int, bool]) -> Iterator[tuple[object, bool]]:
    """The items at the positions `own` names, each with whether it is the rank's own, the padding held back to
    the end (it is read first: it wraps to the split's start) so that each batch's own items lead."""
    padding = []
    for position, item in enumerate(items):
        if position not in own:
            continue
        if own[position]:
            yield item, True
        else:
            padding.append(item)
    yield from ((item, False) for item in padding)


class _WholeShards(IterableDataset):
    def __init__(self, data: ShardDataset, shard_ids: list[int], batch_size: int, collate: Callable):
        self.data, self.shard_ids, self.batch_size, self.collate = data, shard_ids, batch_size, collate

    def __iter__(self) -> Iterator:
        worker, lanes = _worker()
        for shard_id in self.shard_ids[worker::lanes]:
            for chunk in _batched(shard_samples(self.data.shards[shard_id], gaps=True), self.batch_size):
                yield self.collate([self.data.decode(index, raw) for index, raw in chunk])


def _batched(items: Iterator, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _shuffled(items: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: holds `buffer_size` items and emits a random one as each new one arrives."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        pick = rng.randrange(len(buffer))
        buffer[pick], item = item, buffer[pick]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _congruent_below(limit: int, residue: int, modulus: int) -> int:
    """How many b in [0, limit) have b % modulus == residue."""
    return max(0, (limit - residue + modulus - 1) // modulus)
