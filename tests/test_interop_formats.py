"""The official checkpoint formats beyond the golden fixtures' shapes: loaders follow the checkpoint and its config
(text conditioning, one codebook per depth, non-square grids, sigmoid GELU, ffn_dim_multiplier, rope_base, FSDP
raw files, EMA entries), refuse unsafe pickles, explain mismatches, and convert to vqar's format and back."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

import vqar
from vqar.ar import GPT, GPTConfig, RQTransformer, RQTransformerConfig
from vqar.cli import main
from vqar.interop import UnsafeCheckpointError
from vqar.interop.llamagen import GPT_NAMES
from vqar.interop.rq_release import RQ_TRANSFORMER_NAMES
from vqar.quantize import QuantizerConfig
from vqar.sampling import SamplingSettings, generate
from vqar.tokenizers import ConvConfig, Tokenizer, TokenizerConfig


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


# ---------------------------------------------------------------- writers of the official layouts (test-only)
def write_rq_release(folder, tokenizer: Tokenizer, model: RQTransformer) -> None:
    """An RQ release folder as the official trainer writes it, from vqar models."""
    conv, q = tokenizer.cfg.conv, tokenizer.cfg.quantizer
    stage1_arch = {
        "type": "rq-vae",
        "hparams": {
            "bottleneck_type": "rq",
            "embed_dim": q.dim,
            "n_embed": q.codebook_size,
            "latent_shape": [conv.resolution // conv.downsample_factor] * 2 + [q.dim],
            "code_shape": [conv.resolution // conv.downsample_factor] * 2 + [q.depth],
            "shared_codebook": q.shared_codebook,
            "decay": q.decay,
            "latent_loss_weight": q.beta,
            "restart_unused_codes": True,
        },
        "ddconfig": {
            "double_z": False,
            "z_channels": conv.z_channels,
            "resolution": conv.resolution,
            "in_channels": conv.in_channels,
            "out_ch": conv.out_channels,
            "ch": conv.ch,
            "ch_mult": conv.ch_mult,
            "num_res_blocks": conv.num_res_blocks,
            "attn_resolutions": conv.attn_resolutions,
            "dropout": 0.0,
        },
    }
    state = {}
    for key, value in tokenizer.state_dict().items():
        if key.endswith(".initialized"):
            continue
        if key.startswith("quantizer.codebooks."):
            if key.endswith(".weight"):
                value = torch.cat([value, torch.zeros(1, value.shape[1])])  # the padding row
            if q.shared_codebook:  # the same module under every depth
                for d in range(q.depth):
                    state[key.replace("codebooks.0.", f"codebooks.{d}.")] = value
                continue
        state[key] = value
    _write_stage(folder / "stage1", stage1_arch, state)

    c = model.cfg
    text = c.text_length > 0
    block = {"n_head": c.n_head, "gelu": "v2" if c.gelu == "sigmoid" else "v1", "mlp_bias": True, "attn_bias": True}
    stage2_arch = {
        "type": "rq-transformer",
        "vocab_size": c.vocab_size,
        "block_size": list(c.code_shape),
        "vocab_size_cond": c.text_vocab_size if text else max(c.num_classes, 1),
        "block_size_cond": c.text_length if text else 1,
        "embed_dim": c.dim,
        "input_embed_dim": c.code_dim,
        "input_emb_vqvae": True,
        "head_emb_vqvae": True,
        "cumsum_depth_ctx": True,
        "shared_tok_emb": True,
        "shared_cls_emb": True,
        "body": {"n_layer": c.n_layer, "block": block},
        "head": {"n_layer": c.n_depth_layer, "block": block},
    }
    state = RQ_TRANSFORMER_NAMES.to_upstream({k: v for k, v in model.state_dict().items() if k != "code_embeddings"})
    _write_stage(folder / "stage2", stage2_arch, state)


def _write_stage(folder, arch, state) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"arch": arch, "seed": 0}))
    torch.save(
        {"epoch": 3, "state_dict": state, "state_dict_ema": {k: v + 1 for k, v in state.items()}}, folder / "model.pt"
    )


def llamagen_vq_state(tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """vqar conv VQ weights in LlamaGen's names (the inverse of the loader's mapping)."""
    import re

    levels = len(tokenizer.cfg.conv.ch_mult)
    mid = {"block_1": "0", "attn_1": "1", "block_2": "2"}
    out = {}
    for key, value in tokenizer.state_dict().items():
        if key in ("quantizer.codebook.cluster_size_ema", "quantizer.codebook.initialized"):
            continue
        new = key.replace("quantizer.codebook.weight", "quantize.embedding.weight")
        new = re.sub(r"\.mid\.(block_1|attn_1|block_2)\.", lambda m: f".mid.{mid[m[1]]}.", new)
        new = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.conv_blocks.\1.res.", new)
        new = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.conv_blocks.\1.", new)
        match = re.match(r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.(.*)$", new)
        if match:
            part = "res" if match[2] == "block" else match[2]
            new = f"decoder.conv_blocks.{levels - 1 - int(match[1])}.{part}.{match[3]}"
        out[new] = value
    out["quantize.codebook_used"] = torch.zeros(65536)
    return out


def tiny_rq_release(folder, *, text_length: int = 0, text_vocab_size: int = 30, gelu: str = "exact"):
    """A small random RQ-VAE and RQ-Transformer written as an RQ release folder (`write_rq_release`); returns the
    two vqar models it was written from. Text-conditioned (one codebook per depth) when text_length > 0, else
    conditioned on 7 classes with one shared codebook. Release-format input for tests that need no parity."""
    text = text_length > 0
    tokenizer = _randomize(
        Tokenizer(
            TokenizerConfig(
                conv=ConvConfig(
                    resolution=16,
                    ch=32,
                    ch_mult=[1, 2, 2],
                    num_res_blocks=1,
                    attn_resolutions=[8, 4],
                    z_channels=8,
                ),
                quantizer=QuantizerConfig(kind="rq", codebook_size=24, dim=6, depth=3, shared_codebook=not text),
            )
        )
    )
    books = tokenizer.code_vectors()
    cfg = RQTransformerConfig(
        vocab_size=24,
        code_shape=[2, 3, 3],
        code_dim=6,
        shared_codebook=not text,
        dim=16,
        n_head=2,
        n_layer=2,
        n_depth_layer=1,
        num_classes=0 if text else 7,
        text_length=text_length,
        text_vocab_size=text_vocab_size if text else 0,
        gelu=gelu,
    )
    model = _randomize(RQTransformer(cfg, code_embeddings=books))
    model.set_code_embeddings(books)
    write_rq_release(folder, tokenizer, model)
    return tokenizer, model


# ---------------------------------------------------------------- RQ release variants
@pytest.mark.parametrize("variant", ["text_per_depth_books", "class_shared_book"])
def test_rq_release_variants_load_from_their_configs(tmp_path, variant):
    text = variant.startswith("text")
    tokenizer, model = tiny_rq_release(tmp_path / "release", text_length=5 if text else 0,
                                       gelu="sigmoid" if text else "exact")  # fmt: skip
    cfg = model.cfg
    loaded = vqar.load_pretrained(tmp_path / "release")
    assert loaded.cfg.text_length == cfg.text_length and loaded.cfg.gelu == cfg.gelu
    assert loaded.cfg.shared_codebook == cfg.shared_codebook
    codes = torch.randint(0, 24, (2, 2, 3, 3))
    cond = torch.randint(0, 30, (2, 5)) if text else torch.tensor([1, 6])
    with torch.no_grad():
        expected, got = model(codes, cond), loaded(codes, cond)
        if text:
            assert got.text_logits.shape == (2, 4, 30)
            torch.testing.assert_close(got.text_logits, expected.text_logits)
        else:
            assert got.text_logits is None
        torch.testing.assert_close(got.logits, expected.logits)
        images = torch.rand(2, 3, 16, 24) * 2 - 1  # a non-square image gives a non-square code grid
        assert torch.equal(loaded.tokenizer.encode(images), tokenizer.encode(images))
        assert loaded.tokenizer.encode(images).shape == (2, 4, 6, 3)
        sample = generate(loaded, cond, SamplingSettings(greedy=True))
        assert torch.equal(sample, generate(model, cond, SamplingSettings(greedy=True)))
    ema = vqar.load_pretrained(tmp_path / "release" / "stage1", ema=True)
    assert torch.allclose(ema.encoder.conv_in.weight, tokenizer.encoder.conv_in.weight + 1)


def test_rq_release_loads_from_the_release_folder_and_its_file(tmp_path):
    tokenizer, model = tiny_rq_release(tmp_path / "release")
    from_folder = vqar.load_pretrained(tmp_path / "release")
    from_file = vqar.load_pretrained(tmp_path / "release" / "stage2" / "model.pt")
    stage1 = vqar.load_pretrained(tmp_path / "release" / "stage1")
    with_tokenizer = vqar.load_pretrained(tmp_path / "release" / "stage2", tokenizer=stage1)

    def assert_same_weights(expected: torch.nn.Module, loaded: torch.nn.Module) -> None:
        a, b = expected.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert key.endswith(".initialized") or torch.equal(a[key], b[key]), key  # the release has no flag

    for loaded in (from_folder, from_file, with_tokenizer):
        assert_same_weights(model, loaded)
        assert_same_weights(tokenizer, loaded.tokenizer)
    assert with_tokenizer.tokenizer is stage1


def test_rq_transformer_without_its_stage1_says_what_to_pass(tmp_path):
    import shutil

    tiny_rq_release(tmp_path / "release")
    shutil.copytree(tmp_path / "release" / "stage2", tmp_path / "stage2")
    with pytest.raises(FileNotFoundError, match="tokenizer="):
        vqar.load_pretrained(tmp_path / "stage2")
    vq = Tokenizer(
        TokenizerConfig(
            conv=ConvConfig(resolution=16, ch=8, ch_mult=[1, 2], z_channels=8, norm_groups=4),
            quantizer=QuantizerConfig(kind="vq", codebook_size=128, dim=16),
        )
    )
    with pytest.raises(ValueError, match="residual"):
        vqar.load_pretrained(tmp_path / "stage2", tokenizer=vq)


# ---------------------------------------------------------------- LlamaGen variants
def test_llamagen_gpt_from_json_fields_in_fsdp_raw_format(tmp_path):
    cfg = GPTConfig(
        vocab_size=40,
        code_shape=[4, 4],
        dim=32,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        multiple_of=48,
        ffn_dim_multiplier=1.3,
        rope_base=500.0,
        num_classes=5,
    )
    model = _randomize(GPT(cfg))
    upstream = GPT_NAMES.to_upstream(model.state_dict())
    raw = {f"_orig_mod.{k}": v for k, v in upstream.items()}  # FSDP-consolidated, compiled
    torch.save(raw, tmp_path / "consolidated.pt")
    fields = {
        "dim": 32,
        "n_layer": 2,
        "n_head": 4,
        "n_kv_head": 2,
        "multiple_of": 48,
        "ffn_dim_multiplier": 1.3,
        "rope_base": 500,
        "vocab_size": 40,
        "block_size": 16,
        "num_classes": 5,
        "cls_token_num": 1,
        "model_type": "c2i",
        "caption_dim": 2048,
        "max_batch_size": 32,
        "_checkpoint_format": "fsdp",
    }
    (tmp_path / "config.json").write_text(json.dumps(fields))
    loaded = vqar.load_pretrained(tmp_path / "consolidated.pt", config=tmp_path / "config.json")
    codes, labels = torch.randint(0, 40, (3, 4, 4)), torch.tensor([0, 4, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(codes, labels).logits, model(codes, labels).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="EMA"):
        vqar.load_pretrained(tmp_path / "consolidated.pt", config=tmp_path / "config.json", ema=True)


def test_llamagen_gpt_preset_reads_vocab_and_classes_off_the_weights_and_explains_mismatches(tmp_path):
    model = GPT(GPTConfig(vocab_size=50, code_shape=[4, 4], dim=64, n_layer=2, n_head=4, num_classes=3))
    upstream = GPT_NAMES.to_upstream(model.state_dict())
    torch.save({"model": upstream, "args": __import__("argparse").Namespace(gpt_model="x")}, tmp_path / "g.pt")
    config = {"preset": "GPT-B", "dim": 64, "n_layer": 2, "n_head": 4, "block_size": 16}
    loaded = vqar.load_pretrained(tmp_path / "g.pt", config=config)
    assert (loaded.cfg.vocab_size, loaded.num_classes) == (50, 3)
    with pytest.raises(ValueError, match=r"does not fit the configured architecture.*missing keys.*layers\.2"):
        vqar.load_pretrained(tmp_path / "g.pt", config={**config, "n_layer": 3})
    with pytest.raises(ValueError, match="shape mismatches"):
        vqar.load_pretrained(tmp_path / "g.pt", config={**config, "multiple_of": 512})
    with pytest.raises(ValueError, match="pass config= a preset name"):
        vqar.load_pretrained(tmp_path / "g.pt")
    with pytest.raises(ValueError, match="unknown GPT preset 'GPT-Z'"):
        vqar.load_pretrained(tmp_path / "g.pt", config="GPT-Z")
    with pytest.raises(ValueError, match="unknown GPT config fields"):
        vqar.load_pretrained(tmp_path / "g.pt", config={**config, "n_layers": 2})
    # fields of the wrong kind were bare TypeErrors from the constructors
    for field, value, kind in (("dim", "sixty", "an integer"), ("n_layer", 2.0, "an integer"),
                               ("norm_eps", "1e-5", "a number"), ("n_head", True, "an integer")):  # fmt: skip
        with pytest.raises(ValueError, match=f"^GPT config field '{field}' takes {kind}, got {value!r}$"):
            vqar.load_pretrained(tmp_path / "g.pt", config={**config, field: value})


def test_llamagen_vq_with_ema_entropy_and_other_levels(tmp_path):
    fields = {
        "codebook_size": 64,
        "codebook_embed_dim": 4,
        "codebook_l2_norm": True,
        "encoder_ch_mult": [1, 2, 2],
        "decoder_ch_mult": [1, 2, 2],
        "z_channels": 16,
        "ch": 32,
        "image_size": 32,
        "entropy_loss_ratio": 0.1,
    }
    from vqar.interop.llamagen import vq_config

    model = _randomize(Tokenizer(vq_config(dict(fields))))
    state = llamagen_vq_state(model)
    torch.save({"model": state, "ema": {k: v * 0.5 for k, v in state.items()}}, tmp_path / "vq.pt")
    loaded = vqar.load_pretrained(tmp_path / "vq.pt", config={**fields, "_note": "informational"})
    assert loaded.cfg.conv.attn_resolutions == [8] and loaded.cfg.quantizer.entropy_weight == 0.1
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), model.encode(images))
        torch.testing.assert_close(loaded(images).recon, model(images).recon, atol=0, rtol=0)
    ema = vqar.load_pretrained(tmp_path / "vq.pt", config=fields, ema=True)
    torch.testing.assert_close(ema.decoder.conv_out.weight, model.decoder.conv_out.weight * 0.5)
    with pytest.raises(ValueError, match="encoder_ch_mult == decoder_ch_mult"):
        vqar.load_pretrained(tmp_path / "vq.pt", config={**fields, "decoder_ch_mult": [1, 1, 2]})


# ---------------------------------------------------------------- safety
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"system"):
        vqar.load_pretrained(tmp_path / "evil.pt", config="GPT-B")
    assert not marker.exists()


def test_allow_listed_types_load(tmp_path):
    from omegaconf import OmegaConf

    from vqar.interop import load_checkpoint

    payload = {
        "state_dict": {"w": torch.ones(2)},
        "optimizer": {"betas": OmegaConf.create([0.5, 0.9])},
        "args": __import__("argparse").Namespace(lr=1e-4),
    }
    torch.save(payload, tmp_path / "ok.pt")
    loaded = load_checkpoint(tmp_path / "ok.pt")
    assert list(loaded["optimizer"]["betas"]) == [0.5, 0.9] and loaded["args"].lr == 1e-4


def test_corrupt_and_unknown_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.pt"):
        vqar.load_pretrained(tmp_path / "junk.pt", config="GPT-B")
    torch.save({"model": {"something.else": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither a LlamaGen GPT"):
        vqar.load_pretrained(tmp_path / "other.pt", config="GPT-B")
    # A VAR transformer that lacks entries or sits in a wrapper dict is said to be one, not "neither LlamaGen kind".
    from vqar.ar.var import VAR, VARConfig
    from vqar.interop.var_transformer import var_transformer_to_upstream

    var = VAR(VARConfig(vocab_size=16, code_shape=[5], patch_nums=[1, 2], code_dim=4, num_classes=3, dim=32,
                        n_layer=1, n_head=2))  # fmt: skip
    state = var_transformer_to_upstream(var)
    torch.save({k: v for k, v in state.items() if not k.startswith("head.")}, tmp_path / "var_cut.pth")
    with pytest.raises(ValueError, match=r"var_cut.pth looks like a VAR transformer but lacks head.weight"):
        vqar.load_pretrained(tmp_path / "var_cut.pth")
    torch.save({"model": state}, tmp_path / "var_wrapped.pth")
    with pytest.raises(ValueError, match=r"var_wrapped.pth holds a VAR transformer's weights under 'model'"):
        vqar.load_pretrained(tmp_path / "var_wrapped.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "var_ddp.pth")
    with pytest.raises(ValueError, match=r"var_ddp.pth holds a VAR transformer's weights with wrapper prefixes"):
        vqar.load_pretrained(tmp_path / "var_ddp.pth")
    # A VAR file's architecture is read off its weights: a misfit is no --config to check (VAR takes none).
    torch.save({**state, "head.bias": state["head.bias"][:-1]}, tmp_path / "var_edited.pth")
    with pytest.raises(ValueError, match=r"var_edited.pth does not fit .*read off its own weights") as err:
        vqar.load_pretrained(tmp_path / "var_edited.pth")
    assert "config" not in str(err.value).split("). ")[-1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is an empty folder, not a model"):
        vqar.load_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match="not a model folder vqar knows"):
        vqar.load_pretrained(tmp_path / "empty")


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
    for kind in ("rq_stage1", "tokenizer_folder", "ar_folder", "var_vqvae", "var_transformer"):
        assert main(["convert", str(sources[kind]), str(tmp_path / "plain" / kind)]) == 0, kind
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
    assert main(["convert", str(sources["var_vqvae"]), str(tmp_path / "vqvae-256")]) == 0  # the release's scales
    with pytest.raises(ValueError, match=r"scales \(1, 2, 3, 4, 5, 6, 8, 10, 13, 16\).*do not fit"):
        vqar.load_pretrained(sources["var_transformer"], tokenizer=tmp_path / "vqvae-256")
    for kind in ("ar_folder", "var_transformer"):
        with pytest.raises(ValueError, match="not a stage-1 tokenizer"):
            vqar.load_pretrained(sources["var_transformer"], tokenizer=sources[kind])
    # A LlamaGen VQ file asked for its config=, which the VAR transformer then refused: named for what it is now.
    with pytest.raises(ValueError, match=f"the tokenizer {sources['llamagen_vq']} is not a VAR VQVAE but a LlamaGen "
                                         "VQ tokenizer: a VAR transformer .* decodes its codes with a multi-scale"):
        vqar.load_pretrained(sources["var_transformer"], tokenizer=sources["llamagen_vq"])


def test_released_weights_with_nan_or_inf_are_refused_like_a_vqar_folder(tmp_path):
    """A NaN in a foreign file (a VAR .pth, a LlamaGen .pt) samples meaningless codes, as in vqar's own folders,
    which refuse it: the readers of every format refuse it too, naming the file."""
    sources = _sources_of_every_kind(tmp_path)
    for kind, name in (("var_transformer", "head.weight"), ("var_vqvae", "quantize.embedding.weight")):
        state = torch.load(sources[kind], weights_only=True)
        state[name] = state[name].clone()
        state[name][0, 0] = float("nan") if kind == "var_transformer" else float("inf")
        torch.save(state, tmp_path / f"bad_{kind}.pth")
        with pytest.raises(ValueError, match=f"bad_{kind}.pth holds NaN or infinite values"):
            vqar.load_pretrained(tmp_path / f"bad_{kind}.pth")
    checkpoint = torch.load(sources["llamagen_vq"], weights_only=True)
    checkpoint["model"]["quantize.embedding.weight"][1, 1] = float("nan")
    torch.save(checkpoint, tmp_path / "bad_vq.pt")
    with pytest.raises(ValueError, match="bad_vq.pt holds NaN or infinite values"):
        vqar.load_pretrained(tmp_path / "bad_vq.pt", config={"preset": "VQ-16", "codebook_size": 16,
                             "codebook_embed_dim": 4, "ch": 32, "z_channels": 8, "encoder_ch_mult": [1, 2],
                             "decoder_ch_mult": [1, 2], "image_size": 16})  # fmt: skip


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
