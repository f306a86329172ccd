"""What vqar guarantees when things go wrong (README, "Failure modes"), for bad input: an argument, a model folder,
a file or a device that cannot serve is one line naming the file or option, refused before any work."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vqar
from conftest import TINY_RUN, run_cli
from vqar.cli import main
from vqar.train.tokenizer import load_run_config, train_tokenizer


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from vqar.ar import GPT, GPTConfig

    folder = tmp_path_factory.mktemp("model") / "gpt"
    vqar.save_pretrained(GPT(GPTConfig(vocab_size=16, code_shape=[2, 2], dim=32, n_layer=1, n_head=2,
                                       num_classes=3)), folder)  # fmt: skip
    return folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n-per-class", "-1"], "argument --n-per-class: must be a positive integer"),
        (["--n-per-class", "0"], "argument --n-per-class: must be a positive integer"),
        (["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
        (["--seed", "-1"], "argument --seed: must be an integer >= 0"),
        (["--classes", "abc"], "argument --classes: takes 'all', 'none' or comma-separated class ids"),
        (["--top-k", "ten"], "--top-k takes a number"),
        (["--cfg", "0.5"], "cfg_scale must be a finite number >= 1"),
        # float32 logits overflowed: every code the last one, without a word
        (["--cfg", "1e308"], "cfg_scale must be at most 1,000,000 (guidance uses 1.5 to 10; far larger scales"),
    ],
)
def test_bad_sample_arguments_are_one_line_before_the_model_loads(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    # The model does not exist: an argument error, not "no model", shows that nothing was loaded first.
    code, err = run_cli(["sample", "--model", str(tmp_path / "no-such-model"), "--out", str(out), *args], capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_settings_the_model_cannot_take_are_one_line_before_drawing(model_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["sample", "--model", str(model_folder), "--out", str(out), "--smooth"], capsys)
    assert code == 2 and err.count("\n") == 1 and "GPT does not take (VAR only)" in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["sample", "--model", "{model}", "--tokenizer", "{model}", "--out", "{out}"],
        ["convert", "{model}", "{out}", "--tokenizer", "{model}"],
        ["eval", "linear-probe", "mnist", "--model", "{model}", "--tokenizer", "{model}", "--layer", "1"],
    ],
)
def test_an_ar_model_given_as_tokenizer_is_one_line(model_folder, tmp_path, capsys, command):
    out = tmp_path / "out"
    code, err = run_cli([word.format(model=model_folder, out=out) for word in command], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"the tokenizer {model_folder} holds a GPT, not a stage-1 tokenizer" in err
    assert not out.exists()


def _broken_copy(model_folder, tmp_path, edit) -> str:
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(model_folder, folder)
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(meta)))
    return str(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda meta: [meta], "does not describe a model"),
        (lambda meta: {**meta, "config": {**meta["config"], "dim": 64}}, r"does not match .*config.json"),
        (lambda meta: {**meta, "config": {**meta["config"], "vocab_size": 2_000_000_000}}, "does not match"),
        # 10^7 layers: refused from the header's tensor count, before anything is built (even on the meta device)
        (lambda meta: {**meta, "config": {**meta["config"], "n_layer": 10_000_000}}, "n_layer asks for 10000000"),
        (lambda meta: {**meta, "config": {**meta["config"], "dim": -128}}, "make no gpt model"),
        (lambda meta: {**meta, "config": {**meta["config"], "n_head": 0}}, "make no gpt model"),
        # the top-level fields: tracebacks (TypeError, OverflowError) or messages naming no file
        (lambda meta: {**meta, "config": [1]}, "config must be a JSON object of the model's settings, got list"),
        (lambda meta: {**meta, "config": "x"}, "config must be a JSON object"),
        (lambda meta: {**meta, "kind": ["gpt"]}, r"kind must be a model kind's name, got \['gpt'\]"),
        (lambda meta: {**meta, "vqar_format": [2]}, r"vqar_format must be a format number \(1, 2, ...\), got \[2\]"),
        (lambda meta: {**meta, "vqar_format": "two"}, "vqar_format must be a format number"),
        (lambda meta: {**meta, "vqar_format": 1_000_000}, "is of format 1000000, written by a newer vqar than this "
                                                          "one"),  # fmt: skip
    ],
)
def test_a_config_that_does_not_fit_its_weights_is_refused_before_building(model_folder, tmp_path, capsys, edit,
                                                                          message):  # fmt: skip
    folder = _broken_copy(model_folder, tmp_path, edit)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        vqar.load_pretrained(folder)  # a vocabulary of 2e9 would allocate 6 TB: refused from the file's header instead
    assert time.perf_counter() - started < 10
    code, err = run_cli(["sample", "--model", folder, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and "config.json" in err


def test_a_folder_without_a_readable_image_says_so(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(b"not a png")
    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, f"data.source={images}", "steps=2"])
    with pytest.raises(ValueError, match=r"no readable image in .*images: none of the 2 files"):  # (+1 for validation)
        train_tokenizer(cfg, tmp_path / "run")
    for i in range(12):  # with readable images beside them, the broken ones are skipped and counted
        Image.new("L", (32, 32), color=20 * i).save(images / f"good{i}.png")
    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, f"data.source={images}", "steps=2", "data.batch_size=4"])
    assert torch.isfinite(torch.tensor(train_tokenizer(cfg, tmp_path / "run2")["psnr"]))


def test_a_validation_split_without_a_readable_image_is_refused_before_the_first_step(tmp_path):
    """It was found at the first evaluation: every step before it ran, and no checkpoint was left."""
    from vqar.data import DataConfig, build_datasets

    images = tmp_path / "images"
    images.mkdir()
    for i in range(20):
        Image.new("L", (32, 32), color=10 * i).save(images / f"{i:02d}.png")
    val = build_datasets(DataConfig(source=str(images)))[1]
    for index in val.indices:  # the 2 images data.split_seed=0 holds out, broken
        Path(val.dataset.files[index]).write_bytes(b"not a png")
    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, f"data.source={images}", "steps=2", "data.batch_size=4"])
    with pytest.raises(ValueError, match=re.escape("the validation split (2 images held out by data.val_fraction=0.1, "
                                                   "data.split_seed=0) has no readable image in")):  # fmt: skip
        train_tokenizer(cfg, tmp_path / "run")
    assert not list((tmp_path / "run").rglob("*.jsonl")) and not list((tmp_path / "run").rglob("*.safetensors"))


def test_a_meta_build_stops_once_it_makes_far_more_tensors_than_the_file_holds():
    from vqar.utils.meta import ModelTooLarge, bounded_meta_build

    with bounded_meta_build(100, "and the file holds 10"):
        torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(50)])  # 100 tensors: allowed
    started = time.perf_counter()
    too_many = pytest.raises(ModelTooLarge, match="more than 100 tensors, and the file holds 10")
    with too_many, bounded_meta_build(100, "and the file holds 10"):
        torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(10_000_000)])
    assert time.perf_counter() - started < 10
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # the hooks and the meta device are gone


def test_a_model_with_nan_weights_is_refused_not_sampled(model_folder, tmp_path, capsys):
    """NaN weights made NaN logits, and `vqar sample` still wrote images (rc 0)."""
    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "nan"
    shutil.copytree(model_folder, damaged)
    weights = load_file(damaged / "model.safetensors")
    name = sorted(k for k, v in weights.items() if v.is_floating_point())[0]
    weights[name][0] = float("nan")
    save_file(weights, damaged / "model.safetensors")
    code, err = run_cli(["sample", "--model", str(damaged), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and "NaN or infinite" in err and name in err, err
    assert not (tmp_path / "out").exists()


def test_weights_that_are_a_device_or_a_pipe_are_named_as_such(model_folder, tmp_path, capsys):
    """A model.safetensors linked to /dev/zero, or a named pipe, was reported missing ("has a config.json but no
    model.safetensors"): there is one, and it is not a file."""
    import os

    for name, make in (("device", lambda p: p.symlink_to("/dev/zero")), ("pipe", os.mkfifo)):
        copy = tmp_path / name
        shutil.copytree(model_folder, copy)
        (copy / "model.safetensors").unlink()
        make(copy / "model.safetensors")
        code, err = run_cli(["sample", "--model", str(copy), "--out", str(tmp_path / "out")], capsys)
        assert (code, err) == (2, f"vqar: error: {copy / 'model.safetensors'} is not a regular file (a folder, named "
                                  "pipe, socket or device); a model folder's weights are a safetensors file\n"), name


def test_a_weight_of_another_kind_of_number_is_refused_and_another_precision_is_not(model_folder, tmp_path, capsys):
    """A float weight stored as int32 (its header's dtype edited, the bytes the same size) was cast on loading: a
    model of weights near 1e9 sampled without a word. A bf16 copy of the float32 weights still loads."""
    from safetensors.torch import load_file, save_file

    weights = load_file(model_folder / "model.safetensors")
    name = sorted(k for k, v in weights.items() if v.is_floating_point())[0]
    for dtype, refused in ((torch.int32, True), (torch.bfloat16, False)):
        copy = tmp_path / str(dtype)
        shutil.copytree(model_folder, copy)
        save_file({**weights, name: weights[name].to(dtype)}, copy / "model.safetensors")
        code, err = run_cli(["sample", "--model", str(copy), "--n-per-class", "1", "--out", str(tmp_path / "out")],
                            capsys)  # fmt: skip
        if refused:
            assert code == 2 and err == (f"vqar: error: {copy / 'model.safetensors'} holds 1 tensor(s) of another "
                                         f"kind of number than the model's (the first: {name} (int32, expects "
                                         "float32)): the file is damaged or not this model's\n")  # fmt: skip
            assert not (tmp_path / "out").exists()
        else:  # it has no tokenizer to sample with; loading is what is checked
            assert "no tokenizer" in err and vqar.load_pretrained(copy) is not None


@pytest.mark.parametrize(("names", "message"), [("a\nb\n", "names 2 classes; the model has 3"),
                                               ("\n \n", "holds no class names")])
def test_serve_refuses_class_names_that_do_not_fit_the_model(model_folder, tmp_path, capsys, names, message):
    """Two names for three classes left classes 2.. out of the page's picker; an empty file fell back silently."""
    pytest.importorskip("fastapi")
    file = tmp_path / "names.txt"
    file.write_text(names)
    code, err = run_cli(["serve", "--model", str(model_folder), "--port", "0", "--class-names", str(file)], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err and str(file) in err, err


def test_serve_refuses_a_max_images_too_large_for_memory(model_folder, capsys, monkeypatch):
    """`--max-images 1000000000` was taken, and a request for that many images took the machine's memory until the
    server was killed (SIGTERM waits for the request)."""
    pytest.importorskip("fastapi")
    import vqar.serve.app
    import vqar.utils.memory

    monkeypatch.setattr(vqar.utils.memory, "available_memory", lambda: 8 << 30)  # any machine: 8 GB
    monkeypatch.setattr(vqar.serve.app, "serve", lambda *args, **kwargs: None)  # were it taken: no server to stop
    code, err = run_cli(["serve", "--model", str(model_folder), "--port", "0", "--max-images", "1000000000"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "--max-images 1000000000: a request of 1000000000 images of 48 B each would need about 44.7 GB" in err
    assert "8.0 GB is available: lower --max-images" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--window", "4"], "--window has no effect without --speculative: add --speculative, or leave it out"),
    (["--drafts", "sjd", "--max-iterations", "3"], "--drafts and --max-iterations have no effect without"),
    (["--classifier", "digits"], "--classifier has no effect without --accept-rate"),
    (["--cfg-interval", "3"], "--cfg-interval shapes classifier-free guidance, which --cfg 1 (the default) leaves off"),
    (["--cfg-schedule", "linear", "--cfg", "1"], "--cfg-schedule shapes classifier-free guidance"),
    (["--greedy", "--top-k", "5", "--temperature", "0.5"], "--temperature and --top-k have no effect with --greedy"),
    (["--greedy", "--speculative", "--drafts", "sjd"], "--drafts has no effect with --greedy, which always takes the"),
])  # fmt: skip
def test_options_that_only_shape_another_are_refused_without_it(class_run, tmp_path, capsys, args, message):
    """They were silently ignored: `--window 4` alone drew plain samples. (Checked once the model is loaded: what a
    model cannot take is said first, so that the advice to add an option never leads to its refusal.)"""
    code, err = run_cli(["sample", "--model", str(class_run), "--out", str(tmp_path / "out"), *args], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["mps", "xpu", "meta"])
def test_a_device_this_machine_lacks_is_one_line_before_the_model_loads(model_folder, tmp_path, capsys, device):
    """`--device mps` on a machine without it was a traceback from the first tensor moved there, after loading."""
    import torch

    if getattr(getattr(torch, device, None), "is_available", lambda: False)():
        pytest.skip(f"this machine has a {device} device")
    out = tmp_path / "out"
    code, err = run_cli(["sample", "--model", str(model_folder), "--device", device, "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"device '{device}' was asked for but this torch has no usable {device} device" in err
    assert not out.exists()


def test_an_allocation_that_fails_is_one_line(tmp_path, capsys, monkeypatch):
    """`c=10000000000` asked the CPU allocator for 1.28 TB: a RuntimeError traceback. (Raised here by a stand-in, as
    the real allocation could succeed lazily where memory is overcommitted.)"""
    import vqar.train.tokenizer

    def absurd(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 1280000000000 bytes.\nmore lines")  # fmt: skip

    monkeypatch.setattr(vqar.train.tokenizer, "train_tokenizer", absurd)
    code, err = run_cli(["train", "tokenizer", "rqvae-mnist", "c=10000000000", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and "out of memory: " in err and "1280000000000 bytes" in err, err
    monkeypatch.setattr(vqar.train.tokenizer, "train_tokenizer", lambda *a, **k: 1 / 0)  # other errors: unchanged
    with pytest.raises(ZeroDivisionError):
        main(["train", "tokenizer", "rqvae-mnist", "--out", str(tmp_path / "run2")])


def test_a_prompts_file_that_is_a_folder_or_blank_is_named(model_folder, tmp_path, capsys):
    code, err = run_cli(["sample", "--model", str(model_folder), "--prompts", str(tmp_path), "--out",
                      str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 2 and "is a folder; give a text file of prompts" in err, err
    blank = tmp_path / "prompts.txt"
    blank.write_text("\n  \n")
    code, err = run_cli(["sample", "--model", str(model_folder), "--prompts", str(blank), "--out",
                      str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 2 and f"{blank} holds no prompts" in err, err


def test_a_prompts_file_that_is_a_pipe_is_read(model_folder, tmp_path, capsys):
    """`--prompts <(grep cat captions.txt)` and `--prompts /dev/stdin` were "file not found" (they are no regular
    file)."""
    from vqar.commands.common import read_lines

    read_end, write_end = os.pipe()
    os.write(write_end, b"a cat\n\n a dog \n")
    os.close(write_end)
    try:
        assert read_lines(f"/dev/fd/{read_end}", "prompts") == ["a cat", "a dog"]
    finally:
        os.close(read_end)
    read_end, write_end = os.pipe()
    os.write(write_end, b"a cat\n")
    os.close(write_end)
    try:  # read, then refused beside --classes
        code, err = run_cli(["sample", "--model", str(model_folder), "--prompts", f"/dev/fd/{read_end}", "--classes",
                             "1", "--out", str(tmp_path / "out")], capsys)  # fmt: skip
    finally:
        os.close(read_end)
    assert code == 2 and "give either --classes or prompts, not both" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(120)  # a label of 2^40 made 2^40 class names: it never finished
@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"arr_0": np.zeros((4, 8, 8), np.uint8), "labels": np.array([2**40, 0, 0, 0])}, "class id 1099511627776"),
        ({"arr_0": np.zeros((4, 8, 8), bool)}, "got bool"),
        ({"arr_0": np.zeros((4, 8, 8), np.complex64)}, "got complex64"),
        ({"arr_0": np.zeros((4, 8, 8), np.uint8), "labels": np.array([0.5, 1, 2, 3])}, "integer class ids"),
    ],
)
def test_a_bad_array_file_is_one_line(tokenizer_folder, tmp_path, capsys, arrays, message):
    data = tmp_path / "images.npz"
    np.savez(data, **arrays)
    code, err = run_cli(["extract-codes", "--tokenizer", str(tokenizer_folder), "--data", str(data), "--out",
                      str(tmp_path / "codes")], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and message in err and str(data) in err, err
    assert not (tmp_path / "codes").exists()


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("images.npz", lambda data: data[:3000], "is damaged or not a NumPy .npz file"),  # cut short: no zip index
        ("images.npy", lambda data: os.urandom(len(data)), "is not a NumPy array file"),  # numpy: "pickled data"
    ],
)
def test_a_damaged_array_file_is_one_line(tokenizer_folder, tmp_path, capsys, name, damage, message):
    data = tmp_path / name
    if name.endswith(".npz"):
        np.savez(data, arr_0=np.zeros((20, 28, 28), np.uint8))
    else:
        np.save(data, np.zeros((20, 28, 28), np.uint8))
    data.write_bytes(damage(data.read_bytes()))
    code, err = run_cli(["extract-codes", "--tokenizer", str(tokenizer_folder), "--data", str(data), "--out",
                      str(tmp_path / "codes")], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and message in err and str(data) in err, err
    assert "allow_pickle" not in err  # numpy's advice to load it unsafely is not passed on


@pytest.mark.parametrize(
    ("args", "message"),
    [  # 10^9 x 3 images would be 144 GB of codes alone, 8 TB with --accept-rate 1e-12: refused before allocating
        (["--n-per-class", "1000000000"], "--n-per-class 1000000000 x 3 classes: 3000000000 images"),
        (["--accept-rate", "1e-12", "--classifier", "digits"], "at --accept-rate 1e-12 (drawing 8000000000000 per"),
        (["--accept-rate", "0"], "--accept-rate must be in (0, 1]"),
        # past any machine: these overflowed in tracebacks (a count of infinity, a count too large for a float)
        (["--accept-rate", "1e-310", "--classifier", "digits"], "at --accept-rate 1e-310 is more images than any "
                                                                "machine holds: raise --accept-rate"),
        (["--n-per-class", "10000000000", "--accept-rate", "1e-300", "--classifier", "digits"],
         "at --accept-rate 1e-300 is more images than any machine holds"),  # 1e10 / 1e-300: infinity
        (["--n-per-class", str(10**400)], f"--n-per-class {10**400} x 3 classes is more images than any machine"),
        (["--n-per-class", str(10**400), "--accept-rate", "0.5", "--classifier", "digits"], "is more images than"),
    ],
)
def test_a_sample_run_too_large_for_memory_is_refused_up_front(model_folder, tmp_path, capsys, monkeypatch, args,
                                                               message):  # fmt: skip
    import vqar.utils.memory

    monkeypatch.setattr(vqar.utils.memory, "available_memory", lambda: 8 << 30)  # any machine: 8 GB
    code, err = run_cli(["sample", "--model", str(model_folder), "--out", str(tmp_path / "out"), *args], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert "8.0 GB is available" in err or "accept-rate must" in err or "more images than any machine" in err
    assert not (tmp_path / "out").exists()


def test_the_sample_memory_check_counts_the_copies_writing_makes(monkeypatch):
    """The check budgeted one float32 copy of the images, and writing them (the grid, uint8 pictures, the npz's
    RGB array) added 1.6 to 2.7 times that (measured): a run that passed could be killed at its end, after all its
    drawing."""
    import types

    import vqar.utils.memory
    from vqar.commands.sample import _check_memory

    model = types.SimpleNamespace(tokenizer=types.SimpleNamespace(out_channels=1, image_size=32),
                                  cfg=types.SimpleNamespace(code_shape=[4, 4]))  # fmt: skip
    args = types.SimpleNamespace(n_per_class=1000, prompt=None, prompts=None, accept_rate=None)
    one_copy = 10 * 1000 * (4 * 32 * 32 + 8 * 16 + 16)
    monkeypatch.setattr(vqar.utils.memory, "available_memory", lambda: 2 * one_copy)
    with pytest.raises(ValueError, match=r"10000 images of 16.1 KB each \(with the copies writing makes\)"):
        _check_memory(args, model, 10)
    monkeypatch.setattr(vqar.utils.memory, "available_memory", lambda: 5 * one_copy)
    _check_memory(args, model, 10)


def test_a_missing_local_path_is_not_looked_up_on_the_hub(tmp_path, capsys, monkeypatch):
    import types

    asked = []
    hub = types.SimpleNamespace(snapshot_download=lambda repo_id, **_: asked.append(repo_id) or str(tmp_path))
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    code, err = run_cli(["sample", "--model", "runs/nonexistent", "--out", "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and "runs/nonexistent: the local path does not exist" in err, err
    assert asked == []  # `runs` is a local folder: a typo, not a Hub repository
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vqar.load_pretrained("./typo")
    with pytest.raises(FileNotFoundError):  # org/name with no local org/: the Hub is asked
        vqar.load_pretrained("someone/model")
    assert asked == ["someone/model"]


def test_a_file_of_random_bytes_is_not_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "model.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    code, err = run_cli(["sample", "--model", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and f"{path} is not a checkpoint" in err, err
    assert "allow-list" not in err


def test_vqar_load_is_a_deprecated_alias_of_load_pretrained(model_folder):
    with pytest.warns(DeprecationWarning, match="vqar.load_pretrained"):
        model = vqar.load(model_folder)
    assert type(model) is type(vqar.load_pretrained(model_folder))
    for name, value in vqar.load_pretrained(model_folder).state_dict().items():
        assert torch.equal(model.state_dict()[name], value)


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    """A prompts file saved with a UTF-8 BOM (Notepad does) kept it in the first prompt, which then tokenised as an
    unknown character and was written so into prompts.txt; a caption file's first image name missed its file."""
    from vqar.commands.common import read_lines
    from vqar.commands.serve import read_class_names
    from vqar.text.captions import read_captions

    bom = "\ufeff".encode()
    (tmp_path / "prompts.txt").write_bytes(bom + b"a seven\r\na three\n")
    assert read_lines(tmp_path / "prompts.txt", "prompts") == ["a seven", "a three"]
    assert read_class_names(tmp_path / "prompts.txt") == ["a seven", "a three"]
    (tmp_path / "captions.tsv").write_bytes(bom + b"x/1.jpg\ta dog\n")
    assert read_captions(tmp_path / "captions.tsv") == {"x/1.jpg": ["a dog"]}
    (tmp_path / "captions.jsonl").write_bytes(bom + b'{"file": "x/1.jpg", "caption": "a dog"}\n')
    assert read_captions(tmp_path / "captions.jsonl") == {"x/1.jpg": ["a dog"]}


def test_an_image_past_pillows_size_limit_is_named_in_one_line(tokenizer_folder, tmp_path, capsys, monkeypatch,
                                                               recwarn):  # fmt: skip
    """Pillow's warning of a possible decompression bomb was a raw Python warning (its own source line, then
    `warnings.warn(`) that named no file."""
    # a 40x40 image is then past the limit, not past twice it; the tokenizer's 32x32 resize is below it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)
    picture = tmp_path / "large.png"
    Image.new("L", (40, 40), 128).save(picture)
    code, err = run_cli(["reconstruct", "--tokenizer", str(tokenizer_folder), str(picture), str(picture), "--out",
                         str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 0, err
    said = [line.removeprefix("vqar: ") for line in err.splitlines() if "pixels" in line]
    assert said == [f"{picture} is 40x40, 1,600 pixels: over Pillow's limit of 1,200 for images that may be "
                    "decompression bombs, decoded anyway (PIL.Image.MAX_IMAGE_PIXELS sets the limit)"], err  # once
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]  # nor Pillow's too
