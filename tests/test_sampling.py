"""Sampling: filters against direct computations, KV-cached generation against teacher forcing, CFG and its
interval, settings per depth, seeds, and bf16."""

from __future__ import annotations

import math

import pytest
import torch

from vqar.ar import GPT, GPTConfig, RQTransformer, RQTransformerConfig
from vqar.sampling import SamplingSettings, filter_logits, generate, guide, image_noise, sample_logits
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


def evenly(n: int) -> torch.Tensor:
    """n uniform numbers at the centres of n equal bins of [0, 1): a draw that inverts a CDF with them lands on
    each code n * probability times, give or take one, whatever the order the codes are laid out in."""
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


def reference_probs(probs: list[float], temperature=1.0, top_k=None, top_p=None) -> list[float]:
    """The filtered distribution of `vqar.sampling.settings`, written out in float64 pure Python: temper, keep the
    k most likely (and ties), then keep the most likely codes until the ones before reach p."""
    logits = [math.log(q) / temperature for q in probs]
    keep = set(range(len(probs)))
    if top_k is not None:
        kth = sorted(logits, reverse=True)[top_k - 1]
        keep = {i for i in keep if logits[i] >= kth}
    weights = {i: math.exp(logits[i]) for i in keep}
    if top_p is not None:
        total, before, kept = sum(weights.values()), 0.0, set()
        for i in sorted(keep, key=lambda i: -logits[i]):
            if before > top_p:
                break
            kept.add(i)
            before += weights[i] / total
        keep = kept
    total = sum(weights[i] for i in keep)
    return [weights[i] / total if i in keep else 0.0 for i in range(len(probs))]


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "expected_kept"),
    [
        (1.0, None, 0.75, {0, 2}),  # 0.5 + 0.3 reaches 0.75: the code that crosses p (0.3) is kept, no more
        (1.0, None, 0.85, {0, 2, 3}),  # 0.8 does not reach 0.85: 0.15 more
        (1.0, 3, 0.75, {0, 2}),  # top-p after top-k works on the candidates top-k selected
        (1.0, None, 0.3, {0}),  # the most likely code alone reaches p
        (2.0, None, 0.75, {0, 2, 3}),  # tempered first: sqrt-probabilities .38, .29, .21, .12 need three codes
    ],
)
def test_fast_sampler_top_p_matches_the_distribution_computed_by_hand(temperature, top_k, top_p, expected_kept):
    probs = [0.5, 0.05, 0.3, 0.15]
    expected = reference_probs(probs, temperature, top_k, top_p)
    assert {i for i, q in enumerate(expected) if q > 0} == expected_kept  # the reference says what the comment says
    n = 4000
    logits = torch.log(torch.tensor([probs])).expand(n, 4)
    counts = torch.bincount(sample_logits(logits, temperature, top_k, top_p, uniform=evenly(n)), minlength=4)
    assert all(abs(int(c) - q * n) <= 1 for c, q in zip(counts, expected, strict=True)), (counts, expected)


def test_fast_sampler_never_draws_a_code_of_probability_zero():
    # u = 0 sits on the CDF of a leading impossible code (CDF 0 there): the draw must move past it.
    logits = torch.tensor([[float("-inf"), 0.0, 0.0], [float("-inf"), float("-inf"), 1.0]])
    assert sample_logits(logits, uniform=torch.zeros(2)).tolist() == [1, 2]
    assert sample_logits(logits, uniform=torch.full((2,), 1 - 2**-24)).tolist() == [2, 2]


def test_top_k_ties_past_the_candidates_of_one_row_only():
    # Row 0 has 40 codes tied with its 2nd-largest, more than the ~18 candidates one topk call takes; row 1 has no
    # ties. Every tied code of row 0 is still drawn, whatever the other rows of the batch are.
    wide = torch.tensor([5.0] + [1.0] * 40 + [0.0] * 59)
    distinct = torch.arange(100, 0, -1, dtype=torch.float32) / 10
    n = 4100
    logits = torch.stack([wide, distinct]).repeat(n, 1)
    draws = sample_logits(logits, top_k=2, uniform=evenly(n).repeat_interleave(2))
    assert set(draws[0::2].tolist()) == set(range(41))
    assert set(draws[1::2].tolist()) == {0, 1}


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


def llamagen_guided_positions(positions: int, interval: int | None) -> list[bool]:
    """Which positions LlamaGen guides: the first code comes from the prefill, always guided; decode step i
    (i = 0, 1, ...) makes code i + 1 and stops guiding once cfg_interval > -1 and i > cfg_interval."""
    interval = -1 if interval is None else interval
    return [True] + [not (interval > -1 and i > interval) for i in range(positions - 1)]


@pytest.mark.parametrize("interval", [None, -1, 0, 1, 2, 7, 30])
def test_guided_at_follows_llamagen(interval):
    settings = SamplingSettings(cfg_scale=2.0, cfg_interval=interval)
    assert [settings.guided_at(p) for p in range(12)] == llamagen_guided_positions(12, interval)
    assert not any(SamplingSettings(cfg_scale=1.0, cfg_interval=interval).guided_at(p) for p in range(12))


# Hand-set weights for the cfg_interval tests: every code of every position gets the logits of a table row chosen
# by the condition alone. Classes prefer code 0, the null class code 2, and guidance (scale 3) code 1, so each
# position tells which logits drew it: COND_CODE unguided, GUIDED_CODE guided, NULL_CODE the null half alone.
COND_CODE, GUIDED_CODE, NULL_CODE, CFG = 0, 1, 2, 3.0


def condition_table(num_classes: int, vocab: int) -> torch.Tensor:
    table = torch.full((num_classes + 1, vocab), -5.0)
    table[:num_classes, :3] = torch.tensor([1.0, 0.9, 0.0])  # guided: 0.9 + 3 * 0.1, 0 + 3 * 0.9, 1.5 - 3 * 1.5
    table[num_classes, :3] = torch.tensor([0.9, 0.0, 1.5])
    return table


@torch.no_grad()
def _broadcast_condition(model, blocks, table: torch.Tensor) -> None:
    """Condition embeddings along orthogonal zero-mean directions of norm sqrt(dim); attention with zero queries
    and keys averages the values of the positions so far, and only the condition token has a non-zero value, so
    every position after it sees the condition's direction, rescaled (which the final norm undoes); the output
    layer maps each direction to its table row."""
    dim = model.cfg.dim
    rows = torch.zeros(len(table), dim)
    output = torch.zeros(table.shape[1], dim)
    for c in range(len(table)):
        rows[c, 2 * c], rows[c, 2 * c + 1] = (dim / 2) ** 0.5, -((dim / 2) ** 0.5)
        output[:, 2 * c] = table[c] / (dim / 2) ** 0.5
    model.cond_embedding.embedding_table.weight.copy_(rows)
    model.output.weight.copy_(output)
    for block in blocks:
        block.feed_forward.w2.weight.zero_()
        for module in block.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.zero_()


@torch.no_grad()
def gpt_with_condition_logits() -> GPT:
    model = GPT(GPTConfig(vocab_size=16, code_shape=[3, 4], dim=32, n_layer=1, n_head=2, num_classes=5,
                          multiple_of=16)).eval()  # fmt: skip
    model.tok_embeddings.weight.zero_()
    attention = model.layers[0].attention
    attention.wqkv.weight.zero_()
    attention.wqkv.weight[64:].copy_(torch.eye(32))  # values: the normalised input; queries and keys: zero
    attention.wo.weight.copy_(torch.eye(32))
    _broadcast_condition(model, model.layers, condition_table(5, 16))
    return model


@torch.no_grad()
def rq_with_condition_logits() -> RQTransformer:
    cfg = RQTransformerConfig(vocab_size=16, code_shape=[3, 2, 3], code_dim=8, dim=32, n_head=4, n_layer=1,
                              n_depth_layer=1, num_classes=5, class_dropout_prob=0.1)  # fmt: skip
    model = RQTransformer(cfg, code_embeddings=torch.randn(16, 8)).eval()
    for linear in (model.spatial_input, model.depth_input):
        linear.weight.zero_()
    for embedding in (model.pos_emb, model.cond_pos_emb, model.depth_pos_emb):
        embedding.zero_()
    for block in (*model.layers, *model.depth_layers):
        attention = block.attention
        attention.wq.weight.zero_()
        attention.wk.weight.zero_()
        attention.wv.weight.copy_(torch.eye(32))
        attention.wo.weight.copy_(torch.eye(32))
    _broadcast_condition(model, [*model.layers, *model.depth_layers], condition_table(5, 16))
    return model


@pytest.mark.parametrize("make", [gpt_with_condition_logits, rq_with_condition_logits])
def test_cfg_interval_boundary_with_guidance_that_changes_every_code(make):
    model = make()
    cond = torch.tensor([0, 3])
    # The premise, teacher-forced on arbitrary codes: at every position and depth the three choices differ.
    probe = torch.randint(0, 16, (2, *model.code_shape))
    conditional, null = model(probe, cond).logits, model(probe, None).logits
    assert (conditional.argmax(-1) == COND_CODE).all() and (null.argmax(-1) == NULL_CODE).all()
    assert ((null + CFG * (conditional - null)).argmax(-1) == GUIDED_CODE).all()
    positions = model.num_positions
    for interval in (0, 1, 3, positions - 2, -1, None):
        expected = torch.tensor(
            [GUIDED_CODE if g else COND_CODE for g in llamagen_guided_positions(positions, interval)]
        )
        expected = expected[None, :, None].expand(2, positions, model.depth).reshape(2, *model.code_shape)
        for settings in (SamplingSettings(greedy=True, cfg_scale=CFG, cfg_interval=interval),
                         SamplingSettings(top_k=1, cfg_scale=CFG, cfg_interval=interval, seed=4)):  # fmt: skip
            assert torch.equal(generate(model, cond, settings), expected), (interval, settings)


def test_settings_given_per_depth_apply_to_their_depth():
    torch.manual_seed(6)
    model = tiny_rq()
    cond = torch.tensor([0, 1, 2, 3])
    codes = generate(model, cond, SamplingSettings(top_k=[1, None, None], temperature=[1.0, 3.0, 3.0], seed=2))
    argmax = model(codes, cond).logits.argmax(-1)
    assert torch.equal(argmax[..., 0], codes[..., 0])  # top-1 at depth 0: the most likely code, always
    assert not torch.equal(argmax[..., 1:], codes[..., 1:])  # hot, unfiltered draws at depths 1 and 2


def test_each_depth_draws_with_its_own_temperature_top_k_and_top_p():
    torch.manual_seed(7)
    model = tiny_rq()
    cond = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    per_depth = [(0.6, None, 0.8), (2.5, 6, None), (1.0, 1, None)]  # (temperature, top_k, top_p) of depth d
    settings = SamplingSettings(temperature=[f[0] for f in per_depth], top_k=[f[1] for f in per_depth],
                                top_p=[f[2] for f in per_depth])  # fmt: skip
    noise = torch.rand(len(cond), model.num_positions * model.depth, generator=torch.Generator().manual_seed(3))
    codes = generate(model, cond, settings, noise=noise)
    logits = model(codes, cond).logits.flatten(1, 2)  # teacher-forced: (B, positions, depth, K)
    flat = codes.flatten(1, 2)
    for d, (temperature, top_k, top_p) in enumerate(per_depth):
        u = noise.view(len(cond), model.num_positions, model.depth)[:, :, d]
        # The draw of depth d is the one `sample_logits` makes with depth d's settings and that draw's number ...
        drawn = sample_logits(logits[:, :, d].flatten(0, 1), temperature, top_k, top_p, uniform=u.flatten())
        assert torch.equal(drawn.view(len(cond), -1), flat[:, :, d]), d
        # ... and a code of the set that depth's filters keep, computed here by hand.
        for row, code in zip(logits[:, :, d].flatten(0, 1).double(), flat[:, :, d].flatten(), strict=True):
            probs = row.softmax(-1).tolist()
            assert reference_probs(probs, temperature, top_k, top_p)[int(code)] > 0, d


def test_seeded_sampling_is_reproducible_and_each_image_depends_on_its_index_only():
    model = tiny_rq()
    cond = torch.tensor([1, 2, 3, 4])
    settings = SamplingSettings(top_k=[8, 8, 4], top_p=0.9, seed=5)
    a, b = generate(model, cond, settings), generate(model, cond, settings)
    c = generate(model, cond, SamplingSettings(top_k=[8, 8, 4], top_p=0.9, seed=6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(generate(model, cond[:2], settings), a[:2])  # image j: (seed, j), whatever the batch


@pytest.mark.parametrize("make", [tiny_gpt, tiny_rq])
def test_a_model_in_training_mode_samples_as_in_eval_mode_and_keeps_its_mode(make):
    """generate kept a training-mode model's dropout and class dropout on: draws no seed reproduced."""
    model = make(resid_dropout_p=0.5, class_dropout_prob=0.5)
    cond, settings = torch.tensor([0, 1, 2, 3] * 4), SamplingSettings(seed=3, cfg_scale=2.0)
    expected = generate(model, cond, settings)
    model.train()
    model.layers[0].eval()  # a submodule's own mode is given back too
    assert torch.equal(generate(model, cond, settings), expected)
    assert model.training and not model.layers[0].training and model.cond_embedding.training


def test_image_noise_depends_on_the_seed_and_the_image_index_only():
    model = tiny_rq()
    noise = image_noise(model, torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0]))
    assert noise.shape == (3, model.num_positions * model.depth)
    assert ((noise >= 0) & (noise < 1)).all()
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert torch.equal(image_noise(model, torch.tensor([5]), torch.tensor([1]))[0], noise[1])


def test_unconditional_models():
    gpt = tiny_gpt(num_classes=0)
    assert generate(gpt, None, SamplingSettings(greedy=True), batch_size=3).shape == (3, 4, 5)
    with pytest.raises(ValueError, match="unconditional"):
        generate(gpt, torch.tensor([0]))
    with pytest.raises(ValueError, match="unconditional"):  # no null condition: no guidance
        generate(gpt, None, SamplingSettings(cfg_scale=2.0), batch_size=1)
    rq = tiny_rq(num_classes=0, class_dropout_prob=0.0)
    assert rq(generate(rq, None, batch_size=2), None).logits.shape == (2, 3, 2, 3, 32)


@torch.no_grad()
def test_bf16_autocast_greedy_sampling_takes_the_fp32_argmax_up_to_bf16_rounding():
    # bf16 keeps 8 significant bits: a logit of magnitude m is off by about m * 2^-8 per rounding, and a few
    # roundings stack up through the network. TOL = 2^-5 * max |logit| (8 such units) is at least twice the error
    # of a bf16 forward pass (the premise, checked below). So every greedy bf16 code has an fp32 logit within TOL of
    # the fp32 maximum, and bf16 and fp32 sampling take the same codes up to the first near-tie (an fp32 top-2 gap
    # under TOL) of each row.
    torch.manual_seed(3)
    model = tiny_gpt()
    cond = torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = generate(model, cond, SamplingSettings(greedy=True))
        low = model(codes, cond).logits.float().flatten(1, 2)
    assert codes.shape == (4, 4, 5)
    high = model(codes, cond).logits.flatten(1, 2)
    tol = 2**-5 * float(high.abs().max())
    assert float((low - high).abs().max()) <= tol / 2  # the premise
    chosen = high.gather(-1, codes.flatten(1)[..., None])[..., 0]
    assert (chosen >= high.max(-1).values - tol).all()
    fp32 = generate(model, cond, SamplingSettings(greedy=True))
    top2 = model(fp32, cond).logits.flatten(1, 2).topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1] >= tol).long().cumprod(-1)  # 1 until the first near-tie of each row
    assert torch.equal(codes.flatten(1) * clear, fp32.flatten(1) * clear)


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
            context = model.decode_block(flat[:, t : t + 1, None], t, state)
        cached = model.code_logits(context, flat[:, None, :0], state)[:, 0]
        full = model(codes, ids).logits.flatten(1, 2)[:, 6]
    assert {c.k.dtype for c in state} == {torch.float32}
    assert cached.dtype == torch.bfloat16
    torch.testing.assert_close(cached.float(), full.float(), atol=0.05, rtol=0.05)
    assert (cached.argmax(-1) == full.argmax(-1)).all()


def test_top_p_cuts_inside_ties_that_run_past_the_candidates():
    """40 codes tie with the 2nd largest, past the 18 candidates one topk takes: the ones left out are drawn as one
    column, and top-p keeps as many of them, each as likely, as it keeps of the tied codes in sorted order."""
    wide = [5.0] + [1.0] * 40 + [0.0] * 59
    probs = torch.tensor(wide).softmax(-1).tolist()
    n = 20000
    for top_p, kept_tied in ((0.7, 12), (0.85, 26), (0.99, 40)):
        expected = reference_probs(probs, top_k=2, top_p=top_p)
        assert sum(q > 0 for q in expected[1:41]) == kept_tied  # 17 of the tied codes are candidates, 23 not
        draws = sample_logits(torch.tensor([wide]).expand(n, 100), top_k=2, top_p=top_p, uniform=evenly(n))
        counts = torch.bincount(draws, minlength=100)
        tied = counts[1:41][counts[1:41] > 0]
        assert len(tied) == kept_tied and int(counts[41:].sum()) == 0
        assert abs(int(counts[0]) - expected[0] * n) <= 1
        assert all(abs(int(c) - expected[1] * n) <= 1 for c in tied), (tied, expected[1] * n)


def test_the_draw_compiles_to_one_graph_with_the_eager_distribution():
    """top-k's fallback for ties past its candidates was a data-dependent branch: a graph break in every compiled
    step with top-k (1.5x slower at batch 1). Compiled, the tied codes left out are one column: the codes of rows
    without such ties are eager's, and a row of 40 ties (17 of them candidates) keeps eager's distribution, with
    and without top-p cutting inside the ties."""
    torch.manual_seed(0)
    wide = [5.0] + [1.0] * 40 + [0.0] * 59
    n = 4100
    logits = torch.cat([torch.randn(64, 100) * 3, torch.tensor([wide]).expand(n, 100)])
    u = torch.cat([torch.rand(64), evenly(n).float()])
    probs = torch.tensor(wide).softmax(-1).tolist()
    torch._dynamo.reset()
    try:
        draw = torch.compile(sample_logits, fullgraph=True)
        for temperature, top_k, top_p in ((1.0, 2, None), (1.0, 2, 0.85)):  # each a graph of its own
            compiled = draw(logits, temperature, top_k, top_p, uniform=u)
            assert torch.equal(compiled[:64], sample_logits(logits[:64], temperature, top_k, top_p, uniform=u[:64]))
            expected = reference_probs(probs, temperature, top_k, top_p)
            counts = torch.bincount(compiled[64:], minlength=100)
            tied = counts[1:41][counts[1:41] > 0]  # which of the tied codes top-p keeps is the sort's choice
            assert len(tied) == sum(q > 0 for q in expected[1:41]) and int(counts[41:].sum()) == 0
            assert abs(int(counts[0]) - expected[0] * n) <= 1
            assert all(abs(int(c) - expected[1] * n) <= 1 for c in tied), (tied, expected[1] * n)
    finally:
        torch._dynamo.reset()
