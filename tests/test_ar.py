"""Stage-2 training on a code store, exported models, resumes, `vqar sample`, `vqar config`, the demo pipeline,
the papers' model sizes and the rotary embedding."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

import vqar
from conftest import TINY_AR, overridden
from vqar.ar import GPT, GPT_SIZES, RQ_SIZES, GPTConfig, RQTransformer, RQTransformerConfig
from vqar.cli import main
from vqar.sampling import SamplingSettings, draw, generate, make_conditions
from vqar.train.ar import build_model, train_ar
from vqar.train.ar_config import load_run_config


def _records(run_dir, split):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture(scope="module")
def rq_run(tiny_pipeline):
    run_dir = tiny_pipeline / "rq-ar"
    cfg = load_run_config(
        "rq-mnist", [f"codes={tiny_pipeline / 'codes'}", *TINY_AR, "steps=60", "train.eval_every=30", "lr=3e-3"]
    )
    train_ar(cfg, run_dir)
    return run_dir


def test_rq_transformer_trains_and_exports(rq_run):
    train = _records(rq_run, "train")
    assert train[-1]["loss"] < train[0]["loss"] - 0.3
    val = _records(rq_run, "val")
    assert val[-1]["nll"] < val[0]["nll"]
    assert (rq_run / "samples_grid.png").is_file()
    assert Image.open(rq_run / "samples_grid.png").size[1] > 10 * 32  # one row per digit
    model = vqar.load_pretrained(rq_run)
    assert isinstance(model, RQTransformer) and model.tokenizer is not None
    assert model.code_shape == (4, 4, 4) and model.num_classes == 10
    assert torch.equal(model.code_embeddings[0], model.tokenizer.quantizer.codebook(0).vectors())
    codes = generate(model, torch.arange(3), SamplingSettings(greedy=True))
    assert model.tokenizer.decode(codes).shape == (3, 1, 32, 32)


def test_loss_decreases_on_a_small_batch_for_both_models(tiny_pipeline):
    from vqar.data.codes import CodeDataset

    store = CodeDataset(tiny_pipeline / "codes")
    codes = torch.stack([store[i].codes[0] for i in range(16)])
    labels = torch.tensor([store[i].label for i in range(16)])
    no_dropout = dict(class_dropout_prob=0.0, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    gpt = GPT(GPTConfig(**GPT_SIZES["GPT-XS"], vocab_size=64, code_shape=[4, 4], num_classes=10, **no_dropout))
    rq_cfg = load_run_config("rq-mnist", [f"codes={tiny_pipeline / 'codes'}", "size=RQ-XS",
                                          "model.resid_dropout_p=0.0", "model.class_dropout_prob=0.0"])  # fmt: skip
    rq = build_model(rq_cfg, vqar.load_pretrained(tiny_pipeline / "codes" / "tokenizer"))
    for model, batch in ((gpt, codes[..., 0]), (rq, codes)):  # the GPT learns the first-depth code grid
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(60):
            logits = model(batch, labels).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < 0.5 * losses[0], (type(model).__name__, losses[0], losses[-1])


def test_class_dropout_replaces_labels_by_the_null_class_at_the_configured_rate(tiny_pipeline):
    """The class ids a training step embeds: each label is the null class (id num_classes) with probability
    model.class_dropout_prob (0.3 here, not the preset's 0.1) and otherwise the item's own label; evaluation drops
    none. Counted over 3000 labels of 5 steps against a binomial range that fails by chance with probability
    below 1e-7, whatever the seed."""
    from conftest import binomial_range
    from vqar.data.codes import CodeDataset, collate_codes
    from vqar.train.ar import ARTask

    store = CodeDataset(tiny_pipeline / "codes")
    small = ["model.dim=32", "model.n_head=2", "model.n_layer=1", "model.n_depth_layer=1"]  # the rate is all it shows
    cfg = load_run_config("rq-mnist", [f"codes={tiny_pipeline / 'codes'}", *TINY_AR, *small,
                                       "model.class_dropout_prob=0.3"])  # fmt: skip
    task = ARTask(cfg, store, torch.device("cpu"))
    batch = collate_codes([store[i] for i in range(len(store))])
    seen = []
    table = task.model.cond_embedding.embedding_table
    table.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    steps = 5
    for step in range(steps):
        task.train_step(batch, step)
    ids, labels = torch.cat(seen), batch.labels.repeat(steps)
    assert ids.shape == labels.shape == (steps * len(store),) and int(labels.max()) < 10
    dropped = ids == 10
    lo, hi = binomial_range(len(ids), 0.3)
    assert lo <= int(dropped.sum()) <= hi, (int(dropped.sum()), lo, hi)
    assert torch.equal(ids[~dropped], labels[~dropped])
    seen.clear()
    task.evaluate([(batch, len(batch))])
    assert len(seen) == 1 and torch.equal(seen[0], batch.labels)


def test_resume_reaches_the_same_weights(tiny_pipeline, tmp_path):
    import shutil

    from safetensors.torch import load_file

    overrides = [f"codes={tiny_pipeline / 'codes'}", *TINY_AR, "steps=16", "train.ckpt_every=8", "train.eval_every=8"]
    cfg = load_run_config("rq-mnist", [*overrides, "train.ema_decay=0.9"])
    train_ar(cfg, tmp_path / "run")
    final = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000016" / "ema.safetensors"))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000016")
    torch.manual_seed(99)
    train_ar(cfg, tmp_path / "run", resume=True)
    resumed = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000016" / "ema.safetensors"))
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_an_ema_added_on_resume_starts_from_the_resumed_weights(tiny_pipeline, tmp_path, caplog):
    """`--resume train.ema_decay=0.9` on a run trained without EMA ended in "No such file or directory:
    .../ema.safetensors", naming a file of the checkpoint's and no way on."""
    from safetensors.torch import load_file

    overrides = [f"codes={tiny_pipeline / 'codes'}", *TINY_AR, "train.ckpt_every=1", "train.eval_every=2"]
    train_ar(load_run_config("rq-mnist", [*overrides, "steps=2"]), tmp_path / "run")
    cfg = load_run_config("rq-mnist", [*overrides, "steps=4", "train.ema_decay=0.5", "train.keep_checkpoints=3"])
    with caplog.at_level(logging.WARNING, logger="vqar.train"):
        train_ar(cfg, tmp_path / "run", resume=True)
    assert "step-0000002 holds no EMA weights (the run trained without it until now): it starts from the model's" \
        in caplog.text  # fmt: skip
    w2, w3, w4 = (load_file(str(tmp_path / "run" / "checkpoints" / f"step-000000{s}" / "model.safetensors"))
                  for s in (2, 3, 4))  # fmt: skip
    ema = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000004" / "ema.safetensors"))
    for name, value in ema.items():  # from step 2's weights, two updates of decay 0.5
        expected = 0.25 * w2[name] + 0.25 * w3[name] + 0.5 * w4[name] if value.is_floating_point() else w4[name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


def test_a_run_is_not_resumed_on_the_codes_of_another_tokenizer(tiny_pipeline, tmp_path, capsys):
    # The export keeps the run's tokenizer/, so the model used to go on learning the other tokenizer's codes and be
    # sampled through the first one.
    import shutil

    from conftest import run_cli

    run = tmp_path / "run"
    train = ["train", "ar", "rq-mnist", f"codes={tiny_pipeline / 'codes'}", *TINY_AR, "steps=2", "train.eval_every=2",
             "sample.n_per_class=0", "--out", str(run)]  # fmt: skip
    assert main(train) == 0
    printed = capsys.readouterr().out  # no grid is drawn: none is named (it named one that was never written)
    assert f"done: {run}" in printed and "pictures:" not in printed and not (run / "samples_grid.png").exists()
    other = tmp_path / "codes"  # the same codes, paired with a tokenizer whose weights differ
    shutil.copytree(tiny_pipeline / "codes", other)
    tokenizer = vqar.load_pretrained(other / "tokenizer")
    with torch.no_grad():
        next(tokenizer.parameters()).add_(0.01)
    vqar.save_pretrained(tokenizer, other / "tokenizer")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, err = run_cli(["train", "ar", "--resume", f"codes={other}", "steps=4", "--out", str(run)], capsys)
    assert code == 2 and err.splitlines()[-1] == (
        f"vqar: error: data.codes: the store {other} holds the codes of another tokenizer than the one this run "
        f"trained with ({run / 'tokenizer'}); resume on that tokenizer's codes, or start a new run"
    ), err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert run_cli(["train", "ar", "--resume", "steps=4", "--out", str(run)], capsys)[0] == 0  # its own codes


def test_a_resume_on_codes_of_another_shape_names_the_run_not_an_unset_setting(tiny_pipeline, tmp_path, capsys):
    """It said "model.code_shape=[4, 4, 4] contradicts the code store ...; leave model.code_shape unset", a setting
    the user never gave: the value is the run's own, from its run.yaml."""
    from conftest import run_cli
    from vqar.data import DataConfig
    from vqar.data.extraction import extract_codes

    larger = tmp_path / "codes48"  # the same tokenizer at 48 px: 6x6 positions
    extract_codes(vqar.load_pretrained(tiny_pipeline / "tokenizer"), DataConfig(max_images=20, image_size=48), larger)
    run = tmp_path / "run"
    train = ["train", "ar", "rq-mnist", f"codes={tiny_pipeline / 'codes'}", *TINY_AR, "steps=2", "train.eval_every=2",
             "sample.n_per_class=0", "--out", str(run)]  # fmt: skip
    assert run_cli(train, capsys)[0] == 0
    code, err = run_cli(["train", "ar", "--resume", f"codes={larger}", "steps=4", "--out", str(run)], capsys)
    assert code == 2 and err == (f"vqar: error: the run of {run / 'run.yaml'} trains on codes with model.code_shape="
                                 f"[4, 4, 4], and the code store {larger} gives [6, 6, 4]: resume it on a store that "
                                 "gives [4, 4, 4], or start a new run in another --out\n"), err  # fmt: skip
    # the same refusal of a value the user gave blamed the run's run.yaml, and advised a store that would not fit it
    code, err = run_cli(["train", "ar", "--resume", "model.code_shape=[6,6,4]", "--out", str(run)], capsys)
    assert code == 2 and err == ("vqar: error: resuming: model.code_shape=[6, 6, 4] differs from the run's [4, 4, 4] "
                                 f"({run / 'run.yaml'}), whose checkpoints hold that model's weights; leave "
                                 "model.code_shape out, or start a new run in another --out\n"), err  # fmt: skip


def test_a_resume_that_changes_the_model_is_refused_naming_the_setting(tiny_pipeline, tmp_path, capsys):
    """Another n_head keeps every weight shape: the run used to go on training another network from the
    checkpoint's weights, and another width failed naming tensors ("was the architecture changed?")."""
    from conftest import file_contents, run_cli

    run = tmp_path / "run"
    train = ["train", "ar", "rq-mnist", f"codes={tiny_pipeline / 'codes'}", *TINY_AR, "steps=2", "train.eval_every=2",
             "sample.n_per_class=0", "--out", str(run)]  # fmt: skip
    assert run_cli(train, capsys)[0] == 0
    before = file_contents(run)
    for setting, trained in [("model.n_head=8", 4), ("size=RQ-S", "RQ-XS"), ("model.class_dropout_prob=0", 0.1)]:
        code, err = run_cli(["train", "ar", "--resume", setting, "--out", str(run)], capsys)
        key, given = setting.split("=")
        assert code == 2 and err.count("\n") == 1, err
        assert f"{key}={given}" in err and f"the run's {key}={trained}" in err and f"leave {key} out" in err, err
        assert file_contents(run) == before
    # What only shapes training may change: the dropout rates, the length of the run.
    resumed = ["train", "ar", "--resume", "model.resid_dropout_p=0.2", "model.class_dropout_prob=0.2", "steps=3"]
    assert run_cli([*resumed, "--out", str(run)], capsys)[0] == 0


def test_a_run_resumed_with_its_preset_trains_on_the_codes_its_run_yaml_names(tiny_pipeline, tmp_path, capsys,
                                                                              caplog):  # fmt: skip
    """`vqar train ar rq-mnist --resume --out RUN` asked for codes=, which the preset leaves unset, although RUN's
    run.yaml names its store; with the preset the run now resumes as the tokenizer stage does, saying what the
    preset changes. A store given on the command line is still the one used."""
    from conftest import run_cli

    run = tmp_path / "run"
    train = ["train", "ar", "rq-mnist", f"codes={tiny_pipeline / 'codes'}", *TINY_AR, "steps=2", "train.eval_every=2",
             "sample.n_per_class=0", "--out", str(run)]  # fmt: skip
    assert run_cli(train, capsys)[0] == 0
    resumed = ["train", "ar", "rq-mnist", "--resume", *overridden(TINY_AR, "steps=3", "sample.n_per_class=0"), "--out",
               str(run)]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="vqar.train"):
        code, err = run_cli(resumed, capsys)
    assert code == 0, err
    assert f"resuming {run} with settings other than its run.yaml's: train.eval_every 2 -> 500" in caplog.text
    assert f"codes: {tiny_pipeline / 'codes'}" in (run / "run.yaml").read_text()
    code, err = run_cli([*resumed[:-2], "codes=/nonexistent/store", "--out", str(run)], capsys)
    assert code == 2 and "/nonexistent/store" in err, err


def test_a_damaged_checkpoint_is_reported_once_on_resume(tiny_pipeline, tmp_path, capsys, caplog):
    """Resuming an AR run whose newest checkpoint was damaged said "falling back to the previous one" twice: once
    for the check of the resumed schedule, once for the restore."""
    from conftest import run_cli

    run = tmp_path / "run"
    train = ["train", "ar", "rq-mnist", f"codes={tiny_pipeline / 'codes'}", *TINY_AR, "steps=4", "train.eval_every=4",
             "train.ckpt_every=2", "sample.n_per_class=0", "--out", str(run)]  # fmt: skip
    assert run_cli(train, capsys)[0] == 0
    weights = run / "checkpoints" / "step-0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING):
        assert run_cli(["train", "ar", "--resume", "steps=5", "--out", str(run)], capsys)[0] == 0
    assert caplog.text.count("falling back to the previous one") == 1, caplog.text


def test_a_run_whose_run_yaml_holds_npp_settings_that_went_unused_still_resumes(tiny_pipeline, tmp_path, capsys,
                                                                                caplog):  # fmt: skip
    """vqar used to accept npp.rate and the segment schedule's keys with npp.level=1, where they change nothing, and
    now refuses them: a run.yaml of then would refuse --resume. Those keys are put back to their defaults with a
    warning; given anew on the command line, they are still refused."""
    import yaml

    from conftest import run_cli

    run = tmp_path / "run"
    train = ["train", "ar", "rq-mnist", f"codes={tiny_pipeline / 'codes'}", *TINY_AR, "steps=2", "train.eval_every=2",
             "sample.n_per_class=0", "--out", str(run)]  # fmt: skip
    assert run_cli(train, capsys)[0] == 0
    saved = yaml.safe_load((run / "run.yaml").read_text())
    saved["npp"].update(rate=0.25, warmup_steps=7)  # as an older vqar wrote it
    (run / "run.yaml").write_text(yaml.safe_dump(saved))

    code, err = run_cli(["train", "ar", "--resume", "npp.rate=0.3", "steps=3", "--out", str(run)], capsys)
    assert code == 2 and "vqar: error: npp.rate=0.3 shapes next patch prediction" in err, err
    with caplog.at_level("WARNING", logger="vqar.train"):
        code, err = run_cli(["train", "ar", "--resume", "steps=3", "--out", str(run)], capsys)
    assert code == 0, err
    assert "its run.yaml sets npp.rate=0.25 and npp.warmup_steps=7, which npp.level=1 leaves unused" in caplog.text
    assert _records(run, "train")[-1]["step"] == 3
    defaults = dict(level=1, rate=0.5, segment_lr=True, warmup_steps=100, decay_ratio=0.2, end_lr_ratio=0.1)
    assert yaml.safe_load((run / "run.yaml").read_text())["npp"] == defaults

    # The README's way to train on single tokens for longer after NPP: `--resume npp.level=1 steps=MORE`. The NPP
    # settings run.yaml keeps go unused then; "leave npp.warmup_steps=7 out" named one the user never gave.
    saved = yaml.safe_load((run / "run.yaml").read_text())
    saved["npp"].update(level=2, warmup_steps=7)
    (run / "run.yaml").write_text(yaml.safe_dump(saved))
    code, err = run_cli(["train", "ar", "--resume", "npp.level=1", "npp.warmup_steps=7", "steps=4", "--out", str(run)],
                        capsys)  # fmt: skip
    assert code == 2 and "vqar: error: npp.warmup_steps=7 shapes next patch prediction" in err, err  # given anew
    code, err = run_cli(["train", "ar", "--resume", "npp.level=1", "npp.rate=[1", "--out", str(run)], capsys)
    assert code == 2 and err.startswith("vqar: error: cannot read the value of override 'npp.rate=[1'"), err
    caplog.clear()
    with caplog.at_level("WARNING", logger="vqar.train"):
        code, err = run_cli(["train", "ar", "--resume", "npp.level=1", "steps=4", "--out", str(run)], capsys)
    assert code == 0, err
    assert "its run.yaml sets npp.warmup_steps=7, which npp.level=1 leaves unused" in caplog.text
    assert _records(run, "train")[-1]["step"] == 4
    assert yaml.safe_load((run / "run.yaml").read_text())["npp"] == defaults


def test_gpt_on_a_vq_code_store(tmp_path):
    from conftest import TINY_RUN
    from vqar.data import DataConfig
    from vqar.data.extraction import extract_codes
    from vqar.train.tokenizer import load_run_config as tokenizer_config
    from vqar.train.tokenizer import train_tokenizer

    train_tokenizer(tokenizer_config("vq-mnist", [*TINY_RUN, "model.conv.ch_mult=[1,2,4]", "steps=5"]), tmp_path / "vq")
    extract_codes(vqar.load_pretrained(tmp_path / "vq"), DataConfig(max_images=200), tmp_path / "codes")
    cfg = load_run_config("gpt-mnist", [f"codes={tmp_path / 'codes'}", "size=GPT-XS", "steps=10", "bs=16"])
    metrics = train_ar(cfg, tmp_path / "gpt")
    assert np.isfinite(metrics["nll"])
    model = vqar.load_pretrained(tmp_path / "gpt")
    assert model.code_shape == (8, 8) and model.tokenizer is not None
    # A store the architecture cannot model is named with what to do, not by the model's code_shape check, which
    # the store filled in (VAR's used to be, as a VQ tokenizer's config holds an empty patch_nums).
    for preset, problem in (("rq-mnist", "an RQ-Transformer models stacks of codes (a residual tokenizer's height x "
                                         "width x depth), and these are 8x8: train arch=gpt or arch=vim on them"),
                            ("var-mnist", "VAR models the codes of a multi-scale tokenizer")):  # fmt: skip
        store = tmp_path / "codes"
        arch = preset.split("-")[0]
        with pytest.raises(ValueError, match=re.escape(f"data.codes: the store {store} does not suit arch={arch}: "
                                                       f"{problem}")):  # fmt: skip
            load_run_config(preset, [f"codes={store}"])

    # Next patch prediction (level 3: 4x4 patches, then 2x2, then tokens) and VIM train on the same store.
    overrides = [f"codes={tmp_path / 'codes'}", "size=GPT-XS", "steps=8", "bs=16", "train.log_every=1",
                 "npp.level=3", "npp.rate=0.5", "npp.segment_lr=true", "npp.warmup_steps=1"]  # fmt: skip
    train_ar(load_run_config("gpt-mnist", overrides), tmp_path / "npp")
    records = [json.loads(line) for line in (tmp_path / "npp" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["patch"] for r in train] == [4, 4, 2, 2, 1, 1, 1, 1]
    assert [r["positions"] for r in train[::2]] == [16 * 4, 16 * 16, 16 * 64, 16 * 64]
    assert train[0]["lr"] == 0.0 and train[2]["lr"] == 0.0  # every segment restarts its warmup
    with pytest.raises(ValueError, match=r"npp.level > 1\) applies to arch=gpt, not arch=vim"):
        load_run_config("vim-mnist", [f"codes={tmp_path / 'codes'}", "npp.level=2"])
    with pytest.raises(ValueError, match="npp.level=5 starts with 16x16 patches"):
        train_ar(load_run_config("gpt-mnist", [*overrides[:4], "npp.level=5"]), tmp_path / "npp5")
    vim_cfg = load_run_config("vim-mnist", [f"codes={tmp_path / 'codes'}", "steps=6", "bs=16"])
    metrics = train_ar(vim_cfg, tmp_path / "vim")
    vim = vqar.load_pretrained(tmp_path / "vim")
    assert vim.arch == "vim"
    # the reported validation NLL is the exported model's cross-entropy on the validation split, computed here
    from vqar.data import split_dataset
    from vqar.data.codes import CodeDataset

    store = CodeDataset(tmp_path / "codes")
    _, val = split_dataset(store, vim_cfg.data.val_fraction, vim_cfg.data.split_seed)
    val_codes = torch.stack([store[i].codes[0] for i in val.indices])
    val_labels = torch.tensor([store[i].label for i in val.indices])
    with torch.no_grad():
        logits = vim.eval()(val_codes, val_labels).logits
    nll = float(torch.nn.functional.cross_entropy(logits.flatten(0, -2), val_codes.flatten()))
    assert metrics["nll"] == pytest.approx(nll, rel=1e-5)

    # A text-conditioned GPT: the captions of the digits as a prefix, caption dropout, a prompt at sampling time.
    text_data = DataConfig(max_images=200, captions="digits")
    extract_codes(vqar.load_pretrained(tmp_path / "vq"), text_data, tmp_path / "text-codes")
    overrides = [f"codes={tmp_path / 'text-codes'}", "size=GPT-XS", "steps=6", "bs=16", "text.length=8",
                 "text.vocab_size=160", "sample.n_per_class=1"]  # fmt: skip
    assert np.isfinite(train_ar(load_run_config("gpt-mnist", overrides), tmp_path / "gpt-text")["nll"])
    gpt = vqar.load_pretrained(tmp_path / "gpt-text")
    assert gpt.conditioning.value == "text" and gpt.cfg.prefix_length == 8 and gpt.has_null_condition
    conditions = make_conditions(gpt, prompts=["the digit 4"], n_per_condition=2)
    result = draw(gpt, conditions, SamplingSettings(cfg_scale=2.0))
    assert result.images.shape == (2, 1, 32, 32) and result.prompts == ["the digit 4"]
    assert not result.images.requires_grad  # decoded without keeping the tokenizer's graph
    prompt = gpt.text_tokenizer.encode(["the digit 4"] * 2)
    assert torch.equal(result.codes, generate(gpt, prompt, SamplingSettings(cfg_scale=2.0)))  # the prompt, guided
    with torch.no_grad():
        assert torch.equal(result.images, gpt.tokenizer.decode(result.codes).clamp(-1, 1))
    # Greedy and guided: each code is a largest logit of null + 2 (prompt - null), the null condition being the
    # empty caption (all padding), up to float rounding between cached decoding and teacher forcing.
    greedy = draw(gpt, conditions, SamplingSettings(greedy=True, cfg_scale=2.0)).codes
    with torch.no_grad():
        null = gpt(greedy, torch.zeros_like(prompt)).logits
        guided = null + 2.0 * (gpt(greedy, prompt).logits - null)
    chosen = guided.gather(-1, greedy[..., None]).squeeze(-1)
    assert (guided.max(-1).values - chosen <= 1e-4).all()
    with pytest.raises(ValueError, match=r"a caption store .* applies to arch=gpt\|rq, not arch=vim"):
        train_ar(load_run_config("vim-mnist", overrides[:1] + ["steps=2"]), tmp_path / "vim-text")


def test_sample_cli_writes_grid_pngs_and_adm_npz(rq_run, tmp_path, capsys):
    out = tmp_path / "samples"
    args = ["sample", "--model", str(rq_run), "--classes", "0,7", "--n-per-class", "3", "--top-k", "16,16,8,8",
            "--top-p", "0.95", "--seed", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "images/s" in capsys.readouterr().out
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].shape == (6, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
        assert npz["arr_1"].tolist() == [0, 0, 0, 7, 7, 7]
        first = npz["arr_0"].copy()
    assert len(list((out / "images").glob("class0007_*.png"))) == 3
    assert Image.open(out / "grid.png").size == (3 * 34 + 2, 2 * 34 + 2)
    assert main([*args[:-1], str(tmp_path / "again")]) == 0
    with np.load(tmp_path / "again" / "samples.npz") as npz:
        assert np.array_equal(npz["arr_0"], first)  # the same seed gives the same images


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--classes", "12"], "unknown class id"),
        (["--top-p", "2"], "top_p"),
        (["--temperature", "0"], "temperature"),
        (["--top-k", "0"], "top_k"),
        (["--top-k", "1,2"], "depth 4"),
    ],
)
def test_sample_cli_rejects_bad_arguments(rq_run, tmp_path, capsys, extra, message):
    assert main(["sample", "--model", str(rq_run), "--out", str(tmp_path / "s"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_sample_cli_rejects_a_mismatched_tokenizer(rq_run, tmp_path, capsys):
    from conftest import TINY_RUN
    from vqar.train.tokenizer import load_run_config as tokenizer_config
    from vqar.train.tokenizer import train_tokenizer

    train_tokenizer(tokenizer_config("rqvae-mnist", [*TINY_RUN, "d=2", "steps=2"]), tmp_path / "tok")
    args = ["sample", "--model", str(rq_run), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "s")]
    assert main(args) == 2
    assert "2 code(s) per position) does not fit the model" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_quick_demo_runs_end_to_end(tmp_path, classifier_cache):
    from vqar.demo import run_demo

    report = run_demo(tmp_path / "demo", quick=True, classifier_cache=classifier_cache)
    for key in ("tokenizer_psnr_db", "ar_val_nll_per_code", "sampling_images_per_second", "class_accuracy"):
        assert np.isfinite(report[key])
    assert (tmp_path / "demo" / "samples" / "grid.png").is_file()
    written = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert written["samples"] == 40 and written["quick"] is True
    from vqar.demo import check_demo_folder

    check_demo_folder(tmp_path / "demo")  # a demo's folder, its report.json included, is the next demo's to replace


@pytest.mark.parametrize(
    ("size", "millions"),
    [("GPT-B", 111), ("GPT-L", 343), ("GPT-XL", 775), ("GPT-XXL", 1411), ("GPT-3B", 3097)],
)
def test_gpt_sizes_have_the_papers_parameter_counts(size, millions):
    with torch.device("meta"):
        model = GPT(GPTConfig(**GPT_SIZES[size], vocab_size=16384, num_classes=1000))  # a 16x16 grid
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) < 1


@pytest.mark.parametrize(
    ("size", "millions"), [("RQ-480M", 481), ("RQ-821M", 821), ("RQ-1.4B", 1388), ("RQ-3.8B", 3822)]
)
def test_rq_sizes_have_the_papers_parameter_counts(size, millions):
    with torch.device("meta"):
        model = RQTransformer(RQTransformerConfig(**RQ_SIZES[size], vocab_size=16384, num_classes=1000))
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) < 1


def test_config_prints_one_architecture_with_the_values_the_run_uses(rq_run, tiny_pipeline, capsys):
    from vqar.configs import to_dict

    codes = tiny_pipeline / "codes"
    assert main(["config", "ar", "rq-mnist", f"codes={codes}"]) == 0
    text = capsys.readouterr().out
    assert "arch: rq\n" in text and "size: RQ-XS\n" in text
    assert "n_kv_head" not in text and "rope_base" not in text  # the GPT's fields: not this run's architecture
    assert f"  vocab_size: 64  # from the code store {codes}" in text
    assert f"  num_classes: 10  # from the code store {codes}" in text
    assert f"  code_shape:  # from the code store {codes}\n  - 4\n  - 4\n  - 4\n" in text
    assert f"  code_dim: 32  # from the code store {codes}" in text  # the tokenizer's code vectors
    # what the trained run recorded and exported is what the configuration said
    overrides = [f"codes={codes}", *TINY_AR, "steps=60", "train.eval_every=30", "lr=3e-3"]  # as rq_run
    assert to_dict(load_run_config("rq-mnist", overrides).model) == to_dict(vqar.load_pretrained(rq_run).cfg)
    assert main(["config", "ar", "gpt-mnist"]) == 0
    assert "  vocab_size: ???  # from the code store: give codes=DIR" in capsys.readouterr().out
    assert main(["config", "ar", "rq-mnist", f"codes={codes}", "model.vocab_size=512"]) == 2
    assert "model.vocab_size=512 contradicts the code store" in capsys.readouterr().err
    # a store of stacks for a one-code-per-position architecture: refused here, not only when training starts
    assert main(["config", "ar", "gpt-mnist", f"codes={codes}"]) == 2
    assert "a GPT models one code per position" in capsys.readouterr().err
    assert main(["train", "ar", "rq-mnist", "--out", str(tiny_pipeline / "never")]) == 2
    assert "come from the code store" in capsys.readouterr().err


def test_rotary_embedding_rotates_each_channel_pair_by_its_angle_to_the_bit():
    from vqar.ar.layers import apply_rope, rope_2d_table, rotation_table

    def rotated(x, table):  # pair by pair, as the LlamaGen code writes it
        pairs = x.unflatten(-1, (-1, 2))
        cos, sin = table[..., None, :, 0], table[..., None, :, 1]
        return torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin],
                           -1).flatten(-2)  # fmt: skip

    table = rope_2d_table(3, 4, head_dim=16, base=10000.0, prefix=2)  # (14, 8, 2): cos, sin per pair
    x = torch.randn(2, 14, 3, 16)
    assert torch.equal(apply_rope(x, rotation_table(table)), rotated(x, table[None]))
    rows = torch.tensor([[0, 1, 2], [9, 10, 11]])  # a window per image, as speculative decoding feeds
    window = x[:, :3]
    assert torch.equal(apply_rope(window, rotation_table(table)[rows]), rotated(window, table[rows]))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_the_patch_loss_is_each_tokens_cross_entropy_with_the_runs_label_smoothing(smoothing):
    """NPP's patch stages left loss.label_smoothing out (the loss of 2x2 patches was the same at 0 and 0.5): only
    its single-token stage was smoothed."""
    from vqar.ar.next_patch import next_patch_loss, patchify

    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (2, 4, 4), generator=generator)
    for side in (1, 2):
        patches = (4 // side) ** 2
        logits = torch.randn(2, patches, 16, generator=generator)
        per_token = logits.unsqueeze(2).expand(2, patches, side * side, 16).reshape(-1, 16)
        expected = torch.nn.functional.cross_entropy(per_token, patchify(codes, side).reshape(-1),
                                                     label_smoothing=smoothing)  # fmt: skip
        torch.testing.assert_close(next_patch_loss(logits, codes, side, smoothing), expected)
