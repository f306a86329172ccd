"""How codes are drawn: one settings type for every entry point (Python, `vqar sample`, `vqar serve`, the training
grids, the throughput bench), validated in one place.

The semantics, stated once and equal to LlamaGen's where LlamaGen defines them:

* classifier-free guidance is on when `cfg_scale` > 1 (1 turns it off; below 1 is refused). The batch runs as
  [conditional; null condition] and the raw logits are combined as `uncond + cfg_scale * (cond - uncond)`, before
  the temperature and the filters. `cfg_interval` = i >= 0 guides the first code always and the code after
  position p while p <= i (decode step p produces position p + 1); None or -1 guides every position. Outside
  the interval the conditional logits are used (the null half is still computed, as LlamaGen does).
  A model that draws whole blocks per call (VAR's scales) is refused an interval (`check_cfg_interval`).
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
* `speculative` draws by speculative Jacobi decoding (`vqar.sampling.speculative`): a window of
  `speculative_window` drafted positions goes through the model in one call and is verified in order, so each
  code comes from exactly the distribution above (lossless), in fewer model calls when drafts are accepted. The
  codes differ from those of plain sampling with the same seed (the random numbers are used differently), their
  distribution does not; greedy speculative decoding gives the greedy codes. `speculative_drafts` is "mc-sjd"
  (drafts coupled from one iteration to the next, accepted more often) or "sjd" (drawn afresh each iteration);
  `speculative_max_iterations` caps the speculative calls per batch, after which the rest is drawn one position
  per call. Raster models only (not VAR, which already draws a whole scale per call).

For a residual (RQ) model `temperature`, `top_k` and `top_p` may be one value per depth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

MAX_SEED = 2**63 - 1
CFG_SCHEDULES = (None, "constant", "linear")
DRAFTS = ("mc-sjd", "sjd")


class DepthSettings(NamedTuple):
    """The filters of one depth."""

    temperature: float
    top_k: int | None
    top_p: float | None


# The filters that take one value per depth (a list) or one for all.
PER_DEPTH = ("temperature", "top_k", "top_p")

# The settings that shape speculative decoding, which they do nothing without (`check_settings_apply`).
SPECULATIVE_OPTIONS = ("speculative_window", "speculative_drafts", "speculative_max_iterations")
# Past any guidance anyone uses, and far below where the guided logits would overflow float32 (3.4e38).
MAX_CFG_SCALE = 1e6


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
    speculative: bool = False
    speculative_window: int = 16  # drafted positions per model call
    speculative_drafts: str = "mc-sjd"  # or "sjd"
    speculative_max_iterations: int | None = None

    def __post_init__(self):
        # NumPy and torch numbers (a seed drawn with np.random, a top_k read from an array or a tensor) are the
        # Python numbers they hold
        for field in dataclasses.fields(self):
            setattr(self, field.name, _python_numbers(getattr(self, field.name)))

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
        columns = [_per_depth(getattr(self, name), depth, name) for name in PER_DEPTH]
        return [DepthSettings(*values) for values in zip(*columns, strict=True)]

    def validate(self) -> None:
        for name in PER_DEPTH:
            values = getattr(self, name)
            for value in values if _is_list(values) else [values]:
                _CHECKS[name](value)
        if isinstance(self.cfg_scale, bool) or not isinstance(self.cfg_scale, (int, float)):
            raise ValueError(f"cfg_scale must be a number >= 1, got {self.cfg_scale!r}")
        if not (_finite(self.cfg_scale) and self.cfg_scale >= 1.0):
            raise ValueError(f"cfg_scale must be a finite number >= 1 (1 turns guidance off), got {self.cfg_scale}")
        if self.cfg_scale > MAX_CFG_SCALE:  # scale * (cond - uncond) overflows float32 logits: inf, then NaN codes
            raise ValueError(f"cfg_scale must be at most {MAX_CFG_SCALE:,.0f} (guidance uses 1.5 to 10; far larger "
                             f"scales overflow the float32 logits to inf and NaN), got {self.cfg_scale!r}")  # fmt: skip
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
        if not isinstance(self.speculative, bool):
            raise ValueError(f"speculative must be true or false, got {self.speculative!r}")
        if not _is_int(self.speculative_window) or self.speculative_window < 1:
            raise ValueError(f"speculative_window must be an integer >= 1, got {self.speculative_window!r}")
        if self.speculative_drafts not in DRAFTS:
            raise ValueError(f"speculative_drafts must be {' or '.join(DRAFTS)}, got {self.speculative_drafts!r}")
        cap = self.speculative_max_iterations
        if cap is not None and (not _is_int(cap) or cap < 0):
            raise ValueError(f"speculative_max_iterations must be None or an integer >= 0, got {cap!r}")

    def batch_key(self) -> tuple:
        """Settings that must be equal for draws to share a batch (everything but the seed)."""
        as_tuple = lambda v: tuple(v) if _is_list(v) else v  # noqa: E731
        return (as_tuple(self.temperature), as_tuple(self.top_k), as_tuple(self.top_p), self.cfg_scale,
                self.cfg_interval, self.greedy, self.cfg_schedule, self.smooth, self.speculative,
                self.speculative_window, self.speculative_drafts, self.speculative_max_iterations)  # fmt: skip


def check_settings_apply(given: dict[str, Any], name: Callable[[str], str] = str) -> None:
    """ValueError where a setting the user gave (`given`: field -> value, None for one not given; `name` spells a
    field as the caller's user knows it: a flag, a JSON field) only shapes the work of another that is off, rather
    than ignoring it: the speculative options without `speculative`, the guidance options without a `cfg_scale`
    above 1, a filter (or the speculative drafts' kind) with `greedy`."""
    def listed(fields: list[str]) -> tuple[str, str]:
        return " and ".join(map(name, fields)), "them" if len(fields) > 1 else "it"

    unused = [field for field in SPECULATIVE_OPTIONS if given.get(field) is not None]
    if unused and not given.get("speculative"):
        names, them = listed(unused)
        raise ValueError(f"{names} {'have' if them == 'them' else 'has'} no effect without {name('speculative')}: add "
                         f"{name('speculative')}, or leave {them} out")  # fmt: skip
    guidance = [field for field in ("cfg_interval", "cfg_schedule") if given.get(field) is not None]
    if guidance and (given.get("cfg_scale") or 1.0) <= 1.0:
        names, them = listed(guidance)
        raise ValueError(f"{names} shape{'' if them == 'them' else 's'} classifier-free guidance, which "
                         f"{name('cfg_scale')} 1 (the default) leaves off: give {name('cfg_scale')} above 1, or leave "
                         f"{them} out")  # fmt: skip
    filters = [field for field in (*PER_DEPTH, "speculative_drafts") if given.get(field) is not None]
    if filters and given.get("greedy"):  # greedy drafts are the most likely code too, however they are drawn
        names, them = listed(filters)
        raise ValueError(f"{names} {'have' if them == 'them' else 'has'} no effect with {name('greedy')}, which always "
                         f"takes the most likely code: leave {them} out, or drop {name('greedy')}")  # fmt: skip


def settings_or_default(settings: SamplingSettings | None) -> SamplingSettings:
    """`settings`, or the default settings for None; TypeError for anything else. A dict of options would fail as an
    AttributeError deep in sampling, and an empty one (falsy) would be replaced by the defaults without a word."""
    if settings is None:
        return SamplingSettings()
    if not isinstance(settings, SamplingSettings):
        raise TypeError(f"settings must be SamplingSettings (SamplingSettings(**options)), got "
                        f"{type(settings).__name__}")  # fmt: skip
    return settings


def image_stream(seed: int, index: int, salt: int = 0) -> torch.Generator:
    """The random stream of image `index` of a run with `seed` (see the module docstring); `salt` > 0 gives further
    streams of the same image that are independent of the first (Gumbel noise, speculative drafts)."""
    words = [seed, index] if salt == 0 else [seed, index, salt]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _python_numbers(value):
    """`value` with NumPy and torch scalars and 1-D arrays (of per-depth values) as Python numbers and lists."""
    if isinstance(value, np.generic) or (isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim <= 1):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return type(value)(_python_numbers(v) for v in value)
    return value


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


def _finite(value: int | float) -> bool:
    """math.isfinite, false for an int too large for a float (10**400 raised OverflowError there)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_temperature(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (_finite(value) and value > 0):
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
