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


class _Calls:
    """Pickles as `func(*args)`, as a crafted file can ask of the weights-only unpickler's allowed callables."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_pickle_that_would_build_more_than_its_file_holds_is_refused_before_loading(tmp_path, capsys, legacy):
    """A tensor viewed with stride 0 claims any number of elements over one stored value, and `set()`, `list()` or
    `tuple()` of it (all allowed callables) made torch.load build one tensor object per element: a 2.6 MB file of
    10**9 ate all memory until the kernel killed vqar (here 10**5, which would load). As a weight, such a view made
    a VAR of 5M classes. `set()` of a real tensor and a `bytearray` of 10**11 bytes are refused too."""
    weights = {"w": torch.randn(4, 3)}
    cases = {
        "expanded": ({**weights, "x": _Calls(set, torch.zeros(1).expand(10**5))},
                     "a tensor of shape 100000 (100,000 elements) is a view of a storage of 1: a file saved from "
                     "training holds no such tensor"),
        "expanded weight": ({"w": torch.zeros(1).expand(4, 3)}, "a tensor of shape 4x3 (12 elements) is a view"),
        "list of a tensor": ({**weights, "x": _Calls(list, torch.zeros(100))}, "it calls list() on a tensor, which "
                            "builds one object per element: a file saved from training does not"),
        "bytearray": ({**weights, "x": _Calls(bytearray, 10**11)}, "it asks for a bytearray of 100,000,000,000 "
                      "bytes, more than the file holds"),
    }  # fmt: skip
    for case, (content, reason) in cases.items():
        path = tmp_path / f"{case}.pt"
        torch.save(content, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(ValueError) as raised:
            load_checkpoint(path)
        assert str(raised.value).startswith(f"refused to load {path}: {reason}"), case
        code, err = run_cli(["convert", str(path), str(tmp_path / "out")], capsys)
        assert code == 2 and err.startswith(f"vqar: error: refused to load {path}: {reason}"), (case, err)
        assert not (tmp_path / "out").exists()
    # what training writes still loads: views of one storage, transposes, parameters, optimizer state, a Namespace
    import argparse

    from omegaconf import OmegaConf

    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), betas=OmegaConf.create([0.9, 0.95]))
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    shared = torch.randn(10, 6)
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rows": shared[2:5], "t": shared.t(),
             "p": torch.nn.Parameter(torch.ones(3)), "args": argparse.Namespace(lr=1e-4)}  # fmt: skip
    torch.save(saved, tmp_path / "real.pt", _use_new_zipfile_serialization=not legacy)
    loaded = load_checkpoint(tmp_path / "real.pt")
    assert torch.equal(loaded["t"], shared.t()) and torch.equal(loaded["rows"], shared[2:5])
    assert loaded["args"].lr == 1e-4 and list(loaded["optimizer"]["param_groups"][0]["betas"]) == [0.9, 0.95]


def test_a_damaged_pickle_is_one_line_naming_the_file(tmp_path, capsys):
    """The weights-only unpickler's own errors on a damaged stream (IndexError, KeyError, TypeError, struct.error)
    were tracebacks: 5 in 200 fixtures with one byte changed."""
    import io

    for case, stream in (("unhashable key", b"}(]]u."), ("empty stack", b"a."), ("missing memo", b"h\x05."),
                         ("cut length", b"X\x10\x00")):  # fmt: skip
        buffer = io.BytesIO()
        torch.save({"w": torch.zeros(2)}, buffer)
        path = tmp_path / f"{case}.pt"
        with zipfile.ZipFile(buffer) as original, zipfile.ZipFile(path, "w") as damaged:
            for item in original.infolist():
                data = original.read(item)
                damaged.writestr(item, b"\x80\x02" + stream if item.filename.endswith("data.pkl") else data)
        with pytest.raises(ValueError, match=rf"^cannot read checkpoint {path}: a damaged pickle \("):
            load_checkpoint(path)
        code, err = run_cli(["convert", str(path), str(tmp_path / "out")], capsys)
        assert code == 2 and err.count("\n") == 1 and "a damaged pickle" in err, (case, err)


def test_the_pickle_read_follows_a_tensor_through_a_copy_on_the_stack():
    """A tensor copied with DUP (or rebuilt through another call) was followed as an opaque object, so `set()` of
    the copy passed the check. The stream: set(_rebuild_tensor_v2(storage of 100 floats, 0, (100,), (1,), False,
    {})), with and without a DUP of the tensor before the call; the tensor alone is fine."""
    import io

    from vqar.utils.pickle_scan import CraftedPickleError, check_pickle

    tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
              b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x64tQ" + b"K\x00K\x64\x85K\x01\x85\x89}tR")  # fmt: skip
    check_pickle(io.BytesIO(b"\x80\x02" + tensor + b"."), 10**6)
    for copy in (b"", b"20"):  # DUP, then POP of the original
        with pytest.raises(CraftedPickleError, match=r"^it calls set\(\) on a tensor"):
            check_pickle(io.BytesIO(b"\x80\x02c__builtin__\nset\n" + tensor + copy + b"\x85R."), 10**6)
