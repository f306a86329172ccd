"""What vqar guarantees when things go wrong (README, "Failure modes"), for training runs: damaged checkpoints never
cost progress or turn the export back in time, a killed run's temporary files are removed by the next run, a resumed
run's metric log has one row per step, written files get the permissions the umask gives, and a full disk or a model
too large for memory is one line, with nothing half written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vqar
from conftest import TINY_RUN, file_contents, overridden, run_cli
from vqar.train.checkpoint import DamagedCheckpointsError, list_checkpoints, verify_checkpoint
from vqar.train.tokenizer import load_run_config, train_tokenizer
from vqar.utils.io import atomic_write_text

RUN = overridden(TINY_RUN, "data.max_images=200", "train.eval_every=4", "train.ckpt_every=4", "train.log_every=1")


def _train(run_dir, steps: int, keep: int = 3, **options):
    cfg = load_run_config("rqvae-mnist", [*RUN, f"steps={steps}", f"train.keep_checkpoints={keep}"])
    return train_tokenizer(cfg, run_dir, **options)


def _damage(checkpoint) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _rows(run_dir) -> list[tuple[int, str]]:
    return [(r["step"], r["split"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


# ---------------------------------------------------------------- checkpoints
def test_a_run_whose_checkpoints_are_all_damaged_is_not_resumed(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, 8)
    for checkpoint in list_checkpoints(run):
        _damage(checkpoint.path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    with pytest.raises(DamagedCheckpointsError, match=r"step-0000004: checksum mismatch.*--overwrite"):
        _train(run, 12, resume=True)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing was changed
    code, err = run_cli(["train", "tokenizer", "--resume", "--out", str(run)], capsys)
    assert code == 2 and err.splitlines()[-1].startswith("vqar: error: every checkpoint") and "Traceback" not in err


def test_damaged_checkpoints_are_moved_aside_and_the_export_never_goes_back(tmp_path):
    run = tmp_path / "run"
    _train(run, 12)  # checkpoints at steps 4, 8, 12; the export is step 12's
    export = (run / "model.safetensors").read_bytes()
    assert vqar.bundle.trained_steps(run) == 12
    for step in (8, 12):
        _damage(run / "checkpoints" / f"step-{step:07d}")
    _train(run, 8, keep=2, resume=True)  # back to step 4, forward to step 8
    assert [c.step for c in list_checkpoints(run)] == [4, 8]  # the new step 8 and the intact step 4
    assert all(verify_checkpoint(c.path) is None for c in list_checkpoints(run))
    assert (run / "checkpoints" / "damaged" / "step-0000012").is_dir()  # kept aside, not deleted
    assert (run / "checkpoints" / "damaged" / "step-0000008").is_dir()  # also the one the new step 8 replaced
    assert (run / "model.safetensors").read_bytes() == export  # step 8 < step 12: the newer export stays
    assert vqar.bundle.trained_steps(run) == 12
    _train(run, 16, keep=2, resume=True)
    assert vqar.bundle.trained_steps(run) == 16 and [c.step for c in list_checkpoints(run)] == [12, 16]


def test_a_resumed_run_continues_its_metric_log(tmp_path):
    run = tmp_path / "run"
    _train(run, 8)
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-0000008")  # killed after logging step 8, before its checkpoint
    _train(run, 8, resume=True)
    rows = _rows(run)
    assert len(rows) == len(set(rows))  # one row per (step, split)
    assert [step for step, split in rows if split == "train"] == list(range(1, 9))


def test_a_metric_row_cut_short_by_a_kill_does_not_stop_the_resume(tmp_path):
    run = tmp_path / "run"
    _train(run, 8)
    log = run / "metrics.jsonl"
    rows = log.read_text().splitlines()
    # A note of the user's, then the row a SIGKILL (or a full disk) cut short while appending it: no newline after.
    log.write_text("\n".join(rows[:3]) + "\nnote: lr looked high\n" + "\n".join(rows[3:]) + '\n{"step": 9, "spl')
    _train(run, 12, resume=True)  # used to fail with "Expecting ',' delimiter", naming no file
    lines = log.read_text().splitlines()
    assert lines[3] == "note: lr looked high"
    rows = [json.loads(line) for line in lines[:3] + lines[4:]]  # every other line is a whole row
    steps = [(r["step"], r["split"]) for r in rows]
    assert len(steps) == len(set(steps)) and [s for s, split in steps if split == "train"] == list(range(1, 13))


@pytest.mark.parametrize("damage", ["{", "[]", '{"step": "four"}'])
def test_a_damaged_best_json_is_written_anew_instead_of_failing_the_run(tmp_path, caplog, damage):
    run = tmp_path / "run"
    _train(run, 4)
    best = run / "checkpoints" / "best.json"
    best.write_text(damage)
    _train(run, 8, resume=True)  # used to fail at its first evaluation, after the training steps
    assert f"{best} is damaged" in caplog.text
    assert json.loads(best.read_text())["step"] == 8 and json.loads(best.read_text())["metric"] == "psnr"


def test_resuming_a_finished_run_adds_no_row(tmp_path):
    run = tmp_path / "run"
    metrics = _train(run, 4)
    before = (run / "metrics.jsonl").read_text()
    for _ in range(2):  # each --resume of the finished run reports its final validation without logging it again
        assert _train(run, 4, resume=True) == pytest.approx(metrics)
    assert (run / "metrics.jsonl").read_text() == before
    assert _rows(run).count((4, "val")) == 1


def test_the_next_run_removes_what_a_killed_one_left(tmp_path):
    run = tmp_path / "run"
    _train(run, 4)
    dead, alive = _dead_pid(), os.getpid()
    left = [run / f".model.safetensors.{dead}.0a1b2c3d.tmp", run / "checkpoints" / f".tmp-step-0000008-{dead}",
            run / f".run.yaml.{dead}.ffff0000.tmp"]  # fmt: skip
    left[0].write_bytes(b"half a file")
    left[1].mkdir()
    (left[1] / "model.safetensors").write_bytes(b"half a checkpoint")
    left[2].write_text("half")
    writing = run / "checkpoints" / f".tmp-step-0000012-{alive}"  # a live process is still writing it
    writing.mkdir()
    _train(run, 8, resume=True)
    assert not any(path.exists() for path in left)
    assert writing.is_dir()


def test_written_files_get_the_permissions_of_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "note.txt", "x")
        vqar.save_pretrained(vqar.Tokenizer(load_run_config("rqvae-mnist", TINY_RUN).model), tmp_path / "tok")
    finally:
        os.umask(previous)
    for path in (tmp_path / "note.txt", tmp_path / "tok" / "config.json", tmp_path / "tok" / "model.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o640, path
    os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "shared.txt", "x")
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == 0o644


def test_checkpoints_get_the_permissions_of_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        _train(tmp_path / "run", 4)
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "run" / "checkpoints" / "step-0000004").iterdir()]
    assert {p.name for p in files} >= {"model.safetensors", "trainer.pt", "manifest.json"}
    for path in files:  # a colleague in the group can resume the run (safetensors alone would make them 0600)
        assert path.stat().st_mode & 0o777 == 0o640, path


def test_the_space_check_counts_a_checkpoint_and_the_export(tmp_path, monkeypatch):
    from vqar.train import loop

    asked = []
    check = loop.check_writable
    monkeypatch.setattr(loop, "check_writable", lambda run_dir, need, *a: asked.append(need) or check(run_dir, need))
    run = tmp_path / "run"
    _train(run, 4)
    written = sum(p.stat().st_size for p in (run / "checkpoints" / "step-0000004").iterdir())
    written += (run / "model.safetensors").stat().st_size + (run / "config.json").stat().st_size
    assert written <= asked[0] <= 1.2 * written + 2**20  # enough for both, without crying wolf


def test_a_model_whose_training_state_cannot_fit_in_memory_is_refused_before_its_first_step(tmp_path, capsys,
                                                                                             monkeypatch):  # fmt: skip
    # On the CPU the first step allocates the gradients and Adam's two moments; without room for them the kernel's
    # OOM killer ended the run with a bare "Killed" (`vqar train ar gpt-mnist size=GPT-XXL` on a 23 GB machine).
    import re

    import vqar.utils.memory

    monkeypatch.setattr(vqar.utils.memory, "available_memory", lambda: 2**20)
    run = tmp_path / "run"
    code, err = run_cli(["train", "tokenizer", "rqvae-mnist", *RUN, "steps=2", "--out", str(run)], capsys)
    last = err.splitlines()[-1]
    assert code == 2 and "train:" not in err, err
    found = re.fullmatch(r"vqar: error: training these ([\d.]+)M parameters on the CPU \(gradients and optimizer "
                         r"state, before activations\) would need about ([\d.]+) MB of memory, and 1.0 MB is "
                         r"available: choose a smaller model \(size=, model.\*\) or train on a GPU "
                         r"\(train.device=cuda\)", last)  # fmt: skip
    assert found, last
    # float32: 12 bytes a parameter (the count is shown to 0.1M)
    assert float(found[2]) == pytest.approx(3 * 4 * float(found[1]) * 1e6 / 2**20, rel=0.06)
    assert not run.exists()  # refused before run.yaml, a checkpoint or a metric row


@pytest.mark.parametrize("where", ["export", "checkpoint"])
def test_a_full_disk_mid_run_is_one_line_and_leaves_nothing_half_written(tmp_path, capsys, monkeypatch, where):
    import errno

    from safetensors import SafetensorError

    import vqar.train.checkpoint

    run = tmp_path / "run"
    train = ["train", "tokenizer", "rqvae-mnist", *RUN, "--out", str(run)]
    assert run_cli([*train, "steps=4"], capsys)[0] == 0
    before = file_contents(run)
    module = vqar.bundle if where == "export" else vqar.train.checkpoint
    real = module.save_file

    def full_disk(tensors, path, *rest, **options):
        real(dict(list(tensors.items())[:1]), path, *rest, **options)  # part of the file, then the disk is full
        if where == "export":  # what safetensors raises (not an OSError)
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                                  'space left on device" })')  # fmt: skip
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, "save_file", full_disk)
    code, err = run_cli([*train, "steps=8", "--resume"], capsys)
    message = err.splitlines()[-1]  # after the progress bar
    assert code == 2 and message.startswith("vqar: error: out of disk space") and "Traceback" not in err, err
    assert "MiB free" in message and "--resume" in message
    after = file_contents(run)
    assert not [path for path in after if ".tmp" in str(path)]  # no temporary file or folder is left
    assert after[Path("model.safetensors")] == before[Path("model.safetensors")]  # the export of step 4, whole
    assert after[Path("config.json")] == before[Path("config.json")]
    assert all(verify_checkpoint(c.path) is None for c in list_checkpoints(run))  # what is there is whole
    assert [c.step for c in list_checkpoints(run)] == ([4, 8] if where == "export" else [4])
    monkeypatch.setattr(module, "save_file", real)
    assert run_cli([*train, "steps=8", "--resume"], capsys)[0] == 0  # space was freed: the run goes on
    assert vqar.bundle.trained_steps(run) == 8
