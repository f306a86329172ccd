"""`vqar convert` closes with how to use what it wrote: sampling for an AR model, the tokenizer commands for a
stage-1 model (which is not sampled from), each of them a command line that runs on the converted folder."""

from __future__ import annotations

import shutil

import pytest

from vqar.cli import main


@pytest.fixture()
def release(fixtures, tmp_path):
    """The RQ release fixture (stage1 + stage2), copied: convert reads it, the tests write beside it."""
    folder = tmp_path / "release"
    shutil.copytree(fixtures / "rqvae", folder)
    return folder


def _hint(capsys) -> list[str]:
    """What convert prints after the line naming the model it wrote."""
    return capsys.readouterr().out.strip().splitlines()[1:]


def test_a_converted_tokenizer_is_pointed_to_the_tokenizer_commands(release, tmp_path, capsys):
    out = tmp_path / "tokenizer"
    assert main(["convert", str(release / "stage1"), str(out)]) == 0
    assert _hint(capsys) == [
        f"load it with vqar.load_pretrained({str(out)!r}); it is a stage-1 tokenizer, to use as in",
        f"  vqar reconstruct --tokenizer {out} --out DIR IMAGE...",
        f"  vqar eval rfid DATA --tokenizer {out}",
        f"  vqar extract-codes --tokenizer {out} --data DATA --out CODES",
        f"  vqar sample --model AR_MODEL --tokenizer {out}   (an AR model over its codes)",
    ]
    # The hint's commands take the folder: reconstruct an image with it, give it to the AR model as its tokenizer.
    import numpy as np
    from PIL import Image

    picture = tmp_path / "picture.png"
    Image.fromarray(np.full((16, 16, 3), 128, dtype=np.uint8)).save(picture)
    assert main(["reconstruct", "--tokenizer", str(out), "--out", str(tmp_path / "recon"), str(picture)]) == 0
    assert list((tmp_path / "recon").iterdir())
    assert main(["sample", "--model", str(release / "stage2"), "--tokenizer", str(out), "--classes", "0",
                 "--n-per-class", "1", "--out", str(tmp_path / "samples")]) == 0
    assert (tmp_path / "samples" / "samples.npz").is_file()


def test_a_converted_ar_model_is_pointed_to_sampling(release, tmp_path, capsys):
    out = tmp_path / "ar"
    assert main(["convert", str(release), str(out)]) == 0
    assert _hint(capsys) == [f"load it with vqar.load_pretrained({str(out)!r}) or `vqar sample --model {out}`"]


def test_an_ar_model_converted_without_its_tokenizer_is_pointed_to_one(tmp_path, capsys):
    """A VAR transformer file converted with no VQVAE beside it holds no tokenizer: `vqar sample --model OUT`
    alone would fail, so the hint says to give one."""
    import torch

    from vqar.ar.var import VAR, VARConfig
    from vqar.interop.var_transformer import var_transformer_to_upstream

    var = VAR(VARConfig(vocab_size=16, code_shape=[21], patch_nums=[1, 2, 4], code_dim=4, num_classes=5, dim=32,
                        n_layer=1, n_head=2))  # fmt: skip
    torch.save(var_transformer_to_upstream(var), tmp_path / "var_d1.pth")
    out = tmp_path / "var"
    assert main(["convert", str(tmp_path / "var_d1.pth"), str(out)]) == 0
    hint = _hint(capsys)
    assert len(hint) == 1 and f"`vqar sample --model {out} --tokenizer TOKENIZER`" in hint[0], hint
    assert main(["sample", "--model", str(out), "--out", str(tmp_path / "samples")]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_convert_help_names_every_format_it_reads(capsys):
    """A new user learns from --help alone that VAR's released files are converted too."""
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("RQ release", "LlamaGen", "VAR .pth", "var_d16.pth", "vqar 0.1"):
        assert name in text, name
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "VAR .pth" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "LlamaGen .pt, VAR .pth" in " ".join(capsys.readouterr().out.split())  # what --model takes


def test_the_hint_s_commands_quote_a_path_with_spaces(release, tmp_path, capsys):
    """`vqar sample --model /my models/ar` could not be pasted back: the shell split the path."""
    import shlex

    out = tmp_path / "my models" / "ar"
    assert main(["convert", str(release), str(out)]) == 0
    (hint,) = _hint(capsys)
    command = hint.split("`")[1]
    assert shlex.split(command) == ["vqar", "sample", "--model", str(out)]
    assert main(shlex.split(command)[1:] + ["--classes", "0", "--n-per-class", "1", "--out",
                                            str(tmp_path / "samples")]) == 0  # fmt: skip
