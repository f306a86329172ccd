"""The training loop both stages share.

A stage supplies a `TrainTask` (`vqar.train.task`: its modules, optimizers, one training step, evaluation,
artifacts, export); the `Trainer` owns everything else: the step-based schedule, the data order, progress bar and
metric log, periodic evaluation, checkpoints and exact resume. The data order is a pure function of (seed, epoch),
so the position in the data is recovered from the step count alone.

Under torchrun the same loop runs on every rank with a `Parallel` (see `vqar.parallel`): `data.batch_size` is the
global batch, each rank loads its share of it, metrics are averaged over ranks, and rank 0 alone writes the metric
log, checkpoints, pictures and exports, and holds the experiment tracker (`train.logger`, see `train.tracking`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import sys
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vqar.bundle import trained_steps
from vqar.data import BadFileReport, evaluation_loader, training_loader
from vqar.parallel import Parallel, PeerFailed
from vqar.train.checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    read_best,
    resume_weights,
    save_checkpoint,
)
from vqar.train.config import TrainConfig
from vqar.train.errors import NonFiniteLossError, TrackerUnavailable, TrainingInterrupted
from vqar.train.optim import follow_configured_lr
from vqar.train.resources import check_writable, mib, module_bytes, optimizer_bytes, out_of_space
from vqar.train.task import LoaderSettings, TrainTask, warmup_cosine
from vqar.train.tracking import (
    Tracker,
    append_metrics,
    forget_metrics_after,
    logged_metrics,
    open_tracker,
    require_tracker,
)
from vqar.utils.io import atomic_write_text
from vqar.utils.memory import check_memory

log = logging.getLogger("vqar.train")


def _nonfinite(weights: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """The names (module.tensor) of the floating-point tensors holding a NaN or an infinity."""
    return [f"{module}.{name}" for module, tensors in weights.items() for name, tensor in tensors.items()
            if tensor.is_floating_point() and not tensor.isfinite().all()]  # fmt: skip


class _LogWindow:
    """The training steps since the last metric log: their metrics, how many were skipped, and their time. A row
    gives the means over its window, except for `AT_STEP`: a mean learning rate is no rate any step used (the
    warmup's mean lags the row's step), and it would read as the schedule being off."""

    AT_STEP = ("lr",)

    def __init__(self) -> None:
        self._restart()

    def _restart(self) -> None:
        self.metrics: dict[str, list[float]] = defaultdict(list)
        self.at_step: dict[str, float] = {}
        self.steps = self.skipped = 0
        self.start = time.perf_counter()

    def add(self, metrics: dict[str, float], skipped: bool) -> None:
        self.steps += 1
        self.skipped += int(skipped)
        for key, value in metrics.items():
            if key in self.AT_STEP:
                self.at_step[key] = value
            else:
                self.metrics[key].append(value)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpoints) is not training time: throughput leaves it out."""
        paused = time.perf_counter()
        yield
        self.start += time.perf_counter() - paused

    def flush(self, par: Parallel, batch_size: int) -> dict[str, float]:
        """The window's metric means over all ranks (a collective), skipped steps and global throughput in samples
        per second; a new window starts."""
        means = par.mean({k: sum(v) / len(v) for k, v in self.metrics.items()})
        means.update(self.at_step)  # the schedule is the same on every rank
        if self.skipped:
            means["skipped_steps"] = self.skipped
        means["samples_per_s"] = self.steps * batch_size / (time.perf_counter() - self.start)
        self._restart()
        return means


class Trainer:
    def __init__(
        self,
        task: TrainTask,
        train_set: Dataset,
        val_set: Dataset,
        data: LoaderSettings,
        cfg: TrainConfig,
        run_dir: Path,
        run_yaml: str,
        par: Parallel | None = None,
    ):
        self.task, self.train_set, self.val_set = task, train_set, val_set
        self.data, self.cfg = data, cfg
        self.run_dir, self.run_yaml = Path(run_dir), run_yaml
        self.par = par or Parallel()
        self.local_batch = self.par.local_batch(data.batch_size)
        self.local_eval_batch = max(1, data.eval_batch_size // self.par.world_size)
        self.batches_per_epoch = len(train_set) // data.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training split has {len(train_set)} images, fewer than one batch of {data.batch_size}; "
                "lower data.batch_size or add images"
            )
        if len(val_set) == 0:  # found now, not at the first evaluation after training
            raise ValueError(
                "the validation split is empty (too few images to hold any out), and evaluation scores the run: raise "
                "data.val_fraction or add images"
            )

        # A plain function, not a callable object: LambdaLR then saves only the step count, and a resumed run
        # whose train.steps was raised follows the schedule of its new configuration.
        def factor(step: int) -> float:
            own = task.lr_factor(step)
            return own if own is not None else warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)

        self.schedulers = {
            name: torch.optim.lr_scheduler.LambdaLR(opt, factor) for name, opt in task.optimizers().items()
        }
        self.bad_files = BadFileReport()
        self.step = 0
        self.nonfinite_in_a_row = self.nonfinite_total = 0
        self.stop_signal: int | None = None
        self.tracker = Tracker()  # rank 0's `train.logger` while `fit` runs (opened once the start step is known)

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> Path | None:
        """Writes a checkpoint of every rank's state (a collective: all ranks call it); rank 0 writes the files."""
        par, modules = self.par, self.task.modules()
        weights = {name: par.full_state_dict(module) for name, module in modules.items()}
        # A step can leave the weights NaN with a finite loss and gradient (an update too large): such a checkpoint
        # would take the place of the last good one, and resuming from it would train on nothing.
        diverged = _nonfinite(weights) if par.is_main else []
        if par.any(bool(diverged)):
            if not diverged:
                raise PeerFailed(f"rank 0 found the weights of step {self.step} NaN or infinite")
            raise NonFiniteLossError(f"the weights became NaN or infinite by step {self.step} ({len(diverged)} "
                                     f"tensors, the first: {diverged[0]}), so that step's checkpoint is not written. "
                                     f"{self._how_to_go_on()}")  # fmt: skip
        optimizers = {k: par.optimizer_state(modules[k], o) for k, o in self.task.optimizers().items()}
        rank_state = {"rng": {"torch": torch.get_rng_state()}, "task": self.task.state_dict()}
        if torch.cuda.is_available():
            rank_state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        per_rank = par.gather(rank_state)
        path, error = None, None
        if par.is_main:
            state = {
                "step": self.step,
                "world_size": par.world_size,
                "optimizers": optimizers,
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "ranks": per_rank,
            }
            try:
                path = save_checkpoint(
                    self.run_dir, self.step, weights, state, self.run_yaml, self.cfg.keep_checkpoints
                )
                self._export(weights)
            except Exception as err:  # a full disk, a vanished mount: what was being written is removed
                error = self._write_failure(err)
        if par.any(error is not None):
            raise OSError(error) if error else PeerFailed(f"rank 0 failed to write the checkpoint of step {self.step}")
        return path

    def _write_failure(self, err: Exception) -> str:
        """The one-line reason a checkpoint or export write failed; errors other than OSErrors and a full disk
        (safetensors reports that as its own error type) are raised as they are."""
        if out_of_space(err):
            free = shutil.disk_usage(self.run_dir).free
            return (
                f"out of disk space writing step {self.step} in {self.run_dir} ({mib(free)} free; a checkpoint and "
                f"the export need about {mib(self.checkpoint_bytes() + self.export_bytes())}): nothing half-written "
                "is left; free some space and continue with --resume"
            )
        if isinstance(err, OSError):
            return (
                f"writing the checkpoint of step {self.step} in {self.run_dir / 'checkpoints'} failed ({err}); the "
                "previous checkpoint is intact"
            )
        raise err

    def export_if_behind(self) -> None:
        """Exports the model again where the export is older than the restored step (a collective): a run whose
        last checkpoint was written but whose export failed (a full disk) gets it when resumed, finished or not."""
        exported = trained_steps(self.run_dir) if self.par.is_main else None
        if not self.par.any(self.par.is_main and (exported is None or exported < self.step)):
            return
        weights = {name: self.par.full_state_dict(module) for name, module in self.task.modules().items()}
        error = None
        if self.par.is_main:
            try:
                self._export(weights)
            except Exception as err:
                error = self._write_failure(err)
        if self.par.any(error is not None):
            raise OSError(error) if error else PeerFailed(f"rank 0 failed to export the model of step {self.step}")

    def _export(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """The run's model, unless the run directory already holds one of a later step (a run resumed from an
        older checkpoint): an export never goes back in time."""
        exported = trained_steps(self.run_dir)
        if exported is not None and exported > self.step:
            log.warning("%s holds the model exported at step %d, later than this run's step %d: it is kept until "
                        "the run passes it", self.run_dir, exported, self.step)  # fmt: skip
            return
        self.task.export(self.run_dir, weights, self.step)

    def restore(self) -> bool:
        """Loads the newest intact checkpoint of the run; False when there is none."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        par, modules = self.par, self.task.modules()
        for name, module in modules.items():
            weights = resume_weights(ckpt.path, name)
            if weights is not None:
                par.load_full_state_dict(module, load_weights(weights, module))
        state = load_trainer_state(ckpt)
        optimizers = self.task.optimizers()
        configured = {name: [group["initial_lr"] for group in opt.param_groups] for name, opt in optimizers.items()}
        for name, opt in optimizers.items():
            if name in state["optimizers"]:  # else a module the run gained on this resume: its optimizer starts anew
                par.load_optimizer_state(modules[name], opt, state["optimizers"][name])
        for name, sched in self.schedulers.items():  # a module's new optimizer joins the schedule at this step
            sched.load_state_dict(state["schedulers"].get(name, state["schedulers"]["model"]))
            follow_configured_lr(sched, configured[name])
        ranks = state.get("ranks") or [{"rng": state["rng"], "task": state.get("task", {})}]  # older layout
        if len(ranks) == par.world_size:
            mine = ranks[par.rank]
            torch.set_rng_state(mine["rng"]["torch"])
            if "cuda" in mine["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(mine["rng"]["cuda"])
            self.task.load_state_dict(mine.get("task", {}))
        else:  # resumed on another number of processes: the weights are exact, the random streams start afresh
            if par.is_main:  # on every rank: one says so
                log.warning("the checkpoint was written by %d process%s and is resumed by %d: random streams are "
                            "reseeded", len(ranks), "es" * (len(ranks) != 1), par.world_size)  # fmt: skip
            torch.manual_seed(self.cfg.seed + 1000 * state["step"] + par.rank)
        self.step = state["step"]
        if par.is_main:
            forget_metrics_after(self.run_dir, self.step)
        log.info("resumed from %s (step %d)", ckpt.path, self.step)
        return True

    # ---------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> dict[str, float]:
        """Trains to `train.steps`. SIGINT / SIGTERM (Ctrl-C, a scheduler's preemption) finish the current step,
        write a checkpoint and raise `TrainingInterrupted`."""
        problem = None
        if self.par.is_main:
            try:
                check_writable(self.run_dir, self.checkpoint_bytes() + self.export_bytes())
                require_tracker(self.cfg.logger)
            except (OSError, TrackerUnavailable) as err:
                problem = err
        if self.par.any(problem is not None):
            raise problem or PeerFailed("rank 0 cannot write to the run directory or lacks the train.logger package")
        try:
            self.check_memory()
        except ValueError as err:
            problem = err
        if self.par.any(problem is not None):
            raise problem or PeerFailed("another process of the run has too little memory to train; see its error")
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        # Subnormal floats (activations of near-black images drift there) slow CPU kernels several-fold; flushing
        # them to zero changes nothing measurable in training. It is the CPU's setting for the whole process, Python's
        # own floats included (1e-310 read as 0.0 after a run in a notebook), so it is put back afterwards.
        flushed_before = sys.float_info.min / 2 == 0.0
        torch.set_flush_denormal(True)
        failed = True
        try:
            result = self._fit(resume)
            failed = False
            return result
        finally:
            torch.set_flush_denormal(flushed_before)
            self.tracker.close(failed)  # also on errors and signals: the tracker's files end cleanly
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C: stop at once (the previous checkpoint is intact)
            raise KeyboardInterrupt
        self.stop_signal = signum

    def check_memory(self) -> None:
        """On the CPU, refuses a model whose gradients and optimizer state cannot fit in the memory left once it is
        built: the first step would allocate them, and the kernel's OOM killer would end the run without a word.
        (A GPU says when it runs out; activations come on top, so this is the least training needs.)"""
        if self.par.device.type != "cpu":
            return
        params = [p for m in self.task.modules().values() for p in m.parameters() if p.requires_grad]
        grads = sum(p.numel() * p.element_size() for p in params if p.grad is None)
        count = sum(p.numel() for p in params)
        need = grads + sum(optimizer_bytes(o) for o in self.task.optimizers().values() if not o.state)
        check_memory(need, f"training these {count / 1e6:.1f}M parameters on the CPU (gradients and optimizer "
                     "state, before activations)", "choose a smaller model (size=, model.*) or train on a GPU "
                     "(train.device=cuda)")  # fmt: skip

    def checkpoint_bytes(self) -> int:
        """One checkpoint: the weights and buffers of every module (the EMA and the discriminator too), the
        optimizers' state, and a margin for the trainer state and the manifest. (Sharded by FSDP, each rank holds
        1/W of a parameter, but its size counts the whole: the ranks' files add up to these bytes.)"""
        weights = sum(module_bytes(m) for m in self.task.modules().values())
        states = sum(optimizer_bytes(o) for o in self.task.optimizers().values())
        return weights + states + (1 << 20)

    def export_bytes(self) -> int:
        """The exported model (and its companions)."""
        return self.task.export_bytes()

    def _fit(self, resume: bool) -> dict[str, float]:
        cfg, par = self.cfg, self.par
        if resume and not self.restore():  # raises, changing nothing, when every checkpoint is damaged
            log.info("no checkpoint to resume from in %s; starting at step 0", self.run_dir)
        elif resume:
            self.export_if_behind()
        trains = self.step < cfg.steps
        # First: a tracker that cannot start (W&B without a login) ends the run before run.yaml says it trained
        # with these settings, or a new run's folder holds a run.yaml that makes the same command refuse it
        self.tracker = open_tracker(cfg, self.run_dir, self.step, self.run_yaml, par)  # at the resumed step
        # A resume that trains nothing leaves run.yaml the record of what trained: its settings (a lower steps=,
        # another npp.rate) never ran, and later resumes check against the record.
        if par.is_main and (trains or not resume):
            atomic_write_text(self.run_dir / "run.yaml", self.run_yaml)
        if not trains:
            log.info("the run already reached train.steps=%d: nothing is left to train (a higher train.steps trains "
                     "further)", cfg.steps)  # fmt: skip
            return self._final_metrics()
        window = _LogWindow()
        last_eval: dict[str, float] = {}
        bar = self._progress_bar()
        try:
            while self.step < cfg.steps:
                for batch in self._epoch_batches():
                    metrics = self._train_step(batch)
                    self.step += 1
                    bar.update(1)
                    self._record(metrics, window)
                    stopping = par.any(self.stop_signal is not None)
                    # A stopped run resumes after this step, so the steps since the last row are logged now or never.
                    if stopping or self._due(cfg.log_every):
                        means = window.flush(par, self.data.batch_size)
                        bar.set_postfix(_short(means, self.task.progress_metrics), refresh=False)
                        self._log("train", means)
                    if stopping:
                        self._stop_on_signal()
                    with window.paused():
                        if self._due(cfg.eval_every):
                            last_eval = self.evaluate()
                        if self._due(cfg.ckpt_every):
                            self.save()
                    if self.step >= cfg.steps:
                        break
        finally:
            bar.close()
            summary = self.bad_files.summary()
            if summary:
                log.warning(summary)
        return last_eval

    def _progress_bar(self) -> tqdm:
        """Rank 0's progress bar (the other ranks' is disabled): redrawn twice a second on a terminal, every 30 s
        into a log file."""
        interactive = sys.stderr.isatty()
        return tqdm(
            total=self.cfg.steps,
            initial=self.step,
            desc="train",
            dynamic_ncols=True,
            mininterval=0.5 if interactive else 30.0,
            # False, not tqdm's default None, keeps the bar in a job's log, where stderr is no terminal.
            disable=(None if interactive else False) if self.par.is_main else True,
        )

    def _epoch_batches(self) -> Iterator:
        """The current epoch's batches from the position the step count has reached (hence an exact resume)."""
        epoch, position = divmod(self.step, self.batches_per_epoch)
        loader = training_loader(
            self.train_set,
            epoch=epoch,
            start=position,
            batches=self.batches_per_epoch,
            batch_size=self.local_batch,
            seed=self.cfg.seed,
            rank=self.par.rank,
            world_size=self.par.world_size,
            num_workers=self.data.num_workers,
            collate_fn=self.task.collate,
        )
        for batch in loader:
            if self.step // self.batches_per_epoch != epoch:
                break  # padding for the ranks can leave one more local batch than the global epoch has
            yield batch

    def _record(self, metrics: dict[str, float], window: _LogWindow) -> None:
        """Counts a skipped step (stopping after too many in a row) and adds the step to the log window."""
        skipped = bool(metrics.pop("skipped", 0.0))
        if skipped:
            self._count_nonfinite()
        else:
            self.nonfinite_in_a_row = 0
        window.add(metrics, skipped)

    def _due(self, every: int) -> bool:
        """Whether a periodic action (log, evaluation, checkpoint) falls on this step; all fall on the last one."""
        return self.step % every == 0 or self.step == self.cfg.steps

    def _train_step(self, batch) -> dict[str, float]:
        self.bad_files.add(getattr(batch, "bad", ()))
        if self.par.any(len(batch) == 0):  # every file of a batch unreadable: all ranks skip it together
            return {}
        # The learning rate this step uses (the schedulers move on to the next step's below).
        lr = next(iter(self.schedulers.values())).get_last_lr()[0] if self.schedulers else 0.0
        metrics = self.task.train_step(batch, self.step)
        with warnings.catch_warnings():
            # A discriminator waiting for `disc_start` has not stepped yet; its schedule still advances.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            for sched in self.schedulers.values():
                sched.step()
        if not metrics.get("skipped") and not math.isfinite(metrics.get("loss", 0.0)):
            metrics["skipped"] = 1.0  # a task that does not guard its own step: count it all the same
        metrics["lr"] = lr  # a skipped step still has its place in the schedule: a row at it logs its rate
        return metrics

    def _count_nonfinite(self) -> None:
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", self.step,
                    self.nonfinite_in_a_row)  # fmt: skip
        if self.nonfinite_in_a_row > self.cfg.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} training steps in a row had a NaN or infinite loss or gradient (up to "
                f"step {self.step}); stopping. {self._how_to_go_on()}"
            )

    def _how_to_go_on(self) -> str:
        """After the run diverged: which checkpoint to resume from (every one written has finite weights), if any."""
        advice = "a lower train.lr, train.precision=fp32, or check the data"
        try:
            newest = latest_checkpoint(self.run_dir)
        except ValueError:  # every checkpoint damaged: said when resuming
            newest = None
        if newest is None:
            return f"The run has no checkpoint to go back to: start it again (--overwrite) with {advice}"
        return f"Its newest checkpoint, {newest.path} (step {newest.step}), is intact: --resume with {advice}"

    def _stop_on_signal(self) -> None:
        received = signal.Signals(self.stop_signal or signal.SIGTERM)  # another rank may have got it
        name = received.name
        if self.par.is_main:  # every rank stops at this step, and rank 0 writes the checkpoint: one voice says so
            log.warning("%s received: writing a checkpoint at step %d and stopping", name, self.step)
        self.save()
        stopped = f"stopped by {name} at step {self.step}"
        raise TrainingInterrupted(f"{stopped}; resume with --resume", int(received), stopped)

    def _final_metrics(self) -> dict[str, float]:
        """The validation result of a run resumed at its last step: the one it logged then (rank 0 reads it and
        tells the others), or, where none was logged, a new evaluation (which logs it). A finished run resumed
        again adds no row to metrics.jsonl."""
        logged = self.par.gather(logged_metrics(self.run_dir, self.step, "val") if self.par.is_main else None)[0]
        return self.evaluate() if logged is None else logged

    def evaluate(self) -> dict[str, float]:
        par = self.par
        # Every rank scores its share (padded to equal length, so under FSDP all ranks run the same forwards);
        # the tasks sum their statistics over ranks, each over its `counted` own items of a batch.
        loader = evaluation_loader(
            self.val_set,
            batch_size=self.local_eval_batch,
            rank=par.rank,
            world_size=par.world_size,
            num_workers=self.data.num_workers,
            collate_fn=self.task.collate,
        )

        def batches() -> Iterable:
            for batch, counted in loader:
                self.bad_files.add(getattr(batch, "bad", ()))
                if len(batch):
                    yield batch, counted

        metrics = self.task.evaluate(batches())
        if par.is_main:
            self._track_best(metrics)
            self._log("val", metrics)
            log.info("step %d validation: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if par.is_main or par.sharded:  # sharded weights: every rank takes part in sampling the pictures
            self.task.write_artifacts(self.run_dir, self.step)
        if par.is_main:
            self.tracker.log_pictures(self.run_dir, self.task.pictures, self.step)
        return metrics

    def _track_best(self, metrics: dict[str, float]) -> None:
        """Remembers the step of the best validation result; its checkpoint is never pruned."""
        if self.task.best_metric is None or self.task.best_metric[0] not in metrics:
            return
        name, mode = self.task.best_metric
        value = metrics[name]
        path = self.run_dir / "checkpoints" / "best.json"
        best = read_best(self.run_dir)
        if best is None or (value > best["value"] if mode == "max" else value < best["value"]):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"step": self.step, "metric": name, "value": value}))

    def _log(self, split: str, metrics: dict[str, float]) -> None:
        """One row of the metric log (rank 0): metrics.jsonl and the tracker."""
        if self.par.is_main:
            append_metrics(self.run_dir, self.step, split, metrics)
            self.tracker.log_metrics(split, metrics, self.step)


def _short(metrics: dict[str, float], names: Iterable[str]) -> dict[str, str]:
    return {k: f"{metrics[k]:.4g}" for k in names if k in metrics}
