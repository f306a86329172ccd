"""Training checkpoints: one directory per step, written atomically, verified by a checksum manifest.

    RUN_DIR/checkpoints/step-0001000/
        model.safetensors, <other modules>.safetensors   weights (safetensors, never pickles)
        trainer.pt                                        optimizer/scheduler state, step, RNG states
        run.yaml                                          the run's configuration
        manifest.json                                     sha256 of every file above

A checkpoint is assembled in a hidden temporary directory, fsynced, then renamed into place, so a crash leaves
either no new checkpoint or a complete one (and the next run removes the temporary directory). On load the
manifest is checked; a damaged checkpoint is skipped with a warning and the previous good one is used, and a run
whose checkpoints are all damaged is not resumed at all (`DamagedCheckpointsError`). Pruning keeps the newest
intact checkpoints and moves damaged ones aside to `checkpoints/damaged/`, so an intact checkpoint is never
deleted in favour of a damaged one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from vqar.bundle import dtype_kind_mismatches
from vqar.utils.io import current_umask, fsync_dir, remove_leftovers, sha256_file
from vqar.utils.runs import SET_ASIDE, Checkpoint, checkpoint_dir, list_checkpoints
from vqar.utils.safe_load import load_checkpoint

log = logging.getLogger("vqar.train")

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.pt"
DAMAGED = "damaged"


class DamagedCheckpointsError(ValueError):
    """A run has checkpoints but none is intact: resuming would start over and lose them."""


Weights = dict[str, torch.Tensor]


def save_weights(weights: nn.Module | Weights, path: Path) -> None:
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_weights(path: Path, module: nn.Module) -> Weights:
    """The full weights stored at `path`, checked against `module`'s names and (global) shapes first, so a
    checkpoint of another configuration is a clear error whether or not the module is sharded."""
    state = load_file(str(path))
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    kinds = dtype_kind_mismatches(state, expected)
    if missing or unexpected or wrong or kinds:
        parts = [f"{label}: {', '.join(keys[:3])}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("other shapes", wrong),
                  ("another kind of number", kinds)) if keys]  # fmt: skip
        problem = "; ".join(parts)
        raise ValueError(f"{path} does not fit the configured model ({problem}); was the architecture changed?")
    return state


def resume_weights(checkpoint: Path, name: str) -> Path | None:
    """The file module `name` of a run resumes from. A module the run gained on this resume (`train.ema_decay` or a
    discriminator added with --resume) has none: the EMA starts from the checkpoint's model weights, a new
    discriminator (None) from its initialisation, either said once. A missing model file is the checkpoint's
    damage, named by `load_weights`."""
    path = Path(checkpoint) / f"{name}.safetensors"
    if path.exists() or name not in ("ema", "discriminator"):
        return path
    start = "the model's weights there" if name == "ema" else "its initialisation"
    log.warning("%s holds no %s weights (the run trained without it until now): it starts from %s", checkpoint,
                "EMA" if name == "ema" else "discriminator", start)  # fmt: skip
    return path.with_name("model.safetensors") if name == "ema" else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, nn.Module | Weights],
    trainer_state: dict[str, Any],
    run_yaml: str,
    keep: int,
) -> Path:
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:07d}"
    tmp = folder / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, module_weights in weights.items():
            save_weights(module_weights, tmp / f"{name}.safetensors")
        torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / "run.yaml").write_text(run_yaml)
        manifest = {"step": step, "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        mode = 0o666 & ~current_umask()  # safetensors creates its files 0600: colleagues could not resume the run
        for path in tmp.iterdir():
            os.chmod(path, mode)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(tmp)
        if final.exists():  # the same step again (a resumed run): a damaged one is kept aside, an intact one replaced
            problem = verify_checkpoint(final)
            if problem is None:
                shutil.rmtree(final)
            else:
                _move_aside(run_dir, final, problem)
        os.replace(tmp, final)
        fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _verified[str(final)] = (_file_stamps(final), None)  # intact: its manifest was computed from these files
    discard_set_aside_run(run_dir)  # the new run has a checkpoint to resume from: it replaces the one set aside
    prune(run_dir, keep)
    return final


def prune(run_dir: Path, keep: int) -> None:
    """Keeps the `keep` newest intact checkpoints and the best one; older intact ones are deleted and damaged ones
    moved to `checkpoints/damaged/` (a damaged checkpoint never takes the place of an intact one)."""
    best, kept = best_step(run_dir), 0
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(ckpt.path)
        if problem is not None:
            _move_aside(run_dir, ckpt.path, problem)
        elif kept < keep:
            kept += 1
        elif ckpt.step != best:
            shutil.rmtree(ckpt.path, ignore_errors=True)


def _move_aside(run_dir: Path, path: Path, problem: str) -> Path:
    """Moves a damaged checkpoint to `checkpoints/damaged/` (never deleting one: a later look may save it);
    a second damaged copy of the same step gets a numbered name."""
    folder = checkpoint_dir(run_dir) / DAMAGED
    folder.mkdir(exist_ok=True)
    aside, copy = folder / path.name, 1
    while aside.exists():
        aside, copy = folder / f"{path.name}.{copy}", copy + 1
    log.warning("checkpoint %s is damaged (%s); moved to %s", path, problem, aside)
    os.replace(path, aside)
    return aside


def best_step(run_dir: Path) -> int | None:
    """The step of the best validation result so far (`checkpoints/best.json`), if any."""
    best = read_best(run_dir)
    return None if best is None else best["step"]


def read_best(run_dir: Path) -> dict | None:
    """`checkpoints/best.json` ({"step", "metric", "value"}); None when there is none, or when it is damaged (it is
    renamed into place, so only something else changes it): a warning, and the next evaluation writes it anew."""
    path = checkpoint_dir(run_dir) / "best.json"
    try:
        best = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        best = err
    fields = {"step": int, "metric": str, "value": (int, float)}
    if isinstance(best, dict) and all(isinstance(best.get(k), kind) for k, kind in fields.items()):
        return best
    log.warning("%s is damaged (%s); the best checkpoint is chosen again from the next evaluation", path,
                best if isinstance(best, Exception) else "not a step, metric and value")  # fmt: skip
    return None


# Checkpoint folders do not change once renamed into place, so each is hashed once per process; the cache is keyed
# by the size and modification time of every file, so a folder changed since is hashed again.
_verified: dict[str, tuple[tuple, str | None]] = {}


def _file_stamps(path: Path) -> tuple:
    try:
        return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()))
    except OSError:
        return ()


def verify_checkpoint(path: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    key, stamps = str(path), _file_stamps(path)
    if key in _verified and _verified[key][0] == stamps:
        return _verified[key][1]
    problem = _check_manifest(path)
    _verified[key] = (stamps, problem)
    return problem


def _check_manifest(path: Path) -> str | None:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        return f"unreadable manifest ({err})"
    for name, digest in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"missing {name}"
        if sha256_file(file) != digest:
            return f"checksum mismatch in {name}"
    return None


def latest_checkpoint(run_dir: Path, report: bool = True) -> Checkpoint | None:
    """The newest checkpoint whose files match its manifest; damaged ones are skipped, and reported unless a check
    before the resume itself asks (`report=False`: it was said twice). None when the run has no checkpoint;
    `DamagedCheckpointsError` when it has some but none is intact."""
    found = list_checkpoints(run_dir)
    problems = []
    for ckpt in reversed(found):
        problem = verify_checkpoint(ckpt.path)
        if problem is None:
            return ckpt
        if report:
            log.warning("checkpoint %s is damaged (%s); falling back to the previous one", ckpt.path, problem)
        problems.append(f"{ckpt.path.name}: {problem}")
    if found:
        raise DamagedCheckpointsError(
            f"every checkpoint in {checkpoint_dir(run_dir)} is damaged ({'; '.join(problems)}); nothing was changed. "
            "Move them aside to start this run over, or start a new run in their place with --overwrite"
        )
    return None


def load_trainer_state(ckpt: Checkpoint) -> dict[str, Any]:
    """The optimizer, scheduler and random states of `ckpt`, read through the pickle allow-list's reader (a damaged
    or foreign file is one line naming it, not torch's traceback and its advice to load it unsafely) and checked to
    be the state of that checkpoint's step."""
    path = ckpt.path / TRAINER_STATE
    state = load_checkpoint(path)
    kinds = {"step": int, "optimizers": dict, "schedulers": dict}
    wrong = [key for key, kind in kinds.items() if not isinstance(state, dict) or not isinstance(state.get(key), kind)]
    if wrong or isinstance(state["step"], bool) or state["step"] != ckpt.step:
        found = f"step {state['step']!r}" if not wrong else f"no {' / '.join(wrong)} of the kind vqar writes"
        raise ValueError(f"{path} is not the trainer state of {ckpt.path.name} (it holds {found}): move that "
                         "checkpoint folder aside to resume from the one before it")  # fmt: skip
    return state


# What a training run writes into its folder (the trackers' logs and the export with its companions and pictures
# too): what --overwrite removes, so that nothing of the old run, or of a model exported there, outlives it (an old
# export of a later step would hold the new one back; see `Trainer._export`). Anything else in the folder is kept.
RUN_FILES = (
    *("checkpoints", "metrics.jsonl", "run.yaml", "tensorboard", "wandb"),
    *("config.json", "model.safetensors", "tokenizer", "text_tokenizer"),
    *("recon_grid.png", "samples_grid.png", "samples_grid_prompts.txt"),
)


def has_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a training run: its run.yaml or a checkpoint."""
    return Path(run_dir).is_dir() and (any(list_checkpoints(run_dir)) or (Path(run_dir) / "run.yaml").exists())


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuses to start a new run on top of an existing one unless asked to resume or overwrite it; with
    `overwrite`, removes what a run writes (RUN_FILES). What else the folder may hold is `train.launch`'s to judge."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir} exists and is not a directory")
    if has_run(run_dir) and not resume and not overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a training run; pass --resume to continue it, --overwrite to replace "
            "it, or choose another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        put_back_a_killed_overwrites_run(run_dir)  # the last run that had a checkpoint is the one to set aside
        for name in RUN_FILES:
            target = run_dir / name
            if target.exists() or target.is_symlink():
                (run_dir / SET_ASIDE).mkdir(exist_ok=True)
                os.replace(target, run_dir / SET_ASIDE / name)
    for folder in (run_dir, checkpoint_dir(run_dir), *[p for p in run_dir.iterdir() if p.is_dir()]):
        for leftover in remove_leftovers(folder):
            log.info("removed %s, left by a process that was killed while writing it", leftover)


def restore_set_aside_run(run_dir: Path) -> bool:
    """Puts back the run that --overwrite set aside (`SET_ASIDE`) when the run meant to replace it wrote no checkpoint:
    it failed (a tracker without its login, too little memory) or was killed first. Its files go; the old run's come
    back. Once the new run has a checkpoint, the old run is deleted instead. Returns whether it put a run back."""
    aside = Path(run_dir) / SET_ASIDE
    if not aside.is_dir():
        return False
    if list_checkpoints(Path(run_dir)):
        discard_set_aside_run(run_dir)
        return False
    for name in RUN_FILES:
        _remove_run_files(Path(run_dir) / name)
    for entry in aside.iterdir():
        os.replace(entry, Path(run_dir) / entry.name)
    aside.rmdir()
    return True


def put_back_a_killed_overwrites_run(run_dir: Path) -> None:
    """`restore_set_aside_run` where the run meant to replace the one set aside is not running: an --overwrite
    killed before its first checkpoint (SIGKILL) left it aside; said in the log."""
    if restore_set_aside_run(run_dir):
        log.warning("%s: put back the run that an --overwrite killed before its first checkpoint had set aside",
                    run_dir)  # fmt: skip


def discard_set_aside_run(run_dir: Path) -> None:
    """Deletes the run --overwrite set aside: the new run has a checkpoint (or finished), so it is replaced."""
    _remove_run_files(Path(run_dir) / SET_ASIDE)


def _remove_run_files(target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()


def trained_settings(run_dir: Path) -> dict[str, Any]:
    """The run.yaml of the run in `run_dir` as a dict; empty when there is none (a run that never wrote one) or it
    cannot be read."""
    try:
        trained = yaml.safe_load((Path(run_dir) / "run.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return trained if isinstance(trained, dict) else {}


def refuse_changed_model(run_dir: Path, given: Mapping[str, Any], before: Mapping[str, Any],
                         meaning: Callable[[str, Any], Any] = lambda key, value: value) -> None:  # fmt: skip
    """ValueError naming the first setting of `given` (flat `key: value`) whose `meaning` differs from the run's in
    `before`: a resumed run's checkpoints hold the weights of the model it trained, which then either fail to load,
    naming tensors, or, where the shapes agree (another head count, another depth of a shared codebook), load into
    another network that trains on unsaid. A key an older run.yaml lacks has nothing to compare with."""
    for key, value in given.items():
        if key in before and meaning(key, value) != meaning(key, before[key]):
            raise ValueError(f"resuming {run_dir}: {key}={value} differs from the run's {key}={before[key]}, whose "
                             f"checkpoints hold that model's weights; leave {key} out, or start a new run in another "
                             "--out")  # fmt: skip
