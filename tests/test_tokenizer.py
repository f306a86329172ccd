"""The stage-1 Tokenizer: shapes, the official RQ-VAE fixture, save/load, and bad inputs."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import vqar
from vqar.quantize import QuantizerConfig
from vqar.tokenizers import ConvConfig, Tokenizer, TokenizerConfig


def tiny_config(kind: str = "rq", depth: int = 3, **conv) -> TokenizerConfig:
    conv_cfg = ConvConfig(
        in_channels=1,
        out_channels=1,
        resolution=16,
        ch=8,
        ch_mult=[1, 2, 2],
        num_res_blocks=1,
        attn_resolutions=[4],
        z_channels=8,
        norm_groups=4,
    )
    for key, value in conv.items():
        setattr(conv_cfg, key, value)
    quantizer = QuantizerConfig(kind=kind, codebook_size=32, dim=6, depth=depth if kind == "rq" else 1)
    return TokenizerConfig(conv=conv_cfg, quantizer=quantizer)


@pytest.mark.parametrize(("kind", "code_shape"), [("vq", (2, 4, 4)), ("rq", (2, 4, 4, 3))])
def test_encode_decode_shapes(kind, code_shape):
    model = Tokenizer(tiny_config(kind)).eval()
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    codes = model.encode(images)
    assert codes.dtype == torch.int64 and codes.shape == code_shape
    assert model.code_shape() == code_shape[1:]
    assert model.decode(codes).shape == images.shape
    out = model(images)
    assert out.recon.shape == images.shape
    assert torch.equal(out.quant.codes, codes)
    # Fully convolutional: other multiples of the downsampling factor work too.
    assert model.encode(torch.zeros(1, 1, 24, 32)).shape[1:3] == (6, 8)


def test_decode_matches_forward_reconstruction():
    model = Tokenizer(tiny_config("rq")).eval()
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model(images).recon, model.decode(model.encode(images)), atol=1e-5)


def test_encode_never_updates_the_codebook():
    model = Tokenizer(tiny_config("rq")).train()
    before = model.quantizer.codebook(0).weight.clone()
    model.encode(torch.rand(4, 1, 16, 16))
    assert torch.equal(before, model.quantizer.codebook(0).weight)
    assert model.quantizer.training  # mode restored


def test_save_and_load_round_trip(tmp_path):
    model = Tokenizer(tiny_config("rq")).eval()
    vqar.save_pretrained(model, tmp_path / "tok")
    assert {p.name for p in (tmp_path / "tok").iterdir()} == {"config.json", "model.safetensors"}
    loaded = vqar.load_pretrained(tmp_path / "tok")
    assert isinstance(loaded, Tokenizer) and not loaded.training
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(model.encode(images), loaded.encode(images))
    with torch.no_grad():
        assert torch.equal(model(images).recon, loaded(images).recon)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model"):
        vqar.load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        vqar.load_pretrained(tmp_path / "empty")
    vqar.save_pretrained(Tokenizer(tiny_config("rq")), tmp_path / "tok")
    (tmp_path / "tok" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        vqar.load_pretrained(tmp_path / "tok")
    # Weights from a different architecture do not load silently.
    vqar.save_pretrained(Tokenizer(tiny_config("vq")), tmp_path / "vq")
    vqar.save_pretrained(Tokenizer(tiny_config("rq")), tmp_path / "rq")
    (tmp_path / "rq" / "config.json").replace(tmp_path / "vq" / "config.json")
    with pytest.raises(ValueError, match=r"does not match .*config.json"):
        vqar.load_pretrained(tmp_path / "vq")


def test_load_pretrained_refuses_a_device_the_machine_lacks(tmp_path, monkeypatch):
    """Was an AssertionError ("Torch not compiled with CUDA enabled") or a RuntimeError listing every device type,
    raised only once the weights were read and the model moved."""
    vqar.save_pretrained(Tokenizer(tiny_config("rq")), tmp_path / "tok")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda' was asked for but CUDA is not available"):
        vqar.load_pretrained(tmp_path / "tok", device="cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        vqar.load_pretrained(tmp_path / "tok", device="gpu")
    assert next(vqar.load_pretrained(tmp_path / "tok", device="auto").parameters()).device.type == "cpu"


def test_bad_inputs_raise_clear_errors():
    rq = Tokenizer(tiny_config("rq")).eval()
    vq = Tokenizer(tiny_config("vq")).eval()
    with pytest.raises(TypeError, match="float tensor"):
        rq.encode(torch.zeros(1, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        rq.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="multiples of the downsampling factor 4"):
        rq.encode(torch.zeros(1, 1, 18, 16))
    with pytest.raises(ValueError, match=r"\(B, h, w, D\)"):
        rq.decode(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"D=3"):
        rq.decode(torch.zeros(1, 4, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        vq.decode(torch.full((1, 4, 4), 40))
    with pytest.raises(ValueError, match="only applies to residual"):
        vq.decode(torch.zeros(1, 4, 4, dtype=torch.long), depth=2)
    with pytest.raises(ValueError, match="norm_groups"):
        Tokenizer(tiny_config(ch=6))


def test_sizes_encode_refuses_are_refused_everywhere_with_their_reason():
    """0x0 images and grids of no positions stopped a conv with a kernel-size error; `code_shape(0)` gave the
    built resolution's codes and `code_shape(33)` those of 32, and a ViT's `code_shape(64)` a grid it cannot
    encode; a NumPy array was told to divide by 127.5, whatever its dtype; `decode` built an autograd graph, so
    that `.numpy()` of its images failed."""
    import numpy as np

    from conftest import random_tokenizer

    rq = Tokenizer(tiny_config("rq")).eval()  # 16 px, factor 4
    with pytest.raises(ValueError, match="images of 0x16 pixels hold no pixels to encode"):
        rq.encode(torch.zeros(2, 1, 0, 16))
    with pytest.raises(ValueError, match=re.escape("codes of shape (2, 0, 4, 3) hold no positions to decode")):
        rq.decode(torch.zeros(2, 0, 4, 3, dtype=torch.long))
    assert rq.encode(torch.zeros(0, 1, 16, 16)).shape == (0, 4, 4, 3)  # an empty batch is still fine
    assert rq.code_shape() == (4, 4, 3) and rq.code_shape(32) == (8, 8, 3)
    for size in (0, 33, -4, 8.0, True):
        with pytest.raises(ValueError, match=f"image_size {size!r} is not a positive multiple of the tokenizer's "
                                             "downsampling factor 4"):  # fmt: skip
            rq.code_shape(size)
    vit = random_tokenizer(arch="vit")
    with pytest.raises(ValueError, match=r"image_size 32: a ViT tokenizer encodes images of its own size only \(16\)"):
        vit.code_shape(32)
    for array, hint in [(np.zeros((1, 1, 16, 16)), "float64 (torch.from_numpy(array))"),
                        (np.zeros((1, 1, 16, 16), np.uint8), "uint8 (torch.from_numpy(array), then x / 127.5 - 1)")]:
        with pytest.raises(TypeError, match=re.escape(f"got a NumPy array of {hint}")):
            rq.encode(array)
    images = rq.decode(rq.encode(torch.zeros(1, 1, 16, 16)))
    assert not images.requires_grad and images.numpy().shape == (1, 1, 16, 16)


def test_encode_takes_float_images_of_any_precision():
    """float64 images (torch.from_numpy of a NumPy float array) and a tokenizer in another precision than the
    images encode to the same codes instead of stopping the first conv with a dtype RuntimeError."""
    model = Tokenizer(tiny_config("rq")).eval()
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    codes = model.encode(images)
    assert torch.equal(model.encode(images.double()), codes)
    wide = Tokenizer(tiny_config("rq")).eval()
    wide.load_state_dict(model.state_dict())
    wide.double()
    assert torch.equal(wide.encode(images), codes)
    assert wide.decode(codes).dtype == torch.float64


@pytest.mark.parametrize("quantizer", [{"kind": "rq", "depth": 3}, {"kind": "vq", "lookup_dim": 4, "l2_norm": True},
                                       {"kind": "multiscale", "patch_nums": [1, 2, 4]}])  # fmt: skip
def test_a_tokenizer_cast_to_another_precision_encodes_and_decodes(quantizer):
    """A factorized VQ (ViT-VQGAN's project_in / project_out) or a multi-scale quantizer (VAR's Phi convs) cast
    with its tokenizer to bf16, fp16 or float64 met the float32 the quantizer computes in: a dtype RuntimeError from
    the layer, in encode and decode alike, and in `vqar sample --precision bf16` of a VAR model on a GPU."""
    config = tiny_config(quantizer["kind"])
    config.quantizer = QuantizerConfig(**{"codebook_size": 32, "dim": 6, **quantizer})
    model = Tokenizer(config).eval()
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    codes = model.encode(images)
    wide = copy.deepcopy(model).double()  # float32 weights widened and narrowed back are the same numbers
    assert torch.equal(wide.encode(images), codes)
    torch.testing.assert_close(wide.decode(codes).float(), model.decode(codes), atol=1e-5, rtol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):
        narrow = copy.deepcopy(model).to(dtype)
        assert narrow.encode(images).shape == codes.shape
        assert narrow.decode(codes).dtype == dtype


def test_decode_refuses_a_depth_that_is_no_integer():
    """`decode(codes, depth=2.5)` was torch's "slice indices must be integers" from inside the quantizer, and
    `depth=True` decoded the first level without a word."""
    import numpy as np

    rq = Tokenizer(tiny_config("rq")).eval()
    codes = rq.encode(torch.zeros(1, 1, 16, 16))
    for depth in (2.5, 2.0, True, "2", torch.tensor(True), torch.tensor([2])):
        with pytest.raises(TypeError, match=r"^depth must be an integer in \[1, 3\] \(or None for every level\), got"):
            rq.decode(codes, depth=depth)
    with pytest.raises(ValueError, match=r"depth must be in \[1, 3\], got 4"):
        rq.decode(codes, depth=4)
    expected = rq.decode(codes, depth=2)
    for depth in (np.int64(2), torch.tensor(2)):
        assert torch.equal(rq.decode(codes, depth=depth), expected)
    vq = Tokenizer(tiny_config("vq")).eval()
    with pytest.raises(TypeError, match=r"^depth must be an integer in \[1, 1\]"):
        vq.decode(vq.encode(torch.zeros(1, 1, 16, 16)), depth=True)


def test_save_pretrained_refuses_a_folder_that_holds_more_than_a_model(tmp_path):
    """Saving into a code store or a folder of the user's own files wrote the model among them without a word."""
    from vqar.ar import GPT, GPTConfig

    model = Tokenizer(tiny_config("vq")).eval()
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text("{}")
    (store / "codes.npy").write_bytes(b"")
    with pytest.raises(FileExistsError, match=rf"^{store} holds files that are no part of a model \(codes.npy, "
                                              r"manifest.json\): save into a new or empty folder, or pass "
                                              r"overwrite=True to write the model among them$"):  # fmt: skip
        vqar.save_pretrained(model, store)
    assert sorted(p.name for p in store.iterdir()) == ["codes.npy", "manifest.json"]
    vqar.save_pretrained(model, store, overwrite=True)
    assert sorted(p.name for p in store.iterdir()) == ["codes.npy", "config.json", "manifest.json", "model.safetensors"]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"cannot save a model into .*notes.txt: it is a file, not a folder$"):
        vqar.save_pretrained(model, tmp_path / "notes.txt")
    # A model folder, re-saved in place, an empty folder and a new one are written without overwrite.
    gpt = GPT(GPTConfig(vocab_size=32, code_shape=[4, 4], dim=32, n_layer=1, n_head=2, num_classes=3)).attach(model)
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "gpt", tmp_path / "gpt", tmp_path / "empty"):
        vqar.save_pretrained(gpt, folder)
    vqar.save_pretrained(vqar.load_pretrained(tmp_path / "gpt"), tmp_path / "gpt")
    # A tokenizer/ holding other files is refused before the AR model itself is written.
    (tmp_path / "mixed" / "tokenizer").mkdir(parents=True)
    (tmp_path / "mixed" / "tokenizer" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"tokenizer holds files that are no part of a model \(notes.txt\)"):
        vqar.save_pretrained(gpt, tmp_path / "mixed")
    assert [p.name for p in (tmp_path / "mixed").iterdir()] == ["tokenizer"]


def test_save_pretrained_refuses_what_would_not_load(tmp_path):
    """NaN weights, a state_dict of another model, an AR model as `tokenizer=`, a tokenizer of another codebook and
    `trained_steps="x"` were all written, and the folder was then refused on loading (or, for tokenizer= of a
    tokenizer, silently ignored)."""
    from vqar.ar import GPT, GPTConfig

    model = Tokenizer(tiny_config("vq")).eval()
    gpt = GPT(GPTConfig(vocab_size=32, code_shape=[4, 4], dim=32, n_layer=1, n_head=2, num_classes=3))
    wider = GPT(GPTConfig(vocab_size=64, code_shape=[4, 4], dim=32, n_layer=1, n_head=2, num_classes=3))
    nan = {k: v * float("nan") if v.is_floating_point() else v for k, v in model.state_dict().items()}
    out = tmp_path / "out"
    refused = [
        (ValueError, r"^the weights hold NaN or infinite values in \d+ of their \d+ tensors",
         dict(model=model, state_dict=nan)),
        (ValueError, r"^the state_dict given does not fit the Tokenizer saved \(\d+ differences; first: missing ",
         dict(model=model, state_dict={"a": torch.zeros(3)})),
        (TypeError, r"^tokenizer= must be the stage-1 tokenizer \(a vqar.Tokenizer\) that decodes the model's codes, "
                    r"got GPT$", dict(model=gpt, tokenizer=gpt)),
        (TypeError, r"^tokenizer= and text_tokenizer= are an AR model.s", dict(model=model, tokenizer=model)),
        (ValueError, r"^the companions given do not fit the model: the tokenizer \(codebook 32, 1 code\(s\) per "
                     r"position\) does not fit the model \(codebook 64, ", dict(model=wider, tokenizer=model)),
        (ValueError, r"^trained_steps must be a non-negative integer, got 'x'$", dict(model=model, trained_steps="x")),
        (ValueError, r"^trained_steps must be a non-negative integer, got -1$", dict(model=model, trained_steps=-1)),
    ]  # fmt: skip
    for error, message, kwargs in refused:
        with pytest.raises(error, match=message):
            vqar.save_pretrained(folder=out, **kwargs)
        assert not out.exists()


def test_a_model_saved_over_another_takes_no_companion_of_the_old_one(tmp_path):
    """A GPT without a tokenizer saved over a GPT folder loaded with the old model's tokenizer/ attached (a VAR
    saved so was refused: the old tokenizer did not fit it), and a tokenizer saved there kept the tokenizer/."""
    from vqar.ar import GPT, GPTConfig

    tokenizer = Tokenizer(tiny_config("vq")).eval()
    gpt = GPT(GPTConfig(vocab_size=32, code_shape=[4, 4], dim=32, n_layer=1, n_head=2, num_classes=3))
    folder = tmp_path / "model"
    vqar.save_pretrained(gpt, folder, tokenizer=tokenizer)
    vqar.save_pretrained(gpt, folder)
    assert vqar.load_pretrained(folder).tokenizer is None
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    vqar.save_pretrained(gpt, folder, tokenizer=tokenizer)
    vqar.save_pretrained(tokenizer, folder, overwrite=True)  # among other files: nothing is removed
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    vqar.save_pretrained(tokenizer, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    # a tokenizer/ that holds more than a model is not removed: refused before anything is written
    vqar.save_pretrained(gpt, folder, tokenizer=tokenizer)
    (folder / "tokenizer" / "notes.txt").write_text("the user's")
    with pytest.raises(FileExistsError, match=r"tokenizer is in the way of the model saved in .*, which has no "
                                              r"tokenizer, and holds more than a tokenizer: move it away first$"):
        vqar.save_pretrained(tokenizer, folder)
    assert (folder / "tokenizer" / "notes.txt").is_file() and vqar.load_pretrained(folder).tokenizer is not None


def test_a_model_folder_whose_tokenizer_is_an_ar_model_is_refused_naming_it(tmp_path):
    """`vqar convert AR AR_FOLDER/tokenizer --overwrite` makes such a folder; loading it was a TypeError traceback
    in sample, serve, linear-probe and convert."""
    from vqar.ar import GPT, GPTConfig

    gpt = GPT(GPTConfig(vocab_size=32, code_shape=[4, 4], dim=32, n_layer=1, n_head=2, num_classes=3))
    folder = tmp_path / "model"
    vqar.save_pretrained(gpt, folder)
    vqar.save_pretrained(gpt, folder / "tokenizer")
    with pytest.raises(ValueError, match=rf"^{folder}/tokenizer holds a GPT, not the stage-1 tokenizer that decodes "
                                         rf"the codes of the model in {folder}$"):  # fmt: skip
        vqar.load_pretrained(folder)
    vqar.save_pretrained(Tokenizer(tiny_config("rq", depth=2)).eval(), folder / "tokenizer")  # 2 codes a position
    with pytest.raises(ValueError, match=rf"^the companions in {folder} do not fit its model: the tokenizer \(codebook "
                                         r"32, 2 code\(s\) per position\) does not fit"):  # fmt: skip
        vqar.load_pretrained(folder)


def test_encode_refuses_images_holding_nan_or_inf():
    """Images holding NaN or inf were given codes without a word (those of a NaN latent's nearest code)."""
    model = Tokenizer(tiny_config("rq")).eval()
    images = torch.zeros(2, 1, 16, 16)
    images[0, 0, 0, 0], images[1, 0, 3, 5], images[1, 0, 7, 7] = float("nan"), float("inf"), -float("inf")
    refusal = r"^images hold 3 non-finite values \(NaN or inf\) of 512: encode takes finite pixels in \[-1, 1\]$"
    with pytest.raises(ValueError, match=refusal):
        model.encode(images)
    with pytest.raises(ValueError, match=refusal):
        model.soft_codes(images)
    with pytest.raises(ValueError, match=r"^images hold 1 non-finite value \(NaN or inf\) of 256"):
        model.encode(images[:1].double())
    assert model.encode(images.nan_to_num(0.0, 0.0, 0.0)).shape == (2, 4, 4, 3)


def test_encode_refuses_pixels_far_outside_minus_one_to_one():
    """Float pixels of 0..255 were given codes without a word; a resize's small overshoot past [-1, 1] is taken."""
    model = Tokenizer(tiny_config("rq")).eval()
    ramp = torch.linspace(0, 255, 256).view(1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"^images hold values in \[0, 255\], far outside the \[-1, 1\] encode takes "
                       r"\(pixels of 0..255: x / 127.5 - 1; of 0..1: x \* 2 - 1\)$"):  # fmt: skip
        model.encode(ramp)
    with pytest.raises(ValueError, match=r"^images hold values in \[-1.6, 1\]"):
        model.soft_codes(torch.full((1, 1, 16, 16), -1.6).index_fill(3, torch.tensor([0]), 1.0))
    assert model.encode((ramp / 127.5 - 1) * 1.2).shape == (1, 4, 4, 3)  # an overshoot is encoded
