"""What `--out` / `--overwrite` guarantee (README, "Failure modes"): a command writes only into an empty folder or
one of its own kind, `--overwrite` replaces only what the command itself writes, and a user's other files (a
training run, a stats file) are never written over or deleted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import vqar
from conftest import TINY_RUN, file_contents, overridden, run_cli
from vqar.train.tokenizer import load_run_config


# ---------------------------------------------------------------- --out: nothing else is written over or deleted
def _fake_run(folder: Path) -> dict:
    """A folder that looks like a training run (what the user must not lose); returns its files."""
    (folder / "checkpoints" / "step-0000004").mkdir(parents=True)
    for name in ("run.yaml", "metrics.jsonl", "config.json", "model.safetensors", "checkpoints/step-0000004/x.pt"):
        (folder / name).write_text(f"the user's {name}")
    return file_contents(folder)


@pytest.mark.parametrize("kind", ["extract-codes", "pack-shards"])
def test_overwrite_replaces_only_a_folder_of_the_commands_own_kind(tokenizer_folder, tmp_path, capsys, kind):
    victim = tmp_path / "ar_victim"
    before = _fake_run(victim)
    images = tmp_path / "images.npz"
    np.savez(images, arr_0=np.zeros((4, 32, 32), np.uint8))
    command = {"extract-codes": ["extract-codes", "--tokenizer", str(tokenizer_folder), "--data", str(images)],
               "pack-shards": ["pack-shards", str(images)]}[kind]  # fmt: skip
    what = "a code store" if kind == "extract-codes" else "a folder of tar shards"
    for overwrite in ([], ["--overwrite"]):
        code, err = run_cli([*command, "--out", str(victim), *overwrite], capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"{victim} is not {what} (it holds checkpoints, config.json, metrics.jsonl" in err, err
        assert file_contents(victim) == before  # nothing deleted, nothing added
    (tmp_path / "a_file").write_text("x")
    code, err = run_cli([*command, "--out", str(tmp_path / "a_file"), "--overwrite"], capsys)
    assert code == 2 and "a_file is a file" in err and (tmp_path / "a_file").read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli([*command, "--out", str(empty)], capsys)[0] == 0  # an empty folder is filled
    code, err = run_cli([*command, "--out", str(empty)], capsys)
    assert code == 2 and f"{empty} already exists ({what}); pass --overwrite" in err, err
    assert run_cli([*command, "--out", str(empty), "--overwrite"], capsys)[0] == 0  # its own kind: replaced


def test_convert_overwrite_replaces_only_a_model_folder(tokenizer_folder, tmp_path, capsys):
    """`--overwrite` wrote the converted model into any folder: over a training run's export, into a code store or
    a folder of images."""
    victim = tmp_path / "run"
    before = _fake_run(victim)
    images = tmp_path / "images"
    images.mkdir()
    (images / "cat.png").write_bytes(b"the user's picture")
    for folder, holds in ((victim, "checkpoints, config.json, metrics.jsonl"), (images, "cat.png")):
        kept = file_contents(folder)
        for overwrite in ([], ["--overwrite"]):
            code, err = run_cli(["convert", str(tokenizer_folder), str(folder), *overwrite], capsys)
            assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
            assert f"{folder} is not a vqar model folder (it holds {holds}" in err and "OUT_DIR" in err, err
            assert file_contents(folder) == kept  # nothing deleted, nothing added
    assert file_contents(victim) == before
    model = tmp_path / "model"
    assert run_cli(["convert", str(tokenizer_folder), str(model)], capsys)[0] == 0
    code, err = run_cli(["convert", str(tokenizer_folder), str(model)], capsys)
    assert code == 2 and f"{model} already exists (a vqar model folder); pass --overwrite" in err, err
    assert run_cli(["convert", str(tokenizer_folder), str(model), "--overwrite"], capsys)[0] == 0  # a model: replaced


def test_convert_overwrite_replaces_the_whole_model(tokenizer_folder, tmp_path, capsys, monkeypatch):
    """An AR model's tokenizer/ was left under the tokenizer converted over it, and the folder then loaded as
    neither model: the replaced model goes whole, and no work folder is left beside it."""
    model = tmp_path / "model"
    assert run_cli(["convert", str(tokenizer_folder), str(model)], capsys)[0] == 0
    shutil.copytree(tokenizer_folder, model / "tokenizer")  # as an AR model's companion
    assert run_cli(["convert", str(tokenizer_folder), str(model), "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    assert isinstance(vqar.load_pretrained(model), vqar.Tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    shutil.copytree(tokenizer_folder, model / "tokenizer")
    monkeypatch.chdir(model)  # OUT_DIR is the current folder: replaced in place, not moved from under the shell
    assert run_cli(["convert", str(tokenizer_folder), ".", "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in Path.cwd().iterdir()) == ["config.json", "model.safetensors"]
    assert Path.cwd().samefile(model) and isinstance(vqar.load_pretrained("."), vqar.Tokenizer)


@pytest.mark.parametrize("where", ["new", "replaced", "replaced from inside"])
def test_an_interrupted_convert_leaves_out_dir_as_it_was(sampler_folder, tokenizer_folder, tmp_path, capsys,
                                                         monkeypatch, where):  # fmt: skip
    """Ctrl-C while an AR model's tokenizer/ was written left a new OUT_DIR holding the model without it, and
    `--overwrite` run from inside OUT_DIR deleted the old model before writing the new one: the model is built in a
    work folder and put in place whole, so OUT_DIR is as it was and no work folder is left."""
    from vqar import bundle

    out = tmp_path / "out"
    if where != "new":
        shutil.copytree(tokenizer_folder, out)
    before = file_contents(out) if out.exists() else None
    if where == "replaced from inside":
        monkeypatch.chdir(out)
    save = bundle.save_pretrained

    def interrupted(model, folder, *args, **kwargs):
        if Path(folder).name == "tokenizer":
            raise KeyboardInterrupt
        return save(model, folder, *args, **kwargs)

    monkeypatch.setattr(bundle, "save_pretrained", interrupted)
    overwrite = [] if where == "new" else ["--overwrite"]
    assert run_cli(["convert", str(sampler_folder), str(out), *overwrite], capsys)[0] == 130
    assert (file_contents(out) if out.exists() else None) == before
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name.startswith(".")) == []
    monkeypatch.setattr(bundle, "save_pretrained", save)
    assert run_cli(["convert", str(sampler_folder), str(out), *overwrite], capsys)[0] == 0
    assert isinstance(vqar.load_pretrained(out).tokenizer, vqar.Tokenizer)


def test_eval_stats_refuses_an_existing_file_before_the_inception_pass(tmp_path, capsys, monkeypatch):
    import vqar.eval.inception

    def inception(*args, **options):  # loading the network is the start of the slow part
        raise ValueError("the Inception network was loaded")

    monkeypatch.setattr(vqar.eval.inception, "Inception", inception)
    target = tmp_path / "samples.npz"
    target.write_bytes(b"a sample run's images")
    code, err = run_cli(["eval", "stats", "mnist", "--out", str(target)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{target} already exists; pass --overwrite to replace it" in err, err
    assert target.read_bytes() == b"a sample run's images"
    code, err = run_cli(["eval", "stats", "mnist", "--out", str(tmp_path)], capsys)
    assert code == 2 and "is a folder" in err, err
    code, err = run_cli(["eval", "stats", "mnist", "--out", str(tmp_path / "stats.txt")], capsys)
    assert code == 2 and "written as .npz" in err, err
    code, err = run_cli(["eval", "stats", "mnist", "--out", str(target), "--overwrite"], capsys)
    assert code == 2 and "the Inception network was loaded" in err, err  # allowed: the work begins


@pytest.fixture(scope="module")
def sampler_folder(tmp_path_factory):
    """A tiny GPT with random weights and its VQ tokenizer: pictures in a second."""
    from vqar.ar import GPT, GPTConfig

    folder = tmp_path_factory.mktemp("sampler") / "gpt"
    tokenizer = vqar.Tokenizer(load_run_config("rqvae-mnist", [*TINY_RUN, "model.quantizer.kind=vq", "d=1"]).model)
    gpt = GPT(GPTConfig(vocab_size=64, code_shape=list(tokenizer.code_shape(32)), dim=32, n_layer=1, n_head=2,
                        num_classes=3))  # fmt: skip
    vqar.save_pretrained(gpt, folder, tokenizer=tokenizer)
    return folder


def test_sampling_into_a_used_folder_needs_overwrite_which_replaces_every_output(sampler_folder, tmp_path, capsys):
    out = tmp_path / "s_re"
    sample = ["sample", "--model", str(sampler_folder), "--out", str(out)]
    assert run_cli([*sample, "--n-per-class", "3"], capsys)[0] == 0
    assert len(list((out / "images").iterdir())) == 9
    code, err = run_cli([*sample, "--classes", "2", "--n-per-class", "1"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{out} already exists (a sample folder); pass --overwrite" in err, err
    assert len(list((out / "images").iterdir())) == 9
    assert run_cli([*sample, "--classes", "2", "--n-per-class", "1", "--overwrite"], capsys)[0] == 0
    assert [p.name for p in (out / "images").iterdir()] == ["class0002_000000.png"]  # no stale picture left
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_1"].tolist() == [2]
    assert run_cli([*sample, "--classes", "1", "--n-per-class", "1", "--overwrite", "--no-images"], capsys)[0] == 0
    assert not (out / "images").exists()  # the old pictures do not pass for the new samples.npz's
    # Anything else is refused before the model is loaded (it does not exist), with --overwrite too.
    (out / "notes.txt").write_text("mine")
    for target, message in ((out, "is not a sample folder (it holds grid.png, notes.txt, samples.npz)"),
                            (out / "notes.txt", "is a file")):  # fmt: skip
        code, err = run_cli(["sample", "--model", str(tmp_path / "none"), "--out", str(target), "--overwrite"], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert (out / "notes.txt").read_text() == "mine"
    # A prompts.txt of your own beside class-conditional samples is not theirs (--overwrite deleted it).
    (out / "notes.txt").unlink()
    (out / "prompts.txt").write_text("my prompt ideas for later\n")
    before = file_contents(out)
    code, err = run_cli([*sample, "--classes", "1", "--n-per-class", "1", "--overwrite"], capsys)
    assert code == 2 and "is not a sample folder (it holds grid.png, prompts.txt, samples.npz)" in err, err
    assert file_contents(out) == before
    # A stray file a level down was not named: the refusal listed only names a sample run writes.
    (out / "prompts.txt").unlink()
    assert run_cli([*sample, "--classes", "1", "--n-per-class", "1", "--overwrite"], capsys)[0] == 0
    (out / "images" / "notes.txt").write_text("mine")
    code, err = run_cli([*sample, "--classes", "1", "--n-per-class", "1", "--overwrite"], capsys)
    assert code == 2 and "is not a sample folder (it holds grid.png, images, samples.npz: its images/ holds " \
                         "notes.txt, which a sample run does not write)" in err, err  # fmt: skip
    assert (out / "images" / "notes.txt").read_text() == "mine"


def test_a_sample_overwrite_stopped_while_writing_leaves_the_old_samples_whole(sampler_folder, tmp_path, capsys,
                                                                               monkeypatch):  # fmt: skip
    """grid.png, images/ and samples.npz were each moved in place as soon as written: a run killed while writing its
    images left its new grid beside the old images and samples.npz."""
    from vqar.sampling import export

    out = tmp_path / "s_stop"
    sample = ["sample", "--model", str(sampler_folder), "--out", str(out)]
    assert run_cli([*sample, "--n-per-class", "2"], capsys)[0] == 0
    before = file_contents(out)

    def killed_while_writing(result, path):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(export, "write_adm_npz", killed_while_writing)  # the last file written: the rest are done
        code, err = run_cli([*sample, "--classes", "1", "--n-per-class", "3", "--overwrite"], capsys)
    assert code == 130 and file_contents(out) == before and sorted(p.name for p in out.iterdir()) == [
        "grid.png", "images", "samples.npz"]  # fmt: skip
    (out / ".tmp-samples-999999999").mkdir()  # the work folder of a run killed outright (no such process)
    assert run_cli([*sample, "--classes", "1", "--n-per-class", "3", "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "samples.npz"]
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_1"].tolist() == [1, 1, 1] and len(list((out / "images").iterdir())) == 3

    # Stopped while the old images/ is removed (seconds for a large set): the new images were in place beside the
    # old samples.npz and grid. Now every new file is in place first.
    real_rmtree = export.shutil.rmtree

    def stopped_while_removing(path, *args, **kwargs):
        if "images" in Path(path).name:
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(export.shutil, "rmtree", stopped_while_removing)
        code, err = run_cli([*sample, "--classes", "0,2", "--n-per-class", "2", "--overwrite"], capsys)
    assert code == 130, err
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_1"].tolist() == [0, 0, 2, 2]
    assert sorted(p.name[:9] for p in (out / "images").iterdir()) == ["class0000", "class0000", "class0002",
                                                                      "class0002"]  # fmt: skip


def test_a_second_sampler_into_the_same_out_is_refused_while_the_first_writes(sampler_folder, tmp_path, capsys):
    """Two `vqar sample` runs into one new --out both passed the check, both said they wrote samples.npz, and the
    second to finish had replaced the first one's samples without a word. The write lock that extract-codes,
    pack-shards and training take is held from the check to the last file."""
    from conftest import locked_by_another_process

    out = tmp_path / "shared"
    with locked_by_another_process(out) as holder:
        code, err = run_cli(["sample", "--model", str(sampler_folder), "--out", str(out)], capsys)
        assert code == 2 and err == (f"vqar: error: another vqar process (pid {holder.pid}) is writing {out}; wait "
                                     "for it to finish or choose another --out\n")  # fmt: skip
        assert not out.exists()
    assert run_cli(["sample", "--model", str(sampler_folder), "--out", str(out)], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]  # the lock file went with the run


def test_overwrite_does_not_take_a_folder_of_the_users_pictures_or_prompts_for_samples(tmp_path, capsys):
    """A folder was judged by its top-level names alone: images/ of the user's photos or a prompts.txt of their own
    passed for "a sample folder", and --overwrite deleted them."""
    photos, prompts = tmp_path / "proj", tmp_path / "myp"
    (photos / "images").mkdir(parents=True)
    (photos / "images" / "holiday.jpg").write_text("mine")
    prompts.mkdir()
    (prompts / "prompts.txt").write_text("a seven\nthe digit one\n")
    for out, held in ((photos, "images: its images/ holds holiday.jpg, which a sample run does not write"),
                      (prompts, "prompts.txt")):  # fmt: skip
        before = file_contents(out)
        code, err = run_cli(["sample", "--model", str(tmp_path / "none"), "--out", str(out), "--overwrite"], capsys)
        assert code == 2 and err == (f"vqar: error: {out} is not a sample folder (it holds {held}); --overwrite "
                                     "replaces only a sample folder, so nothing was changed: choose another --out\n")
        assert file_contents(out) == before


@pytest.mark.parametrize("case", ["user-file", "a-run", "an-exported-tokenizer", "a-report-of-yours", "a-file",
                                  "empty-name"])  # fmt: skip
def test_the_demo_refuses_an_out_it_did_not_write_before_training(tmp_path, capsys, monkeypatch, case):
    """`vqar demo --out RUN` replaced an AR run's tokenizer/ with its own and the pictures in its samples/; `--out ""`
    wrote into the working folder. Refused before the first training step."""
    import vqar.train.tokenizer

    def train_tokenizer(*args, **kwargs):
        raise AssertionError("the demo trained before it checked --out")

    monkeypatch.setattr(vqar.train.tokenizer, "train_tokenizer", train_tokenizer)
    out = tmp_path / "out"
    if case == "user-file":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        message = f"{out} holds notes.txt, which no demo wrote"
    elif case == "a-run":
        out.mkdir()
        _fake_run(out)
        message = f"{out} holds checkpoints, config.json, metrics.jsonl, model.safetensors and 1 more, which no demo"
    elif case == "an-exported-tokenizer":  # the model folder of a tokenizer, not a demo's run
        (out / "tokenizer").mkdir(parents=True)
        (out / "tokenizer" / "config.json").write_text("{}")
        message = f"{out / 'tokenizer'} is not the demo's tokenizer run, which the demo would write over"
    elif case == "a-report-of-yours":  # a demo's name, not a demo's report (the demo wrote over it)
        out.mkdir()
        (out / "report.json").write_text(json.dumps({"experiment": "mine", "outputs": ["fig1.png"]}))
        message = f"{out / 'report.json'} is not a demo's report, which the demo would write over"
    elif case == "a-file":
        out.write_text("mine")
        message = f"{out} is a file; choose another --out for the demo"
    else:
        out, message = "", "argument --out: is empty"
    before = file_contents(out) if out and Path(out).is_dir() else None
    code, err = run_cli(["demo", "--quick", "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    if before is not None:
        assert file_contents(out) == before
    assert not (tmp_path / "tokenizer").exists()


@pytest.mark.parametrize("command", [["train", "tokenizer", "rqvae-mnist"], ["pack-shards", "x.npz"],
                                     ["extract-codes", "--tokenizer", "t", "--data", "mnist"],
                                     ["reconstruct", "--tokenizer", "t", "x.png"], ["demo"]])  # fmt: skip
def test_an_out_under_a_file_names_the_file_before_anything_runs(tmp_path, capsys, command):
    """It ended in the OS's "[Errno 17] File exists: 'notes.txt'" (or Errno 20), naming neither --out nor why."""
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "run"
    code, err = run_cli([*command, "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"argument --out: {out} cannot be made: {tmp_path / 'notes.txt'} is a file, not a folder" in err, err
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["convert", "reconstruct", "reproduce"])
def test_an_out_that_cannot_be_written_is_refused_before_the_load_or_download(tokenizer_folder, tmp_path, capsys,
                                                                           monkeypatch, command):  # fmt: skip
    """A read-only --out was found once the model was loaded (or the release downloaded), in the OS's words."""
    import importlib

    def too_soon(*args, **kwargs):
        raise AssertionError("loaded or downloaded before --out was checked")

    real_write = Path.write_bytes

    def read_only(path, data):
        if path.name.startswith(".write-test."):
            raise PermissionError(13, "Permission denied", str(path))
        return real_write(path, data)

    # imported before any patch: a module first imported under it would keep the stand-in after the test
    interop, reconstruct, reproduce = map(importlib.import_module, ["vqar.interop", "vqar.eval.reconstruct",
                                                                     "vqar.reproduce.run"])  # fmt: skip
    monkeypatch.setattr(Path, "write_bytes", read_only)
    monkeypatch.setattr(interop, "load_pretrained", too_soon)  # convert's
    monkeypatch.setattr(reconstruct, "load_pretrained", too_soon)
    monkeypatch.setattr(reproduce, "fetch_release", too_soon)
    out = tmp_path / "out"
    picture = tmp_path / "x.png"
    picture.write_bytes(b"")
    args = {"convert": ["convert", str(tokenizer_folder), str(out)],
            "reconstruct": ["reconstruct", "--tokenizer", str(tokenizer_folder), str(picture), "--out", str(out)],
            "reproduce": ["reproduce", "var-d16", "--n", "10", "--out", str(out)]}[command]  # fmt: skip
    code, err = run_cli(args, capsys)
    option = "OUT_DIR" if command == "convert" else "--out"
    assert code != 0 and err == f"vqar: error: {option} {out} cannot be written: Permission denied\n", err
    assert not out.exists()  # the folder the check made is taken away again


def test_an_out_that_cannot_be_made_is_refused_before_sampling(sampler_folder, tmp_path, capsys, monkeypatch):
    """`--out notes.txt/samples` failed with "[Errno 20] Not a directory" after every image was drawn, losing them."""
    import importlib

    def draw_distributed(*args, **kwargs):
        raise AssertionError("sampled before --out was checked")

    # (the module, not the function `vqar.sampling.draw` that the package exports under the same name)
    monkeypatch.setattr(importlib.import_module("vqar.sampling.draw"), "draw_distributed", draw_distributed)
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "samples"
    code, err = run_cli(["sample", "--model", str(sampler_folder), "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"--out: {out} cannot be made: {tmp_path / 'notes.txt'} is a file, not a folder" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    # The folder made to check it goes again when the run fails later (here: a class the model lacks).
    code, err = run_cli(["sample", "--model", str(sampler_folder), "--classes", "7", "--out",
                         str(tmp_path / "new" / "samples")], capsys)  # fmt: skip
    assert code == 2 and "unknown class id 7" in err and not (tmp_path / "new").exists()


def test_training_writes_only_into_a_run_of_its_kind_unless_told_to(sampler_folder, tmp_path, capsys):
    export = tmp_path / "m_export"  # an exported AR model with its tokenizer, and a file of the user's
    shutil.copytree(sampler_folder, export)
    (export / "README.txt").write_text("notes")
    before = file_contents(export)
    train = ["train", "tokenizer", "rqvae-mnist", *overridden(TINY_RUN, "train.ckpt_every=4", "train.log_every=1",
                                                              "data.max_images=64", "steps=1", "train.eval_every=1"),
             "--out"]  # fmt: skip
    code, err = run_cli([*train, str(export)], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{export} is not a training run (it holds README.txt, config.json, model.safetensors, tokenizer)" in err
    assert file_contents(export) == before
    store = tmp_path / "codes"  # data is never trained into, not even with --overwrite
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"format": "vqar-codes"}))
    code, err = run_cli([*train, str(store), "--overwrite"], capsys)
    assert code == 2 and f"{store} is a code store" in err and [p.name for p in store.iterdir()] == ["manifest.json"]
    code, err = run_cli([*train, ""], capsys)  # not the current folder
    assert code == 2 and "argument --out: is empty" in err, err
    # --overwrite: the model there (and its tokenizer) is replaced, the user's file is kept
    assert run_cli([*train, str(export), "--overwrite"], capsys)[0] == 0
    assert vqar.bundle.read_config(export)[0] == "tokenizer" and not (export / "tokenizer").exists()
    assert (export / "README.txt").read_text() == "notes"
    # A tokenizer run is not an AR model's: neither resumed nor replaced as one unasked.
    from vqar.train.launch import check_run_folder

    with pytest.raises(FileExistsError, match="holds the training run of a tokenizer, not of an AR model; pass"):
        check_run_folder(export, "ar", resume=False, overwrite=False)
    with pytest.raises(FileExistsError, match="^--resume: .* not of an AR model$"):
        check_run_folder(export, "ar", resume=True, overwrite=False)
    check_run_folder(export, "tokenizer", resume=True, overwrite=False)
    code, err = run_cli(["train", "ar", "--resume", "--out", str(export)], capsys)  # not its run.yaml's unknown keys
    assert code == 2 and f"{export} is a tokenizer run, not an AR run" in err, err


@pytest.mark.parametrize("parent", ["code store", "training run", "model"])
def test_a_tokenizer_is_never_trained_into_the_tokenizer_folder_of_codes_it_made(sampler_folder, tmp_path, parent):
    """`vqar train tokenizer --overwrite --out STORE/tokenizer` replaced the tokenizer that made a code store's (or an
    AR run's) codes: what was then trained or sampled from them decoded through another tokenizer without a word."""
    from vqar.train.launch import check_run_folder

    folder = tmp_path / "parent"
    shutil.copytree(sampler_folder, folder)  # a model folder with its tokenizer/
    if parent == "code store":
        from vqar.data.codes import FORMAT

        (folder / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    elif parent == "training run":
        (folder / "run.yaml").write_text("kind: ar\n")
    before = file_contents(folder)
    for resume, overwrite in ((False, False), (False, True), (True, False)):
        with pytest.raises(FileExistsError, match=rf"^{folder}/tokenizer is the tokenizer of the {parent} {folder}, "
                                                  r"which made its codes: .* choose another --out$"):  # fmt: skip
            check_run_folder(folder / "tokenizer", "tokenizer", resume=resume, overwrite=overwrite)
    assert file_contents(folder) == before
    check_run_folder(tmp_path / "elsewhere" / "tokenizer", "tokenizer", resume=False, overwrite=False)  # a new folder


@pytest.mark.parametrize("inside", ["checkpoints", "tokenizer", "text_tokenizer"])
def test_overwrite_keeps_the_users_files_inside_the_folders_a_run_writes(sampler_folder, tmp_path, inside):
    """`train --overwrite` into a folder that holds no run removed checkpoints/ and tokenizer/ whole, the user's
    notes in them included; it now refuses, naming the file, and deletes nothing."""
    from vqar.train.launch import check_run_folder

    folder = tmp_path / "mine"
    shutil.copytree(sampler_folder, folder)  # an exported model (its tokenizer/ is the model's) ...
    (folder / "checkpoints" / "damaged").mkdir(parents=True)  # ... and what a killed run leaves
    (folder / "checkpoints" / ".tmp-step-0000003-123").mkdir()
    check_run_folder(folder, "ar", resume=False, overwrite=True)  # all of it a run's own: replaced on --overwrite
    (folder / inside).mkdir(exist_ok=True)
    (folder / inside / "notes.txt").write_text("mine")
    before = file_contents(folder)
    with pytest.raises(FileExistsError, match=rf"^{folder}/{inside}/notes.txt is not a file a training run writes, "
                                              rf"and --overwrite would delete it with {inside}/; move it"):  # fmt: skip
        check_run_folder(folder, "ar", resume=False, overwrite=True)
    assert file_contents(folder) == before


def test_a_demo_stopped_mid_extraction_is_rerun_over_its_own_lock_files(tmp_path):
    """A demo killed while extracting left .codes.lock (and .codes.partial): the rerun said the folder held a file
    no demo wrote, though the README promises a rerun over a stopped demo."""
    from vqar.demo import check_demo_folder

    out = tmp_path / "demo"
    (out / ".codes.partial").mkdir(parents=True)
    for name in (".codes.lock", ".tokenizer.lock", ".ar.lock", ".samples.lock"):
        (out / name).write_text("")
    check_demo_folder(out)
    (out / ".notes.lock").write_text("")  # a lock of nothing the demo writes is not the demo's
    with pytest.raises(FileExistsError, match=r"holds \.notes\.lock, which no demo wrote"):
        check_demo_folder(out)


def test_the_demo_is_refused_under_torchrun_before_any_work(tmp_path, capsys, monkeypatch):
    """Under torchrun every rank ran every step into the same folder; the ranks locked each other out, or rank 0 died
    without a word, leaving a lock behind."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    code, err = run_cli(["demo", "--quick", "--out", str(tmp_path / "demo")], capsys)
    assert code == 2 and err == ("vqar: error: vqar demo runs in one process: start it without torchrun (train, "
                                 "extract-codes, sample and eval are the commands that spread over processes)\n")
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow  # two quick demos, ~1 min
@pytest.mark.timeout(1200)  # on a busy host
def test_a_stopped_demo_is_continued_by_the_same_command(tmp_path, classifier_cache, monkeypatch, caplog):
    """Ctrl-C in a demo said "resume with --resume", which `vqar demo` does not take, and the same command then
    trained every stage anew, the checkpoint Ctrl-C had written gone."""
    import logging
    import os
    import signal

    from vqar.demo import _train_stage as demo_stage
    from vqar.demo import run_demo
    from vqar.train.ar import ARTask
    from vqar.train.errors import TrainingInterrupted

    out, real_step = tmp_path / "demo", ARTask.train_step

    def stopped_at_step_12(self, batch, step):
        if step == 12:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would
        return real_step(self, batch, step)

    with monkeypatch.context() as patch:
        patch.setattr(ARTask, "train_step", stopped_at_step_12)
        with pytest.raises(TrainingInterrupted, match="SIGINT at step 13"):
            run_demo(out, quick=True, classifier_cache=classifier_cache)
    assert not (out / "report.json").exists()
    with caplog.at_level(logging.INFO, logger="vqar"):
        report = run_demo(out, quick=True, classifier_cache=classifier_cache)
    for stage in ("tokenizer", "ar"):
        assert f"continuing the stopped demo's run in {out / stage}" in caplog.text
    assert f"resumed from {out / 'ar' / 'checkpoints' / 'step-0000013'} (step 13)" in caplog.text
    assert report["samples"] == 40 and (out / "report.json").is_file()
    asked = []  # a finished demo's runs are trained anew, so that its times are a whole demo's
    demo_stage(lambda cfg, folder, resume, overwrite: asked.append((resume, overwrite)) or {}, load_run_config(
        "rqvae-mnist", ["steps=20", "train.eval_every=20", "data.max_images=600"]), out / "tokenizer", stopped=False)
    assert asked == [(False, True)]


def test_a_demo_says_it_replaces_a_finished_demo_or_a_stopped_one_of_other_settings(tmp_path, caplog):
    """A full demo's results (half an hour of training, 98.8% accuracy) were replaced by a --quick smoke test in
    the same --out without a word, and so was a stopped full demo's run."""
    import json
    import logging

    from vqar.configs import to_yaml
    from vqar.demo import say_what_is_replaced

    out = tmp_path / "demo"
    (out / "tokenizer").mkdir(parents=True)
    quick = load_run_config("rqvae-mnist", ["steps=20", "train.eval_every=20", "data.max_images=600"])
    full = load_run_config("rqvae-mnist", [])

    def said(stopped: bool) -> str:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vqar"):
            say_what_is_replaced(out, stopped, quick)
        return caplog.text

    assert said(stopped=True) == ""  # an empty folder: nothing to replace
    (out / "tokenizer" / "run.yaml").write_text(to_yaml(quick))
    assert said(stopped=True) == ""  # a stopped demo of these settings is continued
    (out / "tokenizer" / "run.yaml").write_text(to_yaml(full))
    assert f"{out} holds a stopped demo of other settings" in said(stopped=True)
    (out / "report.json").write_text(json.dumps({"arch": "rq", "quick": False, "class_accuracy": 0.988,
                                                 "outputs": {"ar_model": str(out / "ar")}}))  # fmt: skip
    assert (f"{out} holds a finished full demo (arch rq, class accuracy 98.8%), which this run replaces; give "
            "another --out to keep it") in said(stopped=False)  # fmt: skip


def test_ctrl_c_in_a_demo_says_the_same_command_goes_on_and_early_leaves_no_folders(tmp_path, capsys, monkeypatch):
    from vqar import demo
    from vqar.train.errors import TrainingInterrupted
    from vqar.train.tokenizer import TokenizerTask

    def stopped(*args, **kwargs):
        raise TrainingInterrupted("stopped by SIGINT at step 7; resume with --resume", 2, "stopped by SIGINT at step 7")

    with monkeypatch.context() as patch:
        patch.setattr(demo, "run_demo", stopped)
        code, err = run_cli(["demo", "--quick", "--out", str(tmp_path / "demo")], capsys)
    assert code == 130 and err == ("vqar: stopped by SIGINT at step 7; the checkpoint of that step is written, and the "
                                   "same `vqar demo` command continues from it\n")  # fmt: skip

    def interrupted(*args, **kwargs):  # Ctrl-C before the tokenizer's run wrote anything
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(TokenizerTask, "__init__", interrupted)
        code, err = run_cli(["demo", "--quick", "--out", str(tmp_path / "early")], capsys)
    assert code == 130 and err.endswith("vqar: interrupted\n") and not (tmp_path / "early").exists(), err
    # Ctrl-C in extraction or sampling, after a training stage wrote a checkpoint: said as training's is
    (tmp_path / "late" / "tokenizer" / "checkpoints" / "step-0000020").mkdir(parents=True)
    with monkeypatch.context() as patch:
        patch.setattr(demo, "run_demo", interrupted)
        code, err = run_cli(["demo", "--quick", "--out", str(tmp_path / "late")], capsys)
    assert code == 130 and err == ("vqar: interrupted; the same `vqar demo` command goes on from the checkpoints its "
                                   "training wrote\n"), err  # fmt: skip


def test_a_writability_probe_of_another_rank_is_not_taken_for_a_foreign_file(tmp_path):
    """Under torchrun each rank probes --out (`check_folder_writable`) while another checks what it holds: a
    reproduction on 2 processes was refused for "holds .write-test-20726, which no `vqar reproduce` wrote"."""
    import os

    from vqar.reproduce.run import check_reproduction_folder
    from vqar.utils.io import check_folder_writable, folder_entries

    real_unlink = Path.unlink
    kept = []
    try:
        Path.unlink = lambda self, *a, **k: kept.append(self)  # the probe caught between its write and its removal
        check_folder_writable(tmp_path / "out")
    finally:
        Path.unlink = real_unlink
    assert [p.name for p in kept] == [f".write-test.tmp-{os.getpid()}"] and kept[0].exists()
    assert folder_entries(tmp_path / "out") == []
    check_reproduction_folder(tmp_path / "out")  # refused it before
