"""Shared by the benchmarks: a tokenizer and a code store of the bundled digits, made once and reused."""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from vqar.bundle import load
from vqar.data import DataConfig
from vqar.data.extraction import extract_codes
from vqar.train.errors import TrainingInterrupted
from vqar.train.tokenizer import load_run_config, train_tokenizer


def cached_code_store(out: Path, preset: str, tokenizer_steps: int, views: str = "none",
                      captions: str | None = None, tokenizer_overrides: Sequence[str] = ()) -> Path:  # fmt: skip
    """`out/codes`, made (with a `preset` tokenizer, with `tokenizer_overrides`, trained for `tokenizer_steps` in
    `out/tokenizer`) if missing."""
    codes = out / "codes"
    if (codes / "manifest.json").is_file():
        return codes
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "config.json").is_file():
        overrides = [*tokenizer_overrides, f"steps={tokenizer_steps}", f"train.eval_every={tokenizer_steps}"]
        train_tokenizer(load_run_config(preset, overrides), tokenizer_dir, overwrite=True)
    tokenizer = load(tokenizer_dir)
    data = DataConfig(image_size=tokenizer.image_size, channels=tokenizer.in_channels, captions=captions)
    extract_codes(tokenizer, data, codes, views=views, tokenizer_dir=tokenizer_dir)
    return codes


def train_each(configs: list[tuple[str, str, list[str]]], out: Path, overrides: list[str]):
    """Trains one tokenizer per (name, preset, extra overrides) into `out/<name>` with the shared `overrides` after
    the extra ones; yields (name, preset, extra, config, validation metrics, seconds) as each finishes."""
    for name, preset, extra in configs:
        cfg = load_run_config(preset, [*extra, *overrides])
        start = time.perf_counter()
        metrics = train_tokenizer(cfg, out / re.sub(r"[^\w.-]+", "_", name), overwrite=True)
        yield name, preset, extra, cfg, metrics, time.perf_counter() - start


def equal_budget(codebook: int, steps: int, seed: int) -> list[str]:
    """The overrides that give every tokenizer of a comparison the same codebook size and training budget."""
    return [f"c={codebook}", f"steps={steps}", f"train.eval_every={steps}", f"train.ckpt_every={steps}",
            f"train.seed={seed}"]  # fmt: skip


def print_table(header: list[str], rows: list[list]) -> None:
    """A Markdown table, as benchmarks/README.md records them."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


# ---------------------------------------------------------------- argparse types the benchmarks share, beside
# vqar.commands.common's (positive_int, non_negative_int, non_negative_float): a bad argument is refused at once.
REPO = Path(__file__).resolve().parents[1]


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high` (no upper bound when `high` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"from {low} to {high:,}"
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {text}")
        return value

    return parse


def float_at_least(low: float, *, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number >= `low` (> `low` when `strict`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {low:g}, got {text}")
        return value

    return parse


positive_float = float_at_least(0.0, strict=True)


def positive_int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1 (batch sizes: "16,64,256")."""
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() and int(item) >= 1 for item in items):
        raise argparse.ArgumentTypeError(f"takes comma-separated positive integers (16,64,256), got {text!r}")
    return [int(item) for item in items]


def name_list(names: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of `names`."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",")]
        unknown = [item for item in items if item not in names]
        if unknown or not text.strip():
            raise argparse.ArgumentTypeError(f"takes comma-separated names of {', '.join(names)}; got {text!r}")
        return items

    return parse


def existing_dir(text: str) -> str:
    """An argparse type: a folder that exists (returned as given)."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return text


def git_commit(text: str) -> str:
    """An argparse type: a git revision that names a commit of this repository (as given: a commit, tag, branch)."""
    check = ["git", "rev-parse", "--verify", "--quiet", f"{text}^{{commit}}"]
    if text.startswith("-") or subprocess.run(check, cwd=REPO, capture_output=True).returncode != 0:
        raise argparse.ArgumentTypeError(f"{text!r} names no commit of this repository ({REPO})")
    return text


def run_script(main: Callable[[], int | None]) -> None:
    """Exits with `main()`'s status; Ctrl-C (or the TrainingInterrupted a training run raises for it, whose advice
    to --resume these scripts do not take) is one line and status 130 instead of a traceback."""
    try:
        status = main()
    except (KeyboardInterrupt, TrainingInterrupted):
        print(f"{Path(sys.argv[0]).name}: stopped; the benchmark did not finish and recorded nothing: run it again "
              "(what it trained is trained again, except a finished tokenizer and code store, which are reused)",
              file=sys.stderr)  # fmt: skip
        sys.exit(130)
    sys.exit(status)
