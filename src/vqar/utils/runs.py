"""The layout of a training run folder, read by training (resume, the checks before writing) and by loading (a
run that never exported its model): its checkpoints and the kind of model it trains.

    RUN_DIR/run.yaml                       the run's configuration
    RUN_DIR/checkpoints/step-0001000/      one folder per checkpoint (`vqar.train.checkpoint` writes them)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

RUN_CONFIG = "run.yaml"
# Where --overwrite keeps the run it replaces until the new run writes its first checkpoint (`train.checkpoint`):
# deleted up front, it was lost to a new run that failed, or was killed, before it had anything to put in its place.
SET_ASIDE = ".overwritten-run"


@dataclass
class Checkpoint:
    step: int
    path: Path


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Checkpoints present in a run, oldest first (without verifying them)."""
    found = []
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.is_dir() and entry.name.startswith("step-") and entry.name[5:].isdigit():
                found.append(Checkpoint(int(entry.name[5:]), entry))
    return sorted(found, key=lambda c: c.step)


def run_of_checkpoints(path: Path) -> Path | None:
    """The training run whose `checkpoints/` folder `path` is or lies inside (a checkpoint, `damaged/`); None
    elsewhere. A checkpoint holds a run.yaml and weights but is no run and no exported model: writing a run into it
    would change the files its manifest vouches for, and the run would take it for damaged."""
    path = Path(os.path.abspath(path))
    for folder in (path, *path.parents):
        if folder.name == "checkpoints" and ((folder.parent / RUN_CONFIG).is_file() or list_checkpoints(folder.parent)):
            return folder.parent
    return None


def run_kind(run_dir: Path) -> str | None:
    """"ar" or "tokenizer": the kind of training run `run_dir` holds, told by its run.yaml (or its newest
    checkpoint's): an AR run's names its `arch` at the top level, a tokenizer's under `model`. None when it cannot
    be told (no run.yaml, an unreadable one, or the run.yaml of something else)."""
    saved = Path(run_dir) / RUN_CONFIG
    if not saved.is_file():
        checkpoints = list_checkpoints(run_dir)
        saved = checkpoints[-1].path / RUN_CONFIG if checkpoints else saved
    try:
        config = yaml.safe_load(saved.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    return "ar" if "arch" in config else "tokenizer" if "model" in config else None
