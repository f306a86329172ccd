"""Why a training run stops early (kept free of heavy imports: the CLI catches these)."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN or infinite loss or gradient."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; a checkpoint of the current step was written first. `signal_number` is that
    signal's: the command exits with 128 + it, as a process the signal ended (130 for Ctrl-C, 143 for a scheduler's
    SIGTERM, which job schedulers read as a preemption)."""

    def __init__(self, message: str, signal_number: int = 2, stopped: str | None = None):
        super().__init__(message)
        self.signal_number = signal_number
        self.stopped = stopped or message  # what happened, without the advice to resume (`vqar demo` says its own)


class TrackerUnavailable(RuntimeError):
    """The experiment tracker `train.logger` names cannot be used: its package is missing or it cannot start a
    run. Raised before the first training step."""
