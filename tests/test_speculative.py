"""Speculative Jacobi decoding (`vqar.sampling.speculative`): greedy codes equal plain greedy codes, and sampled
sequences follow the model's exact distribution, measured against its enumeration."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats as scipy_stats

from vqar.ar import GPT, VIM, GPTConfig, RQTransformer, RQTransformerConfig, VIMConfig
from vqar.ar.var import VAR, VARConfig
from vqar.sampling import SamplingSettings, filter_logits, generate, image_noise
from vqar.sampling import speculative as spec

# Each chi-square comparison below rejects a correct sampler with probability 1e-5 (the test statistic's upper
# tail under the null hypothesis); the file makes 9 such comparisons, so a false alarm has probability < 1e-4.
FALSE_ALARM = 1e-5
SAMPLES = 20_000


def tiny_gpt(**overrides) -> GPT:
    cfg = dict(vocab_size=64, code_shape=[4, 5], dim=32, n_layer=2, n_head=2, num_classes=5, multiple_of=16,
               class_dropout_prob=0.1)  # fmt: skip
    model = GPT(GPTConfig(**{**cfg, **overrides})).eval()
    torch.nn.init.normal_(model.output.weight, std=0.5)  # zero-initialised otherwise: every logit would tie
    return model


def tiny_vim(**overrides) -> VIM:
    cfg = dict(vocab_size=32, code_shape=[3, 4], dim=32, n_head=4, n_layer=2, num_classes=5, class_dropout_prob=0.1)
    return VIM(VIMConfig(**{**cfg, **overrides})).eval()


def tiny_rq(**overrides) -> RQTransformer:
    cfg = dict(vocab_size=32, code_shape=[3, 2, 3], code_dim=8, dim=32, n_head=4, n_layer=2, n_depth_layer=2,
               num_classes=5, class_dropout_prob=0.1)  # fmt: skip
    cfg = {**cfg, **overrides}
    return RQTransformer(RQTransformerConfig(**cfg), code_embeddings=torch.randn(1, cfg["vocab_size"], 8)).eval()


MODELS = {"gpt": tiny_gpt, "vim": tiny_vim, "rq": tiny_rq}


@pytest.mark.parametrize("window", [3, 64])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_greedy_speculative_decoding_gives_the_greedy_codes(arch, cfg_scale, window):
    torch.manual_seed(0)
    model = MODELS[arch]()
    cond = torch.tensor([0, 1, 2, 3, 4])
    plain = generate(model, cond, SamplingSettings(greedy=True, cfg_scale=cfg_scale))
    counted = spec.DecodeStats()
    fast = generate(model, cond, SamplingSettings(greedy=True, cfg_scale=cfg_scale, speculative=True,
                                                  speculative_window=window), stats=counted)  # fmt: skip
    assert torch.equal(fast, plain)
    assert counted.images == 5 and 1 < counted.calls_per_image <= model.num_positions
    assert 0.0 <= counted.acceptance_rate <= 1.0


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_a_model_of_one_position_samples_speculatively_as_plainly(arch):
    """A 1x1 code grid (a ViT-VQGAN patch the size of its image) ended speculative sampling in an IndexError:
    its window drafted a position after the only one, also at a training run's first evaluation."""
    torch.manual_seed(0)
    model = MODELS[arch](code_shape=[1, 1, 3] if arch == "rq" else [1, 1])
    cond = torch.tensor([0, 1, 2])
    for greedy in (True, False):
        settings = dict(greedy=greedy, cfg_scale=2.0)
        plain = generate(model, cond, SamplingSettings(**settings))
        counted = spec.DecodeStats()
        fast = generate(model, cond, SamplingSettings(**settings, speculative=True), stats=counted)
        assert fast.shape == plain.shape and counted.calls_per_image == 1
        if greedy:
            assert torch.equal(fast, plain)


def test_greedy_speculative_decoding_with_a_cfg_interval_and_an_iteration_cap():
    torch.manual_seed(1)
    model = tiny_gpt()
    cond = torch.tensor([1, 3])
    settings = SamplingSettings(greedy=True, cfg_scale=4.0, cfg_interval=6)
    plain = generate(model, cond, settings)
    for cap in (None, 0, 2):
        fast = SamplingSettings(**{**vars(settings), "speculative": True, "speculative_window": 5,
                                   "speculative_max_iterations": cap})  # fmt: skip
        assert torch.equal(generate(model, cond, fast), plain), cap


def test_a_model_whose_drafts_are_always_right_needs_few_calls():
    """A model that predicts the same code everywhere: every draft after the first call is accepted, so a window
    of W positions finishes 20 positions in 1 + ceil(19 / W) calls."""
    model = tiny_gpt()
    torch.nn.init.zeros_(model.output.weight)
    model.norm.weight.data.zero_()
    counted = spec.DecodeStats()
    settings = SamplingSettings(greedy=True, speculative=True, speculative_window=5)
    codes = generate(model, torch.tensor([0, 1]), settings, stats=counted)
    assert torch.equal(codes, generate(model, torch.tensor([0, 1]), SamplingSettings(greedy=True)))
    assert counted.calls_per_image == 1 + 4 and counted.acceptance_rate == 1.0


def test_each_image_depends_on_its_seed_and_index_only():
    torch.manual_seed(2)
    model = tiny_rq()
    cond = torch.tensor([4, 3, 2, 1, 0])
    settings = SamplingSettings(top_k=8, cfg_scale=2.0, speculative=True, speculative_window=3, seed=7)
    whole = generate(model, cond, settings)
    noise = image_noise(model, torch.full((2,), 7), torch.tensor([3, 1]), settings)
    part = generate(model, cond[[3, 1]], settings, noise=noise)
    assert torch.equal(part, whole[[3, 1]])
    assert not torch.equal(generate(model, cond, SamplingSettings(**{**vars(settings), "seed": 8})), whole)


def test_speculative_settings_are_checked():
    for fields, message in [({"speculative": 1}, "speculative must be"), ({"speculative_window": 0}, "window"),
                            ({"speculative_drafts": "eagle"}, "mc-sjd or sjd"),
                            ({"speculative_max_iterations": -1}, "max_iterations")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            SamplingSettings(**fields).validate()
    var = VAR(VARConfig(vocab_size=16, code_shape=[5], patch_nums=[1, 2], dim=32, n_layer=1, n_head=2, num_classes=3))
    with pytest.raises(ValueError, match="whole block of codes per call"):
        generate(var, torch.tensor([0]), SamplingSettings(speculative=True))


# ---------------------------------------------------------------- the exact distribution


def exact_log_probs(model, cls: int, settings: SamplingSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Every code sequence of `model` (S, *code_shape) and its log-probability under plain sampling's rules:
    guidance by position (with its interval), then temperature, top-k and top-p of each depth."""
    k, shape = model.codebook_size, model.code_shape
    every = torch.tensor(list(itertools.product(range(k), repeat=model.num_positions * model.depth)))
    codes = every.view(-1, *shape)
    with torch.no_grad():
        cond = model(codes, torch.full((len(codes),), cls)).logits.float()
        null = model(codes, None).logits.float() if settings.guided else cond
    cond = cond.reshape(len(codes), model.num_positions, model.depth, k)
    null = null.reshape_as(cond)
    filters = settings.per_depth(model.depth)
    stacks = codes.view(len(codes), model.num_positions, model.depth)
    total = torch.zeros(len(codes))
    for position in range(model.num_positions):
        scale = settings.cfg_scale if settings.guided_at(position) else 1.0
        logits = null[:, position] + scale * (cond[:, position] - null[:, position]) if scale != 1.0 else \
            cond[:, position]  # fmt: skip
        for d, f in enumerate(filters):
            log_p = filter_logits(logits[:, d], *f).log_softmax(-1)
            total += log_p.gather(-1, stacks[:, position, d, None])[:, 0]
    return codes, total


def chi_square(samples: torch.Tensor, codes: torch.Tensor, log_probs: torch.Tensor) -> tuple[float, float]:
    """The chi-square statistic of the sampled sequences against the exact probabilities, with the cells of
    expected count < 5 pooled into one, and the threshold it exceeds with probability FALSE_ALARM."""
    k = int(codes.max()) + 1
    weights = k ** torch.arange(codes[0].numel() - 1, -1, -1)
    index = (codes.flatten(1) * weights).sum(1)
    assert torch.equal(index, torch.arange(len(codes)))  # the enumeration is in base-k order
    observed = torch.bincount((samples.flatten(1) * weights).sum(1), minlength=len(codes)).double()
    expected = log_probs.double().exp() * len(samples)
    assert abs(float(expected.sum()) - len(samples)) < 1e-3 * len(samples)
    small = expected < 5
    cells_o = torch.cat([observed[~small], observed[small].sum()[None]]) if small.any() else observed
    cells_e = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = cells_e > 0
    statistic = float(((cells_o[keep] - cells_e[keep]) ** 2 / cells_e[keep]).sum())
    if float(cells_o[~keep].sum()) > 0:  # a sequence of probability zero was drawn
        statistic = float("inf")
    return statistic, float(scipy_stats.chi2.isf(FALSE_ALARM, int(keep.sum()) - 1))


def exact_gpt() -> GPT:
    torch.manual_seed(3)
    model = tiny_gpt(vocab_size=3, code_shape=[2, 3], dim=16, n_layer=1)  # 3^6 = 729 sequences
    torch.nn.init.normal_(model.output.weight, std=1.5)  # peaked enough that the filters remove codes
    return model


GPT_SETTINGS = dict(temperature=0.8, top_k=2, top_p=0.9, cfg_scale=2.0, cfg_interval=2, seed=11)


@pytest.mark.parametrize("drafts, cap", [("mc-sjd", None), ("sjd", None), ("mc-sjd", 2), (None, None)])
def test_gpt_samples_follow_the_exact_distribution(drafts, cap):
    """Speculative samples (and plain ones, the control: drafts None) against the enumerated distribution under
    temperature, top-k, top-p, guidance and its interval."""
    model = exact_gpt()
    settings = SamplingSettings(**GPT_SETTINGS, speculative=drafts is not None, speculative_window=4,
                                speculative_drafts=drafts or "mc-sjd", speculative_max_iterations=cap)  # fmt: skip
    codes, log_probs = exact_log_probs(model, 2, settings)
    counted = spec.DecodeStats()
    samples = generate(model, torch.full((SAMPLES,), 2), settings, stats=counted)
    statistic, threshold = chi_square(samples, codes, log_probs)
    assert statistic < threshold, (statistic, threshold)
    if drafts is not None:
        assert counted.calls_per_image < model.num_positions  # the drafts save calls
        assert 0.0 < counted.acceptance_rate < 1.0


@pytest.mark.parametrize("q", [[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
def test_one_check_of_a_draft_gives_exactly_the_model_distribution(q):
    """The acceptance rule and the replacement alone, on 200,000 drafts x ~ q: the code that comes out of one check
    has distribution p whatever q is (accept with min(1, p/q), else a draw from max(0, p - q))."""
    n, p = 200_000, torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor(q)
    generator = torch.Generator().manual_seed(8)
    codes = torch.zeros(n, 2, 1, dtype=torch.long)
    codes[:, 1, 0] = torch.multinomial(q, n, replacement=True, generator=generator)  # the drafts, x ~ q
    numbers = torch.rand(n, 2, spec.DRAFTS + 2 * 3, generator=generator)  # independent of the drafts
    window = spec.Window(codes, 1, numbers, greedy=False, coupled=True)
    window.q = q.expand(n, 1, 1, 4).clone()
    spec._verify(window, p.expand(n, 1, 4))
    assert bool(window.done.all())
    observed = torch.bincount(codes[:, 1, 0], minlength=4).double()
    expected = p.double() * n
    statistic = float(((observed - expected) ** 2 / expected).sum())
    assert statistic < scipy_stats.chi2.isf(FALSE_ALARM, 3), (observed / n, statistic)


def test_an_acceptance_rule_that_accepts_every_draft_is_caught(monkeypatch):
    """The check above can fail: with every draft accepted, the samples follow the drafts, not the model."""
    model = exact_gpt()
    settings = SamplingSettings(**GPT_SETTINGS, speculative=True, speculative_window=4)
    codes, log_probs = exact_log_probs(model, 2, settings)
    monkeypatch.setattr(spec, "accepts", lambda uniform, p, q: torch.ones_like(p, dtype=torch.bool))
    samples = generate(model, torch.full((SAMPLES,), 2), settings)
    statistic, threshold = chi_square(samples, codes, log_probs)
    assert statistic > threshold, (statistic, threshold)


@pytest.mark.parametrize("speculative", [True, False])
def test_rq_samples_follow_the_exact_distribution(speculative):
    """An RQ-Transformer with 2x2 positions of depth 2 (2^8 = 256 sequences): drafts checked in (position,
    depth) order, temperature and top-p per depth, guidance."""
    torch.manual_seed(4)
    model = tiny_rq(vocab_size=2, code_shape=[2, 2, 2], dim=16, n_layer=1, n_depth_layer=1)
    torch.nn.init.normal_(model.output.weight, std=1.0)
    settings = SamplingSettings(temperature=[0.7, 1.3], top_p=[0.8, 1.0], cfg_scale=1.5, seed=5,
                                speculative=speculative, speculative_window=3)  # fmt: skip
    codes, log_probs = exact_log_probs(model, 1, settings)
    samples = generate(model, torch.full((SAMPLES,), 1), settings)
    statistic, threshold = chi_square(samples, codes, log_probs)
    assert statistic < threshold, (statistic, threshold)


# ---------------------------------------------------------------- one window start per row


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_rows_at_different_positions_decode_as_each_row_alone(arch):
    """`decode_block` with one start per row (the speculative window): each row's contexts equal those of the
    row decoded alone from its own start (keys written per row, causal mask and positions per row)."""
    torch.manual_seed(5)
    model = MODELS[arch]()
    codes = torch.randint(0, model.codebook_size, (3, model.num_positions, model.depth))
    cond, starts, width = torch.tensor([0, 2, 4]), torch.tensor([0, 2, 1]), 3

    def run(rows, start):
        state = model.new_decode_state()
        with torch.no_grad():
            model.prefill(cond[rows], state)
            # every row's history up to its start, as plain steps would have written it
            for p in range(int(torch.as_tensor(start).max())):
                model.decode_block(codes[rows, p : p + 1], p, state)
            begins = torch.as_tensor(start).view(-1).tolist()
            window = torch.stack([codes[r, s : s + width] for r, s in zip(rows.tolist(), begins, strict=True)])
            return model.decode_block(window, start, state)

    together = run(torch.arange(3), starts)
    for row in range(3):
        alone = run(torch.tensor([row]), int(starts[row]))
        torch.testing.assert_close(together[row], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_compiled_speculative_decoding_draws_the_eager_codes(arch):
    """`--compile --speculative`: the window's static shape compiles once; the codes are those of eager steps."""
    torch.manual_seed(6)
    model = MODELS[arch]()
    cond = torch.tensor([0, 1, 2])
    settings = SamplingSettings(top_k=8, cfg_scale=2.0, speculative=True, speculative_window=4, seed=3)
    eager = generate(model, cond, settings)
    assert torch.equal(generate(model, cond, settings, compile=True), eager)
    if model.depth == 1:  # the check and the redraft ran compiled too, not the eager fallback
        from vqar.sampling.compiled import decode_steps

        steps = decode_steps(model, compile=True)
        assert spec._iterate in steps.graphs and steps.compiled


@pytest.mark.slow
def test_the_warm_up_compiles_what_a_speculative_generation_runs():
    """A server warms up at start; its first speculative request must not wait for a compiler (the check after
    each call compiles apart for greedy and drawn codes)."""
    from torch._dynamo.utils import counters

    from vqar.sampling.draw import warm_up

    torch.manual_seed(7)
    model = tiny_gpt()
    settings = SamplingSettings(cfg_scale=2.0, speculative=True, speculative_window=4, seed=1)
    warm_up(model, [2], like=settings, progress=False)
    graphs = counters["stats"]["unique_graphs"]
    generate(model, torch.tensor([0, 1]), settings, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs


# ---------------------------------------------------------------- the switches


def test_vqar_sample_speculative_greedy_draws_the_greedy_images(class_run, tmp_path, capsys):
    import numpy as np

    from vqar.cli import main

    common = ["sample", "--model", str(class_run), "--classes", "1,7", "--n-per-class", "3", "--greedy",
              "--no-images"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--speculative", "--window", "5", "--out", str(tmp_path / "fast")]) == 0
    printed = capsys.readouterr().out
    assert "model calls per image" in printed and "of drafts accepted" in printed
    plain, fast = (np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("plain", "fast"))
    assert np.array_equal(plain, fast)
    with pytest.raises(SystemExit) as refused:  # argparse's one-line usage error
        main([*common, "--speculative", "--window", "0", "--out", str(tmp_path / "bad")])
    assert refused.value.code == 2 and "--window: must be a positive integer" in capsys.readouterr().err


def test_serve_takes_speculative_requests(class_run):
    import vqar
    from vqar.serve.engine import GenerateRequest, SamplingEngine

    model = vqar.load_pretrained(class_run)
    engine = SamplingEngine(model, model.tokenizer, max_images=4, max_batch=4)
    try:
        assert engine.describe()["speculative"] is True
        ask = lambda **s: GenerateRequest(class_id=3, n=2, settings=SamplingSettings(greedy=True, **s))  # noqa: E731
        plain, fast = engine.generate(ask(), 120), engine.generate(ask(speculative=True, speculative_window=4), 120)
        assert torch.equal(plain.images, fast.images)
        assert plain.acceptance_rate is None and fast.acceptance_rate is not None
        assert fast.calls_per_image <= plain.calls_per_image == model.num_positions
    finally:
        engine.close()


def test_the_throughput_bench_refuses_speculative_var_before_building_it(monkeypatch):
    from vqar.eval import throughput

    monkeypatch.setattr(throughput, "build_models", lambda *args: pytest.fail("built the model before refusing"))
    cfg = throughput.BenchConfig(model="VAR-d16", speculative=True)
    with pytest.raises(ValueError, match="speculative=true applies to arch=gpt\\|rq\\|vim, not arch=var"):
        throughput.measure_throughput(cfg, torch.device("cpu"), progress=False)


def test_the_throughput_bench_runs_speculative():
    from vqar.eval.throughput import BenchConfig, measure_throughput

    cfg = BenchConfig(model="GPT-XS", f=8, d=1, c=64, image_size=32, ch=32, batch_size=2, loops=1, warmup=0,
                      speculative=True, window=4)  # fmt: skip
    result = measure_throughput(cfg, torch.device("cpu"), progress=False)
    assert result["code_shape"] == [4, 4] and 1 < result["model_calls_per_image"] <= 16
    assert 0.0 <= result["draft_acceptance_rate"] <= 1.0


def test_decode_statistics_are_each_images_own_whatever_the_batch(class_run, monkeypatch):
    """`vqar serve` answered each request of a batch drawn together with the whole batch's figures, and a compiled
    draw counted the rows that pad its batch to a bucket as images (3 images: 7.8 calls per image, 8.0 eager)."""
    import vqar
    from vqar.sampling import compiled, draw, make_conditions

    model = vqar.load_pretrained(class_run)
    conditions = make_conditions(model, classes=[1, 7, 3], n_per_condition=1)
    settings = SamplingSettings(seed=5, top_k=8, speculative=True, speculative_window=3)
    run = lambda **options: draw(model, conditions, settings, tokenizer=model.tokenizer, progress=False,  # noqa: E731
                                 **options).decode_stats  # fmt: skip
    alone, together = run(batch_size=1), run(batch_size=3)
    assert together.images == 3 and torch.equal(together.per_image, alone.per_image)
    assert torch.equal(together.of(slice(1, 3)).per_image, run(batch_size=1).per_image[1:])
    assert together.drafts_checked > 0 and (together.per_image[:, 0] > 1).all()
    # compiled, 3 images run as a bucket of 4 (the compiler left out: the padding is the compiled path's)
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    monkeypatch.setattr(compiled, "_compiled", compiled.weakref.WeakKeyDictionary())
    padded = run(batch_size=4, compile=True)
    assert padded.images == 3 and torch.equal(padded.per_image, alone.per_image)
