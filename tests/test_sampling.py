"""Sampling: filters against direct computations, KV-cached generation against teacher forcing, CFG, errors."""

from __future__ import annotations

import pytest
import torch

from vqar.ar import GPT, GPTConfig, RQTransformer, RQTransformerConfig
from vqar.sampling import SamplingSettings, filter_logits, generate, guide, sample_logits
from vqar.testing import generate_uncached


def tiny_gpt(**overrides) -> GPT:
    cfg = dict(vocab_size=64, code_shape=[4, 5], dim=32, n_layer=2, n_head=2, num_classes=5, multiple_of=16)
    model = GPT(GPTConfig(**{**cfg, **overrides})).eval()
    torch.nn.init.normal_(model.output.weight, std=0.5)  # zero-initialised otherwise: every logit would tie
    return model


def tiny_rq(shared: bool = True, **overrides) -> RQTransformer:
    cfg = dict(
        vocab_size=32, code_shape=[3, 2, 3], code_dim=8, dim=32, n_head=4, n_layer=2, n_depth_layer=2,
        num_classes=5, class_dropout_prob=0.1, shared_codebook=shared,
    )  # fmt: skip
    books = torch.randn(1 if shared else 3, 32, 8)
    return RQTransformer(RQTransformerConfig(**{**cfg, **overrides}), code_embeddings=books).eval()


def uniform(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(rows, generator=torch.Generator().manual_seed(seed))


def test_top_k_keeps_the_k_largest():
    logits = torch.randn(3, 50)
    filtered = filter_logits(logits, top_k=5)
    for row, original in zip(filtered, logits, strict=True):
        kept = torch.isfinite(row).nonzero().flatten()
        assert set(kept.tolist()) == set(original.topk(5).indices.tolist())
        assert torch.equal(row[kept], original[kept])


def test_top_k_keeps_ties_with_the_kth_largest_as_llamagen():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, -1.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).sum(-1).tolist() == [4, 2]
    draws = sample_logits(logits.repeat(4000, 1), top_k=2, uniform=uniform(8000))
    first, second = draws[0::2], draws[1::2]
    assert set(first.unique().tolist()) == {0, 1, 2, 3}  # the three codes tied at the 2nd-largest logit all stay
    assert set(second.unique().tolist()) == {0, 1}
    # the row without ties draws exactly what it draws alone
    assert torch.equal(second, sample_logits(logits[1:].repeat(4000, 1), top_k=2, uniform=uniform(8000)[1::2]))
    # ties running far past k (here 40 codes tied with the 2nd largest of 100) are all kept too
    wide = torch.tensor([[5.0] + [1.0] * 40 + [0.0] * 59])
    assert int(torch.isfinite(filter_logits(wide, top_k=2)).sum()) == 41
    evenly = (torch.arange(4100) + 0.5) / 4100
    assert set(sample_logits(wide.expand(4100, 100), top_k=2, uniform=evenly).tolist()) == set(range(41))


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
    draws = sample_logits(logits, uniform=uniform(20000))
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.015)
    draws = sample_logits(logits, top_k=2, uniform=uniform(20000))
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert freq[2] == 0 and abs(freq[0] - 2 / 3) < 0.015
    # the draw inverts the cumulative distribution: u below 0.6 gives code 0, then code 1 up to 0.9, then code 2
    u = torch.tensor([0.0, 0.59, 0.61, 0.89, 0.91, 0.999])
    assert sample_logits(logits[:6], uniform=u).tolist() == [0, 0, 1, 1, 2, 2]


def test_fast_sampler_draws_from_the_filtered_softmax():
    torch.manual_seed(4)
    logits = torch.randn(1, 20) * 2
    expected = filter_logits(logits, temperature=0.8, top_k=8, top_p=0.7).softmax(-1)[0]
    draws = sample_logits(logits.expand(40000, 20), 0.8, 8, 0.7, uniform=uniform(40000, 1))
    freq = torch.bincount(draws, minlength=20).float() / len(draws)
    assert torch.allclose(freq, expected, atol=0.01)
    assert set(draws.unique().tolist()) == set(expected.nonzero().flatten().tolist())


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
    greedy = SamplingSettings(greedy=True)
    codes = generate(model, cond, greedy)
    assert codes.shape == (3, *model.code_shape)
    assert torch.equal(model(codes, cond).logits.argmax(-1), codes)
    assert torch.equal(generate_uncached(model, cond, greedy), codes)


@pytest.mark.parametrize("make", [tiny_gpt, tiny_rq])
def test_seeded_generation_equals_the_uncached_reference(make):
    torch.manual_seed(5)
    model = make()
    cond = torch.tensor([0, 2, 4])
    settings = SamplingSettings(temperature=1.3, top_k=12, top_p=0.9, cfg_scale=2.0, seed=3)
    codes = generate(model, cond, settings)
    assert torch.equal(generate_uncached(model, cond, settings), codes)
    assert not torch.equal(generate(model, cond, SamplingSettings(greedy=True)), codes)


@pytest.mark.parametrize("make", [tiny_gpt, tiny_rq])
def test_guided_generation_is_the_argmax_of_guided_teacher_forcing(make):
    torch.manual_seed(1)
    model = make()
    cond = torch.tensor([0, 2])
    codes = generate(model, cond, SamplingSettings(greedy=True, cfg_scale=3.0))
    null, conditional = model(codes, None).logits, model(codes, cond).logits
    assert torch.equal((null + 3.0 * (conditional - null)).argmax(-1), codes)
    assert torch.equal(generate_uncached(model, cond, SamplingSettings(greedy=True, cfg_scale=3.0)), codes)
    # With scale 1 guidance is off: the conditional model itself.
    unguided = generate(model, cond, SamplingSettings(greedy=True, cfg_scale=1.0))
    assert torch.equal(model(unguided, cond).logits.argmax(-1), unguided)


def test_cfg_interval_guides_only_the_first_codes():
    torch.manual_seed(2)
    model = tiny_gpt()
    cond = torch.tensor([1, 4])
    codes = generate(model, cond, SamplingSettings(greedy=True, cfg_scale=4.0, cfg_interval=2))
    cond_logits, null_logits = model(codes, cond).logits.flatten(1, 2), model(codes, None).logits.flatten(1, 2)
    guided = null_logits + 4.0 * (cond_logits - null_logits)
    flat = codes.flatten(1)
    assert torch.equal(guided[:, :4].argmax(-1), flat[:, :4])  # tokens 0..cfg_interval+1 are guided
    assert torch.equal(cond_logits[:, 4:].argmax(-1), flat[:, 4:])
    every = SamplingSettings(greedy=True, cfg_scale=4.0)
    assert torch.equal(generate(model, cond, SamplingSettings(greedy=True, cfg_scale=4.0, cfg_interval=-1)),
                       generate(model, cond, every))  # fmt: skip


def test_settings_given_per_depth_apply_to_their_depth():
    torch.manual_seed(6)
    model = tiny_rq()
    cond = torch.tensor([0, 1, 2, 3])
    codes = generate(model, cond, SamplingSettings(top_k=[1, None, None], temperature=[1.0, 3.0, 3.0], seed=2))
    argmax = model(codes, cond).logits.argmax(-1)
    assert torch.equal(argmax[..., 0], codes[..., 0])  # top-1 at depth 0: the most likely code, always
    assert not torch.equal(argmax[..., 1:], codes[..., 1:])  # hot, unfiltered draws at depths 1 and 2


def test_seeded_sampling_is_reproducible_and_each_image_depends_on_its_index_only():
    model = tiny_rq()
    cond = torch.tensor([1, 2, 3, 4])
    settings = SamplingSettings(top_k=[8, 8, 4], top_p=0.9, seed=5)
    a, b = generate(model, cond, settings), generate(model, cond, settings)
    c = generate(model, cond, SamplingSettings(top_k=[8, 8, 4], top_p=0.9, seed=6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(generate(model, cond[:2], settings), a[:2])  # image j: (seed, j), whatever the batch


def test_unconditional_models():
    gpt = tiny_gpt(num_classes=0)
    assert generate(gpt, None, SamplingSettings(greedy=True), batch_size=3).shape == (3, 4, 5)
    with pytest.raises(ValueError, match="unconditional"):
        generate(gpt, torch.tensor([0]))
    with pytest.raises(ValueError, match="unconditional"):  # no null condition: no guidance
        generate(gpt, None, SamplingSettings(cfg_scale=2.0), batch_size=1)
    rq = tiny_rq(num_classes=0, class_dropout_prob=0.0)
    assert rq(generate(rq, None, batch_size=2), None).logits.shape == (2, 3, 2, 3, 32)


def test_bf16_autocast_greedy_sampling_mostly_agrees_with_fp32():
    torch.manual_seed(3)
    model = tiny_gpt()
    cond = torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = generate(model, cond, SamplingSettings(greedy=True))
    assert codes.shape == (4, 4, 5)
    assert (codes == generate(model, cond, SamplingSettings(greedy=True))).float().mean() > 0.5


def test_cpu_kv_cache_keeps_float32_under_bf16_and_matches_teacher_forcing():
    # On CPU the cache stays float32 (bf16 bmm over it is ~3x slower); decoding through it must give the logits
    # that the teacher-forced pass gives in bf16, to bf16 precision.
    torch.manual_seed(4)
    model = tiny_gpt()
    ids, codes = torch.tensor([0, 1]), torch.randint(0, 64, (2, 4, 5))
    flat = codes.flatten(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = model.new_decode_state()
        context = model.prefill(ids, state)
        for t in range(6):
            context = model.decode_position(flat[:, t : t + 1], t, state)
        cached = model.code_logits(context, flat[:, :0], state)
        full = model(codes, ids).logits.flatten(1, 2)[:, 6]
    assert {c.k.dtype for c in state} == {torch.float32}
    assert cached.dtype == torch.bfloat16
    torch.testing.assert_close(cached.float(), full.float(), atol=0.05, rtol=0.05)
    assert (cached.argmax(-1) == full.argmax(-1)).all()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"top_p": 2.0}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"cfg_scale": 0.5}, "cfg_scale"),
        ({"cfg_scale": float("inf")}, "cfg_scale"),
        ({"cfg_interval": -5}, "cfg_interval"),
        ({"seed": -1}, "seed"),
        ({"greedy": "yes"}, "greedy"),
    ],
)
def test_bad_sampling_settings_raise_before_any_work(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**fields).validate()
    with pytest.raises(ValueError, match=message):
        generate(tiny_gpt(), torch.tensor([0]), SamplingSettings(**fields))


def test_bad_conditions_raise():
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        generate(model, torch.tensor([5]))
    with pytest.raises(ValueError, match="depth 3"):
        generate(tiny_rq(), torch.tensor([0]), SamplingSettings(top_k=[1, 2]))
    with pytest.raises(ValueError, match="depth 1"):
        generate(model, torch.tensor([0]), SamplingSettings(top_k=[1, 2]))
    no_null = tiny_gpt(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null class"):
        generate(no_null, torch.tensor([0]), SamplingSettings(cfg_scale=2.0))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 5, 4, dtype=torch.long), torch.tensor([0]))
