"""The VAR transformer (`vqar.ar.var`): parity with the official code on the golden fixtures (every folder under
$VQAR_FIXTURES holding var.pth + var_io.safetensors + config.json + meta.json; tolerances from meta.json), the
official checkpoint reader, and the release files read by `vqar.load_pretrained`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixtures_root
from vqar.ar.var import VAR
from vqar.interop.var import load_var_vqvae
from vqar.interop.var_transformer import (
    is_var_transformer_state,
    load_var_transformer,
    var_transformer_config,
    var_transformer_to_upstream,
)
from vqar.sampling.filters import filter_logits

VAR_FILES = ("var.pth", "var_io.safetensors", "config.json", "meta.json")


def _var_folders() -> list:
    root = fixtures_root()
    folders = []
    if root.is_dir():
        found = {p.parent for p in root.rglob("var_io.safetensors")}
        folders = sorted(f for f in found if all((f / name).is_file() for name in VAR_FILES))
    if not folders:
        reason = f"no VAR parity fixtures ({', '.join(VAR_FILES)}) under {root} (set VQAR_FIXTURES)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    return [pytest.param(f, id=str(f.relative_to(root))) for f in folders]


class Case:
    """One fixture folder: its config, tolerances, tensors and the loaded model."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.config = json.loads((folder / "config.json").read_text())
        self.meta = json.loads((folder / "meta.json").read_text())
        self.io = load_file(str(folder / "var_io.safetensors"))
        self.model = load_var_transformer(folder / "var.pth")
        self.tokenizer = None
        self.errors: dict[str, float] = {}

    def check(self, name: str, actual: torch.Tensor) -> None:
        """`actual` against the stored tensor: integers exact; floats within meta.json's `suggested_atol` and
        rtol 1e-4 with -inf entries exact. The largest error is kept in `errors` (shown with pytest -s)."""
        expected = self.io[name]
        if not expected.is_floating_point():
            assert torch.equal(actual.to(expected.dtype), expected), name
            self.errors.setdefault(name, 0.0)
            return
        actual = actual.detach().float()
        assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), f"{name}: -inf entries differ"
        finite = torch.isfinite(expected)
        atol = self.meta["tensors"][name]["suggested_atol"]
        torch.testing.assert_close(actual[finite], expected[finite], atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        error = float((actual[finite] - expected[finite]).abs().max()) if finite.any() else 0.0
        self.errors[name] = max(error, self.errors.get(name, 0.0))


@pytest.fixture(scope="module", params=_var_folders())
def case(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixtures were made with one thread
    case = Case(request.param)
    yield case
    torch.set_num_threads(threads)
    worst = sorted(case.errors.items(), key=lambda item: -item[1])[:8]
    unchecked = sorted(set(case.io) - set(case.errors))
    print(f"\nnot checked: {unchecked}" if unchecked else "\nevery stored tensor checked")
    print(f"largest errors of {len(case.errors)} checked tensors:", ", ".join(f"{k} {v:.1e}" for k, v in worst))


def official_tokenizer(case: Case):
    """The fixture's VQVAE as a vqar tokenizer (its scales and Phi weight from config.json)."""
    if not (case.folder / "vae.pth").is_file():
        pytest.skip(f"no vae.pth in {case.folder}")
    if case.tokenizer is None:
        vq = case.config["vqvae"]
        case.tokenizer = load_var_vqvae(case.folder / "vae.pth", case.config["var"]["patch_nums"],
                                        phi_ratio=vq["quant_resi"], beta=vq["beta"])  # fmt: skip
    return case.tokenizer


# ---------------------------------------------------------------- official checkpoint
def test_reads_official_config(case):
    var = case.config["var"]
    cfg = case.model.cfg
    assert (cfg.dim, cfg.n_layer, cfg.n_head) == (var["embed_dim"], var["depth"], var["num_heads"])
    assert (cfg.shared_adaln, cfg.attn_l2_norm) == (var["shared_aln"], var["attn_l2_norm"])
    assert list(cfg.patch_nums) == list(var["patch_nums"]) and cfg.num_classes == var["num_classes"]
    assert cfg.vocab_size == case.config["vqvae"]["vocab_size"] and cfg.code_dim == case.config["vqvae"]["z_channels"]
    assert cfg.mlp_ratio == var["mlp_ratio"] and cfg.norm_eps == var["norm_eps"]
    assert cfg.code_shape == [case.config["derived"]["L"]] and not case.model.training
    assert sum(p.numel() for p in case.model.parameters()) == case.meta["param_counts"]["var"]
    # Back to the official names and buffers: the very file.
    state = torch.load(case.folder / "var.pth", map_location="cpu", weights_only=True)
    upstream = var_transformer_to_upstream(case.model)
    assert set(upstream) == set(state) and all(torch.equal(upstream[k], state[k]) for k in state)


def test_loader_errors(case, tmp_path):
    state = torch.load(case.folder / "var.pth", map_location="cpu", weights_only=True)
    assert is_var_transformer_state(state)
    if (case.folder / "vae.pth").is_file():
        vae = torch.load(case.folder / "vae.pth", map_location="cpu", weights_only=True)
        assert not is_var_transformer_state(vae)
        with pytest.raises(ValueError, match="VQVAE"):
            load_var_transformer(vae)
    with pytest.raises(ValueError, match="not a VAR transformer"):
        load_var_transformer({"weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="num_classes"):
        load_var_transformer(state, num_classes=case.model.cfg.num_classes + 1)
    broken = dict(state)
    broken.pop("head.bias")
    with pytest.raises(ValueError, match="missing keys"):
        load_var_transformer(broken)
    without_levels = {k: v for k, v in state.items() if k != "lvl_1L"}
    cfg = var_transformer_config(without_levels, patch_nums=list(case.model.cfg.patch_nums))
    assert cfg.patch_nums == case.model.cfg.patch_nums
    with pytest.raises(FileNotFoundError):
        load_var_transformer(tmp_path / "missing.pth")


# ---------------------------------------------------------------- teacher forcing
def test_teacher_forced_parity(case):
    """Every intermediate of the official teacher-forced forward (null class included), from its stored inputs."""
    model, io = case.model, case.io
    labels, inputs = io["var.tf.label"], io["var.tf.x_BLCv_wo_first_l"]
    captured = {}
    hooks = [model.layers[0].register_forward_pre_hook(lambda m, args: captured.__setitem__("in", args[0]))]
    for i, block in enumerate(model.layers):
        hooks.append(block.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out)))
    hooks.append(model.norm.register_forward_hook(lambda m, a, out: captured.__setitem__("norm", out)))
    with torch.no_grad():
        logits = model.teacher_forced(inputs, labels)
        cond = model.cond_embedding(labels)[:, 0]
        ada, head_ada = model.modulations(cond)
    for h in hooks:
        h.remove()
    case.check("var.lvl_pos", model.level_pos())
    case.check("var.tf.cond_BD", cond)
    for i in range(model.cfg.n_layer):
        case.check(f"var.tf.ada.b{i}", ada[i])
        case.check(f"var.tf.block_out.b{i}", captured[i])
    case.check("var.tf.head_ada", head_ada)
    case.check("var.tf.x_BLC_in", captured["in"])
    case.check("var.tf.head_nm_out", captured["norm"])
    case.check("var.tf.logits", logits)
    case.check("var.lvl_1L", model.level_ids[None])
    mask = torch.zeros(model.block_mask.shape).masked_fill(~model.block_mask, float("-inf"))
    case.check("var.attn_bias_for_masking", mask[None, None])


def test_forward_from_codes(case):
    """`forward(codes, cond)`: the quantizer makes the official teacher-forcing inputs of the official codes."""
    vae_io = case.folder / "vae_io.safetensors"
    if not (vae_io.is_file() and (case.folder / "vae.pth").is_file()):
        pytest.skip("no VQVAE files in this fixture folder")
    vae = load_file(str(vae_io))
    codes = torch.cat([vae[f"vae.idx.s{k}"] for k in range(len(case.model.cfg.patch_nums))], dim=1)
    quantizer = official_tokenizer(case).quantizer
    with torch.no_grad():
        case.check("var.tf.x_BLCv_wo_first_l", quantizer.next_scale_inputs(codes))
    # forward(codes, cond) row by row: a class id, or None for the null class
    model, labels = case.model.attach(official_tokenizer(case)), case.io["var.tf.label"]
    with torch.no_grad():
        rows = [model(codes[i : i + 1], None if int(label) == model.cfg.num_classes else labels[i : i + 1]).logits
                for i, label in enumerate(labels)]  # fmt: skip
    case.check("var.tf.logits", torch.cat(rows))


# ---------------------------------------------------------------- sampling
def test_sampler_filter_matches_official(case):
    """vqar's top-k / top-p filter on the official sampler's stored inputs (names: k{top_k}_p{top_p}, 0 = off)."""
    logits = case.io["sampling.logits_in"]
    names = [k for k in case.io if k.startswith("sampling.masked.")]
    assert names
    for name in names:
        k, p = name.removeprefix("sampling.masked.k").split("_p")
        case.check(name, filter_logits(logits, top_k=int(k) or None, top_p=float(p) or None))


def official_image(tokenizer, codes: torch.Tensor) -> torch.Tensor:
    """The official sampler's output image in [0, 1]: the decoded f_hat clamped to [-1, 1], then mapped."""
    return tokenizer.decode(codes).clamp(-1, 1).add(1).mul(0.5)


def greedy_reference(model: VAR, labels: torch.Tensor, cfg: float) -> dict:
    """The official greedy `autoregressive_infer_cfg` driven through the model's block API: the batch doubled as
    [labels; null], guidance (1 + t) cond - t null with t = cfg * k / (K - 1), argmax, both halves fed back."""
    n, scales = len(labels), len(model.block_sizes)
    ids = torch.cat([labels, model.cond_embedding.null_ids(n)])
    state, out, seen = model.new_decode_state(), {}, []
    hook = model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        context, start = model.prefill(ids, state), 0
        for k, size in enumerate(model.block_sizes):
            raw = model.code_logits(context, ids.new_empty(2 * n, size, 0), state).float()
            t = cfg * k / (scales - 1)
            guided = (1 + t) * raw[:n] - t * raw[n:]
            idx = guided.argmax(-1)
            out |= {f"logits_raw.s{k}": raw, f"logits_guided.s{k}": guided, f"idx.s{k}": idx,
                    f"tokens_in.s{k}": seen[-1]}  # fmt: skip
            if k + 1 < scales:
                context = model.decode_block(idx.repeat(2, 1)[..., None], start, state)
                out[f"fhat.s{k}"] = state.fhat[:n].clone()
            start += size
    finally:
        hook.remove()
    quantizer, side = model.quantizer(), model.cfg.patch_nums[-1]
    h = quantizer.code_vectors()[0][idx].transpose(1, 2).reshape(n, -1, side, side)
    out[f"fhat.s{scales - 1}"] = quantizer.add_scale(state.fhat[:n], h, scales - 1)
    out["idx.all"] = torch.cat([out[f"idx.s{k}"] for k in range(scales)], dim=1)
    return out


def _greedy_runs(case) -> list[str]:
    runs = sorted({k.split(".")[1] for k in case.io if k.startswith("var.ar_cfg") and k.endswith(".label")})
    assert runs, "the fixture has no greedy AR runs"
    return runs


def test_greedy_ar_parity(case):
    """The stored greedy runs scale by scale: raw and guided logits, token maps fed to the blocks, f_hat, indices."""
    model = case.model.attach(official_tokenizer(case))
    for run in _greedy_runs(case):
        cfg = float(run.removeprefix("ar_cfg"))
        with torch.no_grad():
            out = greedy_reference(model, case.io[f"var.{run}.label"], cfg)
            out["img"] = official_image(model.tokenizer, out["idx.all"])
        for key, value in out.items():
            if f"var.{run}.{key}" in case.io:
                case.check(f"var.{run}.{key}", value)


def test_greedy_ar_through_generate(case):
    """The one sampling loop reproduces the official greedy indices (VAR's cfg c is cfg_scale 1 + c)."""
    from vqar.sampling import SamplingSettings, generate

    model = case.model.attach(official_tokenizer(case))
    for run in _greedy_runs(case):
        cfg = float(run.removeprefix("ar_cfg"))
        settings = SamplingSettings(greedy=True, cfg_scale=1.0 + cfg)
        codes = generate(model, case.io[f"var.{run}.label"], settings)
        case.check(f"var.{run}.idx.all", codes)


# The RNG-dependent runs as the fixture README defines them (optional there: they need the official generator calls,
# multinomial then exponential_, in the same order; the seed is meta.json's).
OPTIONAL_RUNS = {"ar_stoch": {"cfg": 2.0, "top_k": 8, "top_p": 0.9, "smooth": False},
                 "ar_smooth": {"cfg": 2.0, "top_k": 0, "top_p": 0.0, "smooth": True}}  # fmt: skip


@pytest.mark.parametrize("run", sorted(OPTIONAL_RUNS))
def test_random_ar_parity(case, run, monkeypatch):
    """The official sampler's draws replayed through the block API: its filter (vqar's `filter_logits`), one
    multinomial draw per token, and for more_smooth the Gumbel mix fed back through `decode_block(smooth=...)`."""
    if f"var.{run}.idx.all" not in case.io:
        pytest.skip(f"the fixture has no {run} run")
    spec, model = OPTIONAL_RUNS[run], case.model.attach(official_tokenizer(case))
    quantizer, maps = model.quantizer(), []  # the code maps (hard or soft) the model adds to f_hat, by scale
    add_scale = quantizer.add_scale
    monkeypatch.setattr(quantizer, "add_scale", lambda fhat, h, k: maps.append(h) or add_scale(fhat, h, k))
    labels = torch.tensor(case.meta["labels"]["ar"])
    rng = torch.Generator().manual_seed(case.meta["seeds"]["ar_optional_runs_g_seed"])
    n, scales = len(labels), len(model.block_sizes)
    ids = torch.cat([labels, model.cond_embedding.null_ids(n)])
    state, picked = model.new_decode_state(), []
    with torch.no_grad():
        context, start = model.prefill(ids, state), 0
        for k, size in enumerate(model.block_sizes):
            raw = model.code_logits(context, ids.new_empty(2 * n, size, 0), state).float()
            t = spec["cfg"] * k / (scales - 1)
            masked = filter_logits((1 + t) * raw[:n] - t * raw[n:], top_k=spec["top_k"] or None,
                                   top_p=spec["top_p"] or None)  # fmt: skip
            case.check(f"var.{run}.logits_masked.s{k}", masked)
            idx = torch.multinomial(masked.softmax(-1).view(-1, masked.shape[-1]), 1, True, generator=rng).view(n, -1)
            picked.append(idx)
            smooth = None
            if spec["smooth"]:
                # The Gumbel mix divides the logits by a temperature that falls to 0.0135, so float32 rounding in
                # the logits (1e-5 here, host-dependent) grows scale by scale into h and the next logits. Mixing
                # the official guided logits keeps every scale a parity check of that scale on equal inputs.
                masked = case.io[f"var.{run}.logits_masked.s{k}"]
                noise = -torch.empty_like(masked).exponential_(generator=rng).log()
                smooth = (masked.repeat(2, 1, 1), noise.repeat(2, 1, 1))
            if k + 1 < scales:
                context = model.decode_block(idx.repeat(2, 1)[..., None], start, state, smooth)
            start += size
    codes = torch.cat(picked, dim=1)
    case.check(f"var.{run}.idx.all", codes)
    for k, h in enumerate(maps):
        case.check(f"var.{run}.h.s{k}", h[:n])
    monkeypatch.undo()
    with torch.no_grad():
        # The last scale's map (the soft mix of README §8 with r = 1 for more_smooth) is added to f_hat outside the
        # model, which has no next scale to feed; the image is decoded from that f_hat.
        vectors, side = quantizer.code_vectors()[0].detach(), model.cfg.patch_nums[-1]
        if spec["smooth"]:
            h = ((masked * 2 + noise) / max(0.27 * (1 - 0.95), 0.005)).softmax(-1) @ vectors[None]
        else:
            h = vectors[idx]
        h = h.transpose(1, 2).reshape(n, -1, side, side)
        case.check(f"var.{run}.h.s{scales - 1}", h)
        fhat = quantizer.add_scale(state.fhat[:n], h, scales - 1)
        image = model.tokenizer.decode_latent(fhat.permute(0, 2, 3, 1)).clamp(-1, 1).add(1).mul(0.5)
        case.check(f"var.{run}.img", image)
        if not spec["smooth"]:  # hard codes: the tokenizer's own decode gives the same image
            case.check(f"var.{run}.img", official_image(model.tokenizer, codes))


# ---------------------------------------------------------------- the release files, through load_pretrained
def test_load_pretrained_reads_the_release_files_and_the_bundle_round_trip(case, tmp_path):
    """`vqar.load_pretrained` tells a var_d*.pth apart by its weights and finds the release VQVAE beside it (read
    at the transformer's scales); saved as a vqar folder (what `vqar convert` writes) and loaded back, the model
    and its tokenizer draw the official greedy images."""
    import shutil

    from vqar import load_pretrained
    from vqar.bundle import save_pretrained
    from vqar.interop.load import VAR_VQVAE_FILE
    from vqar.sampling import SamplingSettings, draw, make_conditions

    official_tokenizer(case)  # skips when the folder has no VQVAE
    vq = case.config["vqvae"]
    if vq["quant_resi"] != 0.5 or vq["beta"] != 0.25:
        pytest.skip("the release defaults (Phi ratio 0.5, beta 0.25) are what a lone .pth is read with")
    shutil.copy(case.folder / "var.pth", tmp_path / "var_d2.pth")
    shutil.copy(case.folder / "vae.pth", tmp_path / VAR_VQVAE_FILE)
    model = load_pretrained(tmp_path / "var_d2.pth")
    assert model.arch == "var" and model.tokenizer is not None
    assert list(model.tokenizer.quantizer.patch_nums) == list(case.config["var"]["patch_nums"])
    given = load_pretrained(case.folder / "var.pth", tokenizer=case.folder / "vae.pth")
    assert list(given.tokenizer.quantizer.patch_nums) == list(case.config["var"]["patch_nums"])
    save_pretrained(model, tmp_path / "bundle")
    reloaded = load_pretrained(tmp_path / "bundle")
    for run in _greedy_runs(case):
        cfg = float(run.removeprefix("ar_cfg"))
        labels = case.io[f"var.{run}.label"]
        result = draw(reloaded, make_conditions(reloaded, classes=labels.tolist()),
                      SamplingSettings(greedy=True, cfg_scale=1.0 + cfg))  # fmt: skip
        case.check(f"var.{run}.idx.all", result.codes.flatten(1))
        case.check(f"var.{run}.img", (result.images + 1) / 2)
