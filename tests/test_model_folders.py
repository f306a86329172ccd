"""A folder vqar made that holds no model to load (a code store, tar shards, samples, a run that has not exported its
model yet) is named for what it is, with what to do instead, by `vqar sample`, `vqar serve` and `load_pretrained`."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import vqar
from conftest import file_contents, run_cli
from vqar.ar import ARModel
from vqar.bundle import trained_steps
from vqar.train.checkpoint import list_checkpoints

EXPORT = ("config.json", "model.safetensors", "tokenizer")  # what a run exports at each checkpoint


def _refusals(folder, tmp_path, capsys) -> list[str]:
    """The one-line errors of `vqar sample --model`, `vqar serve --model` and `load_pretrained` for `folder`."""
    errors = []
    for command in (["sample", "--model", str(folder), "--out", str(tmp_path / "out")],
                    ["serve", "--model", str(folder), "--port", "0"]):  # fmt: skip
        code, err = run_cli(command, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("vqar: error: ")
        errors.append(err.removeprefix("vqar: error: ").strip())
    with pytest.raises(FileNotFoundError) as raised:
        vqar.load_pretrained(folder)
    errors.append(str(raised.value))
    assert not (tmp_path / "out").exists()
    return errors


def test_data_and_sample_folders_say_what_they_hold_instead_of_a_model(tiny_pipeline, class_run, tmp_path, capsys):
    """All three were 'X is not a model folder vqar knows: expected config.json + model.safetensors ...'."""
    codes = tiny_pipeline / "codes"
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
    shards, samples = tmp_path / "shards", tmp_path / "samples"
    assert run_cli(["pack-shards", str(images), "--out", str(shards)], capsys)[0] == 0
    drawn = ["sample", "--model", str(class_run), "--classes", "0", "--n-per-class", "1", "--out", str(samples)]
    assert run_cli(drawn, capsys)[0] == 0
    expected = {
        codes: f"{codes} is a code store (made by `vqar extract-codes`), not a model: train an AR model on it with "
               f"`vqar train ar PRESET codes={codes}`",
        shards: f"{shards} is a folder of tar shards (made by `vqar pack-shards`), not a model: train a tokenizer on "
                f"it with `vqar train tokenizer PRESET data.source={shards / 'shards.json'}`",
        samples: f"{samples} holds the samples of `vqar sample` (grid.png, images, samples.npz), not a model: give "
                 "the model folder that drew them (config.json + model.safetensors)",
    }  # fmt: skip
    for folder, message in expected.items():
        assert _refusals(folder, tmp_path, capsys) == [message] * 3


def test_a_run_that_has_not_exported_its_model_names_its_checkpoint_and_resume_exports_it(
    tiny_pipeline, class_run, tmp_path, capsys
):
    """A run stopped before its export (killed before its first checkpoint, or its export failed on a full disk) was
    'not a model folder vqar knows'; the command the message gives exports the newest checkpoint's model."""
    run = tmp_path / "run"
    shutil.copytree(class_run, run)
    for name in EXPORT:
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    newest = list_checkpoints(run)[-1]
    message = (f"{run} is the training run of an AR model, stopped before it exported its model (newest checkpoint: "
               f"{newest.path}); `vqar train ar --resume --out {run}` exports that checkpoint's model into it, then "
               "trains on to its train.steps")  # fmt: skip
    assert _refusals(run, tmp_path, capsys) == [message] * 3

    assert run_cli(["train", "ar", "--resume", "--out", str(run)], capsys)[0] == 0
    assert trained_steps(run) == newest.step
    model = vqar.load_pretrained(run)
    assert isinstance(model, ARModel) and model.tokenizer is not None  # its tokenizer/ is exported again too

    fresh = tmp_path / "fresh"
    shutil.copytree(class_run, fresh, ignore=shutil.ignore_patterns(*EXPORT, "checkpoints"))
    message = (f"{fresh} is the training run of an AR model, stopped before its first checkpoint: it holds no model; "
               f"`vqar train ar --resume --out {fresh}` starts it again")  # fmt: skip
    assert _refusals(fresh, tmp_path, capsys) == [message] * 3

    tokenizer_run = tmp_path / "tokenizer-run"
    shutil.copytree(tiny_pipeline / "tokenizer", tokenizer_run, ignore=shutil.ignore_patterns(*EXPORT))
    newest = list_checkpoints(tokenizer_run)[-1].path
    with pytest.raises(FileNotFoundError) as raised:
        vqar.load_pretrained(tokenizer_run)
    assert str(raised.value) == (f"{tokenizer_run} is the training run of a tokenizer, stopped before it exported its "
                                 f"model (newest checkpoint: {newest}); `vqar train tokenizer --resume --out "
                                 f"{tokenizer_run}` exports that checkpoint's model into it, then trains on to its "
                                 "train.steps")  # fmt: skip


def test_a_checkpoint_given_as_the_model_names_its_run_and_is_never_trained_into(
    tiny_pipeline, class_run, tmp_path, capsys
):
    """A checkpoint was "the training run of an AR model, stopped before its first checkpoint ... `vqar train ar
    --resume --out CHECKPOINT` starts it again": that command trained a new run inside the checkpoint, rewriting
    the files its manifest vouches for, so the run then set its own checkpoint aside as damaged."""
    run = tmp_path / "run"
    shutil.copytree(class_run, run)
    checkpoint = list_checkpoints(run)[-1].path
    advice = f"load the model the run exported ({run}), or continue the run with `vqar train ar --resume --out {run}`"
    for folder, what in ((checkpoint, "a training checkpoint"), (checkpoint.parent, "the checkpoints folder")):
        message = f"{folder} is {what} of the run {run}, not a model: {advice}"
        assert _refusals(folder, tmp_path, capsys) == [message] * 3
    before = file_contents(run)
    for flags in (["--resume"], ["rq-mnist", f"codes={tiny_pipeline / 'codes'}", "--overwrite"]):
        code, err = run_cli(["train", "ar", *flags, "--out", str(checkpoint)], capsys)
        assert code == 2 and err == (f"vqar: error: {checkpoint} lies inside the checkpoints of the run {run}: to "
                                     f"continue that run, pass --resume --out {run}; to start a new one, choose an "
                                     "--out outside it\n")  # fmt: skip
    assert file_contents(run) == before


def test_an_empty_folder_is_said_to_be_empty(tmp_path, capsys):
    """It was 'X is not a model folder vqar knows', as for a folder of unknown files (which still gets that)."""
    empty, other = tmp_path / "empty", tmp_path / "other"
    empty.mkdir()
    other.mkdir()
    (other / "notes.txt").write_text("no model here")
    expected = ("expected config.json + model.safetensors (vqar), config.yaml + model.pt (an RQ release stage) or "
                "stage1/ stage2/ folders")  # fmt: skip
    assert _refusals(empty, tmp_path, capsys) == [f"{empty} is an empty folder, not a model: {expected}"] * 3
    assert _refusals(other, tmp_path, capsys) == [f"{other} is not a model folder vqar knows: {expected}"] * 3


def test_a_tokenizer_given_as_the_model_says_how_to_use_it(tokenizer_folder, tmp_path, capsys):
    """It said only 'X holds a Tokenizer, not an autoregressive model': the stage-1 folder given where the stage-2
    model goes is the usual mix-up, so the message says where a tokenizer goes and how to train a model on it."""
    for command in (["sample", "--model", str(tokenizer_folder), "--out", str(tmp_path / "out")],
                    ["serve", "--model", str(tokenizer_folder), "--port", "0"]):  # fmt: skip
        code, err = run_cli(command, capsys)
        assert code == 2 and err.count("\n") == 1
        assert err.strip() == (
            f"vqar: error: {tokenizer_folder} holds a tokenizer (Tokenizer), not an autoregressive model: give it as "
            f"--tokenizer beside an AR model's --model, or train an AR model on its codes (`vqar extract-codes "
            f"--tokenizer {tokenizer_folder} --data DATA --out CODES`, then `vqar train ar PRESET codes=CODES`)")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_with_another_codebook_is_refused_and_a_fine_tuned_decoder_is_not(
    class_run, tokenizer_folder, tmp_path, capsys
):
    """`vqar sample --model RUN --tokenizer OTHER` with another tokenizer of the same codebook size drew the whole
    set and decoded it to noise without a word. The RQ-Transformer keeps its codebook's vectors; a vqar AR folder
    also keeps the tokenizer its codes came from."""
    code, err = run_cli(["sample", "--model", str(class_run), "--tokenizer", str(tokenizer_folder),
                         "--classes", "1", "--n-per-class", "1", "--out", str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert f"the tokenizer {tokenizer_folder} codes with another codebook than the one {class_run}" in err
    assert not (tmp_path / "out").exists()
    # the run's own tokenizer with a fine-tuned decoder (the codebook untouched) is welcome
    tuned = vqar.load_pretrained(class_run / "tokenizer")
    with torch.no_grad():
        tuned.decoder.conv_out.weight.mul_(1.5)
    model = vqar.load_pretrained(class_run, tokenizer=tuned)
    assert model.tokenizer is tuned


def test_a_gpt_folder_compares_a_given_tokenizer_with_the_one_it_carries(tmp_path):
    """A GPT keeps no code vectors of its own: the tokenizer exported beside it is what a given one is checked
    against."""
    from conftest import random_tokenizer
    from vqar.ar import GPT, GPTConfig

    carried = random_tokenizer()
    model = GPT(GPTConfig(vocab_size=16, code_shape=[4, 4], dim=16, n_layer=1, n_head=2, num_classes=0))
    vqar.save_pretrained(model.attach(carried), tmp_path / "gpt")
    with pytest.raises(ValueError, match="codes with another codebook than the one"):
        vqar.load_pretrained(tmp_path / "gpt", tokenizer=random_tokenizer())  # other random vectors, same size
    assert vqar.load_pretrained(tmp_path / "gpt", tokenizer=carried).tokenizer is carried
    # a half-precision copy of the same tokenizer is the same codebook, rounded (bf16 rounds by up to 0.4%)
    for dtype in (torch.bfloat16, torch.float16):
        rounded = copy.deepcopy(carried).to(dtype)
        assert vqar.load_pretrained(tmp_path / "gpt", tokenizer=rounded).tokenizer is rounded
