"""Shared test fixtures: the parity-fixture folder and small, fast configurations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def fixtures_root() -> Path:
    return Path(os.environ.get("VQAR_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """The golden parity fixtures (made by running the official code); skipped where they are absent."""
    root = fixtures_root()
    if not root.is_dir():
        pytest.skip(f"parity fixtures not found at {root} (set VQAR_FIXTURES to the shared/fixtures folder)")
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A small, fast RQ tokenizer run on a slice of the bundled digits (a few seconds on 2 CPU cores).
TINY_RUN = [
    "model.conv.ch=16",
    "model.conv.ch_mult=[1,2,4,4]",
    "model.conv.norm_groups=8",
    "model.conv.z_channels=32",
    "c=64",
    "data.max_images=600",
    "data.batch_size=32",
    "data.eval_batch_size=128",
    "train.warmup_steps=5",
    "train.log_every=5",
]
