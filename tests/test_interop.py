"""Parity with the official implementations, proven by the golden fixtures (../shared/fixtures, or
$VQAR_FIXTURES): every folder of a known kind is loaded with `vqar.load_pretrained` and every stored output is
reproduced. Suggested tolerances from the fixture READMEs: integers exact, floats about 1e-4."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vqar
from vqar.ar import GPT, RQTransformer
from vqar.ar.layers import rotation_table
from vqar.quantize.vector import entropy_penalty
from vqar.sampling import SamplingSettings, filter_logits, generate
from vqar.testing import generate_uncached
from vqar.tokenizers import Tokenizer

GREEDY = SamplingSettings(greedy=True)

ATOL, IMAGE_ATOL = 1e-4, 2e-4


def close(actual, expected, atol=ATOL, rtol=1e-4):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------- RQ-VAE
def test_rqvae_release_parity(rq_release_folder):
    io = load_file(str(rq_release_folder / "rqvae_io.safetensors"))
    model = vqar.load_pretrained(rq_release_folder / "stage1")
    assert isinstance(model, Tokenizer) and not model.training
    images, codes = io["images"], io["codes"]
    with torch.no_grad():
        close(model.encode_latent(images), io["z_e"])
        out = model(images)
        assert torch.equal(out.quant.codes, codes)
        assert torch.equal(model.encode(images), codes)
        close(out.quant.quantized, io["z_q_st"], atol=1e-6)
        close(model.quantizer.embed(codes), io["z_q_codes"], atol=1e-6)
        close(model.quantizer.embed_per_depth(codes), io["code_emb_with_depth"], atol=1e-6)
        close(out.recon, io["recon_forward"], atol=IMAGE_ATOL)
        close(model.decode(codes), io["recon_from_codes"], atol=IMAGE_ATOL)
        for key in [k for k in io if k.startswith("decode_partial_add_idx")]:
            upto = int(key.rsplit("idx", 1)[1])  # the reference's index is the last depth used
            close(model.decode(codes, depth=upto + 1), io[key], atol=IMAGE_ATOL)
        for key in [k for k in io if k.startswith("soft_code_temp")]:
            temperature = float(key.removeprefix("soft_code_temp"))
            expected = io[key]
            close(model.soft_codes(images[: len(expected)], temperature), expected, atol=1e-6)
        close(out.quant.commitment, io["quant_loss"], atol=0, rtol=1e-5)
        loss_recon = F.mse_loss(out.recon, images)
        close(loss_recon, io["loss_recon"], atol=0)
        close(loss_recon + model.cfg.quantizer.beta * out.quant.commitment, io["loss_total"], atol=0)


def test_rqvae_release_ema_step_parity(rq_release_folder):
    """One train-mode quantizer call from warm EMA buffers: codes, straight-through latents, loss, and the
    codebook's EMA statistics and weights after the sequential per-depth updates."""
    io = load_file(str(rq_release_folder / "rqvae_io.safetensors"))
    quantizer = vqar.load_pretrained(rq_release_folder / "stage1").quantizer
    books = sorted({int(k.split("_cb")[1].split("_")[0]) for k in io if k.startswith("ema_pre_cb")})
    assert books, "the fixture has no EMA test"
    for i in books:
        codebook = quantizer.codebooks[i]
        codebook.weight.data.copy_(io[f"ema_pre_cb{i}_weight"][:-1])  # the release's padding row dropped
        codebook.cluster_size_ema.copy_(io[f"ema_pre_cb{i}_cluster_size_ema"])
        codebook.embed_ema.copy_(io[f"ema_pre_cb{i}_embed_ema"])
    quantizer.train()
    out = quantizer(io["z_e"])
    assert torch.equal(out.codes, io["train_codes"])
    close(out.quantized, io["train_z_q_st"], atol=1e-6)
    close(out.commitment, io["train_commitment_loss"], atol=0, rtol=1e-5)
    for i in books:
        codebook = quantizer.codebooks[i]
        close(codebook.cluster_size_ema, io[f"ema_post_cb{i}_cluster_size_ema"], atol=1e-7, rtol=1e-5)
        close(codebook.embed_ema, io[f"ema_post_cb{i}_embed_ema"], atol=1e-7, rtol=1e-5)
        close(codebook.weight, io[f"ema_post_cb{i}_weight"][:-1], atol=1e-7, rtol=1e-5)


def mean_cross_entropy(logits, codes):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))


# ---------------------------------------------------------------- RQ-Transformer
def test_rq_transformer_release_parity(rq_transformer_release_folder):
    folder = rq_transformer_release_folder
    io = load_file(str(folder / "rqtransformer_io.safetensors"))
    model = vqar.load_pretrained(folder / "stage2")
    assert isinstance(model, RQTransformer) and isinstance(model.tokenizer, Tokenizer)
    codes, cond = io["codes"], io.get("cond")
    with torch.no_grad():
        logits, text_logits = model(codes, cond)
        close(logits, io["logits"])
        close(mean_cross_entropy(logits, codes), io["ce_loss"], atol=0, rtol=1e-5)
        per_depth = F.cross_entropy(logits.flatten(0, 3), codes.flatten(), reduction="none").view(-1, codes.shape[-1])
        close(per_depth.mean(0), io["per_depth_ce"], atol=0, rtol=1e-5)
        for key in ("cond_logits", "text_logits"):
            if key in io:
                close(text_logits, io[key])
        sample = generate(model, cond, GREEDY, batch_size=len(codes))
        assert torch.equal(sample, io["greedy_sample_codes"])
        assert torch.equal(generate_uncached(model, cond, GREEDY, batch_size=len(codes)), sample)
        close(model(sample, cond).logits, io["greedy_sample_logits"])
        close(model.tokenizer.decode(sample), io["greedy_sample_pixels"], atol=IMAGE_ATOL)


# ---------------------------------------------------------------- LlamaGen VQ
def test_llamagen_vq_parity(llamagen_vq_folder):
    io = load_file(str(llamagen_vq_folder / "vq_io.safetensors"))
    model = vqar.load_pretrained(llamagen_vq_folder / "vq_ckpt.pt", config=llamagen_vq_folder / "vq_config.json")
    images, codes = io["images"], io["codes"]
    with torch.no_grad():
        encoded = model.encoder(images)
        close(encoded, io["encoder_out"])
        close(model.quant_conv(encoded), io["pre_quant"])
        out = model(images)
        assert torch.equal(out.quant.codes, codes)
        assert torch.equal(out.quant.codes.flatten(), io["indices_flat"])
        close(out.quant.quantized.permute(0, 3, 1, 2), io["quant"])
        close(model.quantizer.codebook.vectors(), io["codebook_normalized"], atol=1e-6)
        close(out.recon, io["decoded"], atol=IMAGE_ATOL)
        close(model.decode(codes), io["decoded"], atol=IMAGE_ATOL)
    if "images_uint8" in io:  # the reference's image scaling
        close(io["images_uint8"].float() / 127.5 - 1, images, atol=1e-6)

    quantizer = model.quantizer.train()
    latent = io["pre_quant"].permute(0, 2, 3, 1)
    train = quantizer(latent)
    beta = model.cfg.quantizer.beta
    close(beta * train.commitment, io["train_commit_loss"], atol=1e-7, rtol=1e-5)
    entropy = model.cfg.quantizer.entropy_weight * entropy_penalty(
        -quantizer.codebook.distances(F.normalize(latent.reshape(-1, latent.shape[-1]), dim=-1))
    )
    close(train.loss - beta * train.commitment - entropy, io["train_vq_loss"], atol=1e-7, rtol=1e-5)
    close(entropy, io["train_entropy_loss"], atol=1e-6)
    affinity = -quantizer.codebook.distances(F.normalize(latent.reshape(-1, latent.shape[-1]), dim=-1))
    close(entropy_penalty(affinity, 0.01), io["entropy_loss_raw"], atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- LlamaGen GPT
def _gpt_and_tokens(folder):
    io = load_file(str(folder / "gpt_io.safetensors"))
    model = vqar.load_pretrained(folder / "gpt_ckpt.pt", config=folder / "gpt_config.json")
    assert isinstance(model, GPT) and not model.training
    return io, model, io["tokens"].view(len(io["tokens"]), *model.code_shape)


def test_llamagen_gpt_teacher_forced_parity(llamagen_gpt_folder):
    io, model, tokens = _gpt_and_tokens(llamagen_gpt_folder)
    labels = io["labels"]
    with torch.no_grad():
        logits = model(tokens, labels).logits
        close(logits.flatten(1, 2), io["tf_logits"])
        close(mean_cross_entropy(logits, tokens), io["tf_loss"], atol=0, rtol=1e-5)
        close(model(tokens, None).logits.flatten(1, 2), io["tf_logits_uncond"])  # cond=None is the null class
    close(model.rope, rotation_table(io["rope_freqs_cis"]), atol=1e-6)  # the official table, in apply_rope's layout


def test_llamagen_gpt_greedy_generation_parity(llamagen_gpt_folder):
    io, model, tokens = _gpt_and_tokens(llamagen_gpt_folder)
    labels = io["labels"]
    runs = json.loads((llamagen_gpt_folder / "meta.json").read_text())["gpt"]["generation"]
    vq = None
    if (llamagen_gpt_folder / "vq_ckpt.pt").is_file():
        vq = vqar.load_pretrained(llamagen_gpt_folder / "vq_ckpt.pt", config=llamagen_gpt_folder / "vq_config.json")
    assert runs
    for run in runs:
        tag, scale, interval = run["tag"], run["cfg_scale"], run["cfg_interval"]
        settings = SamplingSettings(greedy=True, cfg_scale=scale, cfg_interval=interval)
        with torch.no_grad():
            generated = generate(model, labels, settings)
            assert torch.equal(generated.flatten(1), io[f"gen_{tag}_tokens"]), tag
            cond = model(generated, labels).logits.flatten(1, 2)
            null = model(generated, None).logits.flatten(1, 2) if scale > 1 else cond
            # LlamaGen's interval: token 0 always guided, token t > 0 while t - 1 <= interval (-1: every token)
            steps = torch.arange(cond.shape[1])
            guided_at = (steps == 0) | (interval < 0) | (steps - 1 <= interval) if scale > 1 else steps < 0
            expected = torch.where(guided_at[None, :, None], null + scale * (cond - null), cond)
            close(expected, io[f"gen_{tag}_guided_logits"])
            if vq is not None and f"gen_{tag}_images" in io:
                close(vq.decode(generated), io[f"gen_{tag}_images"], atol=IMAGE_ATOL)


def test_llamagen_sampling_filters_parity(llamagen_gpt_folder):
    io = load_file(str(llamagen_gpt_folder / "gpt_io.safetensors"))
    logits = io["filter_in_logits"]
    for key in [k for k in io if k.startswith("filter_probs_")]:
        settings = {"t": 1.0, "k": None, "p": None}
        for part in key.removeprefix("filter_probs_").split("_"):
            settings[part[0]] = float(part[1:]) if part[0] != "k" else int(part[1:])
        probs = filter_logits(logits, settings["t"], settings["k"], settings["p"]).softmax(-1)
        close(probs, io[key], atol=1e-6)
    filtered = filter_logits(logits, 1.0, 10, None)
    expected = io["filter_k10_filtered_logits"]
    assert torch.equal(filtered.isinf(), expected.isinf())
    close(filtered[~filtered.isinf()], expected[~expected.isinf()], atol=1e-6)


# ---------------------------------------------------------------- Next Patch Prediction
def test_npp_training_forward_parity(npp_folder):
    from vqar.ar.next_patch import next_patch_logits, next_patch_loss, patch_embeddings, patch_rope, patchify

    io = load_file(str(npp_folder / "npp_io.safetensors"))
    gpt_io = load_file(str(npp_folder / "gpt_io.safetensors"))
    model = vqar.load_pretrained(npp_folder / "gpt_ckpt.pt", config=npp_folder / "gpt_config.json")
    tokens = gpt_io["tokens"].view(len(gpt_io["tokens"]), *model.code_shape)
    labels = gpt_io["labels"]
    sizes = sorted({int(k.split("_")[1][1:]) for k in io if k.startswith("npp_p") and k.endswith("_logits")})
    assert sizes
    with torch.no_grad():
        for p in sizes:
            close(patch_embeddings(model, tokens, p), io[f"npp_p{p}_patch_embeddings"], atol=1e-6)
            assert torch.equal(patchify(tokens, p), io[f"npp_p{p}_patch_targets"])
            close(patch_rope(model.cfg, p), io[f"npp_p{p}_freqs_cis"], atol=1e-6)
            logits = next_patch_logits(model, tokens, labels, p)
            close(logits, io[f"npp_p{p}_logits"])
            close(next_patch_loss(logits, tokens, p), io[f"npp_p{p}_loss"], atol=0, rtol=1e-5)
        # p = 1 is ordinary next-token training: the same logits exactly, the same loss up to the order in which
        # two different reductions add the same terms
        logits = next_patch_logits(model, tokens, labels, 1)
        token_logits = model(tokens, labels).logits
        assert torch.equal(logits.view_as(token_logits), token_logits)
        close(next_patch_loss(logits, tokens, 1), mean_cross_entropy(token_logits, tokens), atol=0, rtol=1e-6)
        close(next_patch_loss(logits, tokens, 1), io["npp_p1_loss"], atol=0, rtol=1e-6)


def test_npp_schedules_match_the_released_code(npp_folder):
    from vqar.train.npp import patch_sides, relative_cost, segment_ends, segment_lr

    schedule = json.loads((npp_folder / "npp_schedule.json").read_text())
    for name, expected in schedule["patch_schedule"].items():
        level = int(name.split("_")[0].removeprefix("level"))
        epochs = int(name.split("_")[1].removeprefix("epochs"))
        rate = float(name.split("_")[2].removeprefix("rate"))
        assert segment_ends(epochs, level, rate) == expected["epoch_range"], name
        assert [side * side for side in patch_sides(level)] == expected["patch_sizes"], name
        assert relative_cost(epochs, level, rate) == pytest.approx(expected["relative_sequence_length_cost"]), name
    for name, expected in schedule["lr_schedule"].items():
        a = expected["args"]
        ends = [e * a["steps_per_epoch"] for e in a["epoch_range"]]
        warmup = a["warmup_epochs"] * a["steps_per_epoch"]
        lrs = [
            a["base_lr"] * segment_lr(step, ends, warmup, a["decay_ratio"], a["end_lr"] / a["base_lr"])
            for step in range(a["epochs"] * a["steps_per_epoch"])
        ]
        assert lrs == pytest.approx(expected["lr_per_step"], abs=1e-12), name
