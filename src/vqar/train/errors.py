"""Why a training run stops early (kept free of heavy imports: the CLI catches these)."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN or infinite loss or gradient."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; a checkpoint of the current step was written first."""


class TrackerUnavailable(RuntimeError):
    """The experiment tracker `train.logger` names cannot be used: its package is missing or it cannot start a
    run. Raised before the first training step."""
