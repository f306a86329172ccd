"""The compiled decode steps (issue 18): static shapes with the position as data, the same codes as eager
generation, batches padded to buckets without changing an image, the fallback to eager, and what only a GPU runs
(skipped here with the reason)."""

from __future__ import annotations

import logging

import pytest
import torch

from vqar.ar import GPT, VIM, GPTConfig, RQTransformer, RQTransformerConfig, VIMConfig
from vqar.quantize import QuantizerConfig
from vqar.sampling import SamplingSettings, draw, for_sampling, generate, make_conditions
from vqar.sampling import compiled as compiled_module
from vqar.sampling.compiled import batch_buckets, bucket_for
from vqar.tokenizers import ConvConfig, Tokenizer, TokenizerConfig

CUDA = torch.cuda.is_available()


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(GPTConfig(vocab_size=64, code_shape=[3, 4], dim=32, n_layer=2, n_head=2, num_classes=5,
                              multiple_of=16))  # fmt: skip
        torch.nn.init.normal_(model.output.weight, std=0.5)
    elif kind == "rq":
        model = RQTransformer(RQTransformerConfig(vocab_size=32, code_shape=[2, 3, 3], code_dim=8, dim=32, n_head=4,
                                                  n_layer=2, n_depth_layer=2, num_classes=5, class_dropout_prob=0.1),
                              code_embeddings=torch.randn(32, 8))  # fmt: skip
    else:
        model = VIM(VIMConfig(vocab_size=32, code_shape=[3, 4], dim=32, n_head=4, n_layer=2, num_classes=5,
                              class_dropout_prob=0.1))  # fmt: skip
    return model.eval()


@pytest.mark.parametrize("kind", ["gpt", "rq", "vim"])
def test_a_position_given_as_a_tensor_decodes_as_an_int_does(kind):
    """The static path (the whole cache, masked) against the filled-prefix path, without compiling."""
    model = tiny(kind)
    codes = torch.randint(0, model.codebook_size, (2, model.num_positions, model.depth))
    contexts = []
    for as_tensor in (False, True):
        state = model.new_decode_state()
        with torch.no_grad():
            context = model.prefill(torch.tensor([1, 3]), state)
            for p in range(model.num_positions - 1):
                context = model.decode_block(codes[:, p : p + 1], torch.tensor([p]) if as_tensor else p, state)
        contexts.append(context)
    torch.testing.assert_close(contexts[1], contexts[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["gpt", "rq", "vim"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_a_block_of_positions_decodes_as_one_position_at_a_time(kind, as_tensor):
    """The block contract: feeding positions 1..last-2 in one call gives the contexts (and the next-code logits)
    that one-position calls give; the rest of the generation then goes on unchanged."""
    model = tiny(kind)
    last = model.num_positions - 1
    assert last >= 4
    codes = torch.randint(0, model.codebook_size, (2, model.num_positions, model.depth))
    cond = torch.tensor([1, 3])

    def run(blocks):
        state = model.new_decode_state()
        with torch.no_grad():
            contexts = [model.prefill(cond, state)]
            for start, size in blocks:
                where = torch.tensor([start]) if as_tensor else start
                contexts.append(model.decode_block(codes[:, start : start + size], where, state))
            logits = model.code_logits(contexts[-1][:, -1:], codes[:, last : last + 1, :0], state)
        return torch.cat(contexts, dim=1), logits

    one_by_one, logits_one = run([(p, 1) for p in range(last)])
    in_blocks, logits_blocks = run([(0, 1), (1, last - 2), (last - 1, 1)])
    assert in_blocks.shape == one_by_one.shape == (2, last + 1, model.cfg.dim)
    torch.testing.assert_close(in_blocks, one_by_one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_blocks, logits_one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(in_blocks[:, 2], in_blocks[:, 3])  # the positions' contexts do differ


def reference_attention(q, k, v, query_at):
    """Attention written out one row and one query at a time: query i of row b sees the keys 0..query_at[b, i]."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for b in range(q.shape[0]):
        for i in range(q.shape[2]):
            keys = int(query_at[b, i]) + 1
            kk = k[b, :, :keys].repeat_interleave(groups, 0)
            vv = v[b, :, :keys].repeat_interleave(groups, 0)
            weights = (q[b, :, i : i + 1] @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
            out[b, :, i] = (weights @ vv)[:, 0]
    return out


@pytest.mark.parametrize("queries", [1, 4])
@pytest.mark.parametrize("per_row", [False, True])
def test_attention_over_a_static_cache_sees_each_querys_prefix_only(queries, per_row):
    """`attend_written` reads only the written prefix of the cache; the keys past it (here NaN: never written)
    and past each query must not count."""
    from vqar.ar.layers import attend_written

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, queries, 8), torch.randn(3, 2, 20, 8), torch.randn(3, 2, 20, 8)  # 2 kv heads
    start = torch.tensor([5, 0, 11]) if per_row else torch.tensor([7])
    query_at = start.view(-1, 1).expand(3, 1) + torch.arange(queries)
    k[:, :, int(query_at.max()) + 1 :] = float("nan")
    v[:, :, int(query_at.max()) + 1 :] = float("nan")
    torch.testing.assert_close(attend_written(q, k, v, start), reference_attention(q, k, v, query_at))


@pytest.mark.parametrize("opaque", [False, True])
def test_compiled_attention_over_a_static_cache_in_the_graph_and_as_one_op(opaque, monkeypatch):
    """Compiled on a CPU, a large cache goes to the opaque op (which reads the written prefix), a small one stays
    in the graph (the whole cache, masked): both give the eager attention, and the op runs only when chosen."""
    from vqar.ar import layers

    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8)
    start = torch.tensor([2, 9])
    eager = layers.attend_written(q, k, v, start)
    read = []
    monkeypatch.setattr(layers, "_attend_written", lambda *args: read.append(1) or eager.clone())
    monkeypatch.setattr(layers, "OPAQUE_ATTENTION_MIN", 0 if opaque else 2**62)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layers.attend_written)(q, k, v, start)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)
    assert bool(read) == opaque


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt", "rq", "vim"])
def test_compiled_generation_draws_the_eager_codes(kind):
    model = tiny(kind)
    cond = torch.tensor([0, 2, 4])
    for settings in (SamplingSettings(greedy=True), SamplingSettings(top_k=8, top_p=0.9, cfg_scale=2.0, seed=3)):
        eager = generate(model, cond, settings)
        for _ in range(2):  # the second run reuses the caches (and graphs) of the first
            assert torch.equal(generate(model, cond, settings, compile=True), eager), settings
    assert compiled_module.decode_steps(model, compile=True).compiled  # it did compile, it did not fall back


@pytest.mark.slow
@pytest.mark.parametrize("speculative", [False, True])
def test_compiled_generation_with_the_opaque_attention_draws_the_eager_codes(speculative, monkeypatch):
    """The tiny models' caches are below `OPAQUE_ATTENTION_MIN`; forced to the op, plain and speculative compiled
    generations still draw the eager codes."""
    from vqar.ar import layers

    monkeypatch.setattr(layers, "OPAQUE_ATTENTION_MIN", 0)
    monkeypatch.setattr(compiled_module, "_compiled", compiled_module.weakref.WeakKeyDictionary())
    model = tiny("gpt")
    cond = torch.tensor([0, 2, 4])
    settings = SamplingSettings(top_k=8, cfg_scale=2.0, seed=3, speculative=speculative, speculative_window=4)
    eager = generate(model, cond, settings)
    torch._dynamo.reset()
    try:
        assert torch.equal(generate(model, cond, settings, compile=True), eager)
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_speculative_rq_sampling_stays_within_the_recompilation_limit():
    """An RQ-Transformer's speculative steps call `code_logits` at each depth for one position and for the window:
    9 graphs at depth 4, past dynamo's default limit of 8, and `vqar sample --speculative --compile` ran the rest
    eagerly under dynamo's multi-line warning."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        # dynamo's default limit, whatever ran before; patched through dynamo's own config API (a pytest monkeypatch
        # of it left the setting missing for every later test)
        with torch._dynamo.config.patch(recompile_limit=8):
            torch.manual_seed(0)
            config = RQTransformerConfig(vocab_size=32, code_shape=[2, 2, 4], code_dim=8, dim=32, n_head=4,
                                         n_layer=2, n_depth_layer=2, num_classes=5, class_dropout_prob=0.1)  # fmt: skip
            model = RQTransformer(config, code_embeddings=torch.randn(32, 8)).eval()
            cond = torch.tensor([0, 2])
            settings = SamplingSettings(seed=3, speculative=True, speculative_window=3)
            codes = generate(model, cond, settings, compile=True)
            over = [reason.splitlines()[0] for reason in counters["unimplemented"] if "recompile limit" in reason]
            assert not over, over
            assert torch.equal(codes, generate(model, cond, settings))
    finally:
        torch._dynamo.reset()


def tiny_tokenizer(depth: int) -> Tokenizer:
    quantizer = QuantizerConfig(kind="rq" if depth > 1 else "vq", codebook_size=32, dim=8, depth=depth)
    return Tokenizer(TokenizerConfig(conv=ConvConfig(resolution=16, ch=8, ch_mult=[1, 2, 2], z_channels=8,
                                                     norm_groups=4), quantizer=quantizer)).eval()  # fmt: skip


@pytest.mark.slow
def test_compiled_draws_pad_batches_to_buckets_without_changing_an_image():
    model = tiny("rq")
    tokenizer = tiny_tokenizer(3)
    model.set_code_embeddings(tokenizer.code_vectors())
    model.attach(tokenizer)
    conditions = make_conditions(model, classes=[0, 1, 2, 3, 4], n_per_condition=2)  # 10 images: batches 8 + 2
    settings = SamplingSettings(top_k=16, seed=1)
    eager = draw(model, conditions, settings, batch_size=8)
    compiled = draw(model, conditions, settings, batch_size=8, compile=True)
    assert torch.equal(compiled.codes, eager.codes) and compiled.images.shape == eager.images.shape


def test_batch_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64] and batch_buckets(12) == [1, 2, 4, 8, 12]
    assert [bucket_for(n, 12) for n in (1, 3, 8, 9, 12)] == [1, 4, 8, 12, 12]


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken_compile(function, **options):
        def fails(*args):
            raise RuntimeError("no C++ compiler (as if)")

        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(compiled_module, "_compiled", compiled_module.weakref.WeakKeyDictionary())
    model = tiny("gpt")
    cond = torch.tensor([1, 2])
    with caplog.at_level(logging.WARNING, logger="vqar.sampling"):
        codes = generate(model, cond, SamplingSettings(greedy=True), compile=True)
        again = generate(model, cond, SamplingSettings(greedy=True), compile=True)
    assert torch.equal(codes, generate(model, cond, SamplingSettings(greedy=True)))
    assert torch.equal(again, codes)
    warnings = [r for r in caplog.records if "compiling the decode step failed" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()


def test_bf16_weights_are_for_cuda_only():
    model = tiny("gpt")
    assert for_sampling(model, "bf16").output.weight.dtype == torch.float32  # a CPU keeps float32 weights


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: bf16 weights and caches, CUDA graphs (benchmarks/gpu.py)")
def test_cuda_bf16_compiled_generation_agrees_with_eager():
    model = for_sampling(tiny("gpt").cuda(), "bf16")
    assert model.output.weight.dtype == torch.bfloat16
    cond = torch.tensor([0, 1, 2], device="cuda")
    eager = generate(model, cond, SamplingSettings(greedy=True))
    assert torch.equal(generate(model, cond, SamplingSettings(greedy=True), compile=True), eager)
    state = model.new_decode_state()
    model.prefill(torch.tensor([0], device="cuda"), state)
    assert state[0].k.dtype == torch.bfloat16  # the KV cache too


@pytest.fixture(scope="module")
def gpt_run(tiny_pipeline, tmp_path_factory):
    """A random GPT over 4x4 codes with a VQ tokenizer of the digits' size: enough to sample from."""
    from vqar.bundle import load, save_pretrained

    run = tmp_path_factory.mktemp("compiled") / "gpt"
    tokenizer = load(tiny_pipeline / "tokenizer")
    vq = Tokenizer(TokenizerConfig(conv=tokenizer.cfg.conv, quantizer=QuantizerConfig(kind="vq", codebook_size=64,
                                                                                       dim=32)))  # fmt: skip
    model = GPT(GPTConfig(vocab_size=64, code_shape=[4, 4], dim=32, n_layer=2, n_head=2, num_classes=10,
                          multiple_of=16)).eval()  # fmt: skip
    torch.nn.init.normal_(model.output.weight, std=0.5)
    save_pretrained(model.attach(vq.eval()), run)
    return run


@pytest.mark.slow
def test_sample_and_serve_with_compile_draw_the_same_images(gpt_run, tmp_path, capsys):
    import numpy as np

    from vqar.bundle import load
    from vqar.cli import main
    from vqar.serve.engine import GenerateRequest, SamplingEngine

    args = ["sample", "--model", str(gpt_run), "--classes", "1,2,3", "--n-per-class", "3", "--batch-size", "4",
            "--top-k", "8", "--seed", "2", "--no-images"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "eager")]) == 0
    assert main([*args, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    assert "compiled the decode steps" in capsys.readouterr().out
    with np.load(tmp_path / "eager" / "samples.npz") as eager, np.load(tmp_path / "compiled" / "samples.npz") as fast:
        assert np.array_equal(eager["arr_0"], fast["arr_0"])
    model = load(gpt_run)
    request = GenerateRequest(class_id=4, n=3, settings=SamplingSettings(top_k=8, seed=5))
    plain = SamplingEngine(model, max_images=4, max_batch=4)
    compiled = SamplingEngine(model, max_images=4, max_batch=4, compile=True)  # warms up buckets 1, 2, 4
    try:
        assert torch.equal(compiled.generate(request, timeout=300).images, plain.generate(request, timeout=300).images)
    finally:
        plain.close()
        compiled.close()


@pytest.mark.slow
@pytest.mark.timeout(1000)  # above the script's own 900 s: the default 600 s cut it short on a busy host
def test_the_gpu_benchmark_runs_its_tiny_configuration(tmp_path):
    """benchmarks/gpu.py on a CPU: every section runs (the figures mean nothing), so the script does not rot."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(script), "--tiny", "--out", str(out)], capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tiny"] and {"g1", "g3", "train", "g4", "g5"} <= report.keys() and "torch" in report["environment"]
    assert all(row["speculative_calls_per_image"] <= row["plain_calls_per_image"] for row in report["g4"]["rows"])
    assert all(row["compiled_over_eager"] > 0 for row in report["g5"]["rows"])
    assert all(row["compiled_over_eager"] > 0 for row in report["g1"]["rows"])


@pytest.mark.parametrize(("kind", "settings", "served"), [
    ("gpt", SamplingSettings(top_k=8, seed=2), False),  # `vqar sample --compile --top-k 8`: drawn codes
    ("gpt", SamplingSettings(seed=4), True),  # `vqar serve --compile` warms up the default settings of a request
    pytest.param("rq", SamplingSettings(top_p=0.9, cfg_scale=2.0, seed=1), False, marks=pytest.mark.slow),  # 75 s
])  # fmt: skip
def test_after_the_warm_up_a_generation_of_its_settings_compiles_nothing(kind, settings, served):
    """`vqar sample --compile` warms up with the run's settings before it times the sampling, `vqar serve
    --compile` with the default ones before its first request. The warm-up ran greedy placeholders, and a
    generation that draws its codes (`run.noise` given) compiled again: in the timed sampling, or the request."""
    from torch._dynamo.utils import counters

    from vqar.sampling.draw import warm_up

    torch._dynamo.reset()  # graphs of the other tests' models neither count nor fill the recompilation limit
    try:
        model = tiny(kind)
        cond = torch.tensor([1, 3])
        before = counters["stats"]["unique_graphs"]
        like = {} if served else {"guided": settings.guided, "like": settings}
        warm_up(model, [len(cond)], progress=False, **like)
        warmed = counters["stats"]["unique_graphs"]
        assert warmed > before  # the warm-up compiled
        codes = generate(model, cond, settings, compile=True)
        assert counters["stats"]["unique_graphs"] == warmed  # and the generation only ran what it compiled
        assert compiled_module.decode_steps(model, compile=True).compiled
        assert torch.equal(codes, generate(model, cond, settings))
    finally:
        torch._dynamo.reset()
