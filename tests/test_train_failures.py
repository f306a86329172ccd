"""Stage-1 training survives what goes wrong: unreadable or missing images, non-finite losses, gradients and
weights, a full or unwritable run folder, SIGTERM, and real `vqar train` processes killed with SIGKILL mid-checkpoint
and resumed to the weights of an uninterrupted run."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_RUN, file_contents, overridden, run_cli
from vqar.configs import to_yaml
from vqar.data import load_mnist_digits
from vqar.train.checkpoint import latest_checkpoint, list_checkpoints, prepare_run_dir, verify_checkpoint
from vqar.train.errors import NonFiniteLossError, TrainingInterrupted
from vqar.train.tokenizer import TokenizerTask, load_run_config, train_tokenizer
from vqar.utils.runs import SET_ASIDE


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    digits, labels = load_mnist_digits()
    root = tmp_path / "images"
    for i in range(40):
        folder = root / str(labels[i * 100])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits[i * 100]).save(folder / f"{i}.png")
    (root / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    good = (root / "0" / "0.png").read_bytes()
    (root / "0" / "truncated.png").write_bytes(good[: len(good) // 2])
    overrides = [*TINY_RUN, f"data.source={root}", "data.batch_size=8", "data.val_fraction=0.25", "steps=12"]
    with caplog.at_level(logging.WARNING):
        train_tokenizer(load_run_config("rqvae-mnist", overrides), tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert sum("broken.png" in w for w in warnings) == 1
    assert sum("truncated.png" in w for w in warnings) == 1
    assert any("skipped 2 unreadable image files" in w for w in warnings)


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, f"data.source={tmp_path / 'empty'}"])
    with pytest.raises(ValueError, match="no image"):
        train_tokenizer(cfg, tmp_path / "run")


def test_a_run_without_validation_images_is_refused_before_training(tmp_path, capsys):
    # Evaluation scores the run (its metrics, best checkpoint and pictures); it used to fail only after training.
    train = ["train", "tokenizer", "rqvae-mnist", *TINY_RUN, "steps=2", "train.eval_every=2", "--out"]
    code, err = run_cli([*train, str(tmp_path / "a"), "data.val_fraction=0"], capsys)
    assert code == 2 and err == "vqar: error: data.val_fraction must be in (0, 1) for training (evaluation scores " \
                                "the run on the validation split), got 0\n", err  # fmt: skip
    code, err = run_cli([*overridden(train, "data.max_images=1", "data.batch_size=1"), str(tmp_path / "b")],
                        capsys)  # fmt: skip (too few to split)
    assert code == 2 and "train:" not in err, err
    assert err.endswith("vqar: error: the validation split is empty (too few images to hold any out), and "
                        "evaluation scores the run: raise data.val_fraction or add images\n"), err  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def _nan_loss_from(monkeypatch, bad_steps):
    from vqar.tokenizers.losses import TokenizerObjective

    real = TokenizerObjective.generator_loss

    def generator_loss(self, images, out, last_layer, step):
        loss, metrics = real(self, images, out, last_layer, step)
        return (loss * float("nan"), metrics) if step in bad_steps else (loss, metrics)

    monkeypatch.setattr(TokenizerObjective, "generator_loss", generator_loss)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch, caplog):
    _nan_loss_from(monkeypatch, {5, 6})
    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, "steps=10", "train.ckpt_every=10", "train.log_every=1"])
    with caplog.at_level(logging.WARNING):
        metrics = train_tokenizer(cfg, tmp_path / "run")
    assert math.isfinite(metrics["psnr"])
    assert caplog.text.count("non-finite loss or gradient") == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train if "skipped_steps" in r] == [6, 7]  # the 6th and 7th steps
    assert all(math.isfinite(r["loss"]) for r in train if "loss" in r) and sum("loss" in r for r in train) == 8


def test_too_many_non_finite_steps_stop_with_the_last_checkpoint_intact(tmp_path, monkeypatch):
    _nan_loss_from(monkeypatch, set(range(5, 100)))
    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, "steps=12", "train.ckpt_every=4", "train.max_nonfinite_steps=3"])
    with pytest.raises(NonFiniteLossError, match="4 training steps in a row"):
        train_tokenizer(cfg, tmp_path / "run")
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.step == 8 and verify_checkpoint(ckpt.path) is None
    # Steps 5 and later were all skipped: the checkpoint holds the (finite) weights trained by steps 0-4.
    assert math.isfinite(float(load_file(str(ckpt.path / "model.safetensors"))["encoder.conv_in.weight"].sum()))


def test_weights_gone_nan_with_a_finite_loss_never_replace_the_last_good_checkpoint(tmp_path, monkeypatch):
    """An update too large (lr=1e30) leaves the weights NaN while that step's loss and gradient were finite. Every
    step after it was skipped, but each checkpoint was still written, pruning the last finite ones, and the error
    said a good checkpoint was intact: resuming trained on NaN weights and ended "done"."""
    real_step = TokenizerTask.train_step

    def step(self, batch, step):
        metrics = real_step(self, batch, step)
        if step == 4:  # the 5th step's update overflows
            with torch.no_grad():
                self.model.decoder.conv_out.weight.fill_(float("inf"))
        return metrics

    monkeypatch.setattr(TokenizerTask, "train_step", step)
    run = tmp_path / "run"
    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, "steps=12", "train.ckpt_every=2", "train.eval_every=100"])
    with pytest.raises(NonFiniteLossError) as err:
        train_tokenizer(cfg, run)
    assert str(err.value) == (
        "the weights became NaN or infinite by step 6 (1 tensors, the first: model.decoder.conv_out.weight), so that "
        f"step's checkpoint is not written. Its newest checkpoint, {run / 'checkpoints' / 'step-0000004'} (step 4), "
        "is intact: --resume with a lower train.lr, train.precision=fp32, or check the data"
    )
    assert [c.step for c in list_checkpoints(run)] == [2, 4]
    assert all(v.isfinite().all() for v in load_file(str(run / "checkpoints" / "step-0000004" / "model.safetensors"))
               .values() if v.is_floating_point())  # fmt: skip

    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, "steps=6", "train.ckpt_every=100", "train.eval_every=100"])
    with pytest.raises(NonFiniteLossError, match="by step 6 .* The run has no checkpoint to go back to: start it "
                                                 r"again \(--overwrite\) with a lower train.lr"):  # fmt: skip
        train_tokenizer(cfg, tmp_path / "short")  # the last step's checkpoint: the run never ends "done"
    assert not list_checkpoints(tmp_path / "short") and not (tmp_path / "short" / "model.safetensors").exists()


def test_fp16_loss_scaling_skips_overflows_and_lowers_the_scale():
    from vqar.train.optim import StepGuard

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    guard = StepGuard("fp16", torch.device("cpu"))
    scale = guard.scaler.get_scale()
    # A gradient that overflows once scaled: the step is skipped, the weights stay, the scale drops.
    assert not guard.step((weight * 1e36).sum(), optimizer, grad_clip=None)
    assert torch.equal(weight.detach(), torch.ones(3))
    assert guard.scaler.get_scale() < scale
    # An ordinary loss: the step is taken with the unscaled gradient (1 per weight here).
    assert guard.step(weight.sum(), optimizer, grad_clip=None)
    torch.testing.assert_close(weight.detach(), torch.full((3,), 0.9))
    # The scale survives a checkpoint.
    restored = StepGuard("fp16", torch.device("cpu"))
    restored.load_state_dict(guard.state_dict())
    assert restored.scaler.get_scale() == guard.scaler.get_scale()


def test_non_finite_loss_is_skipped_without_touching_gradients_or_weights():
    from vqar.train.optim import StepGuard

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    assert not StepGuard().step((weight * float("nan")).sum(), optimizer, grad_clip=1.0)
    assert weight.grad is None and torch.equal(weight.detach(), torch.ones(2))


def test_an_unwritable_or_full_run_directory_fails_before_training(tmp_path, monkeypatch):
    import shutil as shutil_module

    from vqar.train import loop

    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, "steps=4"])
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(loop.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(OSError, match="MiB free"):
        train_tokenizer(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_overwrite_stopped_before_its_first_checkpoint_keeps_the_run_it_replaces(tmp_path, monkeypatch, capsys,
                                                                                     caplog):  # fmt: skip
    """--overwrite deleted the run first: a new run that failed before its first checkpoint (a full disk, a tracker
    without its login) or was killed (SIGKILL) lost the old one and had nothing in its place."""
    import shutil as shutil_module

    from vqar.train import loop

    run = tmp_path / "run"
    train_tokenizer(load_run_config("rqvae-mnist", [*TINY_RUN, "steps=4"]), run)
    before = file_contents(run)
    usage = shutil_module.disk_usage(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(loop.shutil, "disk_usage", lambda path: usage._replace(free=1000))
        with pytest.raises(OSError, match="MiB free"):
            train_tokenizer(load_run_config("rqvae-mnist", [*TINY_RUN, "steps=6"]), run, overwrite=True)
    assert file_contents(run) == before
    prepare_run_dir(run, resume=False, overwrite=True)  # what a killed --overwrite leaves: its start, no checkpoint
    (run / "run.yaml").write_text(to_yaml(load_run_config("rqvae-mnist", [*TINY_RUN, "steps=500"])))
    assert not list_checkpoints(run) and (run / SET_ASIDE).is_dir()
    code, err = run_cli(["sample", "--model", str(run), "--out", str(tmp_path / "samples")], capsys)
    assert code == 2 and f"is set aside in {run / SET_ASIDE}" in err, err
    with caplog.at_level(logging.WARNING, logger="vqar"):
        code, err = run_cli(["train", "tokenizer", "--resume", "--out", str(run)], capsys)
    assert code == 0, err
    assert "put back the run that an --overwrite killed before its first checkpoint had set aside" in caplog.text
    assert file_contents(run) == before  # the run's own settings (4 steps, all done), not the killed run's
    train_tokenizer(load_run_config("rqvae-mnist", [*TINY_RUN, "steps=2"]), run, overwrite=True)
    assert latest_checkpoint(run).step == 2 and not (run / SET_ASIDE).exists()  # replaced once it had a checkpoint


def test_sigterm_writes_a_checkpoint_and_stops(tmp_path, monkeypatch):
    import os
    import signal

    real_step = TokenizerTask.train_step

    def step(self, batch, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's preemption would
        return real_step(self, batch, step)

    # The handlers the caller had (here stand-ins of the test's own) are the ones it has again afterwards, both
    # when training stops on the signal and when it ends normally.
    def callers_sigterm(signum, frame):
        raise AssertionError("the caller's SIGTERM handler ran during training")

    def callers_sigint(signum, frame):
        raise AssertionError("the caller's SIGINT handler ran during training")

    before = {signal.SIGTERM: signal.signal(signal.SIGTERM, callers_sigterm),
              signal.SIGINT: signal.signal(signal.SIGINT, callers_sigint)}  # fmt: skip
    try:
        monkeypatch.setattr(TokenizerTask, "train_step", step)
        cfg = load_run_config("rqvae-mnist", [*TINY_RUN, "steps=20", "train.ckpt_every=100"])
        with pytest.raises(TrainingInterrupted, match="SIGTERM at step 4"):
            train_tokenizer(cfg, tmp_path / "run")
        ckpt = latest_checkpoint(tmp_path / "run")
        assert ckpt.step == 4 and verify_checkpoint(ckpt.path) is None
        assert _train_rows(tmp_path / "run") == [4]  # steps 1-4, before train.log_every=5 came round
        assert signal.getsignal(signal.SIGTERM) is callers_sigterm
        assert signal.getsignal(signal.SIGINT) is callers_sigint
        monkeypatch.setattr(TokenizerTask, "train_step", real_step)
        train_tokenizer(cfg, tmp_path / "run", resume=True)  # and it resumes from there
        assert latest_checkpoint(tmp_path / "run").step == 20
        assert _train_rows(tmp_path / "run") == [4, 5, 10, 15, 20]  # every step trained is in one row
        assert signal.getsignal(signal.SIGTERM) is callers_sigterm
        assert signal.getsignal(signal.SIGINT) is callers_sigint
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _train_rows(run_dir) -> list[int]:
    """The steps of a run's training rows in metrics.jsonl."""
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [row["step"] for row in rows if row["split"] == "train"]


# `vqar train` with a pause at one moment of the run, so that a SIGKILL lands exactly there: the process writes
# VQAR_TEST_MARKER and sleeps when it reaches VQAR_TEST_PAUSE ("weights:S": checkpoint S's first weights file is
# written and nothing else; "rename:S": checkpoint S is written and synced, not yet renamed into place; "step:S":
# inside training step S, after the optimizer step). Everything else is the real command.
PAUSING_TRAIN = """
import os, sys, time
from pathlib import Path

import vqar.train.checkpoint as checkpoint
from vqar.cli import main
from vqar.train.tokenizer import TokenizerTask

where, at = os.environ["VQAR_TEST_PAUSE"].split(":")
at = int(at)
folder_of_step = f"step-{at:07d}"  # in the name of the folder the checkpoint is written in, temporary or not


def pause():
    Path(os.environ["VQAR_TEST_MARKER"]).write_text(str(os.getpid()))
    time.sleep(3600)


if where == "weights":
    real_save_weights = checkpoint.save_weights

    def save_weights(weights, path):
        real_save_weights(weights, path)
        if folder_of_step in Path(path).parent.name:
            pause()

    checkpoint.save_weights = save_weights
elif where == "rename":
    real_fsync_dir = checkpoint.fsync_dir

    def fsync_dir(path):
        real_fsync_dir(path)
        if folder_of_step in Path(path).name:
            pause()

    checkpoint.fsync_dir = fsync_dir
elif where == "step":
    real_train_step = TokenizerTask.train_step

    def train_step(self, batch, step):
        metrics = real_train_step(self, batch, step)
        if step == at:
            pause()
        return metrics

    TokenizerTask.train_step = train_step
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five `vqar train` processes: on a busy 2-core machine more than the default 600 s
def test_sigkilled_training_resumes_to_the_same_weights(tmp_path):
    """Real `vqar train` processes killed with SIGKILL in the middle of a checkpoint write (after its first file;
    after all its files, before the rename) and inside a training step, each resumed, end with the weights of an
    uninterrupted run bit for bit, and no checkpoint that a run lists is ever damaged. The kills land where they
    are meant to by construction (the process waits there), not by timing."""
    import os
    import subprocess
    import sys
    import time

    overrides = [*TINY_RUN, "steps=12", "train.eval_every=12", "train.ckpt_every=3", "train.keep_checkpoints=2"]
    arguments = ["train", "tokenizer", "rqvae-mnist", *overrides]
    subprocess.run([sys.executable, "-m", "vqar.cli", *arguments, "--out", str(tmp_path / "clean")], check=True,
                   capture_output=True)  # fmt: skip
    expected = load_file(str(tmp_path / "clean" / "model.safetensors"))

    run, folder = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    plan = [("weights", 6), ("rename", 9), ("step", 10)]
    landed = []
    for attempt, (where, at) in enumerate(plan):
        marker = tmp_path / f"paused-{attempt}"
        log = tmp_path / f"attempt-{attempt}.log"
        env = {**os.environ, "VQAR_TEST_PAUSE": f"{where}:{at}", "VQAR_TEST_MARKER": str(marker)}
        command = [sys.executable, "-c", PAUSING_TRAIN, *arguments, "--out", str(run)]
        with open(log, "w") as output:
            proc = subprocess.Popen([*command, *(["--resume"] if run.exists() else [])], stdout=output,
                                    stderr=subprocess.STDOUT, env=env)  # fmt: skip
            try:
                deadline = time.monotonic() + 600
                while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not marker.exists():  # the run ended before the moment: on to the next one
                    if proc.poll() is None:
                        pytest.fail(f"`vqar train` neither reached {where}:{at} nor ended within 600 s")
                    assert proc.returncode == 0, log.read_text()[-3000:]
                    continue
            finally:
                proc.kill()  # SIGKILL: no handler runs
                proc.wait()
        partial = sorted(folder.glob(f".tmp-step-{at:07d}-*"))
        if where == "weights":  # killed after the first file: a partial checkpoint, no manifest yet
            assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()
            assert not (partial[0] / "manifest.json").exists() and not (folder / f"step-{at:07d}").exists()
        elif where == "rename":  # complete but not renamed: not a checkpoint yet
            assert len(partial) == 1 and (partial[0] / "manifest.json").is_file()
            assert not (folder / f"step-{at:07d}").exists()
        else:
            assert not partial
        landed.append(where)
        checkpoints = list_checkpoints(run)
        assert checkpoints and checkpoints[-1].step <= at
        for ckpt in checkpoints:  # finished checkpoints are whole; partial ones are hidden temporary folders
            assert verify_checkpoint(ckpt.path) is None, ckpt.path
    assert {"weights", "rename"} <= set(landed), landed  # at least the two kills inside checkpoint writes
    subprocess.run([sys.executable, "-m", "vqar.cli", *arguments, "--out", str(run), "--resume"], check=True,
                   capture_output=True)  # fmt: skip
    assert latest_checkpoint(run).step == 12
    assert not list(folder.glob(".tmp-*")), "the resumed run left the killed runs' temporary folders"
    resumed = load_file(str(run / "model.safetensors"))
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


def test_a_trainer_state_that_is_damaged_foreign_or_of_another_step_is_one_line_naming_it(tmp_path, capsys):
    """`--resume` read trainer.pt with torch.load alone: a damaged pickle was an IndexError traceback, one asking for
    objects off the allow-list 41 lines ending in torch's advice to load it with weights_only=False, and a step
    that is not the checkpoint's ("four", or 10**12: training then reported itself done) was taken or a TypeError.
    (The manifest is rewritten each time, as a copy made elsewhere would be.)"""
    import hashlib
    import os

    run = tmp_path / "run"
    train = ["train", "tokenizer", "rqvae-mnist", *overridden(TINY_RUN, "data.max_images=64", "train.eval_every=2",
                                                              "train.ckpt_every=2"), "--out", str(run)]  # fmt: skip
    assert run_cli([*train, "steps=2"], capsys)[0] == 0
    ckpt = run / "checkpoints" / "step-0000002"
    state_file, good = ckpt / "trainer.pt", (ckpt / "trainer.pt").read_bytes()

    class Runs:  # a pickle that would run a command when loaded without the allow-list
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    state = torch.load(state_file, weights_only=True)
    cases = {
        "damaged": lambda: state_file.write_bytes(good[:200] + bytes(50) + good[250:]),
        "foreign": lambda: torch.save({**state, "task": Runs()}, state_file),
        "step four": lambda: torch.save({**state, "step": "four"}, state_file),
        "step 10**12": lambda: torch.save({**state, "step": 10**12}, state_file),
        "a list": lambda: torch.save([1, 2], state_file),
    }
    for case, write in cases.items():
        write()
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest["files"]["trainer.pt"] = hashlib.sha256(state_file.read_bytes()).hexdigest()
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
        code, err = run_cli([*train, "steps=4", "--resume"], capsys)
        assert code == 2 and err.count("\n") == 1 and str(state_file) in err, (case, err)
        assert "Traceback" not in err and not (tmp_path / "ran").exists(), case
        if case == "foreign":
            assert err.startswith(f"vqar: error: refused to load {state_file}: it contains Python objects that are "
                                  "not on vqar's allow-list (it needs posix.system)"), err  # fmt: skip
        assert list_checkpoints(run)[-1].step == 2, case  # nothing was trained
        if case == "step 10**12":
            assert "is not the trainer state of step-0000002 (it holds step 1000000000000): move that " in err, err


def test_a_checkpoint_weight_of_another_kind_of_number_is_refused_on_resume(tmp_path):
    """An int32 tensor where the module has float32 was cast on --resume without a word."""
    from safetensors.torch import save_file

    from vqar.train.checkpoint import load_weights

    module = torch.nn.Linear(3, 2)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    save_file({**state, "weight": state["weight"].to(torch.int32)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"does not fit the configured model \(another kind of number: weight \(int32, "
                                         r"expects float32\)\)"):  # fmt: skip
        load_weights(tmp_path / "model.safetensors", module)
    save_file({**state, "weight": state["weight"].to(torch.bfloat16)}, tmp_path / "model.safetensors")
    assert load_weights(tmp_path / "model.safetensors", module)["weight"].dtype == torch.bfloat16
