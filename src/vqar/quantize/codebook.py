"""A learned codebook: nearest-neighbour lookup, EMA or gradient learning, k-means init and dead-code restarts.

The EMA update with Laplace smoothing follows "Neural Discrete Representation Learning" (van den Oord et al., 2017,
appendix) as used by RQ-VAE ("Autoregressive Image Generation using Residual Quantization", Lee et al., CVPR 2022):

    N_k <- decay * N_k + (1 - decay) * n_k          (EMA of assignment counts, `cluster_size_ema`)
    m_k <- decay * m_k + (1 - decay) * sum_{x->k} x  (EMA of assigned vectors, `embed_ema`)
    e_k <- m_k / (n * (N_k + eps) / (n + K * eps)),  n = sum_k N_k

Codes whose EMA count falls below `dead_threshold` are restarted from vectors of the current batch. l2-normalised
lookup (nearest neighbour by cosine similarity) follows ViT-VQGAN (Yu et al., ICLR 2022).

Under torch.distributed the counts and sums are all-reduced, and k-means centroids and restart candidates are
broadcast from rank 0, so every rank keeps an identical codebook (see `sync`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vqar.parallel import sync

# Distances are computed in row chunks so that chunk_rows * K floats stay around 256 MB at most.
_DISTANCE_BUDGET = 64 * 1024 * 1024


class Codebook(nn.Module):
    """`size` vectors of dimension `dim`.

    Args:
        size: number of codes K.
        dim: vector dimension.
        ema: learn the vectors by exponential moving averages (no gradient); otherwise by gradient descent.
        decay: EMA decay.
        eps: Laplace smoothing constant of the EMA update.
        l2_norm: compare and return l2-normalised vectors (the stored weight stays unnormalised).
        kmeans_init: initialise from k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that initialisation.
        restart_dead: replace codes whose EMA assignment count is below `dead_threshold` with batch vectors.
        dead_threshold: EMA count under which a code counts as dead.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        l2_norm: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        restart_dead: bool = True,
        dead_threshold: float = 1.0,
    ):
        super().__init__()
        if size < 2:
            raise ValueError(f"a codebook needs at least 2 codes, got size={size}")
        if dim < 1:
            raise ValueError(f"codebook dim must be positive, got {dim}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.size, self.dim = size, dim
        self.ema, self.decay, self.eps = ema, decay, eps
        self.l2_norm = l2_norm
        self.kmeans_iters = kmeans_iters
        self.restart_dead, self.dead_threshold = restart_dead, dead_threshold

        self.weight = nn.Parameter(torch.randn(size, dim), requires_grad=not ema)
        # Assignment counts are tracked in both modes: they drive dead-code restarts.
        self.register_buffer("cluster_size_ema", torch.zeros(size))
        if ema:
            self.register_buffer("embed_ema", self.weight.detach().clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    def extra_repr(self) -> str:
        mode = "ema" if self.ema else "grad"
        return f"size={self.size}, dim={self.dim}, {mode}, l2_norm={self.l2_norm}"

    # ---------------------------------------------------------------- lookup
    def vectors(self) -> torch.Tensor:
        """The code vectors as used for lookup, (K, dim) float32."""
        weight = self.weight.float()
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances (N, K) from rows of `x` (N, dim) to the lookup vectors."""
        return _squared_distances(x.float(), self.vectors())

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of `x` (N, dim); ties go to the lowest index."""
        return _nearest(x.float(), self.vectors())

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors for int64 `codes` of any shape: (*codes.shape, dim). Callers validate user input."""
        return F.embedding(codes, self.vectors())

    # ---------------------------------------------------------------- learning
    @torch.no_grad()
    def maybe_init(self, x: torch.Tensor | Callable[[], torch.Tensor], items: int | None = None) -> None:
        """k-means initialisation from `x` (N, dim) the first time any rank asks for it; `x` may be a function
        that makes the vectors, called only then. `items`: the number of images whose rows `x` holds (item-major),
        so that the vectors of every rank's images are drawn from as one process would draw from the whole batch."""
        if not sync.any_rank(not bool(self.initialized), self.weight.device):
            return
        if callable(x):
            x = x()
        elif items is not None:  # every rank gathers, one with an empty batch too
            x = sync.gather_batch(x, items)
        x = _finite_rows(x.float())
        centroids = kmeans(x, self.size, self.kmeans_iters, self.l2_norm) if len(x) else self.vectors()
        sync.broadcast_(centroids)
        self.weight.data.copy_(centroids)
        if self.ema:
            self.embed_ema.copy_(centroids)
            # Count the fresh centroids as alive so the first EMA step does not restart them all.
            self.cluster_size_ema.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(self, x: torch.Tensor, codes: torch.Tensor,
               restart_pool: Callable[[], torch.Tensor] | None = None, items: int | None = None) -> None:  # fmt: skip
        """One training step of codebook statistics from lookup-space vectors `x` (N, dim) assigned to `codes`.
        Dead codes restart from rows of `restart_pool()` (default `x`, gathered from every rank as `maybe_init`
        does with `items`), called only when there are dead codes: a multi-scale quantizer draws a pool with every
        scale equally represented, so that the few vectors of its coarse scales get codes too."""
        # A non-finite row (one NaN latent of an overflowing step) is left out: in the running sums it would poison
        # the codebook for good, while the training loop skips that step. Its code is sent to an extra slot that
        # is then dropped: no sync, and no pass over the vectors.
        x = x.float()
        slots = torch.where(_finite_row_mask(x), codes, self.size)
        counts = torch.bincount(slots, minlength=self.size + 1)[: self.size].float()
        sums = None
        if self.ema:
            sums = torch.zeros(self.size + 1, self.dim, device=x.device).index_add_(0, slots, x)[: self.size]
        sync.all_reduce_sum_(*(t for t in (counts, sums) if t is not None))

        self.cluster_size_ema.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.ema:
            self.embed_ema.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        if self.restart_dead:
            self._restart_dead_codes(x, restart_pool, items)
        if self.ema:
            n = self.cluster_size_ema.sum()
            smoothed = n * (self.cluster_size_ema + self.eps) / (n + self.size * self.eps)
            self.weight.data.copy_(self.embed_ema / smoothed.unsqueeze(1))

    def _restart_dead_codes(self, x: torch.Tensor, pool: Callable[[], torch.Tensor] | None = None,
                            items: int | None = None) -> None:  # fmt: skip
        dead = self.cluster_size_ema < self.dead_threshold
        if not sync.any_rank(bool(dead.any()), x.device):
            return
        if pool is not None:
            x = pool().float()
        elif items is not None:  # every rank gathers, one with an empty batch too
            x = sync.gather_batch(x, items)
        x = _finite_rows(x)
        candidates = sample_vectors(x, self.size) if len(x) else self.weight.detach().float().clone()
        sync.broadcast_(candidates)
        column = dead.unsqueeze(1)
        if self.ema:
            self.embed_ema.copy_(torch.where(column, candidates, self.embed_ema))
        else:
            self.weight.data.copy_(torch.where(column, candidates, self.weight.data.float()))
        self.cluster_size_ema.copy_(torch.where(dead, torch.ones_like(self.cluster_size_ema), self.cluster_size_ema))


def _finite_row_mask(x: torch.Tensor) -> torch.Tensor:
    """Whether each row of `x` (N, dim) is free of NaN and infinity: a row's sum is NaN or infinite exactly then
    (latents do not reach 1e37), at a tenth of the cost of `isfinite().all(dim=1)` on a CPU."""
    return x.sum(dim=1).isfinite()


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of `x` (N, dim) without a NaN or infinity: what codes may be initialised or restarted from. (Called
    where the caller waits on the device anyway; all rows finite, the usual case, costs no copy.)"""
    finite = _finite_row_mask(x)
    return x if bool(finite.all()) else x[finite]


def code_statistics(codes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(usage, perplexity) of integer `codes` over a codebook of `size`: usage in % of codes that occur."""
    return count_statistics(torch.bincount(codes.reshape(-1), minlength=size).float())


def count_statistics(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(usage, perplexity) of code histograms `counts` (..., size), per histogram: usage in % of codes that occur,
    perplexity exp(entropy)."""
    probs = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    usage = (counts > 0).float().mean(-1) * 100
    perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1))
    return usage, perplexity


def sample_vectors(x: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows drawn from `x` without replacement; with too few rows, tiled with a little noise."""
    n, dim = x.shape
    if n < count:
        repeats = -(-count // n)
        x = x.repeat(repeats, 1)
        x = x + torch.randn_like(x) * (0.01 / dim**0.5)
    return x[torch.randperm(len(x), device=x.device)[:count]]


def kmeans(x: torch.Tensor, k: int, iters: int, l2_norm: bool = False) -> torch.Tensor:
    """Lloyd's k-means on rows of `x`; spherical (unit-norm centroids) when `l2_norm`. Returns (k, dim)."""
    if l2_norm:
        x = F.normalize(x, dim=-1)
    centroids = sample_vectors(x, k)
    for _ in range(iters):
        assign = _nearest(x, centroids)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        # Empty clusters keep their previous centroid.
        centroids = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp_min(1).unsqueeze(1), centroids)
        if l2_norm:
            centroids = F.normalize(centroids, dim=-1)
    return centroids


def _squared_distances(x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    x_sq = x.pow(2).sum(1, keepdim=True)
    v_sq = vectors.pow(2).sum(1)
    return torch.addmm(x_sq + v_sq, x, vectors.t(), alpha=-2.0)


def _nearest(x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    rows = max(1, _DISTANCE_BUDGET // max(1, len(vectors)))
    if len(x) <= rows:
        return _squared_distances(x, vectors).argmin(1)
    return torch.cat([_squared_distances(chunk, vectors).argmin(1) for chunk in x.split(rows)])
