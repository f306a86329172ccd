"""How codes are drawn: one settings type for every entry point (Python, `vqar sample`, `vqar serve`, the training
grids, the throughput bench), validated in one place.

The semantics, stated once and equal to LlamaGen's where LlamaGen defines them:

* classifier-free guidance is on when `cfg_scale` > 1 (1 turns it off; below 1 is refused). The batch runs as
  [conditional; null condition] and the raw logits are combined as `uncond + cfg_scale * (cond - uncond)`, before
  the temperature and the filters. `cfg_interval` = i >= 0 guides the first code always and the code after
  position p while p <= i (decode step p produces position p + 1); None or -1 guides every position. Outside
  the interval the conditional logits are used (the null half is still computed, as LlamaGen does).
* `cfg_schedule` spreads the scale over a model's blocks (positions, or VAR's scales): "constant" uses
  `cfg_scale` at every block; "linear" ramps it as 1 + (cfg_scale - 1) * k / (K - 1) over blocks k = 0 .. K-1, no
  guidance at the first block and the full scale at the last (VAR's schedule: its `cfg` c is cfg_scale = 1 + c,
  so its README's cfg 1.5 is cfg_scale 2.5). None takes the model's own schedule (`ARModel.cfg_schedule`).
* `smooth` (VAR's `more_smooth`) feeds a Gumbel-softmax mix of code vectors back to the model instead of the drawn
  code's vector (models with `smooth_embedding` only); the drawn codes are unchanged.
* the logits are divided by `temperature` (> 0);
* top-k keeps every code whose logit is >= the k-th largest (ties with the k-th are kept);
* top-p keeps the smallest set of most likely codes whose probability reaches p: codes are sorted, and a code is
  dropped when the codes before it already reach p (so the code that crosses p is kept, and at least one);
* `greedy` takes the most likely code (argmax) instead of drawing;
* a draw inverts the cumulative distribution with one uniform number per code. Image j of a run with seed s
  takes its numbers from a random stream that depends on (s, j) alone, so it is the same image whichever batch
  or process draws it, and whichever entry point asks for it.

For a residual (RQ) model `temperature`, `top_k` and `top_p` may be one value per depth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

MAX_SEED = 2**63 - 1
CFG_SCHEDULES = (None, "constant", "linear")


class DepthSettings(NamedTuple):
    """The filters of one depth."""

    temperature: float
    top_k: int | None
    top_p: float | None


@dataclass
class SamplingSettings:
    temperature: Any = 1.0  # a number, or one per depth
    top_k: Any = None  # an integer >= 1, None for no top-k, or one per depth
    top_p: Any = None  # in (0, 1], None for no top-p, or one per depth
    cfg_scale: float = 1.0
    cfg_interval: int | None = None
    greedy: bool = False
    seed: int = 0
    cfg_schedule: str | None = None  # "constant", "linear", or None for the model's own
    smooth: bool = False

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0

    def guided_at(self, position: int) -> bool:
        """Whether the code(s) of `position` are drawn from guided logits."""
        interval = self.cfg_interval
        return self.guided and (position == 0 or interval is None or interval < 0 or position - 1 <= interval)

    def scale_at(self, block: int, blocks: int, schedule: str) -> float:
        """The guidance scale of block `block` of `blocks` under `schedule` (the settings' own when they name one);
        see the module docstring."""
        if (self.cfg_schedule or schedule) == "linear":
            return 1.0 + (self.cfg_scale - 1.0) * (block / (blocks - 1) if blocks > 1 else 1.0)
        return self.cfg_scale

    def per_depth(self, depth: int) -> list[DepthSettings]:
        """Validated filters for each of `depth` depths (ValueError naming the setting otherwise)."""
        self.validate()
        columns = [_per_depth(getattr(self, name), depth, name) for name in ("temperature", "top_k", "top_p")]
        return [DepthSettings(*values) for values in zip(*columns, strict=True)]

    def validate(self) -> None:
        for name in ("temperature", "top_k", "top_p"):
            values = getattr(self, name)
            for value in values if _is_list(values) else [values]:
                _CHECKS[name](value)
        if isinstance(self.cfg_scale, bool) or not isinstance(self.cfg_scale, (int, float)):
            raise ValueError(f"cfg_scale must be a number >= 1, got {self.cfg_scale!r}")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 1.0):
            raise ValueError(f"cfg_scale must be a finite number >= 1 (1 turns guidance off), got {self.cfg_scale}")
        interval = self.cfg_interval
        if interval is not None and (not _is_int(interval) or interval < -1):
            raise ValueError(f"cfg_interval must be None, -1 (guide every code) or an integer >= 0, got {interval!r}")
        if not isinstance(self.greedy, bool):
            raise ValueError(f"greedy must be true or false, got {self.greedy!r}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {', '.join(map(str, CFG_SCHEDULES))}, "
                             f"got {self.cfg_schedule!r}")  # fmt: skip
        if not isinstance(self.smooth, bool):
            raise ValueError(f"smooth must be true or false, got {self.smooth!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")

    def batch_key(self) -> tuple:
        """Settings that must be equal for draws to share a batch (everything but the seed)."""
        as_tuple = lambda v: tuple(v) if _is_list(v) else v  # noqa: E731
        return (as_tuple(self.temperature), as_tuple(self.top_k), as_tuple(self.top_p), self.cfg_scale,
                self.cfg_interval, self.greedy, self.cfg_schedule, self.smooth)  # fmt: skip


def _is_list(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _per_depth(value, depth: int, name: str) -> list:
    if _is_list(value):
        if len(value) != depth:
            kind = "one code per position" if depth == 1 else f"{depth} codes per position"
            raise ValueError(f"{name} has {len(value)} values but the model has depth {depth} ({kind})")
        return list(value)
    return [value] * depth


def _check_temperature(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")


def _check_top_k(value) -> None:
    if value is not None and (not _is_int(value) or value < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no top-k), got {value!r}")


def _check_top_p(value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or None for no top-p), got {value!r}")


_CHECKS = {"temperature": _check_temperature, "top_k": _check_top_k, "top_p": _check_top_p}
