"""Sampling: filters against direct computations, KV-cached generation against teacher forcing, CFG, errors."""

from __future__ import annotations

import pytest
import torch

from vqar.ar import GPT, GPTConfig, RQTransformer, RQTransformerConfig
from vqar.sampling import filter_logits, guide, sample_logits
from vqar.sampling.filters import check_sampling_args


def tiny_gpt(**overrides) -> GPT:
    cfg = dict(vocab_size=64, grid=[4, 5], dim=32, n_layer=2, n_head=2, num_classes=5, multiple_of=16)
    model = GPT(GPTConfig(**{**cfg, **overrides})).eval()
    torch.nn.init.normal_(model.output.weight, std=0.5)  # zero-initialised otherwise: every logit would tie
    return model


def tiny_rq(shared: bool = True, **overrides) -> RQTransformer:
    cfg = dict(
        vocab_size=32, code_shape=[3, 2, 3], code_dim=8, embed_dim=32, n_head=4, body_layers=2, head_layers=2,
        num_classes=5, class_dropout_prob=0.1, shared_codebook=shared,
    )  # fmt: skip
    books = torch.randn(1 if shared else 3, 32, 8)
    return RQTransformer(RQTransformerConfig(**{**cfg, **overrides}), code_embeddings=books).eval()


def test_top_k_keeps_the_k_largest():
    logits = torch.randn(3, 50)
    filtered = filter_logits(logits, top_k=5)
    for row, original in zip(filtered, logits, strict=True):
        kept = torch.isfinite(row).nonzero().flatten()
        assert set(kept.tolist()) == set(original.topk(5).indices.tolist())
        assert torch.equal(row[kept], original[kept])


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.75)).flatten().tolist()
    assert kept == [True, False, True, False]  # 0.5 + 0.3 reaches 0.75
    kept = torch.isfinite(filter_logits(logits, top_p=0.85)).flatten().tolist()
    assert kept == [True, False, True, True]  # 0.8 does not: 0.15 more
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).sum() == 1  # always one
    probs = filter_logits(logits, temperature=0.5).softmax(-1)
    expected = torch.tensor([[0.5, 0.05, 0.3, 0.15]]) ** 2
    assert torch.allclose(probs, expected / expected.sum(), atol=1e-6)


def test_sampling_follows_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).expand(20000, 3)
    draws = sample_logits(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.015)
    draws = sample_logits(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert freq[2] == 0 and abs(freq[0] - 2 / 3) < 0.015
    again = sample_logits(logits, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, sample_logits(logits, generator=torch.Generator().manual_seed(0)))


def test_guidance_formula_and_scale_one():
    cond, uncond = torch.randn(2, 7), torch.randn(2, 7)
    stacked = torch.cat([cond, uncond])
    assert torch.allclose(guide(stacked, 3.0), uncond + 3.0 * (cond - uncond))
    assert torch.allclose(guide(stacked, 1.0), cond, atol=1e-6)  # up to float rounding of u + (c - u)


@pytest.mark.parametrize("make", [tiny_gpt, tiny_rq, lambda: tiny_rq(shared=False)])
def test_cached_greedy_generation_is_the_argmax_of_teacher_forcing(make):
    torch.manual_seed(0)
    model = make()
    cond = torch.tensor([1, 3, 4])
    codes = model.generate(cond, greedy=True)
    assert codes.shape == (3, *model.code_shape)
    assert torch.equal(model(codes, cond).argmax(-1), codes)
    assert torch.equal(model.generate(cond, greedy=True, use_cache=False), codes)


@pytest.mark.parametrize("make", [tiny_gpt, tiny_rq])
def test_guided_generation_is_the_argmax_of_guided_teacher_forcing(make):
    torch.manual_seed(1)
    model = make()
    cond = torch.tensor([0, 2])
    codes = model.generate(cond, greedy=True, cfg_scale=3.0)
    guided = model(codes, None) + 3.0 * (model(codes, cond) - model(codes, None))
    assert torch.equal(guided.argmax(-1), codes)
    assert torch.equal(model.generate(cond, greedy=True, cfg_scale=3.0, use_cache=False), codes)
    # With scale 1 guidance is the conditional model itself.
    assert torch.equal(
        model.generate(cond, greedy=True, cfg_scale=1.0), model(model.generate(cond, greedy=True), cond).argmax(-1)
    )


def test_cfg_interval_guides_only_the_first_codes():
    torch.manual_seed(2)
    model = tiny_gpt()
    cond = torch.tensor([1, 4])
    codes = model.generate(cond, greedy=True, cfg_scale=4.0, cfg_interval=2)
    cond_logits, null_logits = model(codes, cond).flatten(1, 2), model(codes, None).flatten(1, 2)
    guided = null_logits + 4.0 * (cond_logits - null_logits)
    flat = codes.flatten(1)
    assert torch.equal(guided[:, :4].argmax(-1), flat[:, :4])  # tokens 0..cfg_interval+1 are guided
    assert torch.equal(cond_logits[:, 4:].argmax(-1), flat[:, 4:])
    assert torch.equal(model.generate(cond, greedy=True, cfg_scale=4.0, cfg_interval=-1),
                       model.generate(cond, greedy=True, cfg_scale=4.0))  # fmt: skip


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed():
    model = tiny_rq()
    cond = torch.tensor([1, 2, 3, 4])
    a = model.generate(cond, top_k=[8, 8, 4], top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = model.generate(cond, top_k=[8, 8, 4], top_p=0.9, generator=torch.Generator().manual_seed(5))
    c = model.generate(cond, top_k=[8, 8, 4], top_p=0.9, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unconditional_models():
    gpt = tiny_gpt(num_classes=0)
    assert gpt.generate(None, batch_size=3, greedy=True).shape == (3, 4, 5)
    with pytest.raises(ValueError, match="unconditional"):
        gpt.generate(torch.tensor([0]))
    rq = tiny_rq(num_classes=0, class_dropout_prob=0.0)
    assert rq(rq.generate(None, batch_size=2), None).shape == (2, 3, 2, 3, 32)


def test_bf16_autocast_sampling_runs_and_mostly_agrees():
    torch.manual_seed(3)
    model = tiny_gpt()
    cond = torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = model.generate(cond, greedy=True)
    assert codes.shape == (4, 4, 5)
    assert (codes == model.generate(cond, greedy=True)).float().mean() > 0.5


def test_cpu_kv_cache_keeps_float32_under_bf16_and_matches_uncached_decoding():
    # On CPU the cache stays float32 (bf16 bmm over it is ~3x slower); decoding through it must give the logits
    # that recomputing the whole prefix in bf16 gives, to bf16 precision.
    torch.manual_seed(4)
    model = tiny_gpt()
    ids, prefix = torch.tensor([0, 1]), torch.randint(0, 32, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        caches = model.new_caches()
        model.prefill(ids, caches)
        for t in range(prefix.shape[1]):
            cached = model.decode_one_token(prefix[:, t], t, caches)
        full = model.next_token_logits(ids, prefix)
    assert {c.k.dtype for c in caches} == {torch.float32}
    assert cached.dtype == torch.bfloat16
    torch.testing.assert_close(cached.float(), full.float(), atol=0.05, rtol=0.05)
    assert (cached.argmax(-1) == full.argmax(-1)).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_p": 2.0}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"cfg_scale": -1.0}, "cfg_scale"),
    ],
)
def test_bad_sampling_arguments_raise_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_gpt().generate(torch.tensor([0]), **kwargs)


def test_bad_conditions_raise():
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        model.generate(torch.tensor([5]))
    with pytest.raises(ValueError, match="depth 3"):
        tiny_rq().generate(torch.tensor([0]), top_k=[1, 2])
    no_null = tiny_gpt(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null class"):
        no_null.generate(torch.tensor([0]), cfg_scale=2.0)
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 5, 4, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError):
        check_sampling_args(1.0, None, None, 1.0, cfg_interval=-5)


def test_fast_sampler_draws_from_the_filtered_softmax():
    torch.manual_seed(4)
    logits = torch.randn(1, 20) * 2
    expected = filter_logits(logits, temperature=0.8, top_k=8, top_p=0.7).softmax(-1)[0]
    draws = sample_logits(logits.expand(40000, 20), 0.8, 8, 0.7, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=20).float() / len(draws)
    assert torch.allclose(freq, expected, atol=0.01)
    assert set(draws.unique().tolist()) == set(expected.nonzero().flatten().tolist())


def test_one_generator_per_row_makes_rows_independent_of_the_batch():
    logits = torch.randn(4, 50)
    streams = [torch.Generator().manual_seed(s) for s in range(4)]
    together = sample_logits(logits, top_k=20, top_p=0.9, generator=streams)
    for row in range(4):  # each row alone, with a fresh copy of its own stream, draws the same code
        fresh = [torch.Generator().manual_seed(row)]
        alone = sample_logits(logits[row : row + 1], top_k=20, top_p=0.9, generator=fresh)
        assert alone.item() == together[row].item()
    with pytest.raises(ValueError, match="3 generators for 4 rows"):
        sample_logits(logits, generator=streams[:3])
