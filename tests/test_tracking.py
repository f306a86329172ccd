"""Experiment tracking (`train.logger`): TensorBoard and W&B get the rows of metrics.jsonl at the same steps and the
pictures of each evaluation, continue their curves when a run is resumed, are closed however training ends, and a
missing package is one clear error before training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import TINY_AR, TINY_RUN, overridden, torchrun
from vqar.cli import main
from vqar.configs import ConfigError
from vqar.parallel import Parallel
from vqar.train import tracking
from vqar.train.errors import TrackerUnavailable, TrainingInterrupted
from vqar.train.tokenizer import TokenizerTask, load_run_config, train_tokenizer

# Eight steps on 200 digits: rows at steps 2, 4, 6, 8, evaluations and checkpoints at 4 and 8.
RUN = overridden(TINY_RUN, "data.max_images=200", "train.log_every=2", "train.eval_every=4", "train.ckpt_every=4",
                 "steps=8")


def _train(run_dir, logger: str, resume: bool = False):
    return train_tokenizer(load_run_config("rqvae-mnist", [*RUN, f"train.logger={logger}"]), run_dir, resume=resume)


def _lose_the_last_checkpoint(run_dir) -> None:
    """As if the process died after logging step 8 but before writing its checkpoint: a resume starts from step 4
    and logs steps 5-8 a second time."""
    shutil.rmtree(run_dir / "checkpoints" / "step-0000008")


def _scalar_rows(run_dir) -> dict[tuple[str, int], float]:
    """metrics.jsonl as {(split/name, step): value}."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(f"{r['split']}/{k}", r["step"]): v for r in rows for k, v in r.items() if k not in ("step", "split")}


# ---------------------------------------------------------------------------------------------------- TensorBoard
def _tensorboard(run_dir):
    pytest.importorskip("tensorboard", reason="train.logger=tensorboard needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    return events.Reload()


def test_tensorboard_logs_the_metric_log_and_the_pictures(tmp_path):
    pytest.importorskip("tensorboard", reason="train.logger=tensorboard needs the tensorboard package")
    run_dir = tmp_path / "run"
    _train(run_dir, "tensorboard")
    events = _tensorboard(run_dir)
    logged = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    expected = _scalar_rows(run_dir)
    assert {"train/loss", "train/lr", "val/psnr", "val/usage"} <= {tag for tag, _ in expected}
    assert logged.keys() == expected.keys()
    assert all(logged[key] == pytest.approx(value, rel=1e-6) for key, value in expected.items())
    assert events.Tags()["images"] == ["recon_grid"]
    pictures = events.Images("recon_grid")
    assert [p.step for p in pictures] == [4, 8]
    with Image.open(run_dir / "recon_grid.png") as grid:
        assert (pictures[-1].width, pictures[-1].height) == grid.size


def test_ar_training_logs_its_sample_grid_to_tensorboard(tmp_path, tiny_pipeline):
    pytest.importorskip("tensorboard", reason="train.logger=tensorboard needs the tensorboard package")
    from vqar.train.ar import train_ar
    from vqar.train.ar_config import load_run_config as ar_config

    run_dir = tmp_path / "ar"
    overrides = [f"codes={tiny_pipeline / 'codes'}", *overridden(TINY_AR, "steps=4", "train.log_every=2",
                                                                 "train.eval_every=2")]  # fmt: skip
    train_ar(ar_config("rq-mnist", [*overrides, "train.logger=tensorboard"]), run_dir)
    events = _tensorboard(run_dir)
    logged = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    expected = _scalar_rows(run_dir)
    assert {("train/loss", 2), ("val/nll", 4)} <= expected.keys()
    assert logged == pytest.approx(expected, rel=1e-6)
    assert events.Tags()["images"] == ["samples_grid"]
    assert [p.step for p in events.Images("samples_grid")] == [2, 4]


def test_a_resumed_run_continues_the_tensorboard_curves(tmp_path):
    pytest.importorskip("tensorboard", reason="train.logger=tensorboard needs the tensorboard package")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    run_dir = tmp_path / "run"
    _train(run_dir, "tensorboard")
    _lose_the_last_checkpoint(run_dir)
    _train(run_dir, "tensorboard", resume=True)
    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    # The resumed run's file starts with a purge marker at step 5: TensorBoard drops the first run's steps 5-8.
    starts = [e.step for e in EventFileLoader(str(files[1])).Load() if e.HasField("session_log")]
    assert starts == [5]
    events = _tensorboard(run_dir)
    expected = _scalar_rows(run_dir)
    for tag in ("train/loss", "val/psnr"):
        steps = [e.step for e in events.Scalars(tag)]
        assert steps == sorted({step for name, step in expected if name == tag}), tag  # each step once
    logged = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert logged == pytest.approx(expected, rel=1e-6)
    assert [p.step for p in events.Images("recon_grid")] == [4, 8]


# ---------------------------------------------------------------------------------------------------- W&B
@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """W&B offline, with its settings and caches in the test's folder: nothing goes online or into $HOME."""
    pytest.importorskip("wandb", reason="train.logger=wandb needs the wandb package")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _read_records(path) -> list:
    """The records of an offline run's transaction log (`run-ID.wandb`: a header, then LevelDB-style log blocks of
    32 KiB holding protobuf `Record`s, split into full / first / middle / last chunks). The wandb package has no
    reader of its own for these files any more (its Go core writes and reads them), hence this one. A record cut
    short at the end of the file (still being written) is left out."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7  # the 7-byte header ":W&B", magic 0xBEE1, version
    assert data[:4] == b":W&B"
    records, chunk = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0:  # zero padding to the end of the block
            pos += left - 7
            continue
        if pos + length > len(data):
            break
        chunk += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _wandb_records(path, timeout: float = 60.0) -> list:
    """The whole transaction log of a finished run. W&B's core process writes out the end of the log (up to the
    exit record) a moment after `finish` returns, later still on a busy machine: wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        records = _read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _wandb_history(records) -> dict[int, dict]:
    """{step: {key: value}} of the history records (rows logged at one step are one record)."""
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = history.setdefault(record.history.step.num, {})
            for item in record.history.item:  # an image is a dict of fields (nested keys)
                *outer, key = [item.key] if item.key else item.nested_key
                target = row
                for name in outer:
                    target = target.setdefault(name, {})
                target[key] = json.loads(item.value_json)
    return history


def _offline_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_wandb_offline_logs_the_metric_log_and_the_pictures(tmp_path, offline_wandb):
    run_dir = tmp_path / "my-run"
    _train(run_dir, "wandb")
    [offline] = _offline_runs(run_dir)
    run_id = (run_dir / "wandb" / "run_id.txt").read_text().strip()
    assert offline.name.endswith(f"-{run_id}")
    records = _wandb_records(offline / f"run-{run_id}.wandb")
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.project, run.display_name) == (run_id, "vqar", "my-run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["logger"] == "wandb" and config["train"]["steps"] == 8  # run.yaml
    history = _wandb_history(records)
    expected = _scalar_rows(run_dir)
    assert sorted(history) == sorted({step for _, step in expected})
    assert all(history[step][name] == pytest.approx(value, rel=1e-6) for (name, step), value in expected.items())
    assert [step for step, row in history.items() if "recon_grid" in row] == [4, 8]
    assert history[8]["recon_grid"]["_type"] == "image-file"
    assert len(list((offline / "files" / "media" / "images").glob("recon_grid_*.png"))) == 2
    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
    assert summary["val/psnr"] == pytest.approx(expected["val/psnr", 8], rel=1e-6)
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)  # finished


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    _train(run_dir, "wandb")
    run_id = (run_dir / "wandb" / "run_id.txt").read_text().strip()
    _lose_the_last_checkpoint(run_dir)
    _train(run_dir, "wandb", resume=True)
    assert (run_dir / "wandb" / "run_id.txt").read_text().strip() == run_id
    first, resumed = _offline_runs(run_dir)  # offline, each start is a directory of its own; `wandb sync` joins them
    assert resumed.name.endswith(f"-{run_id}")
    records = _wandb_records(resumed / f"run-{run_id}.wandb")
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == run_id
    assert sorted(_wandb_history(records)) == [6, 8]  # it continues after the checkpoint of step 4


def test_a_run_started_afresh_gets_a_new_wandb_run(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    _train(run_dir, "wandb")
    old_id = (run_dir / "wandb" / "run_id.txt").read_text()
    [old] = _offline_runs(run_dir)
    _wandb_records(old / f"run-{old_id.strip()}.wandb")  # the old run's log is complete before it is removed
    train_tokenizer(load_run_config("rqvae-mnist", [*RUN, "train.logger=wandb"]), run_dir, overwrite=True)
    assert (run_dir / "wandb" / "run_id.txt").read_text() != old_id
    assert len(_offline_runs(run_dir)) == 1  # --overwrite replaced the old run's tracker files too


def test_a_resumed_online_wandb_run_skips_the_steps_wandb_already_holds(tmp_path, monkeypatch):
    """Online (a stand-in for the server here): the stored run id is resumed, and the rows the interrupted run
    already sent after the checkpoint are not sent again, since W&B refuses steps below its own."""
    wandb = pytest.importorskip("wandb", reason="train.logger=wandb needs the wandb package")
    got = {}

    class Run:
        id, step = "abc123", 9  # the interrupted run logged up to step 8; its checkpoint is of step 4

        def log(self, values, step):
            got.setdefault("logged", []).append((sorted(values), step))

        def finish(self, exit_code):
            got["exit_code"] = exit_code

    monkeypatch.setattr(wandb, "init", lambda **kwargs: got.update(kwargs) or Run())
    run_dir = tmp_path / "run"
    (run_dir / "wandb").mkdir(parents=True)
    (run_dir / "wandb" / "run_id.txt").write_text("abc123\n")
    cfg = load_run_config("rqvae-mnist", [*RUN, "train.logger=wandb"]).train
    tracker = tracking.open_tracker(cfg, run_dir, 4, "train:\n  steps: 8\n")
    assert (got["id"], got["resume"], got["name"], got["config"]) == ("abc123", "allow", "run", {"train": {"steps": 8}})
    for step in (6, 8, 10):
        tracker.log_metrics("train", {"loss": 1.0}, step)
    tracker.close()
    assert got["logged"] == [(["train/loss"], 10)] and got["exit_code"] == 0


# ---------------------------------------------------------------------------------------------------- either
@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_is_one_clear_error_before_training(tmp_path, monkeypatch, capsys, logger):
    monkeypatch.setitem(sys.modules, logger, None)  # as if it were not installed
    with pytest.raises(TrackerUnavailable, match=rf"train.logger={logger} needs the {logger} package "
                       r"\(pip install 'vqar\[tracking\]'\)"):  # fmt: skip
        _train(tmp_path / "run", logger)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()
    rc = main(["train", "tokenizer", "rqvae-mnist", *RUN, f"train.logger={logger}", "--out", str(tmp_path / "cli")])
    error = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(error) == 1
    assert error[0].startswith(f"vqar: error: train.logger={logger} needs the {logger} package")


def test_a_wandb_run_that_cannot_start_is_one_clear_error_before_training(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="train.logger=wandb needs the wandb package")

    def init(**kwargs):
        raise wandb.errors.UsageError("No API key configured.\nUse `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", init)
    with pytest.raises(
        TrackerUnavailable, match=r"^W&B could not start a run \(UsageError: No API key configured\. Use"
    ):
        _train(tmp_path / "run", "wandb")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()
    # The new run's folder is left as it was: run.yaml and an empty wandb/ made the same command, rerun once logged
    # in, refuse the folder as "already holds a training run"
    assert main(["train", "tokenizer", "rqvae-mnist", *RUN, "train.logger=wandb", "--out", str(tmp_path / "cli")]) == 2
    assert not (tmp_path / "cli").exists()
    # A resume whose tracker cannot start trained nothing: run.yaml still says what trained
    short = [*RUN, "steps=4"]
    assert main(["train", "tokenizer", "rqvae-mnist", *short, "--out", str(tmp_path / "ran")]) == 0
    recorded = (tmp_path / "ran" / "run.yaml").read_text()
    resume = ["train", "tokenizer", "--resume", "steps=8", "train.logger=wandb", "--out", str(tmp_path / "ran")]
    assert main(resume) == 2
    assert (tmp_path / "ran" / "run.yaml").read_text() == recorded and not (tmp_path / "ran" / "wandb").exists()


def test_an_unknown_logger_is_a_config_error():
    with pytest.raises(ConfigError, match="train.logger must be one of none, tensorboard, wandb, got 'mlflow'"):
        load_run_config("rqvae-mnist", [*RUN, "train.logger=mlflow"])


class _Recorder(tracking.Tracker):
    """A tracker that remembers what it got."""

    def __init__(self):
        super().__init__()
        self.scalars, self.pictures, self.failed = {}, [], None

    def _scalars(self, values, step):
        self.scalars.update({(name, step): value for name, value in values.items()})

    def _pictures(self, paths, step):
        self.pictures.append((sorted(paths), step))

    def _close(self, failed):
        self.failed = failed


def test_the_tracker_is_closed_when_training_ends_or_stops_on_a_signal(tmp_path, monkeypatch):
    opened = []

    def open_recorder(cfg, run_dir, step, run_yaml="", par=None):
        opened.append((_Recorder(), step))
        return opened[-1][0]

    monkeypatch.setattr("vqar.train.loop.open_tracker", open_recorder)
    real_step = TokenizerTask.train_step

    def step(self, batch, step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's preemption, after the evaluation of step 4
        return real_step(self, batch, step)

    monkeypatch.setattr(TokenizerTask, "train_step", step)
    with pytest.raises(TrainingInterrupted):
        _train(tmp_path / "run", "none")
    interrupted, start = opened[0]
    assert start == 0 and interrupted.closed and interrupted.failed is True
    assert interrupted.scalars == pytest.approx(_scalar_rows(tmp_path / "run"))
    assert interrupted.pictures == [(["recon_grid"], 4)]
    monkeypatch.setattr(TokenizerTask, "train_step", real_step)
    _train(tmp_path / "run", "none", resume=True)
    finished, start = opened[1]
    assert start == 6 and finished.closed and finished.failed is False
    assert finished.pictures == [(["recon_grid"], 8)]
    interrupted.log_metrics("train", {"loss": 1.0}, 9)  # a closed tracker ignores what comes later
    assert ("train/loss", 9) not in interrupted.scalars


def test_logger_none_writes_no_tracker_files(tmp_path):
    _train(tmp_path / "run", "none")
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "wandb").exists()


# ---------------------------------------------------------------------------------------------------- rank 0 only
def test_ranks_other_than_0_open_no_tracker(tmp_path):
    cfg = load_run_config("rqvae-mnist", [*RUN, "train.logger=tensorboard"]).train
    tracker = tracking.open_tracker(cfg, tmp_path / "run", 0, par=Parallel(rank=1))
    assert type(tracker) is tracking.Tracker  # logs nothing
    tracker.log_metrics("train", {"loss": 1.0}, 1)
    tracker.close()
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_a_two_process_run_has_one_tensorboard_log_with_the_metric_log(tmp_path):
    pytest.importorskip("tensorboard", reason="train.logger=tensorboard needs the tensorboard package")
    run_dir = tmp_path / "run"
    command = [*torchrun(2), "-m", "vqar.cli", "train", "tokenizer", "rqvae-mnist", "--out", str(run_dir),
               *RUN, "train.logger=tensorboard"]  # fmt: skip
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    assert "x 2 processes" in done.stderr
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # one event file: rank 0's
    events = _tensorboard(run_dir)
    logged = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert logged == pytest.approx(_scalar_rows(run_dir), rel=1e-6)
    assert [p.step for p in events.Images("recon_grid")] == [4, 8]
