"""Text-to-image training and sampling: a text-conditioned RQ-Transformer trained on digit captions (its weighted
text loss, caption dropout), the caption settings refused where no captions or text head use them, `vqar sample
--prompt`, and a text run refused before it starts leaving nothing that blocks its rerun."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

import vqar
from conftest import TINY_AR, overridden
from vqar.cli import main
from vqar.data import DataConfig
from vqar.data.codes import CodeDataset
from vqar.data.extraction import extract_codes
from vqar.train.ar import train_ar
from vqar.train.ar_config import load_run_config


@pytest.fixture(scope="module")
def text_run(tiny_pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    tokenizer = vqar.load_pretrained(tiny_pipeline / "tokenizer")
    extract_codes(tokenizer, DataConfig(source="mnist", max_images=300, captions="digits"), root / "codes",
                  tokenizer_dir=tiny_pipeline / "tokenizer")  # fmt: skip
    changes = ["steps=30", "train.eval_every=30", "train.log_every=1", "text.length=8", "text.vocab_size=160",
               "loss.soft_targets=true"]  # fmt: skip
    overrides = [f"codes={root / 'codes'}", *overridden(TINY_AR, *changes)]
    metrics = train_ar(load_run_config("rq-mnist-text", overrides), root / "ar")
    return root, metrics


def test_text_rq_trains_with_weighted_text_loss(text_run):
    root, metrics = text_run
    records = [json.loads(line) for line in (root / "ar" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    for r in train:  # the logged loss is 0.1 * caption CE + 0.9 * image CE
        assert r["loss"] == pytest.approx(0.1 * r["text_loss"] + 0.9 * r["image_loss"], rel=1e-5)
    assert np.mean([r["text_loss"] for r in train[-5:]]) < np.mean([r["text_loss"] for r in train[:5]])
    assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]])
    assert np.isfinite(metrics["nll"])
    model = vqar.load_pretrained(root / "ar")
    assert model.conditioning.value == "text" and model.text_tokenizer.length == 8 and model.has_null_condition
    assert (root / "ar" / "samples_grid_prompts.txt").is_file()


@pytest.fixture(scope="module")
def random_stores(tmp_path_factory):
    """Code stores of 20 digits from untrained tokenizers, by name: VQ or RQ codes, with captions or classes."""
    from conftest import random_tokenizer

    root = tmp_path_factory.mktemp("random-stores")
    for quantizer, captions in [("vq", "digits"), ("rq", "digits"), ("rq", "none")]:
        data = DataConfig(max_images=20, image_size=16, channels=1, captions=captions)
        extract_codes(random_tokenizer(quantizer=quantizer), data, root / f"{quantizer}-{captions}")
    return root


def test_caption_loss_weights_are_refused_where_no_text_head_uses_them(random_stores):
    """A GPT reads its caption but does not predict it, and a class-conditional model has none: the image loss is
    the whole loss there, and loss.txt_weight / loss.img_weight used to be ignored unsaid."""
    from vqar.configs import ConfigError

    gpt_text, rq_text = ([f"codes={random_stores / s}", "text.vocab_size=160"] for s in ("vq-digits", "rq-digits"))
    with pytest.raises(ConfigError, match=re.escape("loss.txt_weight=0.5 (the caption loss of a text head) applies to "
                                                    "arch=rq, not arch=gpt")):  # fmt: skip
        load_run_config("gpt-mnist", [*gpt_text, "loss.txt_weight=0.5"])
    with pytest.raises(ConfigError, match=re.escape("loss.img_weight=0.5 applies to a text-conditioned model")):
        load_run_config("rq-mnist", [f"codes={random_stores / 'rq-none'}", "loss.img_weight=0.5"])
    assert load_run_config("rq-mnist-text", [*rq_text, "loss.txt_weight=0.5"]).loss.txt_weight == 0.5
    load_run_config("gpt-mnist", gpt_text)  # the defaults, which every run.yaml states, are no choice to refuse


def test_a_caption_preset_on_a_store_without_captions_is_refused(random_stores):
    """rq-mnist-text on class codes trained a class-conditional model without a word: its text.* settings went
    unused, and the run sampled digits by class."""
    from vqar.configs import ConfigError

    classes = f"codes={random_stores / 'rq-none'}"
    with pytest.raises(ConfigError, match=re.escape("text.vocab_size=256 shapes the captions of a text-conditioned "
                                                    "model, and this store holds no captions")):  # fmt: skip
        load_run_config("rq-mnist-text", [classes])
    with pytest.raises(ConfigError, match=re.escape("text.length=16 and text.bpe_dropout=None shape the captions")):
        load_run_config("rq-mnist", [classes, "text.length=16", "text.bpe_dropout=null"])
    assert load_run_config("rq-mnist", [classes]).model.num_classes == 10  # the defaults: every run.yaml states them


@pytest.mark.parametrize("dropout", ["-0.1", "0", "1", "1.5"])
def test_a_bpe_dropout_outside_0_1_is_refused_with_the_config(random_stores, dropout):
    """It used to pass the config checks and fail once the run folder was made, naming no setting (0 too: the
    caption tokenizer takes null for no dropout)."""
    from vqar.configs import ConfigError

    text = [f"codes={random_stores / 'rq-digits'}", "text.vocab_size=160"]
    with pytest.raises(ConfigError, match=re.escape(f"text.bpe_dropout must be in (0, 1), or null for none, got "
                                                    f"{float(dropout)}")):  # fmt: skip
        load_run_config("rq-mnist-text", [*text, f"text.bpe_dropout={dropout}"])
    load_run_config("rq-mnist-text", [*text, "text.bpe_dropout=null"])


def test_caption_dropout_replaces_whole_captions_at_the_configured_rate(text_run):
    """The captions a training step feeds the model: each is the empty caption with probability
    model.class_dropout_prob (0.3 here, not the preset's 0.1) and otherwise one of its image's captions; evaluation
    drops none. Counted over 3000 captions of 10 steps against a binomial range that fails by chance with
    probability below 1e-7, whatever the seed."""
    from conftest import binomial_range
    from vqar.data.codes import collate_codes
    from vqar.train.ar import ARTask

    root, _ = text_run
    small = ["model.dim=32", "model.n_head=2", "model.n_layer=1", "model.n_depth_layer=1"]  # the rate is all it shows
    overrides = [f"codes={root / 'codes'}", *TINY_AR, *small, "text.length=8", "text.vocab_size=160",
                 "model.class_dropout_prob=0.3"]  # fmt: skip
    store = CodeDataset(root / "codes")
    captions = vqar.load_pretrained(root / "ar").text_tokenizer
    task = ARTask(load_run_config("rq-mnist-text", overrides), store, torch.device("cpu"), text_tokenizer=captions)
    batch = collate_codes([store[i] for i in range(len(store))])
    seen = []
    task.model.cond_embedding.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    steps = 10
    for step in range(steps):
        task.train_step(batch, step)
    ids = torch.cat(seen)
    assert ids.shape == (steps * len(store), 8)
    empty = (ids == captions.pad_id).all(1)
    lo, hi = binomial_range(len(ids), 0.3)
    assert lo <= int(empty.sum()) <= hi, (int(empty.sum()), lo, hi)
    # the others are captions of their own image: their text (spaces aside), cut where the 8 tokens end
    for row, item in zip(ids[~empty], torch.arange(len(ids))[~empty] % len(store), strict=True):
        text = captions.decode(row).replace(" ", "")
        assert any(c.lower().replace(" ", "").startswith(text) for c in store.captions[int(item)]), text
    seen.clear()
    task.evaluate([(batch, len(batch))])
    assert len(seen) == 1 and not (seen[0] == captions.pad_id).all(1).any()


def test_sample_cli_draws_prompts(text_run, tmp_path, capsys):
    root, _ = text_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the digit 3\n\nsomeone wrote the digit seven\n")
    out = tmp_path / "s"
    args = ["sample", "--model", str(root / "ar"), "--prompt", "a handwritten one", "--prompts", str(prompts),
            "--n-per-class", "2", "--cfg", "2.0", "--top-k", "8", "--top-p", "0.95", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].shape == (6, 32, 32, 3) and npz["arr_1"].tolist() == [0, 0, 1, 1, 2, 2]
        first = npz["arr_0"].copy()
    assert (out / "prompts.txt").read_text().splitlines()[2] == "someone wrote the digit seven"
    assert len(list((out / "images").glob("prompt0002_*.png"))) == 2
    with np.load(out / "samples.npz") as npz:  # how --overwrite tells the run's prompts.txt from one of yours
        assert npz["prompts"].tolist() == (out / "prompts.txt").read_text().splitlines()
    assert main([*args, "--overwrite"]) == 0  # the run's own prompts.txt is the run's to replace
    assert main([*args[:-1], str(tmp_path / "again")]) == 0
    with np.load(tmp_path / "again" / "samples.npz") as npz:
        assert np.array_equal(npz["arr_0"], first)
    capsys.readouterr()
    line_break = ["--prompt", "a seven\nwritten neatly", "--prompt", "the digit one"]  # prompts.txt had 3 lines
    for bad, message in ((["--prompt", " "], "empty prompt"), ([], "text-conditioned"),
                         (["--prompt", "a one", "--classes", "1"], "either --classes or prompts"),
                         (line_break, "prompt 'a seven\\nwritten neatly' holds a line break ('\\n' at character 8)"),
                         (["--prompt", "a seven\u2028written neatly"], "holds a line break ('\\u2028'")):  # fmt: skip
        assert main(["sample", "--model", str(root / "ar"), "--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()


def test_a_caption_tokenizer_of_another_vocabulary_is_refused_beside_the_model(text_run, tmp_path, capsys):
    """A `--text-tokenizer` learned from other captions, smaller than the model's text vocabulary, was taken
    without a word: its ids mean other words to the model. The model's own vocabulary at another length is not."""
    from vqar.text import TextTokenizer

    root, _ = text_run
    other = TextTokenizer.train(["a cat on a mat", "two dogs in the park"] * 4, tmp_path / "other", vocab_size=160)
    args = ["sample", "--model", str(root / "ar"), "--prompt", "the digit 3", "--n-per-class", "1"]
    assert main([*args, "--text-tokenizer", str(tmp_path / "other"), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the caption tokenizer has another vocabulary than the one the model was " \
        "trained with" in err, err
    assert not (tmp_path / "s").exists()
    own = vqar.load_pretrained(root / "ar").text_tokenizer
    assert other.vocab_size < own.vocab_size and own.entries_differing_from(other) > 0
    own.with_length(4).save(tmp_path / "own")
    assert main([*args, "--text-tokenizer", str(tmp_path / "own"), "--out", str(tmp_path / "s")]) == 0


def test_a_missing_text_tokenizer_is_said_to_be_missing_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import vqar.interop

    def too_early(*args, **kwargs):
        raise ValueError("the model was loaded before --text-tokenizer was checked")

    monkeypatch.setattr(vqar.interop, "load_pretrained", too_early)
    args = ["sample", "--model", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "s")]
    assert main([*args, "--text-tokenizer", str(tmp_path / "typo")]) == 2
    assert f"no text tokenizer at {tmp_path / 'typo'}: the path does not exist" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    assert main([*args, "--text-tokenizer", str(tmp_path / "notes")]) == 2
    assert "holds no text tokenizer" in capsys.readouterr().err


def test_a_text_run_that_fails_before_it_starts_leaves_nothing_that_blocks_its_rerun(random_stores, tmp_path, capsys,
                                                                                      monkeypatch):  # fmt: skip
    """Refused for memory after its caption tokenizer was made, the run left OUT/text_tokenizer/, and the same
    command again was refused: "OUT is not a training run (it holds text_tokenizer)"."""
    import vqar.utils.memory
    from conftest import run_cli

    out = tmp_path / "run"
    train = ["train", "ar", "rq-mnist-text", f"codes={random_stores / 'rq-digits'}", "text.vocab_size=160",
             "size=RQ-XS", "bs=8", "steps=2", "train.eval_every=2", "sample.n_per_class=0",
             "--out", str(out)]  # fmt: skip
    with monkeypatch.context() as patch:
        patch.setattr(vqar.utils.memory, "available_memory", lambda: 1 << 20)  # 1 MB free
        code, err = run_cli(train, capsys)
    assert code == 2 and "1.0 MB is available" in err, err
    assert not out.exists()
    out.mkdir()  # an empty folder of the user's own is kept as it was
    with monkeypatch.context() as patch:
        patch.setattr(vqar.utils.memory, "available_memory", lambda: 1 << 20)
        assert run_cli(train, capsys)[0] == 2
    assert out.is_dir() and not any(out.iterdir())
    assert run_cli(train, capsys)[0] == 0  # the same command, with the memory it needs


def test_a_text_run_repeated_with_its_seed_learns_the_same_vocabulary_and_weights(random_stores, tmp_path):
    """The caption vocabulary came out numbered in hash-map order and BPE dropout drew from an unseeded source of
    `tokenizers`' own: the same command and seed gave other weights every time (max |difference| ~4e-3)."""
    from safetensors.torch import load_file

    overrides = [f"codes={random_stores / 'rq-digits'}", "text.vocab_size=160", "size=RQ-XS", "bs=8", "steps=3",
                 "train.eval_every=3", "sample.n_per_class=0", "text.bpe_dropout=0.3"]  # fmt: skip
    for run in ("a", "b"):
        train_ar(load_run_config("rq-mnist-text", overrides), tmp_path / run)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a/text_tokenizer" / name).read_text() == (tmp_path / "b/text_tokenizer" / name).read_text()
    first, second = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("dropout", [None, 0.3])
def test_a_bpe_dropout_given_on_resume_is_the_one_trained_with(text_run, tmp_path, dropout):
    """`--resume text.bpe_dropout=...` was written to run.yaml and ignored: the run's saved caption tokenizer kept
    the rate it was made with (0.1). A rate shapes training only, and may change on resume as dropout rates do."""
    from types import SimpleNamespace

    from vqar.train.text import TextConfig, prepare_text_tokenizer

    root, _ = text_run
    run = tmp_path / "run"
    run.mkdir()
    (run / "text_tokenizer").symlink_to(root / "ar" / "text_tokenizer")  # the run's, made with 0.1
    one_process = SimpleNamespace(is_main=True, barrier=lambda: None)
    cfg = TextConfig(length=8, vocab_size=160, bpe_dropout=dropout)
    tokenizer = prepare_text_tokenizer(cfg, CodeDataset(root / "codes"), [0, 1], run, one_process)
    assert tokenizer.dropout == dropout and vqar.load_pretrained(root / "ar").text_tokenizer.dropout == 0.1
    assert (tokenizer._dropout is None) == (dropout is None)  # the segmentation the training steps draw from


def test_a_caption_size_at_odds_with_the_text_settings_names_them_not_the_store(random_stores, text_run, tmp_path,
                                                                                capsys):  # fmt: skip
    """"model.text_length=8 contradicts the code store, which gives 32": the 32 was text.length's, and on --resume
    a changed text.length was said to need "a store that gives 32"."""
    from conftest import run_cli
    from vqar.configs import ConfigError

    codes = [f"codes={random_stores / 'rq-digits'}", "text.vocab_size=160"]
    with pytest.raises(ConfigError, match=re.escape("model.text_length=8 contradicts text.length, which gives 32 (a "
                                                    "text model's caption sizes come from its text settings): leave "
                                                    "model.text_length unset and set text.length")):  # fmt: skip
        load_run_config("rq-mnist-text", [*codes, "model.text_length=8"])
    root, _ = text_run
    run = tmp_path / "ar"
    shutil.copytree(root / "ar", run)
    code, err = run_cli(["train", "ar", "--resume", "--out", str(run), "text.length=16"], capsys)
    assert code == 2 and "was trained with model.text_length=8, and text.length now gives 16; the caption settings " \
                         "cannot change on --resume" in err, err  # fmt: skip


def test_a_text_vocab_size_far_above_what_the_captions_give_is_warned_about(text_run, tmp_path, caplog):
    """`text.vocab_size=300000` on digit captions learned a vocabulary of a few hundred entries and sized the model's
    text embedding at 300,000 rows without a word."""
    from types import SimpleNamespace

    from vqar.train.text import TextConfig, prepare_text_tokenizer

    root, _ = text_run
    one_process = SimpleNamespace(is_main=True, barrier=lambda: None)
    store = CodeDataset(root / "codes")
    with caplog.at_level("WARNING", logger="vqar.train"):
        made = prepare_text_tokenizer(TextConfig(length=8, vocab_size=300_000), store, [0, 1], tmp_path / "a",
                                      one_process)  # fmt: skip
    assert f"gave a vocabulary of {made.vocab_size} entries, far fewer than text.vocab_size=300000" in caplog.text
    assert f"text.vocab_size={made.vocab_size} would do" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vqar.train"):
        prepare_text_tokenizer(TextConfig(length=8, vocab_size=made.vocab_size), store, [0, 1], tmp_path / "b",
                               one_process)  # fmt: skip
    assert "far fewer" not in caplog.text
