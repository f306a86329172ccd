"""Shared by the benchmarks: a tokenizer and a code store of the bundled digits, made once and reused."""

from __future__ import annotations

from pathlib import Path

from vqar.data import DataConfig
from vqar.data.codes import extract_codes
from vqar.pretrained import load
from vqar.train.tokenizer import load_run_config, train_tokenizer


def cached_code_store(out: Path, preset: str, tokenizer_steps: int, views: str = "none",
                      captions: str | None = None) -> Path:  # fmt: skip
    """`out/codes`, made (with a `preset` tokenizer trained for `tokenizer_steps` in `out/tokenizer`) if missing."""
    codes = out / "codes"
    if (codes / "manifest.json").is_file():
        return codes
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "config.json").is_file():
        overrides = [f"steps={tokenizer_steps}", f"train.eval_every={tokenizer_steps}"]
        train_tokenizer(load_run_config(preset, overrides), tokenizer_dir, overwrite=True)
    tokenizer = load(tokenizer_dir)
    data = DataConfig(image_size=tokenizer.image_size, channels=tokenizer.in_channels, captions=captions)
    extract_codes(tokenizer, data, codes, views=views, tokenizer_dir=tokenizer_dir)
    return codes
