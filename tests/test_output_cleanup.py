"""A command that fails leaves no output folder it created behind (README, "Failure modes"): the folders of a new
--out (and its new parents) go when they hold nothing, while an --out that existed, or work kept to resume, stays."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_RUN, file_contents, run_cli


@pytest.fixture
def unreadable(tmp_path) -> Path:
    """An image folder whose files are no images: every command that reads it fails after opening it."""
    folder = tmp_path / "unreadable" / "0"
    folder.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(b"not a picture")
    return folder.parent


def _commands(tokenizer_folder, data) -> dict[str, list[str]]:
    return {
        "extract-codes": ["extract-codes", "--tokenizer", str(tokenizer_folder), "--data", str(data)],
        "pack-shards": ["pack-shards", str(data)],
        "train": ["train", "tokenizer", "rqvae-mnist", *TINY_RUN, f"data.source={data}", "steps=1"],
    }


@pytest.mark.parametrize("kind", ["extract-codes", "pack-shards", "train"])
def test_a_failed_command_removes_the_folders_it_created(tokenizer_folder, unreadable, tmp_path, capsys, kind):
    new = tmp_path / "new"
    code, err = run_cli([*_commands(tokenizer_folder, unreadable)[kind], "--out", str(new / "deeper" / "out")], capsys)
    last = err.splitlines()[-1]  # after a warning per unreadable file
    assert code == 2 and last.startswith("vqar: error:") and ("be read" in last or "no readable image" in last), err
    assert not new.exists()  # nor .out.partial beside it


@pytest.mark.parametrize("kind", ["extract-codes", "pack-shards", "train"])
def test_a_failed_command_leaves_an_existing_out_and_its_parent_as_they_were(tokenizer_folder, unreadable, tmp_path,
                                                                             capsys, kind):  # fmt: skip
    parent = tmp_path / "mine"
    (parent / "out").mkdir(parents=True)
    (parent / "notes.txt").write_text("the user's")
    code, err = run_cli([*_commands(tokenizer_folder, unreadable)[kind], "--out", str(parent / "out")], capsys)
    assert code == 2, err
    assert (parent / "out").is_dir() and not any((parent / "out").iterdir())  # still there, still empty
    assert sorted(p.name for p in parent.iterdir()) == ["notes.txt", "out"]
    code, err = run_cli([*_commands(tokenizer_folder, unreadable)[kind], "--out", str(parent / "new")], capsys)
    assert code == 2 and sorted(p.name for p in parent.iterdir()) == ["notes.txt", "out"], err


def test_an_extraction_that_fails_before_any_shard_leaves_nothing_to_resume(tokenizer_folder, tmp_path, capsys,
                                                                            monkeypatch):  # fmt: skip
    import vqar.data.extraction

    def encode(*args, **kwargs):
        raise ValueError("the encoder failed")

    monkeypatch.setattr(vqar.data.extraction, "_encode_units", encode)
    images = tmp_path / "images.npz"
    np.savez(images, arr_0=np.zeros((4, 32, 32), np.uint8))
    out = tmp_path / "new" / "codes"
    command = ["extract-codes", "--tokenizer", str(tokenizer_folder), "--data", str(images), "--out", str(out)]
    code, err = run_cli(command, capsys)
    assert code == 2 and "vqar: error: the encoder failed" in err and "to resume" not in err, err
    assert not (tmp_path / "new").exists()


def test_an_interrupted_extraction_keeps_its_work_to_resume(tokenizer_folder, tmp_path, capsys, monkeypatch):
    import vqar.data.extraction

    real = vqar.data.extraction._WorkFolder.write

    def write(self, u, *args):  # the first shard is written, the second fails
        if u == 1:
            raise ValueError("the disk failed")
        real(self, u, *args)

    monkeypatch.setattr(vqar.data.extraction._WorkFolder, "write", write)
    images = tmp_path / "images.npz"
    np.savez(images, arr_0=np.zeros((8, 32, 32), np.uint8))
    out = tmp_path / "new" / "codes"
    command = ["extract-codes", "--tokenizer", str(tokenizer_folder), "--data", str(images), "--shard-size", "4",
               "--out", str(out)]  # fmt: skip
    code, err = run_cli(command, capsys)
    assert code == 2 and "1 of" in err and "run the same command again to resume" in err, err
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [".codes.partial"]


def test_reconstruct_of_missing_images_leaves_no_folder(tokenizer_folder, tmp_path, capsys):
    out = tmp_path / "new" / "recon"
    code, err = run_cli(["reconstruct", "--tokenizer", str(tokenizer_folder), str(tmp_path / "gone.png"), "--out",
                         str(out)], capsys)  # fmt: skip
    assert code == 2 and err == f"vqar: error: no such image: {tmp_path / 'gone.png'}\n", err  # before loading
    assert not (tmp_path / "new").exists()


def test_the_tidy_up_keeps_a_folder_that_holds_anything(tmp_path):
    from vqar.utils.io import created_folders_removed_on_failure

    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(ValueError), created_folders_removed_on_failure(out):
        out.mkdir(parents=True)
        (tmp_path / "a" / "kept.txt").write_text("someone else's")
        raise ValueError("failed")
    assert file_contents(tmp_path) == {Path("a/kept.txt"): b"someone else's"}  # the empty b/out went, a stayed
    with created_folders_removed_on_failure(tmp_path / "c"):  # success: what was made stays
        (tmp_path / "c").mkdir()
    assert (tmp_path / "c").is_dir()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the swap in one step is Linux's renameat2")
def test_a_folder_replaced_by_a_killed_process_is_whole_under_its_name(tmp_path, monkeypatch):
    """The old folder was moved aside, then the new one moved in: a kill between the two renames left neither
    under the name (the old one hidden as `.NAME.replaced-PID`). On Linux the two now swap in one step; a kill
    after it leaves the new folder in place and the old one under the work folder's temporary name."""
    from vqar.utils import io

    def store(name: str, text: str) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(text)
        return tmp_path / name

    target, built = store("codes", "old"), store(f".codes.tmp-{2**22 + 1}", "new")  # the pid of no process

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the kill, at whichever step comes after the swap or the first rename

    real_replace = io.os.replace
    renames = []

    def replace_then_die(source, destination):
        renames.append(destination)
        if len(renames) > 1:
            killed()
        real_replace(source, destination)

    monkeypatch.setattr(io.os, "replace", replace_then_die)
    monkeypatch.setattr(io.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        io.replace_directory(built, target)
    assert (target / "manifest.json").read_text() == "new"
    monkeypatch.undo()
    assert io.remove_leftovers(tmp_path) == [built]  # the old folder, tidied by the next run
    assert file_contents(tmp_path) == {Path("codes/manifest.json"): b"new"}


def test_reconstruct_refuses_a_pipe_and_leaves_its_own_out_out_of_a_folder_given(tokenizer_folder, tmp_path, capsys,
                                                                                  caplog):  # fmt: skip
    """A named pipe given as an image hung (it was read until a writer closed it), and an --out inside a folder
    given was read back on the next run: its earlier pictures reconstructed again and counted in the mean PSNR."""
    import logging
    import os

    os.mkfifo(tmp_path / "fifo.png")
    code, err = run_cli(["reconstruct", "--tokenizer", str(tokenizer_folder), str(tmp_path / "fifo.png"), "--out",
                         str(tmp_path / "r")], capsys)  # fmt: skip
    assert (code, err) == (2, f"vqar: error: {tmp_path / 'fifo.png'} is not a regular file (a named pipe, socket or "
                              "device); give an image file\n")  # fmt: skip
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32), 100 * i, np.uint8)).save(images / f"{i}.png")
    args = ["reconstruct", "--tokenizer", str(tokenizer_folder), str(images), "--out", str(images / "recon")]
    for extra in ([], ["--overwrite"]):
        code, err = run_cli([*args, *extra], capsys)
        assert code == 0, err
    assert sorted(p.name for p in (images / "recon").iterdir()) == ["0_recon.png", "1_recon.png"]  # no recon/recon
    with caplog.at_level(logging.WARNING, logger="vqar"):
        assert run_cli([*args, "--overwrite", "--size", "256"], capsys)[0] == 0
    assert "--size 256 is far from the 32 px this tokenizer was built for" in caplog.text


def test_reconstruct_given_an_ar_model_names_the_tokenizer_it_carries(class_run, tmp_path, capsys):
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    code, err = run_cli(["reconstruct", "--tokenizer", str(class_run), str(image), "--out", str(tmp_path / "r")],
                        capsys)  # fmt: skip
    assert code == 2 and err.endswith(f"not a tokenizer: the tokenizer it was trained on is {class_run / 'tokenizer'}"
                                      "\n"), err  # fmt: skip
