"""Stage-1 training end to end on the bundled digits: it learns, resumes exactly and survives bad input."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vqar
from conftest import TINY_RUN
from vqar.data import load_mnist_digits
from vqar.tokenizers import Tokenizer
from vqar.train.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint
from vqar.train.loop import NonFiniteLossError
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
    model = vqar.load(run_dir)
    assert isinstance(model, Tokenizer) and model.code_shape() == (4, 4, 4)
    images = torch.from_numpy(load_mnist_digits()[0][::25].astype("float32")).unsqueeze(1) / 127.5 - 1
    codes = model.encode(images)
    with torch.no_grad():
        errors = [float((model.decode(codes, depth=d) - images).pow(2).mean()) for d in range(1, 5)]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors


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


def test_an_existing_run_is_never_overwritten_by_accident(trained_run, tmp_path):
    run_dir, cfg = trained_run
    before = (run_dir / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train_tokenizer(cfg, run_dir)
    assert (run_dir / "model.safetensors").read_bytes() == before


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(tmp_path, monkeypatch):
    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, "steps=10", "train.ckpt_every=4"])
    real_step = TokenizerTask.train_step

    def step(self, batch, step):
        metrics = real_step(self, batch, step)
        return {**metrics, "loss": float("nan")} if step == 5 else metrics

    monkeypatch.setattr(TokenizerTask, "train_step", step)
    with pytest.raises(NonFiniteLossError, match="step 5"):
        train_tokenizer(cfg, tmp_path / "run")
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.step == 4 and verify_checkpoint(ckpt.path) is None


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

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(run_dir, 120, task.modules(), {}, "", keep=2)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-0000040", "step-0000080"]
    assert verify_checkpoint(run_dir / "checkpoints" / "step-0000080") is None


def test_learning_rate_schedule():
    from vqar.train.loop import warmup_cosine

    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, 0.1) == pytest.approx(0.1)


def test_resuming_with_another_architecture_is_a_clear_error(trained_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run[0], run_dir)
    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, "steps=100", "c=32"])
    with pytest.raises(ValueError, match="does not fit the configured model"):
        train_tokenizer(cfg, run_dir, resume=True)
