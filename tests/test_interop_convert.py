"""Converting to vqar's format (`vqar convert`) and loading it back: from every format vqar reads, with --config and
--tokenizer refused where they do not apply, released weights holding NaN refused, whole bundles from Hub repo ids,
and the model folders of vqar 0.1 with the logits they gave."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest
import safetensors.torch
import torch

import vqar
from test_interop_formats import llamagen_vq_state, tiny_rq_release
from vqar.ar import GPT, GPTConfig
from vqar.cli import main
from vqar.quantize import QuantizerConfig
from vqar.tokenizers import ConvConfig, Tokenizer, TokenizerConfig


# ---------------------------------------------------------------- vqar's own format
def test_convert_writes_vqar_format_that_loads_back_identically(tmp_path, capsys):
    release, out = tmp_path / "release", tmp_path / "converted"
    tokenizer, model = tiny_rq_release(release)
    assert main(["convert", str(release), str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer" / "model.safetensors").is_file()
    original, converted = vqar.load_pretrained(release), vqar.load_pretrained(out)
    codes = torch.randint(0, original.codebook_size, (2, *original.code_shape))
    cond = torch.tensor([3, 6])
    with torch.no_grad():
        assert torch.equal(original(codes, cond).logits, converted(codes, cond).logits)
        assert torch.equal(model(codes, cond).logits, converted(codes, cond).logits)  # the weights written
        assert torch.equal(original.tokenizer.decode(codes), converted.tokenizer.decode(codes))
        assert torch.equal(tokenizer.decode(codes), converted.tokenizer.decode(codes))
    assert main(["convert", str(release), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def _sources_of_every_kind(folder: Path) -> dict[str, Path]:
    """One small model per format `vqar convert` reads, by name: the kinds it tells apart."""
    from vqar.ar.var import VAR, VARConfig
    from vqar.interop.llamagen import vq_config
    from vqar.interop.var import to_upstream
    from vqar.interop.var_transformer import var_transformer_to_upstream

    rq_tokenizer, rq_model = tiny_rq_release(folder / "release")
    vqar.save_pretrained(rq_tokenizer, folder / "tokenizer_folder")
    vqar.save_pretrained(rq_model, folder / "ar_folder")
    llamagen_vq = Tokenizer(vq_config({"preset": "VQ-16", "codebook_size": 16, "codebook_embed_dim": 4, "ch": 32,
                                       "z_channels": 8, "encoder_ch_mult": [1, 2], "decoder_ch_mult": [1, 2],
                                       "image_size": 16}))  # fmt: skip
    torch.save({"model": llamagen_vq_state(llamagen_vq)}, folder / "llamagen_vq.pt")
    conv = ConvConfig(resolution=16, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[4], z_channels=8)
    quantizer = QuantizerConfig(kind="multiscale", codebook_size=16, dim=4, patch_nums=[1, 2, 4], ema=False)
    var_vqvae = Tokenizer(TokenizerConfig(conv=conv, quantizer=quantizer, quant_conv_kernel=3))
    torch.save(to_upstream(var_vqvae), folder / "var_vqvae.pth")
    var = VAR(VARConfig(vocab_size=16, code_shape=[21], patch_nums=[1, 2, 4], code_dim=4, num_classes=5, dim=32,
                        n_layer=2, n_head=2))  # fmt: skip
    torch.save(var_transformer_to_upstream(var), folder / "var_d2.pth")
    return {
        "rq_release": folder / "release",
        "rq_stage1": folder / "release" / "stage1",
        "rq_stage2_file": folder / "release" / "stage2" / "model.pt",
        "tokenizer_folder": folder / "tokenizer_folder",
        "ar_folder": folder / "ar_folder",
        "llamagen_vq": folder / "llamagen_vq.pt",
        "var_vqvae": folder / "var_vqvae.pth",
        "var_transformer": folder / "var_d2.pth",
    }


# (source, option): where --config or --tokenizer has nothing to set, and the reason the error gives.
_OPTIONS_THAT_DO_NOT_APPLY = [
    ("rq_release", "--config", "records its architecture in its config.yaml"),
    ("rq_stage1", "--config", "records its architecture in its config.yaml"),
    ("rq_stage2_file", "--config", "records its architecture in its config.yaml"),
    ("rq_stage1", "--tokenizer", "holds an RQ-VAE"),
    ("tokenizer_folder", "--config", "records its architecture in its config.json"),
    ("tokenizer_folder", "--tokenizer", "holds a tokenizer"),
    ("ar_folder", "--config", "records its architecture in its config.json"),
    ("llamagen_vq", "--tokenizer", "holds a LlamaGen VQ tokenizer"),
    ("var_vqvae", "--tokenizer", "holds a VAR VQVAE"),
    ("var_transformer", "--config", "read off its weights"),
]


def test_a_full_disk_or_an_unwritable_folder_is_one_line_and_the_old_model_stays(tmp_path, capsys, monkeypatch):
    """A disk that filled while the model was written ended in safetensors' traceback (its error is no OSError);
    an OUT_DIR that was writable in a folder that was not passed the up-front check and failed after the whole
    load with a bare errno. Now: too little space is said before writing, a write that runs out of space is one
    line, and the folder the model is first written in is checked with OUT_DIR."""
    import pathlib
    import shutil

    from safetensors import SafetensorError

    import vqar.bundle

    release, out = tmp_path / "release", tmp_path / "converted"
    tiny_rq_release(release)
    assert main(["convert", str(release), str(out)]) == 0
    before = {path.name: path.read_bytes() for path in out.rglob("*.safetensors")}
    capsys.readouterr()

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(vqar.bundle, "save_file", disk_full)
    assert main(["convert", str(release), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vqar: error: out of disk space writing the model to {out} (") and err.count("\n") == 1
    assert f"{out} is as it was" in err and "Traceback" not in err
    monkeypatch.undo()
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1000))
    assert main(["convert", str(release), str(out), "--overwrite"]) == 2
    assert "only 1000 B free on its disk, and the model needs about" in capsys.readouterr().err
    monkeypatch.undo()
    real_write = pathlib.Path.write_bytes

    def parent_read_only(path, data):
        if path.parent == tmp_path and path.name.startswith(".write-test."):
            raise PermissionError(13, "Permission denied")
        return real_write(path, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", parent_read_only)
    assert main(["convert", str(release), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"OUT_DIR {out} cannot be written whole: the model is written in {tmp_path} first" in err, err
    assert {path.name: path.read_bytes() for path in out.rglob("*.safetensors")} == before
    assert not list(tmp_path.glob(".converted.tmp-*"))


def test_convert_never_writes_into_the_tokenizer_of_a_model(tmp_path, capsys):
    """`vqar convert SRC MODEL/tokenizer --overwrite` replaced the tokenizer that decodes MODEL's codes: with an AR
    model MODEL no longer loaded; with another tokenizer it decoded through that one without a word."""
    from conftest import file_contents

    release, model = tmp_path / "release", tmp_path / "model"
    tiny_rq_release(release)
    assert main(["convert", str(release), str(model)]) == 0
    before = file_contents(model)
    for source in (release, release / "stage1", model):
        assert main(["convert", str(source), str(model / "tokenizer"), "--overwrite"]) == 2
        assert capsys.readouterr().err == (
            f"vqar: error: {model}/tokenizer is the tokenizer of the model {model}, which made its codes: a model "
            "converted there would replace it (not even --overwrite writes into it); choose another OUT_DIR\n")
    assert file_contents(model) == before
    assert vqar.load_pretrained(model).tokenizer is not None


def test_convert_refuses_config_and_tokenizer_where_they_do_not_apply(tmp_path, capsys):
    sources = _sources_of_every_kind(tmp_path)
    values = {"--config": "VQ-16", "--tokenizer": str(sources["tokenizer_folder"])}
    for kind, option, reason in _OPTIONS_THAT_DO_NOT_APPLY:
        out = tmp_path / "out" / f"{kind}{option}"
        assert main(["convert", str(sources[kind]), str(out), option, values[option]]) == 2, (kind, option)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"({option}) does not apply" in err and reason in err, (kind, option, err)
        assert not out.exists()
    # Where they apply, they are taken as before; without them every kind converts.
    assert main(["convert", str(sources["rq_release"]), str(tmp_path / "given"), "--tokenizer",
                 str(sources["rq_stage1"])]) == 0  # fmt: skip
    assert main(["convert", str(sources["var_vqvae"]), str(tmp_path / "scales"), "--config",
                 '{"patch_nums": [1, 2, 4]}']) == 0  # fmt: skip
    assert list(vqar.load_pretrained(tmp_path / "scales").quantizer.patch_nums) == [1, 2, 4]
    assert main(["convert", str(sources["var_transformer"]), str(tmp_path / "var"), "--tokenizer",
                 str(sources["var_vqvae"])]) == 0  # fmt: skip
    assert list(vqar.load_pretrained(tmp_path / "var").tokenizer.quantizer.patch_nums) == [1, 2, 4]
    for kind in ("rq_stage1", "tokenizer_folder", "ar_folder", "var_transformer"):
        assert main(["convert", str(sources[kind]), str(tmp_path / "plain" / kind)]) == 0, kind
    # A VQVAE file keeps no scales, only a usage row per scale: 3 rows are not the release's 10 scales, said so
    # (it converted at the release's scales without a word).
    assert main(["convert", str(sources["var_vqvae"]), str(tmp_path / "plain" / "var_vqvae")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "var_vqvae.pth was trained at 3 scales" in err and "patch_nums" in err, err
    assert not (tmp_path / "plain" / "var_vqvae").exists()
    with pytest.raises(ValueError, match=r"tokenizer= \(--tokenizer\) does not apply"):
        vqar.load_pretrained(sources["tokenizer_folder"], tokenizer=vqar.load_pretrained(sources["rq_stage1"]))


def test_a_var_transformer_file_takes_a_tokenizer_folder_or_names_what_the_tokenizer_is(tmp_path):
    """The scales a VAR transformer reads its VQVAE file at are no --config of the user's: a converted VQVAE folder
    (which records its scales) is taken as the tokenizer, and another kind of model is named for what it is."""
    sources = _sources_of_every_kind(tmp_path)
    assert main(["convert", str(sources["var_vqvae"]), str(tmp_path / "vqvae"), "--config",
                 '{"patch_nums": [1, 2, 4]}']) == 0  # fmt: skip
    model = vqar.load_pretrained(sources["var_transformer"], tokenizer=tmp_path / "vqvae")
    assert list(model.tokenizer.quantizer.patch_nums) == [1, 2, 4]
    release_scales = '{"patch_nums": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]}'
    assert main(["convert", str(sources["var_vqvae"]), str(tmp_path / "vqvae-256"), "--config", release_scales]) == 0
    with pytest.raises(ValueError, match=r"scales \(1, 2, 3, 4, 5, 6, 8, 10, 13, 16\).*do not fit"):
        vqar.load_pretrained(sources["var_transformer"], tokenizer=tmp_path / "vqvae-256")
    for kind in ("ar_folder", "var_transformer"):
        with pytest.raises(ValueError, match="not a stage-1 tokenizer"):
            vqar.load_pretrained(sources["var_transformer"], tokenizer=sources[kind])
    # A LlamaGen VQ file asked for its config=, which the VAR transformer then refused: named for what it is now.
    with pytest.raises(ValueError, match=f"the tokenizer {sources['llamagen_vq']} is not a VAR VQVAE but a LlamaGen "
                                         "VQ tokenizer: a VAR transformer .* decodes its codes with a multi-scale"):
        vqar.load_pretrained(sources["var_transformer"], tokenizer=sources["llamagen_vq"])
    # A damaged VAR VQVAE shares a LlamaGen VQ's names, and was called one: its own error is said, as alone.
    state = torch.load(sources["var_vqvae"], weights_only=True)
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"].clone().fill_(float("nan"))
    torch.save(state, tmp_path / "damaged_vqvae.pth")
    with pytest.raises(ValueError, match="damaged_vqvae.pth holds NaN or infinite values in 1 of its"):
        vqar.load_pretrained(sources["var_transformer"], tokenizer=tmp_path / "damaged_vqvae.pth")


def test_released_weights_with_nan_or_inf_are_refused_like_a_vqar_folder(tmp_path):
    """A NaN in a foreign file (a VAR .pth, a LlamaGen .pt) samples meaningless codes, as in vqar's own folders,
    which refuse it: the readers of every format refuse it too, naming the file."""
    sources = _sources_of_every_kind(tmp_path)
    for kind, name in (("var_transformer", "head.weight"), ("var_vqvae", "quantize.embedding.weight")):
        state = torch.load(sources[kind], weights_only=True)
        state[name] = state[name].clone()
        state[name][0, 0] = float("nan") if kind == "var_transformer" else float("inf")
        torch.save(state, tmp_path / f"bad_{kind}.pth")
        # Named as the file names it (vqar calls VAR's head.weight output.weight): what a user finds in the file.
        config = {"patch_nums": [1, 2, 4]} if kind == "var_vqvae" else None
        with pytest.raises(ValueError, match=rf"bad_{kind}.pth holds NaN or infinite values .*\(the first: {name}\)"):
            vqar.load_pretrained(tmp_path / f"bad_{kind}.pth", config=config)
    checkpoint = torch.load(sources["llamagen_vq"], weights_only=True)
    checkpoint["model"]["quantize.embedding.weight"][1, 1] = float("nan")
    torch.save(checkpoint, tmp_path / "bad_vq.pt")
    with pytest.raises(ValueError, match=r"bad_vq.pt holds NaN .*first: quantize.embedding.weight\)"):
        vqar.load_pretrained(tmp_path / "bad_vq.pt", config={"preset": "VQ-16", "codebook_size": 16,
                             "codebook_embed_dim": 4, "ch": 32, "z_channels": 8, "encoder_ch_mult": [1, 2],
                             "decoder_ch_mult": [1, 2], "image_size": 16})  # fmt: skip


def test_a_file_that_does_not_fit_is_told_in_its_own_names_and_its_format_s_hint(tmp_path):
    """A VAR file lacking head.bias was said to miss 'output.bias', a key no VAR file has; an RQ stage 2 holding
    other weights listed vqar's names and ended with LlamaGen's advice to check --config, which RQ releases
    refuse."""
    sources = _sources_of_every_kind(tmp_path)
    state = torch.load(sources["var_transformer"], weights_only=True)
    del state["head.bias"]
    torch.save(state, tmp_path / "var_without_head_bias.pth")
    with pytest.raises(ValueError, match=r"1 missing keys, first: \['head.bias'\]"):
        vqar.load_pretrained(tmp_path / "var_without_head_bias.pth")
    release = tmp_path / "damaged_release"
    shutil.copytree(sources["rq_release"], release)
    stage2 = torch.load(release / "stage2" / "model.pt", weights_only=True)
    stage2["state_dict"] = {key: value for key, value in stage2["state_dict"].items() if "head" not in key}
    torch.save(stage2, release / "stage2" / "model.pt")
    with pytest.raises(ValueError, match=r"missing keys.*check that both files are of the same stage of one release"):
        vqar.load_pretrained(release)


def _tiny_text_gpt_bundle(tmp_path):
    """A text-to-image GPT with its VQ tokenizer and caption tokenizer attached."""
    from vqar.text import TextTokenizer

    tokenizer = Tokenizer(TokenizerConfig(conv=ConvConfig(resolution=16, ch=8, ch_mult=[1, 2], z_channels=8,
                                                          norm_groups=4),
                                          quantizer=QuantizerConfig(kind="vq", codebook_size=16, dim=4)))  # fmt: skip
    captions = TextTokenizer.train(["a red square", "a blue circle", "two green dots"] * 3, tmp_path / "bpe",
                                   vocab_size=150, length=6, min_frequency=1)  # fmt: skip
    cfg = GPTConfig(vocab_size=16, code_shape=[8, 8], dim=32, n_layer=1, n_head=2, num_classes=0, text_length=6,
                    text_vocab_size=captions.vocab_size, class_dropout_prob=0.1)  # fmt: skip
    return GPT(cfg).eval().attach(tokenizer.eval(), captions)


def test_hub_repo_ids_download_the_whole_bundle_and_nothing_else(tmp_path, monkeypatch):
    """A stand-in for the Hub that honours allow_patterns as huggingface_hub does (fnmatch on repo paths)."""
    import fnmatch
    import shutil

    remote = tmp_path / "remote"
    model = _tiny_text_gpt_bundle(tmp_path)
    vqar.save_pretrained(model, remote)
    (remote / "checkpoints").mkdir()
    (remote / "checkpoints" / "optimizer.pt").write_bytes(b"large")
    (remote / "README.md").write_text("a model card")
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append(repo_id)
        snapshot = tmp_path / "cache" / repo_id.replace("/", "--")
        for file in remote.rglob("*"):
            name = file.relative_to(remote).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, snapshot / name)
        return str(snapshot)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    loaded = vqar.load_pretrained("someone/tiny-t2i")
    assert calls == ["someone/tiny-t2i"] and isinstance(loaded, GPT)
    fetched = {p.relative_to(tmp_path / "cache" / "someone--tiny-t2i").as_posix()
               for p in (tmp_path / "cache").rglob("*") if p.is_file()}  # fmt: skip
    assert "checkpoints/optimizer.pt" not in fetched and "README.md" not in fetched
    assert {"config.json", "model.safetensors", "tokenizer/config.json", "text_tokenizer/vocab.json"} <= fetched
    assert loaded.text_tokenizer is not None and loaded.tokenizer is not None
    prompt = ["a red circle"]
    assert torch.equal(loaded.text_tokenizer.encode(prompt), model.text_tokenizer.encode(prompt))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(FileNotFoundError, match="huggingface_hub"):
        vqar.load_pretrained("someone/tiny-gpt")


# ---------------------------------------------------------------- folders of vqar 0.1
V1 = Path(__file__).parent / "data" / "vqar_v1"  # written by vqar 0.1.0 itself; see its README


@pytest.mark.parametrize("arch", ["gpt", "rq", "vim"])
def test_folders_of_vqar_0_1_load_convert_and_give_their_logits(tmp_path, arch, capsys):
    io = safetensors.torch.load_file(str(V1 / "io.safetensors"))
    codes, cond = io[f"{arch}_codes"], io["cond"]
    with pytest.raises(ValueError, match="load_pretrained"):
        vqar.bundle.load(V1 / arch)
    loaded = vqar.load_pretrained(V1 / arch)
    assert loaded.arch == arch and (arch != "rq" or loaded.tokenizer is not None)
    with torch.no_grad():
        torch.testing.assert_close(loaded(codes, cond).logits, io[f"{arch}_logits"], atol=1e-6, rtol=1e-6)
    assert main(["convert", str(V1 / arch), str(tmp_path / "new")]) == 0
    converted = vqar.load_pretrained(tmp_path / "new")
    with torch.no_grad():
        assert torch.equal(converted(codes, cond).logits, loaded(codes, cond).logits)
    if arch == "rq":
        assert torch.equal(converted.tokenizer.decode(codes), loaded.tokenizer.decode(codes))
