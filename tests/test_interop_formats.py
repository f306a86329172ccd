"""The official checkpoint formats beyond the golden fixtures' shapes: loaders follow the checkpoint and its config
(text conditioning, one codebook per depth, non-square grids, sigmoid GELU, ffn_dim_multiplier, rope_base, FSDP
raw files, EMA entries), refuse unsafe pickles, and explain mismatches and files they cannot read."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

import vqar
from vqar.ar import GPT, GPTConfig, RQTransformer, RQTransformerConfig
from vqar.interop import UnsafeCheckpointError, load_checkpoint
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


def test_a_release_without_its_stage2_weights_is_named_not_read_as_its_tokenizer(tmp_path):
    """A release folder whose stage2/model.pt is missing (an unpacking that stopped short) was loaded, and
    converted, as its stage-1 RQ-VAE without a word; `vqar sample` then called the release a tokenizer."""
    tiny_rq_release(tmp_path / "release")
    (tmp_path / "release" / "stage2" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"release/stage2 has a config.yaml but no model.pt$"):
        vqar.load_pretrained(tmp_path / "release")


def test_a_folder_with_another_program_s_config_json_is_not_called_a_vqar_0_1_folder(tmp_path):
    """A Hub model's or a release's config.json was taken for vqar 0.1's, and the error advised `vqar convert`,
    the very command that had failed with it."""
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 8}')
    (tmp_path / "var_d16.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is not a vqar model folder: its config.json names no model kind, .*; to "
                                         r"read a checkpoint in it, give its file \(var_d16.pth\)$"):  # fmt: skip
        vqar.load_pretrained(tmp_path)


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
    with pytest.raises(ValueError, match=r"pass config= \(--config\) a preset name"):
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


def test_a_llamagen_vq_file_given_as_the_tokenizer_says_how_to_give_its_architecture(tmp_path, capsys):
    """It said "pass config=", where `--config` (and config=) is the GPT's: the tokenizer's cannot be given beside
    it. The advice, converting the VQ file first, is followed to the end."""
    from vqar.cli import main
    from vqar.interop.llamagen import vq_config

    fields = {"preset": "VQ-16", "codebook_size": 50, "codebook_embed_dim": 4, "ch": 32, "z_channels": 8,
              "encoder_ch_mult": [1, 2], "decoder_ch_mult": [1, 2], "image_size": 16}  # fmt: skip
    torch.save({"model": llamagen_vq_state(Tokenizer(vq_config(dict(fields))))}, tmp_path / "vq.pt")
    model = GPT(GPTConfig(vocab_size=50, code_shape=[8, 8], dim=64, n_layer=2, n_head=4, num_classes=3))
    torch.save({"model": GPT_NAMES.to_upstream(model.state_dict())}, tmp_path / "g.pt")
    config = json.dumps({"preset": "GPT-B", "dim": 64, "n_layer": 2, "n_head": 4, "block_size": 64})
    convert = ["convert", str(tmp_path / "g.pt"), str(tmp_path / "gpt"), "--config", config]
    assert main([*convert, "--tokenizer", str(tmp_path / "vq.pt")]) == 2
    err = capsys.readouterr().err
    assert f"the tokenizer {tmp_path / 'vq.pt'} is a LlamaGen VQ checkpoint, which does not record its architecture: "\
           f"convert it once with it (`vqar convert {tmp_path / 'vq.pt'} VQ_FOLDER --config VQ-16`, or VQ-8)" in err
    with pytest.raises(ValueError, match=r"the tokenizer .*g.pt is a LlamaGen GPT checkpoint, not a stage-1 "):
        vqar.load_pretrained(tmp_path / "g.pt", config=json.loads(config), tokenizer=tmp_path / "g.pt")
    assert main(["convert", str(tmp_path / "vq.pt"), str(tmp_path / "vq"), "--config", json.dumps(fields)]) == 0
    assert main([*convert, "--tokenizer", str(tmp_path / "vq")]) == 0
    assert isinstance(vqar.load_pretrained(tmp_path / "gpt").tokenizer, Tokenizer)


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


def test_a_legacy_format_file_asking_for_other_types_is_refused_as_such_not_called_damaged(tmp_path):
    """torch.save's old (non-zip) format cannot be scanned for the types it asks for, and such a file was called
    "a damaged pickle"; the types are named as for a zip file, and nothing runs."""
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _RunsCode(marker)}, tmp_path / "evil.pt",
               _use_new_zipfile_serialization=False)  # fmt: skip
    with pytest.raises(UnsafeCheckpointError, match=r"not on vqar's allow-list \(it needs posix.system\)"):
        load_checkpoint(tmp_path / "evil.pt")
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
