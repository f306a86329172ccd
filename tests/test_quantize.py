"""Quantizers against direct computations, hand-computed EMA steps and the official RQ-VAE fixture."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vqar.quantize import (
    Codebook,
    QuantizerConfig,
    ResidualQuantizer,
    VectorQuantizer,
    build_quantizer,
    kmeans,
)
from vqar.quantize.codebook import code_statistics
from vqar.quantize.vector import entropy_penalty


def _brute_force_codes(x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """argmin over explicit pairwise distances, in float64."""
    d = ((x.double()[:, None, :] - vectors.double()[None]) ** 2).sum(-1)
    return d.argmin(1)


def test_vector_quantizer_matches_direct_computation():
    vq = VectorQuantizer(64, 8, ema=False, restart_dead=False).eval()
    z = torch.randn(3, 5, 7, 8)
    out = vq(z)
    flat = z.reshape(-1, 8)
    expected = _brute_force_codes(flat, vq.codebook.weight.detach())
    assert out.codes.shape == (3, 5, 7)
    assert torch.equal(out.codes.reshape(-1), expected)
    assert torch.allclose(out.quantized.reshape(-1, 8), vq.codebook.weight[expected], atol=1e-6)
    commitment = ((flat - vq.codebook.weight[expected]) ** 2).mean()
    assert torch.allclose(out.commitment, commitment)
    # Codebook loss + beta * commitment for a gradient-learned codebook: the two terms are equal in value.
    assert torch.allclose(out.loss, (1 + vq.beta) * commitment)


def test_straight_through_gradient_is_identity():
    for quantizer in (VectorQuantizer(32, 6), ResidualQuantizer(32, 6, 3)):
        quantizer.eval()
        z = torch.randn(4, 6, requires_grad=True)
        weights = torch.randn(4, 6)
        (quantizer(z).quantized * weights).sum().backward()
        assert torch.allclose(z.grad, weights), type(quantizer).__name__


def test_commitment_gradient_pulls_latents_to_codes():
    vq = VectorQuantizer(16, 4, beta=0.25).eval()
    z = torch.randn(10, 4, requires_grad=True)
    out = vq(z)
    out.loss.backward()
    q = vq.codebook.weight[out.codes]
    assert torch.allclose(z.grad, 0.25 * 2 * (z - q).detach() / z.numel(), atol=1e-7)


def test_gradient_codebook_gets_only_the_codebook_loss_gradient():
    # d/de_k of mean((e_k - sg(z))^2) over the vectors assigned to k; the commitment term is detached from the codes.
    vq = VectorQuantizer(16, 4, beta=0.25, ema=False, restart_dead=False).eval()
    z = torch.randn(30, 4)
    vq(z).loss.backward()
    weight = vq.codebook.weight.detach()
    codes = _brute_force_codes(z, weight)
    expected = torch.zeros(16, 4).index_add_(0, codes, 2 * (weight[codes] - z) / z.numel())
    assert torch.allclose(vq.codebook.weight.grad, expected, atol=1e-7)


def reference_entropy_penalty(affinity: torch.Tensor, temperature: float) -> float:
    """Mean entropy of each row's softmax(affinity / T) minus the entropy of their mean, in float64."""
    probs = (affinity.double() / temperature).softmax(-1)
    per_row = -(probs * probs.log()).sum(-1).mean()
    mean = probs.mean(0)
    return float(per_row + (mean * mean.log()).sum())


def test_entropy_penalty_matches_a_direct_computation():
    torch.manual_seed(9)
    affinity = torch.randn(12, 6) * 2
    expected = reference_entropy_penalty(affinity, 0.5)
    assert entropy_penalty(affinity, 0.5).item() == pytest.approx(expected, abs=1e-4)  # log(p + 1e-5) inside
    # Confident assignments spread over all K codes: 0 - log K, the minimum.
    assert entropy_penalty(torch.eye(6) * 50, 1.0).item() == pytest.approx(-math.log(6), abs=1e-3)
    # Everything on one code: 0 - 0.
    assert entropy_penalty(torch.eye(6)[[0, 0, 0]] * 50, 1.0).item() == pytest.approx(0.0, abs=1e-3)


def test_entropy_term_is_added_to_the_training_loss_with_its_weight():
    torch.manual_seed(10)
    vq = VectorQuantizer(8, 4, ema=False, restart_dead=False, entropy_weight=0.1, entropy_temperature=0.5).train()
    weight = vq.codebook.weight.detach().clone()
    z = torch.randn(20, 4)
    out = vq(z)
    distances = ((z.double()[:, None] - weight.double()[None]) ** 2).sum(-1)
    commitment = distances.min(1).values.sum() / z.numel()
    expected = (1 + vq.beta) * commitment + 0.1 * reference_entropy_penalty(-distances, 0.5)
    assert out.loss.item() == pytest.approx(float(expected), rel=1e-4)
    assert vq.eval()(z).loss.item() == pytest.approx(float((1 + vq.beta) * commitment), rel=1e-5)  # training only


def test_gradient_codebook_learns_and_ema_codebook_does_not():
    grad_vq = VectorQuantizer(16, 4, ema=False, restart_dead=False).train()
    grad_vq(torch.randn(32, 4)).loss.backward()
    assert grad_vq.codebook.weight.grad is not None and grad_vq.codebook.weight.grad.abs().sum() > 0
    ema_vq = VectorQuantizer(16, 4, ema=True).train()
    assert not ema_vq.codebook.weight.requires_grad


@pytest.mark.parametrize("eps", [1e-5, 0.5])  # 0.5: the Laplace smoothing moves the codes by ~10%, far past rtol
def test_ema_update_matches_hand_computed_step(eps):
    torch.manual_seed(1)
    size, dim, decay = 6, 3, 0.9
    vq = VectorQuantizer(size, dim, decay=decay, eps=eps, restart_dead=False).train()
    cb = vq.codebook
    weight0 = torch.randn(size, dim)
    counts0 = torch.rand(size) + 2
    embed0 = weight0 * counts0[:, None]
    cb.weight.data.copy_(weight0)
    cb.cluster_size_ema.copy_(counts0)
    cb.embed_ema.copy_(embed0)
    z = torch.randn(20, dim)
    out = vq(z)

    codes = [min(range(size), key=lambda k, v=v: float(((v - weight0[k]) ** 2).sum())) for v in z]
    assert out.codes.tolist() == codes
    n_k = torch.tensor([codes.count(k) for k in range(size)], dtype=torch.float64)
    sums = torch.zeros(size, dim, dtype=torch.float64)
    for v, k in zip(z.double(), codes, strict=True):
        sums[k] += v
    cs = decay * counts0.double() + (1 - decay) * n_k
    ee = decay * embed0.double() + (1 - decay) * sums
    n = cs.sum()
    weight = ee / (n * (cs + eps) / (n + size * eps))[:, None]
    assert torch.allclose(cb.cluster_size_ema.double(), cs, rtol=1e-6)
    assert torch.allclose(cb.embed_ema.double(), ee, rtol=1e-5, atol=1e-7)
    assert torch.allclose(cb.weight.double(), weight, rtol=1e-5, atol=1e-7)
    # The returned codes are the ones looked up before the update.
    assert torch.allclose(out.quantized, weight0[out.codes], atol=1e-6)


def test_eval_mode_and_encode_leave_the_codebook_alone():
    vq = VectorQuantizer(8, 2).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(50, 2))
    for key, value in vq.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_dead_codes_restart_from_batch_vectors():
    torch.manual_seed(2)
    vq = VectorQuantizer(8, 4, decay=0.99, restart_dead=True, dead_threshold=1.0).train()
    cb = vq.codebook
    cb.cluster_size_ema.copy_(torch.tensor([50.0, 50.0, 50, 50, 0, 0, 0, 0]))
    cb.embed_ema.copy_(cb.weight.detach() * cb.cluster_size_ema[:, None])
    live_before = cb.weight.detach()[:4].clone()
    z = torch.randn(64, 4) * 0.01 + live_before[0]  # everything maps to code 0
    vq(z)
    restarted = cb.weight.detach()[4:]
    # Each restarted code now sits on (a rescaled copy of) one of the batch vectors.
    nearest = torch.cdist(restarted, z).min(1).values
    assert nearest.max() < 0.05
    assert torch.allclose(cb.cluster_size_ema[4:], torch.ones(4))
    assert torch.allclose(cb.weight.detach()[1:4], live_before[1:4], rtol=0.05)


@pytest.mark.parametrize(("ema", "kmeans_init"), [(True, False), (True, True), (False, False)])
def test_a_non_finite_latent_is_left_out_of_the_codebook_statistics(ema, kmeans_init):
    """One NaN latent (an overflowing step, which the training loop then skips) went into the EMA sums inside the
    forward and poisoned the codebook for good: every later step was NaN too. Its row is now left out of the
    statistics, the k-means initialisation and the restart pool: the step is the one without that row."""
    torch.manual_seed(3)
    x = torch.randn(40, 4)
    poisoned = x.clone()
    poisoned[7, 1] = float("nan")
    poisoned[12] = float("inf")
    kept = torch.ones(40, dtype=torch.bool)
    kept[[7, 12]] = False
    states = []
    for rows in (poisoned, x[kept]):
        torch.manual_seed(4)
        book = Codebook(16, 4, ema=ema, kmeans_init=kmeans_init, restart_dead=True, dead_threshold=1.0)
        book.cluster_size_ema[8:] = 0  # half the codes dead: the restart draws from the batch
        book.maybe_init(rows)
        codes = book.nearest(rows)
        book.update(rows, codes)
        states.append(book.state_dict())
    for name, value in states[0].items():
        assert value.isfinite().all() if value.is_floating_point() else True, name
        assert torch.equal(value, states[1][name]), name
    quantizer = ResidualQuantizer(16, 4, depth=2).train()
    quantizer(poisoned.view(2, 4, 5, 4))
    assert all(value.isfinite().all() for value in quantizer.state_dict().values() if value.is_floating_point())
    assert quantizer.eval()(x.view(2, 4, 5, 4)).quantized.isfinite().all()


def test_restart_for_gradient_codebooks_copies_batch_vectors():
    vq = VectorQuantizer(8, 4, ema=False, restart_dead=True).train()
    z = torch.randn(40, 4) + 10  # far from the N(0, 1) initial codes
    vq(z)
    # At step 1 every count is (1 - decay) * n_k < 1, so all codes restart from batch vectors.
    assert torch.cdist(vq.codebook.weight.detach(), z).min(1).values.max() < 1e-5


def test_kmeans_init_finds_clusters():
    torch.manual_seed(3)
    centers = torch.tensor([[5.0, 0], [-5, 0], [0, 5], [0, -5]])
    x = (centers[:, None, :] + 0.1 * torch.randn(4, 100, 2)).reshape(-1, 2)
    vq = VectorQuantizer(4, 2, kmeans_init=True, restart_dead=False).train()
    assert not bool(vq.codebook.initialized)
    vq(x)
    assert bool(vq.codebook.initialized)
    found = vq.codebook.weight.detach()
    assert torch.cdist(centers, found).min(1).values.max() < 0.2
    snapshot = found.clone()
    vq.codebook.maybe_init(torch.randn(10, 2))  # initialises only once
    assert torch.equal(vq.codebook.weight.detach(), snapshot)


def test_kmeans_initialised_codes_count_as_alive_at_the_first_step():
    # The fresh centroids start with an EMA count of 1, so a code that gets any vector at the first step keeps
    # decay * 1 + (1 - decay) * n_k >= 1 and is not restarted (whatever k-means found).
    torch.manual_seed(3)
    centers = torch.tensor([[5.0, 0], [-5, 0], [0, 5], [0, -5]])
    x = (centers[:, None, :] + 0.1 * torch.randn(4, 50, 2)).reshape(-1, 2)
    vq = VectorQuantizer(4, 2, decay=0.99, kmeans_init=True, restart_dead=True, dead_threshold=1.0).train()
    counts = torch.bincount(vq(x).codes, minlength=4).float()
    used = counts > 0
    assert torch.allclose(vq.codebook.cluster_size_ema[used], 0.99 + 0.01 * counts[used])


def test_spherical_kmeans_returns_unit_vectors():
    c = kmeans(torch.randn(200, 5), 8, iters=5, l2_norm=True)
    assert torch.allclose(c.norm(dim=1), torch.ones(8), atol=1e-5)


def test_l2_normalised_factorized_lookup():
    vq = VectorQuantizer(32, 24, lookup_dim=4, l2_norm=True, ema=False, restart_dead=False).eval()
    z = torch.randn(2, 3, 3, 24)
    out = vq(z)
    h = F.normalize(vq.project_in(z.reshape(-1, 24)), dim=-1)
    e = F.normalize(vq.codebook.weight.detach(), dim=-1)
    assert torch.equal(out.codes.reshape(-1), (h @ e.t()).argmax(1))  # nearest = highest cosine similarity
    assert out.quantized.shape == z.shape
    assert torch.allclose(vq.embed(out.codes), out.quantized, atol=1e-5)
    assert sum(p.numel() for p in vq.project_in.parameters()) == 24 * 4 + 4


def test_usage_and_perplexity():
    usage, perplexity = code_statistics(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 8)
    assert usage.item() == pytest.approx(50.0)
    assert perplexity.item() == pytest.approx(4.0)
    usage, perplexity = code_statistics(torch.tensor([0, 1, 1, 1]), 4)  # a code used once counts as used
    assert usage.item() == pytest.approx(50.0)
    assert perplexity.item() == pytest.approx(math.exp(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))))
    rq = ResidualQuantizer(16, 4, 3).eval()
    out = rq(torch.randn(100, 4))
    assert out.usage.shape == (3,) and out.perplexity.shape == (3,)
    for d in range(3):
        expected = len(out.codes[:, d].unique()) / 16 * 100
        assert out.usage[d].item() == pytest.approx(expected)


def test_residual_quantizer_with_one_depth_equals_vector_quantizer():
    torch.manual_seed(4)
    vq = VectorQuantizer(32, 8, decay=0.9, restart_dead=False)
    rq = ResidualQuantizer(32, 8, 1, decay=0.9, restart_dead=False)
    rq.codebook(0).load_state_dict(vq.codebook.state_dict())
    z = torch.randn(6, 4, 4, 8)
    for mode in (False, True):
        vq.train(mode)
        rq.train(mode)
        a, b = vq(z), rq(z)
        assert torch.equal(a.codes, b.codes[..., 0])
        assert torch.allclose(a.quantized, b.quantized)
        assert torch.allclose(a.loss, b.loss) and torch.allclose(a.commitment, b.commitment)
    assert torch.allclose(vq.codebook.weight, rq.codebook(0).weight)


def test_residual_quantization_follows_the_recursion():
    torch.manual_seed(5)
    for shared in (True, False):
        rq = ResidualQuantizer(64, 5, 4, shared_codebook=shared).eval()
        assert len(rq.codebooks) == (1 if shared else 4)
        if not shared:
            assert not torch.equal(rq.codebook(0).weight, rq.codebook(1).weight)
        z = torch.randn(50, 5)
        out = rq(z)
        residual, total = z.clone(), torch.zeros_like(z)
        partial_losses = []
        for d in range(4):
            vectors = rq.codebook(d).weight.detach()
            k = _brute_force_codes(residual, vectors)
            assert torch.equal(out.codes[:, d], k), (shared, d)
            residual = residual - vectors[k]
            total = total + vectors[k]
            partial_losses.append(((z - total) ** 2).mean())
        assert torch.allclose(out.quantized, total, atol=1e-5)
        assert torch.allclose(out.commitment, torch.stack(partial_losses).mean())
        assert torch.allclose(rq.embed(out.codes), total, atol=1e-5)
        assert torch.allclose(rq.embed(out.codes, depth=2), rq.embed_per_depth(out.codes)[:, :2].sum(1))


@pytest.mark.parametrize("ema", [True, False])
def test_residual_training_loss_is_the_cumulative_commitment_of_every_depth(ema):
    # loss = beta * mean_d ||z - sg(sum_{i<=d} e_i)||^2 (+ mean_d ||e_d - sg(r_d)||^2 for a gradient codebook), and
    # its gradient reaches z through every depth's term.
    torch.manual_seed(11)
    rq = ResidualQuantizer(16, 4, 3, beta=0.3, ema=ema, restart_dead=False, shared_codebook=False).eval()
    z = torch.randn(40, 4, requires_grad=True)
    out = rq(z)
    residual, total = z.detach().clone(), torch.zeros(40, 4)
    commitments, codebook_losses, grad = [], [], torch.zeros(40, 4)
    for d in range(3):
        vectors = rq.codebook(d).weight.detach()
        e = vectors[_brute_force_codes(residual, vectors)]
        codebook_losses.append(((e - residual) ** 2).mean())
        residual, total = residual - e, total + e
        commitments.append(((z.detach() - total) ** 2).mean())
        grad += 0.3 / 3 * 2 * (z.detach() - total) / z.numel()
    expected = 0.3 * torch.stack(commitments).mean() + (0 if ema else torch.stack(codebook_losses).mean())
    assert torch.allclose(out.commitment, torch.stack(commitments).mean())
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    assert torch.allclose(z.grad, grad, atol=1e-7)


def test_residual_soft_codes_match_a_direct_computation():
    torch.manual_seed(12)
    rq = ResidualQuantizer(16, 4, 3, shared_codebook=False).eval()
    z = torch.randn(2, 5, 4)
    soft = rq.soft_codes(z, temperature=0.7)
    assert soft.shape == (2, 5, 3, 16)
    residual = z.reshape(-1, 4).double()
    for d in range(3):
        vectors = rq.codebook(d).weight.detach().double()
        distances = ((residual[:, None] - vectors[None]) ** 2).sum(-1)
        assert torch.allclose(soft.reshape(-1, 3, 16)[:, d].double(), (-distances / 0.7).softmax(-1), atol=1e-5), d
        residual = residual - vectors[distances.argmin(1)]


def test_residual_error_falls_with_depth():
    torch.manual_seed(6)
    rq = ResidualQuantizer(128, 4, 6).train()
    z = torch.randn(2048, 4)
    for _ in range(20):  # EMA steps so the codebook fits the residuals
        rq(z)
    rq.eval()
    codes = rq(z).codes
    errors = [((z - rq.embed(codes, depth=d)) ** 2).mean().item() for d in range(1, 7)]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.3 * errors[0]


def test_quantizers_run_in_float32_under_autocast():
    vq = VectorQuantizer(256, 16).eval()
    z = torch.randn(500, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes_bf16 = vq(z).codes
    assert torch.equal(codes_bf16, vq(z).codes)


def test_bad_inputs_raise_clear_errors():
    vq = VectorQuantizer(16, 4)
    rq = ResidualQuantizer(16, 4, 2)
    with pytest.raises(ValueError, match="last dimension 4"):
        vq(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        vq.embed(torch.tensor([0, 16]))
    with pytest.raises(TypeError, match="integer"):
        vq.embed(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="D=2"):
        rq.embed(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="depth must be in"):
        rq.embed(torch.zeros(3, 2, dtype=torch.long), depth=3)
    with pytest.raises(ValueError, match="at least 2 codes"):
        Codebook(1, 4)
    with pytest.raises(ValueError, match="decay"):
        Codebook(8, 4, decay=1.5)
    with pytest.raises(ValueError, match="kind='rq'"):
        build_quantizer(QuantizerConfig(kind="vq", depth=3))
    with pytest.raises(ValueError, match="kind must be one of"):
        build_quantizer(QuantizerConfig(kind="fsq"))


def test_an_l2_normalised_lookup_of_one_dimension_is_refused():
    """Each code normalised to unit length in 1 dimension is +1 or -1: a ViT-VQGAN with lookup_dim=1 trained without
    a word and used 2 of its 512 codes."""
    for fields, what in ((dict(lookup_dim=1), "lookup_dim=1"), (dict(dim=1), "dim=1")):
        with pytest.raises(ValueError, match=f"l2_norm=true puts each code on the unit sphere, which in {what} holds"):
            QuantizerConfig(kind="vq", codebook_size=512, l2_norm=True, **fields).validate()
    QuantizerConfig(kind="vq", codebook_size=512, l2_norm=True, lookup_dim=2).validate()
    QuantizerConfig(kind="vq", codebook_size=512, l2_norm=False, dim=1).validate()
