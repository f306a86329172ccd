"""What a training stage supplies to the shared loop (`vqar.train.loop.Trainer`): its `TrainTask` (modules,
optimizers, one step, evaluation, artifacts, export) and data settings, and the default learning-rate schedule."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from vqar.data import collate_samples
from vqar.train.resources import module_bytes


class TrainTask(ABC):
    """One stage's part of training. Batches come from `collate` (image `Batch`es by default)."""

    collate = staticmethod(collate_samples)
    # The validation metric that picks the best checkpoint, kept beside the newest ones: (name, "max" or "min").
    best_metric: tuple[str, str] | None = None
    # The training metrics the progress bar shows, of those a step returns (the metric log keeps them all).
    progress_metrics: tuple[str, ...] = ("loss",)
    # The picture files `write_artifacts` writes into the run directory; the tracker logs them after each evaluation.
    pictures: tuple[str, ...] = ()

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Modules whose weights a checkpoint holds, by file name ("model", "discriminator", ...)."""

    @abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    @abstractmethod
    def train_step(self, batch, step: int) -> dict[str, float]:
        """Forward, backward and optimizer step(s) on one batch; returns scalar metrics including "loss"."""

    @abstractmethod
    def evaluate(self, batches: Iterable[tuple[Any, int]]) -> dict[str, float]:
        """Metrics of the validation split from this rank's `(batch, counted)` pairs, summed over ranks: the first
        `counted` items of a batch are the rank's own; the rest pad its share to the others' length (see
        `vqar.data.evaluation_loader`), run through the model for FSDP's lockstep but left out of the sums."""

    def lr_factor(self, step: int) -> float | None:
        """A task may bring its own learning-rate schedule (e.g. NPP's per-segment restarts): the factor of the base
        learning rate at `step`. None keeps the loop's warmup + cosine."""
        return None

    def state_dict(self) -> dict:
        """Extra state a checkpoint must keep for an exact resume (e.g. an augmentation generator)."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - optional hook
        pass

    def write_artifacts(self, run_dir: Path, step: int) -> None:  # noqa: B027 - optional hook
        """Pictures or other files that show progress (called after each evaluation)."""

    def export_bytes(self) -> int:
        """About what `export` writes: the model's weights, and the tokenizer an AR task exports beside it."""
        companion = getattr(self, "tokenizer", None)
        return module_bytes(self.modules()["model"]) + (
            module_bytes(companion) if isinstance(companion, nn.Module) else 0
        )

    @abstractmethod
    def export(self, out_dir: Path, weights: dict[str, dict[str, torch.Tensor]], step: int) -> None:
        """Writes the model trained for `step` steps in vqar's loadable format (`vqar.bundle.save_pretrained`);
        `weights` holds the full state dict of each of `modules()` (gathered from the shards under FSDP)."""


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """Learning-rate factor: linear warmup over `warmup` steps, then cosine from 1 down to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class LoaderSettings(Protocol):
    """What the loop needs of a data config (image `DataConfig` and the code-store config both fit)."""

    batch_size: int
    eval_batch_size: int
    num_workers: int
