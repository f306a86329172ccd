"""Files that are no PyTorch checkpoint (a NumPy `.npz` or `.npy`, a plain zip) given where one is expected are named
for what they are, in one line, instead of ending in torch's bare `[enforce fail at inline_container.cc:180]`."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from conftest import run_cli
from vqar.interop import load_checkpoint


@pytest.fixture
def archives(tmp_path):
    """(path, what the error says it is) for zip archives that torch.save did not write."""
    images, stats, other = tmp_path / "images.npz", tmp_path / "stats.pt", tmp_path / "notes.zip"
    np.savez(images, arr_0=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    with open(stats, "wb") as handle:  # the content counts, not the name (a path would get .npz appended)
        np.savez_compressed(handle, mu=np.zeros(3), sigma=np.eye(3))
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("readme.txt", "hello")
    return [
        (images, f"{images} is a NumPy .npz archive (arrays: arr_0), not a PyTorch checkpoint"),
        (stats, f"{stats} is a NumPy .npz archive (arrays: mu, sigma), not a PyTorch checkpoint"),
        (other, f"{other} is a zip archive (readme.txt), not a PyTorch checkpoint"),
    ]


def test_an_npz_or_plain_zip_given_as_a_checkpoint_is_named_for_what_it_is(archives, tmp_path, capsys):
    images = archives[0][0]
    for path, message in archives:
        with pytest.raises(ValueError) as raised:
            load_checkpoint(path)
        assert str(raised.value) == message
        for command in (["sample", "--model", str(path), "--out", str(tmp_path / "out")],
                        ["convert", str(path), str(tmp_path / "converted")],
                        ["eval", "rfid", str(images), "--tokenizer", str(path)]):  # fmt: skip
            code, err = run_cli(command, capsys)
            assert (code, err) == (2, f"vqar: error: {message}\n"), command
    assert not (tmp_path / "out").exists() and not (tmp_path / "converted").exists()


def test_a_checkpoint_torch_saved_is_still_read(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))


def test_an_npy_array_given_as_a_checkpoint_is_named_for_what_it_is(tmp_path, capsys):
    path = tmp_path / "codes.pt"  # the content counts, not the name
    with open(path, "wb") as handle:
        np.save(handle, np.arange(6))
    # it was "neither a PyTorch archive (torch.save's zip) nor a pickle": true, but not what the file is
    message = f"{path} is a NumPy .npy array, not a PyTorch checkpoint"
    with pytest.raises(ValueError) as raised:
        load_checkpoint(path)
    assert str(raised.value) == message
    code, err = run_cli(["sample", "--model", str(path), "--out", str(tmp_path / "out")], capsys)
    assert (code, err) == (2, f"vqar: error: {message}\n")


def test_a_model_folders_safetensors_or_config_file_given_alone_asks_for_its_folder(tokenizer_folder, tmp_path, capsys):
    """It was "neither a PyTorch archive (torch.save's zip) nor a pickle": a vqar folder's weights, without the
    config.json that says what model they are."""
    path = tokenizer_folder / "model.safetensors"
    message = (f"{path} is a safetensors file of weights, which does not say what model they are: give the folder "
               "that holds it with its config.json")  # fmt: skip
    code, err = run_cli(["sample", "--model", str(path), "--out", str(tmp_path / "out")], capsys)
    assert (code, err) == (2, f"vqar: error: {message}\n")
    config = tokenizer_folder / "config.json"  # it was "not a checkpoint" too
    code, err = run_cli(["sample", "--model", str(config), "--out", str(tmp_path / "out")], capsys)
    assert (code, err) == (2, f"vqar: error: {config} is the configuration of a vqar model, which the files beside "
                              f"it make up: give their folder, {tokenizer_folder}\n")  # fmt: skip
    random_bytes = tmp_path / "noise.pt"  # a file that only looks like one at its first byte is still no checkpoint
    random_bytes.write_bytes(b"\xff" * 8 + b"{" + b"x" * 20)
    with pytest.raises(ValueError, match="is not a checkpoint: it is neither"):
        load_checkpoint(random_bytes)
