"""The metric log and experiment trackers: where a run's curves and pictures go.

RUN_DIR/metrics.jsonl is always written. The tracker `train.logger` names (`none`, `tensorboard`, `wandb`) gets the
same rows under split-prefixed names (`train/loss`, `val/psnr`) at the same steps, and the pictures a task writes
after each evaluation (`TrainTask.pictures`). Rank 0 alone holds one. TensorBoard and W&B are optional packages (the
`tracking` extra): a missing one is a `TrackerUnavailable` before training. A tracker keeps its files inside the run
directory and continues the run's curves when the run is resumed from a checkpoint.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from vqar.parallel import Parallel, PeerFailed
from vqar.train.config import TrainConfig
from vqar.train.errors import TrackerUnavailable
from vqar.utils.io import atomic_write_text, created_folders_removed_on_failure

log = logging.getLogger("vqar.train")

EXTRA = "pip install 'vqar[tracking]'"
# The modules each tracker imports, checked before training.
_MODULES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb",)}


def append_metrics(run_dir: Path, step: int, split: str, metrics: dict[str, float]) -> None:
    """One row of RUN_DIR/metrics.jsonl: `{"step": .., "split": .., **metrics}`."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")


def logged_metrics(run_dir: Path, step: int, split: str) -> dict[str, float] | None:
    """The metrics of the last row logged for (`step`, `split`) in RUN_DIR/metrics.jsonl, if there is one."""
    path = Path(run_dir) / "metrics.jsonl"
    found = None
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("step") == step and row.get("split") == split:
                found = {k: v for k, v in row.items() if k not in ("step", "split")}
    return found


def forget_metrics_after(run_dir: Path, step: int) -> None:
    """Drops the metric rows a run logged after the checkpoint it resumes from: they are logged again, and
    metrics.jsonl then holds one row per (step, split). A last row cut short (a kill or a full disk while it was
    appended: no newline ends it) goes too, so the next row starts on a line of its own; any other line that is no
    metric row is kept as it is."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n") and _row_step(lines[-1]) is None:
        log.warning("%s: dropped its last row, which was cut short while it was written (%r)", path, lines[-1][:60])
        lines.pop()
    kept = [line for line in lines if line.strip() and (_row_step(line) or 0) <= step]
    if len(kept) != len(lines) or (text and not text.endswith("\n")):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _row_step(line: str) -> int | None:
    """The step of a metrics.jsonl row; None for a line that is no row (damaged, or written by someone else)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    found = row.get("step") if isinstance(row, dict) else None
    return found if isinstance(found, int) else None


def require_tracker(logger: str) -> None:
    """Fails with one clear error when the package of tracker `logger` cannot be imported (cheap: run it before
    anything slow)."""
    for module in _MODULES.get(logger, ()):
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise TrackerUnavailable(
                f"train.logger={logger} needs the {_MODULES[logger][0]} package ({EXTRA}); importing {module} "
                f"failed: {err}"
            ) from None


class Tracker:
    """The common interface, and the tracker of `train.logger=none` (and of every rank but 0): it logs nothing.

    Subclasses implement `_scalars`, `_pictures` and `_close`; the public methods prefix names with the split and
    turn every call after `close` into a no-op (a closed tracker may still be held by a Trainer)."""

    def __init__(self) -> None:
        self.closed = False

    def log_metrics(self, split: str, metrics: dict[str, float], step: int) -> None:
        """One metric-log row: `metrics` of `split` ("train", "val") at `step`, as `split/name`."""
        if not self.closed and metrics:
            self._scalars({f"{split}/{name}": float(value) for name, value in metrics.items()}, step)

    def log_pictures(self, run_dir: Path, names: Iterable[str], step: int) -> None:
        """The picture files `names` in `run_dir` (those that exist) at `step`, each under its file's stem."""
        paths = {Path(name).stem: Path(run_dir) / name for name in names}
        paths = {tag: path for tag, path in paths.items() if path.is_file()}
        if not self.closed and paths:
            self._pictures(paths, step)

    def close(self, failed: bool = False) -> None:
        """Writes out what is buffered and ends the tracker's run (`failed`: the training stopped on an error or a
        signal; a tracker error then is only a warning, so it does not hide the first). Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            self._close(failed)
        except Exception as err:
            if not failed:
                raise
            log.warning("closing the %s tracker failed too: %s", type(self).__name__, err)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def _pictures(self, paths: dict[str, Path], step: int) -> None:
        pass

    def _close(self, failed: bool) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files in RUN_DIR/tensorboard; a resumed run adds a file of its own to the same folder."""

    def __init__(self, run_dir: Path, step: int):
        super().__init__()
        from torch.utils.tensorboard import SummaryWriter

        # The rows of the checkpoint's own step were logged before it was written and are not logged again; those
        # after it (written by the interrupted run, then again by this one) are: TensorBoard drops the first run's
        # events from the purge step on, so every step shows once.
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=step + 1)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def _pictures(self, paths: dict[str, Path], step: int) -> None:
        for tag, path in paths.items():
            with Image.open(path) as picture:
                self.writer.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()  # once per evaluation: the curves so far show up without waiting for the timer

    def _close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run with its files in RUN_DIR/wandb, named after the run directory, with run.yaml as its config.

    The W&B run id is kept in RUN_DIR/wandb/run_id.txt; a run resumed from a checkpoint resumes that W&B run
    (`resume="allow"`). W&B cannot go back in time: rows of steps it already holds (logged after the checkpoint by
    the interrupted run) are not sent again. Offline (WANDB_MODE=offline) each start is a directory of its own
    under the same id; `wandb sync --id ID RUN_DIR/wandb/offline-run-*` uploads them in order into one run."""

    def __init__(self, run_dir: Path, step: int, project: str, run_yaml: str):
        super().__init__()
        import wandb

        run_dir = Path(run_dir).resolve()
        id_file = run_dir / "wandb" / "run_id.txt"
        # A run starting at step 0 has no curve to continue (a resume without a checkpoint logs its steps again,
        # which W&B could not take in the old run): it gets a new W&B run.
        run_id = id_file.read_text().strip() if step > 0 and id_file.is_file() else None
        with created_folders_removed_on_failure(id_file.parent):  # a run that never started leaves no wandb/
            id_file.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.run = wandb.init(
                    project=project,
                    name=run_dir.name,
                    id=run_id,
                    resume="allow",
                    dir=str(run_dir),
                    config=OmegaConf.to_container(OmegaConf.create(run_yaml)) if run_yaml else None,
                )
            except Exception as err:  # not logged in, no network, a bad project name: say so before training
                reason = " ".join(str(err).split())  # W&B's messages span lines; the CLI prints one
                raise TrackerUnavailable(f"W&B could not start a run ({type(err).__name__}: {reason}); run `wandb "
                                         "login` or set WANDB_MODE=offline") from err  # fmt: skip
        atomic_write_text(id_file, self.run.id + "\n")
        self.first_step = self.run.step  # past 0 when W&B resumed a run that holds later steps than the checkpoint
        if self.first_step > step + 1:
            log.info("W&B holds steps up to %d of this run: rows before then are not sent again", self.first_step - 1)

    def _log(self, values: dict, step: int) -> None:
        if step >= self.first_step:
            self.run.log(values, step=step)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        self._log(values, step)

    def _pictures(self, paths: dict[str, Path], step: int) -> None:
        import wandb

        self._log({tag: wandb.Image(str(path)) for tag, path in paths.items()}, step)

    def _close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def open_tracker(
    cfg: TrainConfig, run_dir: Path, step: int, run_yaml: str = "", par: Parallel | None = None
) -> Tracker:
    """Rank 0's tracker of `cfg.logger` for a run that starts (or resumes) at `step`; the other ranks get the no-op
    `Tracker`. `run_yaml` is the run's configuration, which W&B shows beside the curves. A collective: when rank 0
    cannot start its tracker, every rank raises `TrackerUnavailable`, so none starts training."""
    par = par or Parallel()
    tracker, problem = Tracker(), None
    if par.is_main:
        try:
            tracker = _start(cfg, run_dir, step, run_yaml)
        except TrackerUnavailable as err:
            problem = err
    if par.any(problem is not None):
        raise problem or PeerFailed(f"rank 0 could not start the train.logger={cfg.logger} tracker")
    return tracker


def _start(cfg: TrainConfig, run_dir: Path, step: int, run_yaml: str) -> Tracker:
    require_tracker(cfg.logger)
    if cfg.logger == "tensorboard":
        return TensorBoardTracker(run_dir, step)
    if cfg.logger == "wandb":
        return WandbTracker(run_dir, step, cfg.wandb_project, run_yaml)
    return Tracker()
