"""The training schedule of Next Patch Prediction (arXiv 2412.15321): coarse patches first, then single tokens.

`level` L trains with patches of 4^(L-1), ..., 4, 1 tokens (p = 2^(L-1), ..., 2, 1). Segment i ends at
int(total * rate^i) (i = 0..L-1), taken in reverse order, so with level 2 and rate 0.5 the first half of training
uses 2x2 patches and the second half single tokens: 0.625 of the token-level sequence cost. Totals count epochs
in the paper and optimizer steps in vqar (one boundary rule, any unit). By default every segment restarts the
learning rate, as NPP's scheduler does: a linear warmup from 0, constant, then a linear decay towards
`end_lr_ratio` over its last `decay_ratio`. Measured on the digits (benchmarks/README.md), NPP without the restarts
(`segment_lr=false`: the run's single warmup + cosine) ends 0.12 nats/token behind token-level training; with them
it matches it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vqar.configs import changed_settings, preset_fields

log = logging.getLogger("vqar.train")


MAX_LEVEL = 12  # 2048x2048 patches: past any code grid (a huge level was a hang in the schedule's arithmetic)


@dataclass
class NPPConfig:
    """`level` 1 is plain next-token training."""

    level: int = 1
    rate: float = 0.5
    segment_lr: bool = True
    warmup_steps: int = 100
    decay_ratio: float = 0.2
    end_lr_ratio: float = 0.1

    def validate(self) -> None:
        if not 1 <= self.level <= MAX_LEVEL or not 0.0 < self.rate < 1.0:
            raise ValueError(f"npp.level must be in [1, {MAX_LEVEL}] (its first patches are 2^(level-1) codes a "
                             f"side) and npp.rate in (0, 1), got {self.level}, {self.rate}")  # fmt: skip
        # end_lr_ratio above 1 would raise the learning rate over what is meant to be each segment's decay
        if not 0.0 <= self.decay_ratio <= 1.0 or self.warmup_steps < 0 or not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ValueError(f"npp.decay_ratio and npp.end_lr_ratio must be in [0, 1] and npp.warmup_steps >= 0, got "
                             f"{self.decay_ratio:g}, {self.end_lr_ratio:g} and {self.warmup_steps}")  # fmt: skip

    def unused(self) -> list[str]:
        """The names of the settings given other than their defaults that go unused: all of NPP's with level 1
        (plain next-token training), the per-segment schedule's with segment_lr off."""
        if self.level == 1:
            names = ["rate", "segment_lr", "warmup_steps", "decay_ratio", "end_lr_ratio"]
        elif not self.segment_lr:
            names = ["warmup_steps", "decay_ratio", "end_lr_ratio"]
        else:
            return []
        return list(changed_settings(self, names))


def resets_of_unused_npp(run_yaml: Path, overrides: Iterable[str]) -> list[str]:
    """Overrides that put back the defaults of the npp.* settings a run's run.yaml states where the resumed run
    leaves them unused (`NPPConfig.unused`): `npp.rate` once `--resume npp.level=1` trains on single tokens, or one
    an older vqar accepted and vqar now refuses. They never changed the training they were saved with, and the user
    did not give them on this command line, so "leave it out" could not be followed. One given on the command line
    is not reset: the configuration's own check refuses it."""
    overrides = list(overrides)
    given = {item.partition("=")[0] for item in overrides}
    saved = preset_fields("ar", run_yaml, [], ("npp",)).get("npp")
    try:
        fields = OmegaConf.to_container(saved) if isinstance(saved, DictConfig) else {}
        changed = OmegaConf.from_dotlist([item for item in overrides if item.startswith("npp.")]).get("npp", {})
        npp = NPPConfig(**{**fields, **OmegaConf.to_container(OmegaConf.create(changed))})
        unused = [name for name in npp.unused() if f"npp.{name}" not in given]
    except Exception:  # a damaged section or override (OmegaConf's own errors too) is named by the configuration
        return []
    if unused:
        log.warning("resuming %s: its run.yaml sets %s, which npp.level=%d%s leaves unused; put back to the default "
                    "(unused either way)", run_yaml.parent, " and ".join(f"npp.{name}={getattr(npp, name)}"
                    for name in unused), npp.level, "" if npp.level == 1 else " npp.segment_lr=false")  # fmt: skip
    return [f"npp.{name}={str(getattr(NPPConfig, name)).lower()}" for name in unused]


def check_resumed_schedule(run_dir: Path, done: int, before: tuple[int, NPPConfig],
                           after: tuple[int, NPPConfig]) -> None:  # fmt: skip
    """ValueError when resuming after `done` steps with `after` = (train.steps, npp) would train on larger patches
    than the run's last step did under `before`: the boundaries scale with train.steps, so a longer run (or another
    rate or level) puts coarse patches back after single tokens, silently undoing the schedule's end."""
    (total, npp), (new_total, new_npp) = before, after
    last = patch_side_at(done - 1, total, npp.level, npp.rate) if npp.level > 1 and done > 0 else 1
    if new_npp.level == 1 or done == 0:
        return
    side = patch_side_at(done, new_total, new_npp.level, new_npp.rate)
    if side <= last:
        return
    until = next(end for end, p in zip(segment_ends(new_total, new_npp.level, new_npp.rate), patch_sides(new_npp.level),
                                       strict=True) if p == side)  # fmt: skip
    was = f"train.steps={total}, npp.level={npp.level}, npp.rate={npp.rate:g}"
    now = f"train.steps={new_total}, npp.level={new_npp.level}, npp.rate={new_npp.rate:g}"
    resets = " ".join(f"npp.{name}={str(getattr(NPPConfig, name)).lower()}"
                      for name in ("rate", "segment_lr", "warmup_steps", "decay_ratio", "end_lr_ratio")
                      if getattr(new_npp, name) != getattr(NPPConfig, name))  # fmt: skip
    raise ValueError(f"resuming {run_dir} after step {done} with {now} would train on {side}x{side} patches again "
                     f"until step {until}, where the run's last step ({was}) trained on "
                     f"{'single tokens' if last == 1 else f'{last}x{last} patches'}: the schedule's boundaries scale "
                     f"with train.steps. Keep the run's settings to finish its schedule; to train on single tokens "
                     f"for longer, resume with npp.level=1{' ' + resets if resets else ''} and the longer train.steps; "
                     "or start a new run in another --out")  # fmt: skip


def check_grid(level: int, grid: tuple[int, int]) -> None:
    """ValueError naming `npp.level` when its largest patches do not tile the code grid (the smaller ones then
    do, being powers of two), with the largest level that fits."""
    largest = 2 ** (level - 1)
    height, width = grid
    if height % largest == 0 and width % largest == 0:
        return
    fits = max(n for n in range(1, level) if height % 2 ** (n - 1) == 0 and width % 2 ** (n - 1) == 0)
    advice = f"use npp.level={fits} or lower" if fits > 1 else "next patch prediction needs a grid with even sides"
    raise ValueError(f"npp.level={level} starts with {largest}x{largest} patches, which do not tile the "
                     f"{height}x{width} code grid: {advice}")  # fmt: skip


def check_segments(level: int, rate: float, total: int, warmup: int = 0) -> None:
    """ValueError when a patch size of the schedule gets no step at all (int(total * rate^i) rounds two ends
    together): the run would silently train a lower level than the one asked for. With a per-segment `warmup`,
    which starts each segment at learning rate 0 (as NPP's scheduler does), a segment of one step trains nothing
    either."""
    start = 0
    for end, side in zip(segment_ends(total, level, rate), patch_sides(level), strict=True):
        if end == start or (end == start + 1 and warmup > 0):
            said = "no step" if end == start else "one step, which npp.warmup_steps trains at learning rate 0"
            raise ValueError(f"train.steps={total} with npp.rate={rate:g} gives the {side}x{side} patches of "
                             f"npp.level={level} {said}: raise train.steps or npp.rate, or lower "
                             "npp.level")  # fmt: skip
        start = end


def segment_ends(total: int, level: int, rate: float) -> list[int]:
    """Where each patch size stops: [int(total * rate^(L-1)), ..., int(total * rate), total]."""
    return [int(total * rate**i) for i in range(level)][::-1]


def patch_sides(level: int) -> list[int]:
    """Patch side p of each segment: [2^(L-1), ..., 2, 1] (patches of p^2 tokens)."""
    return [2**i for i in range(level)][::-1]


def patch_side_at(step: int, total: int, level: int, rate: float) -> int:
    for end, side in zip(segment_ends(total, level, rate), patch_sides(level), strict=True):
        if step < end:
            return side
    return 1


def relative_cost(total: int, level: int, rate: float) -> float:
    """Sequence length processed, relative to token-level training for the same number of steps."""
    start, cost = 0, 0.0
    for end, side in zip(segment_ends(total, level, rate), patch_sides(level), strict=True):
        cost += (end - start) / side**2
        start = end
    return cost / total


def segment_lr(step: int, ends: list[int], warmup: int, decay_ratio: float, end_ratio: float) -> float:
    """Learning-rate factor at `step` (units of `ends`, e.g. optimizer steps) with a restart at every segment."""
    start = 0
    for end in ends:
        if step < end:
            break
        start = end
    i, n = step - start, end - start
    if i < warmup:
        return i / warmup
    decay = decay_ratio * n
    decay_start = n - decay
    if decay > 0 and i > decay_start:
        return 1.0 - (1.0 - end_ratio) * (i - decay_start) / decay
    return 1.0
