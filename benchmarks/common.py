"""Shared by the benchmarks: a tokenizer and a code store of the bundled digits, made once and reused."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path

from vqar.bundle import load
from vqar.data import DataConfig
from vqar.data.extraction import extract_codes
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
