"""One writer at a time for a code store, a folder of shards or a training run (README, "Failure modes"): a second
`vqar extract-codes`, `vqar pack-shards` or `vqar train` with the same --out fails at once, naming the process that
writes it, and writes nothing; once that process is done, the command works and leaves no lock file."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_RUN, file_contents, locked_by_another_process, overridden, run_cli, torchrun


@pytest.fixture
def images(tmp_path) -> Path:
    path = tmp_path / "images.npz"
    np.savez(path, arr_0=np.zeros((4, 32, 32), np.uint8))
    return path


def _command(kind: str, tokenizer_folder, images) -> list[str]:
    if kind == "extract-codes":
        return ["extract-codes", "--tokenizer", str(tokenizer_folder), "--data", str(images)]
    return ["pack-shards", str(images)]


def _hold(lock: Path, pid: int):
    """Takes the lock as a running vqar process holds it: flock on the file, with its pid inside."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{pid}\n".encode())
    return fd


@pytest.mark.parametrize("kind", ["extract-codes", "pack-shards"])
def test_a_second_writer_of_the_same_out_fails_at_once_and_writes_nothing(tokenizer_folder, images, tmp_path,
                                                                          capsys, kind):  # fmt: skip
    parent = tmp_path / "runs"
    parent.mkdir()
    out, lock = parent / "out", parent / ".out.lock"
    fd = _hold(lock, 4242)
    try:
        code, err = run_cli([*_command(kind, tokenizer_folder, images), "--out", str(out)], capsys)
        assert code == 2 and err.count("\n") == 1, err
        expected = f"another vqar process (pid 4242) is writing {out}; wait for it to finish or choose another --out"
        assert err == f"vqar: error: {expected}\n"
        assert [p.name for p in parent.iterdir()] == [".out.lock"]  # no store, no .out.partial
    finally:
        os.close(fd)
    assert run_cli([*_command(kind, tokenizer_folder, images), "--out", str(out)], capsys)[0] == 0
    assert sorted(p.name for p in parent.iterdir()) == ["out"]  # the lock file went with the run


@pytest.mark.parametrize("kind", ["extract-codes", "pack-shards"])
def test_overwrite_deletes_nothing_while_another_process_writes(tokenizer_folder, images, tmp_path, capsys, kind):
    out = tmp_path / "out"
    command = [*_command(kind, tokenizer_folder, images), "--out", str(out)]
    assert run_cli(command, capsys)[0] == 0
    before = file_contents(out)
    with locked_by_another_process(out) as holder:
        code, err = run_cli([*command, "--overwrite"], capsys)
        assert code == 2 and f"another vqar process (pid {holder.pid}) is writing {out};" in err, err
        assert file_contents(out) == before
    assert not (tmp_path / ".out.lock").exists()
    assert run_cli([*command, "--overwrite"], capsys)[0] == 0


@pytest.mark.parametrize("kind", ["extract-codes", "pack-shards"])
def test_an_out_in_a_folder_that_cannot_be_written_names_that_folder(tokenizer_folder, images, tmp_path, capsys,
                                                                     monkeypatch, kind):  # fmt: skip
    """The lock file is the first thing written beside --out: its error names the folder and --out, not the lock file
    the user never asked for. (Permissions are simulated: the tests may run as root, whom chmod does not stop.)"""
    import errno

    real_open = os.open

    def read_only_folder(path, flags, *args):
        if Path(path).parent == tmp_path / "runs" and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(os, "open", read_only_folder)
    out = tmp_path / "runs" / "out"
    code, err = run_cli([*_command(kind, tokenizer_folder, images), "--out", str(out)], capsys)
    assert (code, err) == (2, f"vqar: error: cannot write {out}: its folder {out.parent} is not writable (Permission "
                              "denied)\n")  # fmt: skip
    assert list(out.parent.iterdir()) == []


def test_a_lock_file_a_killed_process_left_is_taken_over(images, tmp_path, capsys):
    (tmp_path / ".out.lock").write_text("999999999\n")  # no process holds its flock any more
    assert run_cli(["pack-shards", str(images), "--out", str(tmp_path / "out")], capsys)[0] == 0
    assert json.loads((tmp_path / "out" / "shards.json").read_text())["shardlist"]
    assert not (tmp_path / ".out.lock").exists()


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    """`vqar ARGS` as two torchrun processes."""
    command = [*torchrun(2), "-m", "vqar.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.distributed
def test_under_torchrun_rank_0_takes_the_lock_for_every_rank(tokenizer_folder, images, tmp_path):
    def torchrun() -> subprocess.CompletedProcess:
        return _torchrun([*_command("extract-codes", tokenizer_folder, images), "--shard-size", "2",
                          "--out", str(tmp_path / "out")])  # fmt: skip

    fd = _hold(tmp_path / ".out.lock", 4242)
    try:
        done = torchrun()
        assert done.returncode != 0
        assert f"vqar: error: another vqar process (pid 4242) is writing {tmp_path / 'out'};" in done.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    finally:
        os.close(fd)
    done = torchrun()
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote 4 items") == 1 and not (tmp_path / ".out.lock").exists()


# A one-step tokenizer run on 64 digits (a second or two).
TRAIN = ["train", "tokenizer", "rqvae-mnist", *overridden(TINY_RUN, "data.max_images=64", "steps=1",
                                                           "train.eval_every=1", "train.log_every=1")]  # fmt: skip


def test_a_second_training_into_the_same_run_fails_at_once_and_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli([*TRAIN, "--out", str(run)], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the lock file went with the run
    before = file_contents(run)
    with locked_by_another_process(run) as holder:
        expected = f"vqar: error: another vqar process (pid {holder.pid}) is writing {run}; wait for it to finish or " \
                   "choose another --out\n"  # fmt: skip
        for mode in (["--resume"], ["--overwrite"], ["steps=2", "--resume"]):
            code, err = run_cli([*overridden(TRAIN, *mode), "--out", str(run)], capsys)
            assert (code, err) == (2, expected), mode
            assert file_contents(run) == before, mode  # --overwrite deleted nothing, --resume wrote nothing
        code, err = run_cli([*TRAIN, "--out", str(tmp_path / "run" / ".." / "run")], capsys)  # another spelling
        assert code == 2 and f"(pid {holder.pid})" in err, err
    assert run_cli([*overridden(TRAIN, "steps=2"), "--resume", "--out", str(run)], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 1, 2, 2]


def test_a_new_run_is_not_started_while_another_process_holds_its_folder(tmp_path, capsys):
    out = tmp_path / "runs" / "run"
    out.parent.mkdir()
    fd = _hold(tmp_path / "runs" / ".run.lock", 4242)
    try:
        code, err = run_cli([*TRAIN, "--out", str(out)], capsys)
        assert code == 2 and err.count("\n") == 1 and "another vqar process (pid 4242) is writing" in err, err
        assert [p.name for p in out.parent.iterdir()] == [".run.lock"]  # no run folder was made
    finally:
        os.close(fd)


@pytest.mark.slow
@pytest.mark.distributed
def test_under_torchrun_rank_0_takes_the_training_lock_and_no_rank_waits_when_it_fails(tmp_path):
    out = tmp_path / "run"
    fd = _hold(tmp_path / ".run.lock", 4242)
    try:
        done = _torchrun([*TRAIN, "data.batch_size=16", "--out", str(out)])  # within its timeout: no rank hangs
        assert done.returncode != 0
        assert f"vqar: error: another vqar process (pid 4242) is writing {out};" in done.stderr, done.stderr[-3000:]
        assert not out.exists()
    finally:
        os.close(fd)
    done = _torchrun([*TRAIN, "data.batch_size=16", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: ") == 1 and not (tmp_path / ".run.lock").exists()
