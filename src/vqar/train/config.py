"""Settings of the shared training loop (both stages)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vqar.utils.device import PRECISIONS

# Where the metric log goes besides metrics.jsonl, which is always written (see `train.tracking`).
LOGGERS = ("none", "tensorboard", "wandb")


@dataclass
class TrainConfig:
    """AdamW with linear warmup then cosine decay to `lr * min_lr_ratio`, counted in optimizer steps.
    `ema_decay` keeps an exponential moving average of the weights (stage 2), exported in place of the raw ones.
    `logger` also sends the metric log and the pictures to TensorBoard or W&B (project `wandb_project`); both are
    optional packages (the `tracking` extra)."""

    steps: int = 2000
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    log_every: int = 50
    eval_every: int = 500
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 20  # consecutive NaN/inf steps (skipped) before the run stops
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    ema_decay: float | None = None
    logger: str = "none"
    wandb_project: str = "vqar"

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"train.steps must be positive, got {self.steps}")
        if not 0 < self.lr < math.inf:  # nan and inf too: the first update would make every weight NaN
            raise ValueError(f"train.lr must be positive and finite, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"train.weight_decay must be >= 0 and finite, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("train.warmup_steps must be >= 0 and train.min_lr_ratio in [0, 1]")
        if self.grad_clip is not None and not self.grad_clip > 0:  # nan clips every gradient to NaN
            raise ValueError(f"train.grad_clip must be positive or null, got {self.grad_clip}")
        for name in ("log_every", "eval_every", "ckpt_every", "keep_checkpoints", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.logger not in LOGGERS:
            raise ValueError(f"train.logger must be one of {', '.join(LOGGERS)}, got {self.logger!r}")
        if not self.wandb_project.strip():
            raise ValueError("train.wandb_project must not be empty")
