"""Building blocks shared by the autoregressive models: RMSNorm, SwiGLU, 2D rotary embeddings, a static KV cache,
causal self-attention that uses it, and the pre-LN GPT-2 block of the RQ-Transformer and VIM.

The cache is the gpt-fast kind: tensors allocated once per generation for the whole sequence, written in place
at the current position; a decode step attends to the filled prefix only (a view, no copy, no padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 ("Root Mean Square Layer Normalization", Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def swiglu_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """LLaMA's FFN width: 2/3 of 4*dim, optionally scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * -(-hidden // multiple_of)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) ("GLU Variants Improve Transformer", Shazeer 2020)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def rope_2d_table(height: int, width: int, head_dim: int, base: float, prefix: int) -> torch.Tensor:
    """Cos/sin table (prefix + height*width, head_dim/2, 2) of LlamaGen's 2D RoPE.

    Rotation pairs are interleaved channels (2m, 2m+1). The first head_dim/4 pairs rotate by row * freq, the last
    head_dim/4 by column * freq, with freq_k = base^(-2k / (head_dim/2)). The `prefix` rows (condition tokens) are
    all zero, so those tokens' queries and keys are multiplied by 0, exactly as upstream does.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = 1.0 / base ** (torch.arange(quarter, dtype=torch.float32) * 2 / (head_dim // 2))
    rows = torch.outer(torch.arange(height, dtype=torch.float32), freqs)  # (h, hd/4)
    cols = torch.outer(torch.arange(width, dtype=torch.float32), freqs)  # (w, hd/4)
    angles = torch.cat(
        [rows[:, None, :].expand(height, width, quarter), cols[None, :, :].expand(height, width, quarter)], dim=-1
    ).reshape(height * width, 2 * quarter)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    return torch.cat([torch.zeros(prefix, 2 * quarter, 2), table])


def rotation_table(table: torch.Tensor) -> torch.Tensor:
    """`apply_rope`'s layout (L, 2, head_dim) of a cos/sin table (L, head_dim/2, 2): each channel's cosine, then
    its signed sine (-sin for the first channel of a pair, +sin for the second)."""
    cos, sin = table.unbind(-1)
    return torch.stack([cos.repeat_interleave(2, -1), torch.stack([-sin, sin], -1).flatten(-2)], dim=-2)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotates each channel pair (x0, x1) of x (B, L, H, head_dim) to (x0 cos - x1 sin, x1 cos + x0 sin), in
    float32, by a `rotation_table` (L, 2, head_dim), or (B, L, 2, head_dim) with rows of their own.

    As x * cos + swap(x) * signed sin: three kernels instead of pair-by-pair arithmetic's nine, which is a large
    share of a small decode step on a CPU; a - b and a + (-b) round alike, so the result is the same to the bit."""
    table = table if table.dim() == 4 else table[None]
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (x32 * table[:, :, None, 0] + swapped * table[:, :, None, 1]).type_as(x)


class KVCache:
    """Keys and values of one attention layer for a whole generation, (B, heads, max_len, head_dim).

    Allocated on the first write. On GPUs it takes the dtype of the keys (bf16 under autocast halves its memory).
    On CPUs a low-precision run still caches float32: single-query attention over the cache is memory-bound there,
    and CPU bf16 batched matmuls over it run about 3x slower than float32 ones (measured in
    `benchmarks/sampling.py`, where a bf16 cache made the 16x16 GPT slower than fp32)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v (B, H, L, hd) at positions [start, start + L) and returns the filled prefix. A position
        given as a tensor (1,) is a step of the compiled decoder: the L keys are written from there and the whole
        cache is returned (static shapes; attention masks the positions not yet written)."""
        if isinstance(start, torch.Tensor):
            if self.k is None or self.k.shape[0] != k.shape[0]:
                raise ValueError("a decode step at a position tensor writes into a cache that the prefill allocated")
            if start.numel() > 1:  # one position per row (a speculative window): row b writes from start[b]
                index = start.view(-1, 1) + torch.arange(k.shape[2], device=start.device)  # (B, L)
                rows = torch.arange(k.shape[0], device=start.device).view(-1, 1)
                self.k[rows, :, index] = k.transpose(1, 2).to(self.k.dtype)
                self.v[rows, :, index] = v.transpose(1, 2).to(self.v.dtype)
                return self.k, self.v
            index = start.reshape(1) + torch.arange(k.shape[2], device=start.device) if k.shape[2] > 1 else start
            self.k.index_copy_(2, index, k.to(self.k.dtype))
            self.v.index_copy_(2, index, v.to(self.v.dtype))
            return self.k, self.v
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        dtype = cache_dtype(k)
        if self.k is None or self.k.shape[0] != k.shape[0] or self.k.dtype != dtype:
            # Zeros, not empty memory: a compiled step reads the whole cache, and a NaN left in memory at a masked
            # position would still turn 0 * NaN into NaN.
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k = torch.zeros(shape, dtype=dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=dtype, device=v.device)
            if k.is_cuda:  # compiled steps write into these in place: CUDA graphs may keep them as static inputs
                torch._dynamo.mark_static_address(self.k)
                torch._dynamo.mark_static_address(self.v)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache | None,
    start: int | torch.Tensor,
    dropout: float,
) -> torch.Tensor:
    """Attention of q (B, H, L, hd) over the keys so far. Without a cache: plain causal attention. With one: the
    new keys are cached at `start`; a single query (decoding) attends to the whole filled prefix, several queries
    attend causally (a prefill from position 0, or a block of L codes fed at once: query i sees the cache up to
    `start + i`). A tensor `start` (a compiled step, or one start per row) goes to `attend_written`."""
    if cache is not None:
        cached_k, cached_v = cache.update(start, k, v)
        if isinstance(start, torch.Tensor):
            return attend_written(q, cached_k, cached_v, start)
        if q.shape[2] == 1 or start != 0:
            k, v = cached_k, cached_v
        if start != 0 and q.shape[2] > 1:  # a block of codes after the prefill
            return _sdpa(q, k, v, _visible(q, k.shape[2], start))
    if q.shape[2] == 1:
        return _attend(q, k, v, None)
    k, v = _share_heads(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)


# How a compiled CPU step attends over its static cache, measured on the demo's models (benchmarks/README.md,
# "Attention in a compiled step"). From this many cached key elements (rows x heads x cache length x head size) it
# calls the opaque op, whose dispatch costs ~0.1 ms per layer: the 16x16 GPT's graph wins up to 16 rows, the op from
# 32. Below it, a cache of at most SHORT_CACHE positions keeps a single query's two products, which inductor fuses
# into loops that beat SDPA there (the 4x4 RQ-Transformer), and a longer one takes SDPA (the 8x8 and 16x16 GPTs).
OPAQUE_ATTENTION_MIN = 2**20
SHORT_CACHE = 32


def attend_written(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Attention of q (B, H, L, hd) over a whole static cache k, v (B, H, T, hd) whose queries stand at `start`
    + i (`start` (1,), or (B,) one per row): query i sees the keys up to its own position.

    On a CPU only the written prefix of the cache is read, as in an eager step. A compiled step cannot slice it (its
    shapes are static), so at large batches it calls this as one opaque op (`vqar::attend_written`): left to the
    compiler, the attention read the whole cache (twice the work on average) and a single query's two products
    became slow fused loops (inductor lowers a one-row batched matmul to a reduction), 3x slower than eager
    sampling at batch 64. At small batches the op's dispatch costs more than it saves: the graph keeps
    attention over the whole cache, masked. On a GPU the cache is read whole: its written length would be a sync
    (and a CUDA graph cannot read it)."""
    if q.device.type != "cpu":
        return _attend(q, k, v, _visible(q, k.shape[2], start))
    if not torch.compiler.is_compiling():
        return _attend_written(q, k, v, start)
    if q.shape[0] * k.shape[1] * k.shape[2] * k.shape[3] >= OPAQUE_ATTENTION_MIN:
        return _attend_written_op(q, k, v, start)
    visible = _visible(q, k.shape[2], start)
    return _attend(q, k, v, visible) if k.shape[2] <= SHORT_CACHE else _sdpa(q, k, v, visible)


def _attend_written(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    end = min(int(start.max()) + q.shape[2], k.shape[2])  # the keys after the last query are masked anyway
    return _attend(q, k[:, :, :end], v[:, :, :end], _visible(q, end, start))


@torch.library.custom_op("vqar::attend_written", mutates_args=())
def _attend_written_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    return _attend_written(q, k, v, start)


@_attend_written_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


def _visible(q: torch.Tensor, keys: int, start: int | torch.Tensor) -> torch.Tensor:
    """Which of `keys` cached keys each query sees: (L, keys), or (B, 1, L, keys) for one start per row."""
    offsets = torch.arange(q.shape[2], device=q.device)[:, None]  # (L, 1)
    query_at = start.view(-1, 1, 1, 1) + offsets if _per_row(start) else start + offsets
    return torch.arange(keys, device=q.device) <= query_at  # (L, keys) or (B, 1, L, keys)


def _share_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: each key/value head serves a group of query heads."""
    if k.shape[1] == q.shape[1]:
        return k, v
    groups = q.shape[1] // k.shape[1]
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """Attention of q over cached k, v (in the cache's dtype), each query seeing the keys `visible` marks (all
    where None)."""
    if q.shape[2] == 1 and q.device.type == "cpu":
        # One query over the cached prefix: two batched matmuls beat SDPA's kernels at this shape on CPU.
        k, v = _share_heads(q, k, v)
        scores = torch.matmul(q.to(k.dtype), k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        return torch.matmul(scores.softmax(-1), v).to(q.dtype)
    return _sdpa(q, k, v, visible)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    k, v = _share_heads(q, k, v)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=visible)


def rows_at(table: torch.Tensor, index: int | torch.Tensor, count: int = 1) -> torch.Tensor:
    """Rows [index, index + count) of `table`: a slice for an int, a gather for a position tensor (a compiled
    step, whose position is data rather than a constant). One index per row, (B,), gives (B, count, ...)."""
    if _per_row(index):
        return table[index.view(-1, 1) + torch.arange(count, device=index.device)]
    if isinstance(index, torch.Tensor):
        return table.index_select(0, index.reshape(1) + torch.arange(count, device=index.device))
    return table[index : index + count]


def _per_row(start: int | torch.Tensor) -> bool:
    """Whether a decode step's position is one per row (B,) rather than one for the batch."""
    return isinstance(start, torch.Tensor) and start.numel() > 1


def cache_dtype(keys: torch.Tensor) -> torch.dtype:
    """The dtype a KV cache stores `keys` in; see `KVCache`."""
    if keys.device.type == "cpu" and keys.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return keys.dtype


class SigmoidGELU(nn.Module):
    """The sigmoid approximation of GELU (Hendrycks & Gimpel, 2016), used by some released RQ models."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


GELUS = {"exact": nn.GELU, "sigmoid": SigmoidGELU}  # a config's `gelu`, for the GPT-2 blocks of VIM and RQ


def check_gelu(gelu: str) -> None:
    if gelu not in GELUS:
        raise ValueError(f"gelu must be {' or '.join(map(repr, GELUS))}, got {gelu!r}")


class GPT2Attention(nn.Module):
    """Multi-head attention with separate biased query / key / value projections (GPT-2; the RQ release)."""

    def __init__(self, dim: int, n_head: int, bias: bool, attn_dropout_p: float, resid_dropout_p: float):
        super().__init__()
        self.n_head = n_head
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=bias) for _ in range(4))
        self.attn_dropout_p = attn_dropout_p
        self.resid_dropout = nn.Dropout(resid_dropout_p)

    def forward(self, x: torch.Tensor, cache: KVCache | None, start: int) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = (p(x).view(b, length, self.n_head, -1).transpose(1, 2) for p in (self.wq, self.wk, self.wv))
        out = causal_attention(q, k, v, cache, start, self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, length, dim)))


class GPT2FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool, gelu: str, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        check_gelu(gelu)  # anything else was built as the sigmoid form without a word
        self.act = GELUS[gelu]()
        self.w2 = nn.Linear(hidden, dim, bias=bias)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(self.act(self.w1(x))))


class GPT2Block(nn.Module):
    """Pre-LN block: x + attention(LN(x)), then + MLP(LN(.)) with a `mlp_ratio`-wide GELU MLP. `cfg` needs dim,
    n_head, mlp_ratio, mlp_bias, attn_bias, gelu ("exact" or "sigmoid") and the dropout rates."""

    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = nn.LayerNorm(cfg.dim)
        self.attention = GPT2Attention(cfg.dim, cfg.n_head, cfg.attn_bias, cfg.attn_dropout_p, cfg.resid_dropout_p)
        self.ffn_norm = nn.LayerNorm(cfg.dim)
        self.feed_forward = GPT2FeedForward(cfg.dim, cfg.mlp_ratio * cfg.dim, cfg.mlp_bias, cfg.gelu,
                                            cfg.resid_dropout_p)  # fmt: skip

    def forward(self, x: torch.Tensor, cache: KVCache | None, start: int) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cache, start)
        return x + self.feed_forward(self.ffn_norm(x))


def run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, caches: list[KVCache] | None = None, start: int = 0, **inputs
) -> torch.Tensor:
    """x through every block; with caches, block i reads and writes caches[i] from position `start`. `inputs`
    (a rotary table, say) go to every block."""
    for i, block in enumerate(blocks):
        x = block(x, cache=caches[i] if caches is not None else None, start=start, **inputs)
    return x
