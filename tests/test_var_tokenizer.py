"""VAR's multi-scale residual tokenizer ("Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction", Tian et al., NeurIPS 2024): parity with the official VQVAE on every VAR fixture folder under
$VQAR_FIXTURES (any folder holding vae.pth, vae_io.safetensors, config.json and meta.json), the official weights'
loader, the quantizer against a direct computation, and its training (loss, per-scale usage, dead-code restarts
at every scale)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vqar
from conftest import fixtures_root
from vqar.data import DataConfig
from vqar.data.codes import CodeDataset
from vqar.data.extraction import extract_codes
from vqar.interop.var import is_var_vqvae_state, load_var_vqvae, to_upstream
from vqar.quantize import MultiScaleQuantizer, QuantizerConfig
from vqar.quantize.codebook import code_statistics
from vqar.quantize.multiscale import PATCH_NUMS_256, phi_index, phi_ticks
from vqar.tokenizers import ConvConfig, Tokenizer, TokenizerConfig
from vqar.train.tokenizer import load_run_config, train_tokenizer
from vqar.utils.safe_load import load_checkpoint

VAE_FILES = ("vae.pth", "config.json", "meta.json", "vae_io.safetensors")
# Fixture tensors of the official usage EMA, which vqar does not implement (it reports per-batch usage per scale
# instead), and the input.
NOT_COMPARED = re.compile(r"^vae\.(img|fwd\.usages|fwd_train\..*|fwd\.ema_.*)$")


def _vae_folders():
    root = fixtures_root()
    if not root.is_dir():
        return []
    return sorted({p.parent for p in root.rglob(VAE_FILES[-1]) if all((p.parent / f).is_file() for f in VAE_FILES)})


_NONE = pytest.mark.skip(reason=f"no VAR VQVAE fixtures under {fixtures_root()} (set VQAR_FIXTURES)")
vae_folder = pytest.mark.parametrize(
    "folder",
    [pytest.param(f, id=str(f.relative_to(fixtures_root()))) for f in _vae_folders()]
    or [pytest.param(None, marks=_NONE)],
)


@pytest.fixture(autouse=True)
def one_thread():
    """The fixtures were made with one thread (more threads move the decoder output by ~1e-5); the small
    computations here are faster on one anyway."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _read(folder):
    config = json.loads((folder / "config.json").read_text())
    meta = json.loads((folder / "meta.json").read_text())["tensors"]
    return config, meta, load_file(str(folder / "vae_io.safetensors"))


class Checker:
    """Compares against fixture tensors with their meta.json tolerances (indices exact) and records the names."""

    def __init__(self, io, meta):
        self.io, self.meta, self.seen, self.errors = io, meta, set(), {}

    def __call__(self, name, actual):
        expected = self.io[name]
        self.seen.add(name)
        if not expected.is_floating_point():
            assert torch.equal(actual.long(), expected), name
            return
        atol = self.meta[name]["suggested_atol"]
        self.errors[name] = float((actual.double() - expected.double()).abs().max())
        torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def _patch_nums(config):
    return config["vqvae"]["v_patch_nums"]


# ---------------------------------------------------------------- parity with the official VQVAE
@vae_folder
def test_vqvae_parity_with_every_fixture_tensor(folder):
    config, meta, io = _read(folder)
    model = vqar.load_pretrained(folder / "vae.pth", config={"patch_nums": _patch_nums(config)})
    assert isinstance(model, Tokenizer) and not model.training and model.layout == "scales"
    quantizer, check = model.quantizer, Checker(io, meta)
    images = io["vae.img"]
    with torch.no_grad():
        encoded = model.encoder(images)
        check("vae.enc_out", encoded)
        f = model.quant_conv(encoded)
        check("vae.f", f)
        for k, step in enumerate(quantizer.steps(f)):
            check(f"vae.idx.s{k}", step.codes)
            check(f"vae.z_rest.s{k}", step.inputs)
            check(f"vae.h_code.s{k}", step.vectors)
            check(f"vae.h_up.s{k}", step.upsampled)
            check(f"vae.h_phi.s{k}", step.refined)
            check(f"vae.fhat.s{k}", step.fhat)
        codes = model.encode(images)
        assert codes.shape == (len(images), *model.code_shape())
        check("vae.idx.all", codes)
        for k in range(quantizer.num_scales):  # the official decode clamps to [-1, 1]
            check(f"vae.rec_idx.s{k}", model.decode(codes, depth=k + 1).clamp(-1, 1))
        check("vae.rec_idx.last", model.decode(codes).clamp(-1, 1))
        for k, native in enumerate(quantizer.native_fhats(codes)):  # the experimental same_shape=False path
            if f"vae.fhat_native.s{k}" in io:
                check(f"vae.fhat_native.s{k}", native.permute(0, 3, 1, 2))
                check(f"vae.rec_native.s{k}", model.decode_latent(native).clamp(-1, 1))
        fhat = quantizer.embed(codes)
        check("vae.dec_in", model.post_quant_conv(fhat.permute(0, 3, 1, 2)))
        check("vae.fhat_to_img", model.decode_latent(fhat).clamp(-1, 1))
        check("vae.f_to_img", model.decode_latent(f.permute(0, 2, 3, 1)).clamp(-1, 1))
        out = model(images)  # the training forward: not clamped, straight-through f_hat, the official vq loss
        check("vae.fwd.rec", out.recon)
        check("vae.fwd.vq_loss", out.quant.loss)
        assert torch.equal(out.quant.codes, codes)
    beta = config["vqvae"]["beta"]
    torch.testing.assert_close(out.quant.loss, (beta + 1) * out.quant.commitment, atol=1e-7, rtol=1e-6)
    untested = {name for name in io if not NOT_COMPARED.match(name)} - check.seen
    assert not untested, f"fixture tensors this test does not compare: {sorted(untested)}"


@vae_folder
def test_teacher_forcing_inputs_match_the_official(folder):
    """`next_scale_inputs` is the official idxBl_to_var_input: f_hat of the coarser scales resized to each scale."""
    config, _, io = _read(folder)
    if not (folder / "var_io.safetensors").is_file():
        pytest.skip("no var_io.safetensors in this fixture folder")
    var_io = load_file(str(folder / "var_io.safetensors"))
    tolerance = json.loads((folder / "meta.json").read_text())["tensors"]["var.tf.x_BLCv_wo_first_l"]
    quantizer = load_var_vqvae(folder / "vae.pth", _patch_nums(config)).quantizer
    with torch.no_grad():
        inputs = quantizer.next_scale_inputs(io["vae.idx.all"])
    torch.testing.assert_close(inputs, var_io["var.tf.x_BLCv_wo_first_l"], atol=tolerance["suggested_atol"], rtol=1e-4)


@vae_folder
def test_loader_reads_the_configuration_off_the_weights(folder):
    config, _, _ = _read(folder)
    vq, fixed = config["vqvae"], config["vqvae_fixed_in_code"]
    model = load_var_vqvae(folder / "vae.pth", _patch_nums(config))
    cfg = model.cfg
    assert (cfg.quantizer.codebook_size, cfg.quantizer.dim) == (vq["vocab_size"], vq["z_channels"])
    assert (cfg.conv.ch, cfg.conv.ch_mult, cfg.conv.num_res_blocks) == (vq["ch"], fixed["ch_mult"],
                                                                          fixed["num_res_blocks"])  # fmt: skip
    assert cfg.quant_conv_kernel == vq["quant_conv_ks"] and cfg.quantizer.phi_ratio == abs(vq["quant_resi"])
    assert cfg.quantizer.phi_share == vq["share_quant_resi"] and cfg.quantizer.beta == vq["beta"]
    assert model.image_size == config["image_size"] and model.code_shape() == (config["derived"]["L"],)
    assert model.quantizer.scale_slices() == [tuple(b) for b in config["derived"]["begin_ends"]]
    # Parameters only: the official usage EMA is dropped, vqar's codebook statistics are its own buffers.
    params = sum(p.numel() for p in model.parameters())
    assert params == json.loads((folder / "meta.json").read_text())["param_counts"]["vqvae"]


@vae_folder
def test_weights_go_back_to_the_official_names_unchanged(folder):
    config, _, _ = _read(folder)
    state = load_checkpoint(folder / "vae.pth")
    back = to_upstream(load_var_vqvae(state, _patch_nums(config)))
    assert list(back) == list(state) or set(back) == set(state)
    for key, value in state.items():
        if key != "quantize.ema_vocab_hit_SV":
            assert torch.equal(back[key], value), key


@vae_folder
def test_convert_writes_a_bundle_that_encodes_the_same(folder, tmp_path):
    config, _, io = _read(folder)
    images = io["vae.img"][:2]
    loaded = load_var_vqvae(folder / "vae.pth", _patch_nums(config))
    vqar.save_pretrained(loaded, tmp_path / "vae")
    again = vqar.load_pretrained(tmp_path / "vae")
    assert again.cfg == loaded.cfg
    assert torch.equal(again.encode(images), loaded.encode(images))


@vae_folder
def test_wrong_files_get_one_line_errors(folder, tmp_path):
    config, _, _ = _read(folder)
    if (folder / "var.pth").is_file():
        with pytest.raises(ValueError, match="VAR transformer, not its VQVAE"):
            load_var_vqvae(folder / "var.pth")
    with pytest.raises(ValueError, match="not a VAR VQVAE"):
        load_var_vqvae({"encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no state dict"):
        load_var_vqvae({})
    state = load_checkpoint(folder / "vae.pth")
    assert is_var_vqvae_state(state) and not is_var_vqvae_state({"quantize.embedding.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="increasing"):
        load_var_vqvae(state, [1, 3, 2])
    # No scales given: the release's ten, unless the file's usage rows (one per scale) say it had another number.
    scales = len(_patch_nums(config))
    with pytest.raises(ValueError, match=f"trained at {scales} scales .* not at the release's 10"):
        load_var_vqvae(state)
    state["quantize.ema_vocab_hit_SV"] = torch.zeros(10, state["quantize.embedding.weight"].shape[0])
    assert list(load_var_vqvae(state).quantizer.patch_nums) == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    state["quantize.embedding.weight"] = state["quantize.embedding.weight"][:, :-1]
    with pytest.raises(ValueError, match="does not fit"):
        load_var_vqvae(state, _patch_nums(config))


# ---------------------------------------------------------------- which Phi a scale uses
def test_phi_tick_rule_on_the_release_configuration():
    assert [phi_index(k, len(PATCH_NUMS_256), 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    quantizer = MultiScaleQuantizer(8, 4, PATCH_NUMS_256, phi_share=4)
    assert [quantizer.phi_index(k) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    # One Phi per scale (share 0) maps scale k to Phi k; a single Phi serves every scale.
    assert [MultiScaleQuantizer(8, 4, (1, 2, 3, 4, 5), phi_share=0).phi_index(k) for k in range(5)] == [0, 1, 2, 3, 4]
    assert {MultiScaleQuantizer(8, 4, (1, 2, 3), phi_share=1).phi_index(k) for k in range(3)} == {0}
    assert len(MultiScaleQuantizer(8, 4, (1, 2, 3), phi_ratio=0.0).phis) == 0


@vae_folder
def test_phi_tick_rule_on_the_fixture_configuration(folder):
    config, _, _ = _read(folder)
    derived, share = config["derived"], config["vqvae"]["share_quant_resi"]
    assert phi_ticks(share).tolist() == derived["quant_resi_ticks"]  # bit-exact float64
    quantizer = MultiScaleQuantizer(8, 4, _patch_nums(config), phi_share=share)
    assert [quantizer.phi_index(k) for k in range(quantizer.num_scales)] == derived["phi_index_per_scale"]
    for k in derived.get("phi_exact_tie_scales", []):  # mathematical ties, decided by the float64 ticks
        distances = sorted(abs(phi_ticks(share) - k / (quantizer.num_scales - 1)))
        assert distances[1] - distances[0] < 1e-12


# ---------------------------------------------------------------- the quantizer
def _latents(n=6, side=4, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn(n, dim, 2, 2, generator=g), size=(side, side), mode="bilinear")
    return (coarse + 0.2 * torch.randn(n, dim, side, side, generator=g)).permute(0, 2, 3, 1).contiguous()


def _reference(quantizer, z):
    """The README recursion written out directly (distances in float64, Phi by its conv), for P = 4 and scales
    1, 2, 4 where area resizing is exact average pooling."""
    f = z.permute(0, 3, 1, 2).double()
    book, rho = quantizer.codebook.weight.detach().double(), quantizer.phi_ratio
    rest, fhat, codes, losses = f.clone(), torch.zeros_like(f), [], []
    for k, p in enumerate(quantizer.patch_nums):
        zk = F.avg_pool2d(rest, 4 // p) if p != 4 else rest
        x = zk.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        idx = ((x[:, None] - book[None]) ** 2).sum(-1).argmin(1)
        h = book[idx].view(len(f), p, p, -1).permute(0, 3, 1, 2)
        if p != 4:
            h = F.interpolate(h.float(), size=(4, 4), mode="bicubic").double()
        conv = quantizer.phis[quantizer.phi_index(k)]
        h = (1 - rho) * h + rho * F.conv2d(h, conv.weight.double(), conv.bias.double(), padding=1)
        fhat, rest = fhat + h, rest - h
        codes.append(idx.view(len(f), -1))
        losses.append((quantizer.beta + 1) * (fhat - f).pow(2).mean())
    return torch.cat(codes, 1), fhat, torch.stack(losses).mean()


def test_quantization_follows_the_multiscale_recursion():
    quantizer = MultiScaleQuantizer(16, 5, (1, 2, 4), phi_share=2, ema=False, restart_dead=False).eval()
    z = _latents()
    out = quantizer(z)
    codes, fhat, loss = _reference(quantizer, z)
    assert out.codes.shape == (6, 1 + 4 + 16) and torch.equal(out.codes, codes)
    torch.testing.assert_close(out.quantized.permute(0, 3, 1, 2).double(), fhat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss.double(), loss, atol=1e-6, rtol=1e-5)
    # embed() rebuilds f_hat from the codes, after every prefix of scales.
    torch.testing.assert_close(quantizer.embed(out.codes), out.quantized, atol=1e-6, rtol=1e-6)
    for depth, step in enumerate(quantizer.steps(z.permute(0, 3, 1, 2)), 1):
        torch.testing.assert_close(quantizer.embed(out.codes, depth=depth).permute(0, 3, 1, 2), step.fhat)
    # Teacher-forcing inputs: f_hat of scales < k resized to scale k, for k >= 1, scale by scale.
    inputs = quantizer.next_scale_inputs(out.codes)
    assert inputs.shape == (6, 4 + 16, 5)
    expected = [quantizer.scale_input(quantizer.embed(out.codes, depth=k).permute(0, 3, 1, 2), k) for k in (1, 2)]
    torch.testing.assert_close(inputs, torch.cat(expected, 1))
    # add_scale is the step the sampler takes one scale at a time.
    fhat_step = None
    for k in range(3):
        fhat_step = quantizer.add_scale(fhat_step, quantizer.scale_vectors(out.codes, k), k)
    torch.testing.assert_close(fhat_step.permute(0, 2, 3, 1), quantizer.embed(out.codes))


def test_usage_and_perplexity_are_reported_per_scale():
    quantizer = MultiScaleQuantizer(16, 5, (1, 2, 4)).eval()
    out = quantizer(_latents(n=20))
    assert out.usage.shape == (3,) and out.perplexity.shape == (3,)
    for k, (begin, end) in enumerate(quantizer.scale_slices()):
        usage, perplexity = code_statistics(out.codes[:, begin:end], 16)
        assert out.usage[k] == usage and out.perplexity[k] == perplexity
    assert [len(c) for c in quantizer.level_codes(out.codes)] == [20, 80, 320]


def test_straight_through_and_where_the_gradients_go():
    quantizer = MultiScaleQuantizer(16, 5, (1, 2, 4), ema=False, restart_dead=False).train()
    z = _latents().requires_grad_(True)
    weights = torch.randn(z.shape)
    (quantizer(z).quantized * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)  # the identity on the latent
    assert quantizer.codebook.weight.grad is None and quantizer.phis[0].weight.grad is None
    z.grad = None
    quantizer(z).loss.backward()  # the vq loss trains the encoder (commitment), the codebook and the Phi convs
    assert z.grad.abs().sum() > 0 and quantizer.codebook.weight.grad.abs().sum() > 0
    used = {quantizer.phi_index(k) for k in range(3)}  # 3 scales on 4 shared Phi convs: one is unused
    assert len(used) == 3
    for j, phi in enumerate(quantizer.phis):
        assert (phi.weight.grad is not None and phi.weight.grad.abs().sum() > 0) == (j in used), j
    ema = MultiScaleQuantizer(16, 5, (1, 2, 4), ema=True).train()
    ema(_latents()).loss.backward()
    assert not ema.codebook.weight.requires_grad and ema.phis[0].weight.grad is not None


@pytest.mark.parametrize("ema", [False, True])
def test_training_the_quantizer_reduces_its_loss(ema):
    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(32, 4, (1, 2, 4), ema=ema)
    z = _latents(n=32, dim=4, seed=1)
    optimizer = torch.optim.Adam([p for p in quantizer.parameters() if p.requires_grad], lr=3e-2)
    first = quantizer.eval()(z).loss.item()
    for _ in range(60):
        loss = quantizer.train()(z).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert quantizer.eval()(z).loss.item() < 0.7 * first


def _collapse_run(restart_dead: bool) -> torch.Tensor:
    """Per-scale usage on fresh data after training an EMA codebook on latents whose 1x1 scale (the image means)
    sits in a small region away from the random initial codes."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)

    def latents(n):
        return torch.randn(n, 1, 1, 4, generator=g) + 3.0 + 0.3 * torch.randn(n, 4, 4, 4, generator=g)

    quantizer = MultiScaleQuantizer(64, 4, (1, 2, 4), phi_ratio=0.0, ema=True, decay=0.9, restart_dead=restart_dead)
    for _ in range(60):
        quantizer.train()(latents(64))
    return quantizer.eval()(latents(1024)).usage


def test_dead_code_restarts_work_at_every_scale():
    without, with_restarts = _collapse_run(False), _collapse_run(True)
    assert without[0] < 15  # the coarse scale collapses onto a handful of codes
    assert (with_restarts > 1.5 * without).all(), (without, with_restarts)


def test_bad_inputs_raise_clear_errors():
    quantizer = MultiScaleQuantizer(16, 5, (1, 2, 4)).eval()
    with pytest.raises(ValueError, match=r"\(B, 4, 4, 5\)"):
        quantizer(torch.randn(2, 3, 3, 5))
    with pytest.raises(ValueError, match=r"\(B, 21\)"):
        quantizer.embed(torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, L\) with L = 21"):
        quantizer.embed(torch.zeros(2, 21, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        quantizer.next_scale_inputs(torch.full((2, 21), 16))
    with pytest.raises(ValueError, match="depth must be in"):
        quantizer.embed(torch.zeros(2, 21, dtype=torch.long), depth=4)
    with pytest.raises(ValueError, match="increasing"):
        MultiScaleQuantizer(16, 5, (1, 3, 2))
    with pytest.raises(ValueError, match="needs patch_nums"):
        QuantizerConfig(kind="multiscale").validate()
    with pytest.raises(ValueError, match="depth 1"):
        QuantizerConfig(kind="multiscale", patch_nums=[1, 2], depth=2).validate()
    # Scales left over from the var-mnist preset when its kind is changed: named, not silently dropped.
    for kind, depth in (("vq", 1), ("rq", 4)):
        with pytest.raises(ValueError, match=f"patch_nums \\[1, 2, 3, 4\\] apply to 'multiscale' quantizers only, "
                                             f"not '{kind}'"):  # fmt: skip
            QuantizerConfig(kind=kind, depth=depth, patch_nums=[1, 2, 3, 4]).validate()
        # and the Phi convolutions' settings, which were saved in run.yaml and changed no weight
        for setting in ({"phi_ratio": 0.9}, {"phi_share": 2}):
            (name, value), = setting.items()
            with pytest.raises(ValueError, match=f"^{name}={value} applies to 'multiscale' quantizers only .*not "
                                                 f"'{kind}': leave model.quantizer.{name} out$"):  # fmt: skip
                QuantizerConfig(kind=kind, depth=depth, **setting).validate()
        QuantizerConfig(kind=kind, depth=depth).validate()


def test_phi_settings_that_would_build_unused_or_no_convolutions_are_refused():
    """`phi_share=100000000` built 10^8 Phi convolutions until memory ran out, and 20 on 4 scales built 16 that no
    scale used; `phi_share=2` with `phi_ratio=0` was saved in run.yaml and built none."""
    scales = {"kind": "multiscale", "patch_nums": [1, 2, 3, 4, 5, 6]}
    for share in (7, 10**8):
        with pytest.raises(ValueError, match=f"phi_share {share}: the 6 scales of patch_nums .* use at most 6 shared"):
            QuantizerConfig(**scales, phi_share=share).validate()
        with pytest.raises(ValueError, match=f"phi_share {share}: "):  # before a module is built
            MultiScaleQuantizer(16, 4, (1, 2, 3, 4, 5, 6), phi_share=share)
    QuantizerConfig(**scales, phi_share=6).validate()
    QuantizerConfig(kind="multiscale", patch_nums=[1, 2], phi_share=4).validate()  # VAR's 4, kept for few scales
    with pytest.raises(ValueError, match="phi_share=2 with phi_ratio=0: phi_ratio 0 builds no Phi convolution"):
        QuantizerConfig(**scales, phi_ratio=0.0, phi_share=2).validate()
    for share in (0, 4):  # the default, and what a converted file without Phi says
        QuantizerConfig(**scales, phi_ratio=0.0, phi_share=share).validate()


# ---------------------------------------------------------------- the tokenizer
def tiny_tokenizer(**quantizer) -> Tokenizer:
    conv = ConvConfig(in_channels=1, out_channels=1, resolution=16, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1,
                      attn_resolutions=[4], z_channels=8, norm_groups=4)  # fmt: skip
    fields = {"kind": "multiscale", "codebook_size": 32, "dim": 6, "patch_nums": [1, 2, 4], **quantizer}
    return Tokenizer(TokenizerConfig(conv=conv, quantizer=QuantizerConfig(**fields), quant_conv_kernel=3))


def test_tokenizer_encodes_to_scales_and_decodes_coarse_to_fine(tmp_path):
    model = tiny_tokenizer().eval()
    assert model.quant_conv.kernel_size == (3, 3) and model.code_shape() == (21,) and model.levels == 3
    assert not model.is_residual and model.depth == 1
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    codes = model.encode(images)
    assert codes.shape == (3, 21) and codes.dtype == torch.int64
    with torch.no_grad():
        torch.testing.assert_close(model.decode(codes), model(images).recon, atol=1e-5, rtol=1e-5)
        coarse = model.decode(codes, depth=1)
        expected = model.decode_latent(model.quantizer.embed(codes, depth=1))
    torch.testing.assert_close(coarse, expected)
    vqar.save_pretrained(model, tmp_path / "tok")
    assert torch.equal(vqar.load_pretrained(tmp_path / "tok").encode(images), codes)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model.decode(codes.view(3, 21, 1))
    with pytest.raises(ValueError, match=r"\(B, 21\)"):
        model.decode(codes[:, :-1])
    with pytest.raises(ValueError, match=r"image_size 32: a multi-scale \(VAR\) tokenizer encodes images of its own"):
        model.code_shape(32)
    with pytest.raises(ValueError, match="last scale of patch_nums"):
        tiny_tokenizer(patch_nums=[1, 2, 3])


def test_existing_tokenizers_keep_their_layouts():
    conv = ConvConfig(in_channels=1, out_channels=1, resolution=16, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1,
                      attn_resolutions=[], z_channels=8, norm_groups=4)  # fmt: skip
    rq = Tokenizer(TokenizerConfig(conv=conv, quantizer=QuantizerConfig(kind="rq", codebook_size=8, dim=4, depth=3)))
    vq = Tokenizer(TokenizerConfig(conv=conv, quantizer=QuantizerConfig(kind="vq", codebook_size=8, dim=4)))
    assert (rq.layout, rq.code_shape(), rq.levels, rq.is_residual) == ("stack", (4, 4, 3), 3, True)
    assert (vq.layout, vq.code_shape(), vq.levels, vq.is_residual) == ("grid", (4, 4), 1, False)
    assert rq.quant_conv.kernel_size == (1, 1) and rq.code_vectors().shape == (1, 8, 4)


# ---------------------------------------------------------------- training and code extraction on the digits
def test_var_mnist_trains_with_per_scale_usage_and_extracts_flat_codes(tmp_path):
    tiny = ["model.conv.ch=8", "model.conv.ch_mult=[1,2,2,2]", "model.conv.norm_groups=4", "c=32",
            "data.max_images=160", "data.batch_size=16", "data.eval_batch_size=80", "steps=4", "train.log_every=2",
            "train.eval_every=4", "train.ckpt_every=4", "train.warmup_steps=1"]  # fmt: skip
    cfg = load_run_config("var-mnist", tiny)
    assert cfg.model.quantizer.kind == "multiscale" and cfg.model.quantizer.patch_nums == [1, 2, 3, 4]
    train_tokenizer(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for split in ("train", "val"):
        last = [r for r in records if r["split"] == split][-1]
        usage = [last[f"usage_s{k}"] for k in range(4)]
        assert all(0 < u <= 100 for u in usage) and math.isclose(last["usage"], sum(usage) / 4, rel_tol=1e-5)
    model = vqar.load_pretrained(tmp_path / "run")
    manifest = extract_codes(model, DataConfig(source="mnist", max_images=20), tmp_path / "codes")
    store = CodeDataset(tmp_path / "codes")
    assert manifest["code_shape"] == [30] and store[0].codes.shape == (1, 30)
    stored = vqar.load_pretrained(store.tokenizer_path)  # the scales travel with the store's tokenizer
    assert stored.quantizer.patch_nums == (1, 2, 3, 4)


@vae_folder
def test_a_vqvae_config_of_the_wrong_kind_is_named(folder):
    """They were an IndexError ([]), a TypeError ("1,2", an unknown key) or "unknown VAR VQVAE preset '[1,2]';
    known: " with nothing known."""
    for config, message in (({"patch_nums": []}, "'patch_nums' takes the sides of its scales (1, 2, 3, ...), got []"),
                            ({"patch_nums": "1,2"}, "'patch_nums' takes a list, got '1,2'"),
                            ({"patch_numz": [1]}, "unknown VAR VQVAE config fields ['patch_numz']"),
                            ("[1,2]", "is a dict of its fields or a JSON file of one (it has no presets)"),
                            ):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            vqar.load_pretrained(folder / "vae.pth", config=config)
