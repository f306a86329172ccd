"""Stage-1 training end to end on the bundled digits: it learns, resumes exactly, refuses a resume or a run folder it
must not take, follows its schedule, reports its throughput, keeps its best checkpoint, falls back from a damaged one
and leaves nothing of a failed write; and the weight EMA."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vqar
from conftest import TINY_RUN, overridden, run_cli
from vqar.data import load_mnist_digits
from vqar.tokenizers import Tokenizer
from vqar.train.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint
from vqar.train.tokenizer import TokenizerTask, load_run_config, train_tokenizer


def _records(run_dir, split):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "rq"
    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, "steps=80", "train.eval_every=40", "train.ckpt_every=40"])
    train_tokenizer(cfg, run_dir)
    return run_dir, cfg


def test_training_learns_and_writes_a_complete_run(trained_run):
    run_dir, _ = trained_run
    for name in ("run.yaml", "metrics.jsonl", "recon_grid.png", "config.json", "model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert [c.step for c in list_checkpoints(run_dir)] == [40, 80]
    train = _records(run_dir, "train")
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    val = _records(run_dir, "val")
    assert [r["step"] for r in val] == [40, 80]
    assert val[1]["psnr"] > val[0]["psnr"] > 10
    assert all(0 < r["usage"] <= 100 for r in val)
    grid = Image.open(run_dir / "recon_grid.png")
    assert grid.size[1] > 5 * 32  # originals + one row per depth (4)


def test_trained_tokenizer_loads_and_refines_with_depth(trained_run):
    run_dir, cfg = trained_run
    model = vqar.load_pretrained(run_dir)
    assert isinstance(model, Tokenizer) and model.code_shape() == (4, 4, 4)
    images = torch.from_numpy(load_mnist_digits()[0][::25].astype("float32")).unsqueeze(1) / 127.5 - 1
    codes = model.encode(images)
    with torch.no_grad():
        errors = [float((model.decode(codes, depth=d) - images).pow(2).mean()) for d in range(1, 5)]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors


def test_a_discriminator_added_on_resume_starts_fresh_on_the_run_schedule(tmp_path, caplog):
    """`--resume loss.disc_weight=0.1` on a run trained without one failed on the discriminator's missing
    weights, then on its missing learning-rate schedule (a KeyError traceback)."""
    base = [*TINY_RUN, "train.eval_every=2", "train.ckpt_every=2", "train.warmup_steps=0"]
    run_dir = tmp_path / "run"
    train_tokenizer(load_run_config("rqvae-mnist", [*base, "steps=2"]), run_dir)
    cfg = load_run_config("rqvae-mnist", [*base, "steps=4", "loss.disc_weight=0.1"])
    with caplog.at_level(logging.WARNING, logger="vqar.train"):
        train_tokenizer(cfg, run_dir, resume=True)
    assert "step-0000002 holds no discriminator weights (the run trained without it until now): it starts from " \
           "its initialisation" in caplog.text  # fmt: skip
    step_4 = run_dir / "checkpoints" / "step-0000004"
    assert (step_4 / "discriminator.safetensors").is_file()
    state = torch.load(step_4 / "trainer.pt", weights_only=True)["schedulers"]
    assert state["discriminator"]["last_epoch"] == state["model"]["last_epoch"] == 4  # one schedule, one step
    assert "past train.steps" not in caplog.text
    # A discriminator that starts after the run's last step is built and saved, and never trains: said.
    caplog.clear()
    late = load_run_config("rqvae-mnist", [*base, "steps=6", "loss.disc_weight=0.1", "loss.disc_start=5000"])
    with caplog.at_level(logging.WARNING, logger="vqar.train"):
        train_tokenizer(late, run_dir, resume=True)
    assert "loss.disc_start=5000 is past train.steps=6: the discriminator is built and saved but never trains in " \
           "this run" in caplog.text  # fmt: skip
    # Training flushes subnormal floats to zero, the CPU's setting for the whole process: it stayed on after the
    # run, and Python's own 1e-310 then read as 0.0 (a later `--accept-rate 1e-310` was "0.0").
    assert sys.float_info.min / 2 > 0.0 and float("1e-310") > 0.0


def test_resume_reaches_the_same_weights(tmp_path):
    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, "steps=24", "train.eval_every=12", "train.ckpt_every=12"])
    run_dir = tmp_path / "run"
    train_tokenizer(cfg, run_dir)
    final = load_file(str(run_dir / "checkpoints" / "step-0000024" / "model.safetensors"))
    shutil.copytree(run_dir / "checkpoints" / "step-0000024", tmp_path / "uninterrupted")
    # As if the process died after the step-12 checkpoint.
    shutil.rmtree(run_dir / "checkpoints" / "step-0000024")
    torch.manual_seed(1234)  # the resumed run must not depend on the state it was started in
    train_tokenizer(cfg, run_dir, resume=True)
    resumed = load_file(str(run_dir / "checkpoints" / "step-0000024" / "model.safetensors"))
    assert final.keys() == resumed.keys()
    for key in final:
        assert torch.equal(final[key], resumed[key]), key
    opt_a = torch.load(tmp_path / "uninterrupted" / "trainer.pt", weights_only=True)["optimizers"]["model"]
    opt_b = torch.load(run_dir / "checkpoints" / "step-0000024" / "trainer.pt", weights_only=True)["optimizers"][
        "model"
    ]
    assert all(torch.equal(opt_a["state"][i]["exp_avg"], opt_b["state"][i]["exp_avg"]) for i in opt_a["state"])


def test_gan_losses_switch_on_at_disc_start(tmp_path):
    cfg = load_run_config(
        "rqvae-mnist",
        [*TINY_RUN, "steps=6", "loss.disc_weight=0.5", "loss.disc_start=3", "loss.disc_layers=2", "train.log_every=1"],
    )
    train_tokenizer(cfg, tmp_path / "gan")
    records = _records(tmp_path / "gan", "train")
    assert all("d_loss" not in r for r in records[:3])
    assert all({"d_loss", "g_loss", "disc_adaptive_weight"} <= r.keys() for r in records[3:])
    assert all(math.isfinite(r["disc_adaptive_weight"]) and r["disc_adaptive_weight"] >= 0 for r in records[3:])
    ckpt = latest_checkpoint(tmp_path / "gan")
    assert (ckpt.path / "discriminator.safetensors").is_file()


def test_an_existing_run_is_never_overwritten_by_accident(trained_run, tmp_path):
    run_dir, cfg = trained_run
    before = (run_dir / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train_tokenizer(cfg, run_dir)
    assert (run_dir / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("setting", ["lr=nan", "lr=inf", "train.weight_decay=nan", "train.grad_clip=nan"])
def test_a_learning_rate_or_clip_that_is_not_a_finite_number_is_named(setting):
    key = setting.split("=")[0].replace("lr", "train.lr") if setting.startswith("lr") else setting.split("=")[0]
    with pytest.raises(ValueError, match=f"^{key} must be"):
        load_run_config("rqvae-mnist", [setting])


def test_a_resume_that_changes_the_tokenizer_is_refused_and_a_preset_s_other_settings_are_named(tmp_path, capsys,
                                                                                                  caplog):  # fmt: skip
    """`--resume d=2` loaded the depth-4 shared codebook into a depth-2 model and went on: the export then gave
    4x4x2 codes, unlike the stores and AR models made from the run. A preset given with --resume replaced the run's
    data and schedule without a word."""
    from conftest import file_contents

    run = tmp_path / "run"
    train = ["train", "tokenizer", "rqvae-mnist", *overridden(TINY_RUN, "data.max_images=128", "steps=2",
                                                              "train.eval_every=2"), "--out", str(run)]  # fmt: skip
    assert run_cli(train, capsys)[0] == 0
    before = file_contents(run)
    for setting, key, trained in [("d=2", "model.quantizer.depth", 4), ("model.conv.resolution=64 data.image_size=64",
                                  "model.conv.resolution", 32), ("model.conv.ch=32", "model.conv.ch", 16)]:  # fmt: skip
        code, err = run_cli(["train", "tokenizer", "--resume", *setting.split(), "steps=3", "--out", str(run)], capsys)
        given = setting.split()[0].split("=")[1]
        assert code == 2 and err == (f"vqar: error: resuming {run}: {key}={given} differs from the run's {key}="
                                     f"{trained}, whose checkpoints hold that model's weights; leave {key} out, or "
                                     "start a new run in another --out\n"), err  # fmt: skip
        assert file_contents(run) == before
    # With a preset, a change of the model is refused before the preset's other settings are warned of.
    with caplog.at_level(logging.WARNING, logger="vqar.train"):
        code, err = run_cli(["train", "tokenizer", "--resume", "rqvae-mnist", *TINY_RUN, "d=2", "--out", str(run)],
                            capsys)  # fmt: skip
    assert code == 2 and "model.quantizer.depth=2 differs from the run's" in err, err
    assert "settings other than" not in caplog.text
    assert file_contents(run) == before
    # The settings of the backbone not in use would do nothing: refused, as for a new run.
    code, err = run_cli(["train", "tokenizer", "--resume", "model.vit.patch_size=4", "--out", str(run)], capsys)
    assert code == 2 and "model.vit.patch_size=4 shapes the vit backbone, which model.arch=conv does not" in err, err
    # What only shapes training may change.
    resumed = ["train", "tokenizer", "--resume", "model.quantizer.beta=0.5", "model.quantizer.restart_dead=false",
               "steps=3", "--out", str(run)]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="vqar.train"):
        assert run_cli(resumed, capsys)[0] == 0
    assert "settings other than" not in caplog.text  # what the command line names is meant
    with caplog.at_level(logging.WARNING, logger="vqar.train"):
        code, err = run_cli(["train", "tokenizer", "--resume", "rqvae-mnist", *TINY_RUN, "steps=4", "--out", str(run)],
                            capsys)  # fmt: skip
    assert code == 0, err
    assert (f"resuming {run} with settings other than its run.yaml's: model.quantizer.beta 0.5 -> 0.25, "
            "model.quantizer.restart_dead False -> True, train.eval_every 2 -> 250"
            ) in caplog.text  # the command line's data.max_images=600 and steps=4 are meant  # fmt: skip


def test_learning_rate_schedule():
    from vqar.train.task import warmup_cosine

    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, 0.1) == pytest.approx(0.1)


def test_a_task_schedule_replaces_warmup_cosine_where_it_answers(tmp_path, monkeypatch):
    from vqar.train.task import warmup_cosine

    monkeypatch.setattr(TokenizerTask, "lr_factor", lambda self, step: 0.5 if step < 3 else None)
    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, "steps=6", "train.log_every=1"])
    train_tokenizer(cfg, tmp_path / "run")
    train = cfg.train
    expected = [0.5] * 3 + [warmup_cosine(step, train.warmup_steps, 6, train.min_lr_ratio) for step in (3, 4, 5)]
    assert [r["lr"] for r in _records(tmp_path / "run", "train")] == pytest.approx([train.lr * f for f in expected])


def test_a_row_logs_the_learning_rate_of_its_step(tmp_path):
    """The lr of a row was the mean over the steps since the last row: in warmup over 10 steps, the row of step 3
    said 2/10 of train.lr (the rate of step 2), where step 3 trains at 3/10."""
    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, "steps=3", "train.log_every=100", "train.warmup_steps=10"])
    train_tokenizer(cfg, tmp_path / "run")
    (row,) = _records(tmp_path / "run", "train")
    assert row["step"] == 3 and row["lr"] == pytest.approx(cfg.train.lr * 3 / 10)


def test_throughput_leaves_out_evaluation_and_checkpoint_time(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from vqar.train import loop

    clock = [0.0]  # a fake clock: a training step takes 1 s, an evaluation or a checkpoint 100 s

    def taking(seconds, method):
        def timed(*args, **kwargs):
            clock[0] += seconds
            return method(*args, **kwargs)

        return timed

    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(TokenizerTask, "train_step", taking(1.0, TokenizerTask.train_step))
    monkeypatch.setattr(loop.Trainer, "evaluate", taking(100.0, loop.Trainer.evaluate))
    monkeypatch.setattr(loop.Trainer, "save", taking(100.0, loop.Trainer.save))
    overrides = [*TINY_RUN, "steps=9", "train.log_every=3", "train.eval_every=2", "train.ckpt_every=4"]
    train_tokenizer(load_run_config("rqvae-mnist", overrides), tmp_path / "run")
    assert [r["samples_per_s"] for r in _records(tmp_path / "run", "train")] == [32.0] * 3  # data.batch_size=32


def test_the_progress_bar_shows_the_task_metrics(tmp_path, monkeypatch):
    from vqar.train import loop

    bars = []

    class Bar:
        def __init__(self, **settings):
            self.settings, self.postfixes = settings, []
            bars.append(self)

        def update(self, n):
            pass

        def set_postfix(self, postfix, refresh):
            self.postfixes.append(postfix)

        def close(self):
            pass

    monkeypatch.setattr(loop, "tqdm", Bar)
    monkeypatch.setattr(loop.sys.stderr, "isatty", lambda: False)  # as in a batch job's log
    train_tokenizer(load_run_config("rqvae-mnist", [*TINY_RUN, "steps=5"]), tmp_path / "run")
    (bar,) = bars
    shown = {"total": 5, "initial": 0, "desc": "train", "dynamic_ncols": True, "mininterval": 30.0, "disable": False}
    assert bar.settings == shown
    # The tokenizer's choice (d_loss joins once the discriminator trains); the metric log keeps every metric.
    assert list(bar.postfixes[-1]) == ["loss", "psnr", "usage"]
    assert {"perplexity", "lr", "samples_per_s"} <= _records(tmp_path / "run", "train")[-1].keys()


def test_resuming_with_another_architecture_is_a_clear_error(trained_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run[0], run_dir)
    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, "steps=100", "c=32"])
    with pytest.raises(ValueError, match="model.quantizer.codebook_size=32 differs from the run's "
                                         "model.quantizer.codebook_size=64"):  # fmt: skip
        train_tokenizer(cfg, run_dir, resume=True)  # named from run.yaml, before anything is loaded
    (run_dir / "run.yaml").unlink()  # nothing to compare with: the checkpoint's weights still refuse to load
    with pytest.raises(ValueError, match="does not fit the configured model"):
        train_tokenizer(cfg, run_dir, resume=True)


def test_a_resume_that_trains_nothing_leaves_the_run_record_as_it_was(trained_run, tmp_path, caplog):
    """`--resume steps=40` on a run at step 80 trained nothing but wrote its settings into run.yaml, and later
    resumes checked against settings that never ran (an NPP run then refused its own)."""
    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run[0], run_dir)
    before = {name: (run_dir / name).read_bytes() for name in ("run.yaml", "metrics.jsonl")}
    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, "steps=40", "train.eval_every=40", "train.lr=5e-4"])
    with caplog.at_level(logging.INFO, logger="vqar.train"):
        train_tokenizer(cfg, run_dir, resume=True)
    assert "the run already reached train.steps=40" in caplog.text
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_the_best_checkpoint_is_kept_beside_the_newest(tmp_path, monkeypatch):
    scores = iter([30.0, 20.0, 10.0])  # validation PSNR gets worse after the first evaluation

    def evaluate(self, batches):
        for _ in batches:
            pass
        return {"psnr": next(scores)}

    monkeypatch.setattr(TokenizerTask, "evaluate", evaluate)
    overrides = [*TINY_RUN, "steps=12", "train.eval_every=4", "train.ckpt_every=4", "train.keep_checkpoints=1"]
    train_tokenizer(load_run_config("rqvae-mnist", overrides), tmp_path / "run")
    assert [c.step for c in list_checkpoints(tmp_path / "run")] == [4, 12]
    best = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())
    assert best == {"step": 4, "metric": "psnr", "value": 30.0}


def test_damaged_checkpoint_falls_back_to_the_previous_one(trained_run, tmp_path, caplog):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run[0], run_dir)
    newest = run_dir / "checkpoints" / "step-0000080" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING):
        ckpt = latest_checkpoint(run_dir)
    assert ckpt.step == 40
    assert "checksum mismatch in model.safetensors" in caplog.text


def test_failed_checkpoint_write_leaves_no_partial_files(trained_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run[0], run_dir)
    cfg = trained_run[1]
    task = TokenizerTask(cfg, torch.device("cpu"))

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    from vqar.train.checkpoint import save_checkpoint

    best_before = (run_dir / "checkpoints" / "best.json").read_text()
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(run_dir, 120, task.modules(), {}, "", keep=2)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["best.json", "step-0000040", "step-0000080"]
    assert (run_dir / "checkpoints" / "best.json").read_text() == best_before
    assert verify_checkpoint(run_dir / "checkpoints" / "step-0000080") is None


def test_ema_step_matches_a_hand_computed_average():
    """w_ema <- decay * w_ema + (1 - decay) * w, parameter by parameter; buffers are copied as they are."""
    from torch import nn

    from vqar.train.ema import ModelEMA

    model = nn.BatchNorm1d(2)  # two parameters and three buffers
    with torch.no_grad():
        model.weight.copy_(torch.tensor([1.0, 2.0]))
        model.bias.copy_(torch.tensor([-4.0, 8.0]))
    ema = ModelEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([11.0, -8.0]))
        model.bias.copy_(torch.tensor([6.0, 8.0]))
        model.running_mean.copy_(torch.tensor([0.5, 0.25]))
    ema.update(model)
    # 0.9 * 1 + 0.1 * 11 = 2, 0.9 * 2 + 0.1 * -8 = 1; 0.9 * -4 + 0.1 * 6 = -3, 0.9 * 8 + 0.1 * 8 = 8
    torch.testing.assert_close(ema.shadow.weight, torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(ema.shadow.bias, torch.tensor([-3.0, 8.0]))
    assert torch.equal(ema.shadow.running_mean, model.running_mean)
    ema.update(model)  # a second step from there: 0.9 * 2 + 0.1 * 11 = 2.9, 0.9 * 1 + 0.1 * -8 = 0.1
    torch.testing.assert_close(ema.shadow.weight, torch.tensor([2.9, 0.1]))
    assert not ema.shadow.weight.requires_grad and model.weight.requires_grad  # the model itself is untouched
    torch.testing.assert_close(model.weight, torch.tensor([11.0, -8.0]))
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=1.0)


def test_a_resume_follows_the_learning_rate_and_schedule_configured_now(tmp_path):
    """`--resume lr=1e-2` recorded the new rate in run.yaml and trained on at the checkpoint's, and the first step
    after a resume that raised `steps=` ran at the old schedule's last rate."""
    from vqar.cli import main

    tiny = [*TINY_RUN, "train.warmup_steps=0", "train.log_every=1", "train.eval_every=100"]

    def rates(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row["lr"] for row in rows if "lr" in row}

    assert main(["train", "tokenizer", "rqvae-mnist", *tiny, "steps=6", "lr=1e-2", "--out", str(tmp_path / "a")]) == 0
    assert main(["train", "tokenizer", "rqvae-mnist", *tiny, "steps=3", "lr=1e-3", "--out", str(tmp_path / "b")]) == 0
    assert main(["train", "tokenizer", "--resume", "steps=6", "lr=1e-2", "--out", str(tmp_path / "b")]) == 0
    fresh, resumed = rates(tmp_path / "a"), rates(tmp_path / "b")
    assert resumed[1] == pytest.approx(1e-3) and fresh[1] == pytest.approx(1e-2)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(fresh[step], rel=1e-6), (step, resumed, fresh)
