"""Generation loops over a static KV cache: one prefill of the condition, then one decode step per code.

For the GPT a step is one token. For the RQ-Transformer a step is one position: D depth-transformer steps (with
their own short cache, reused at every position) then one spatial step. With classifier-free guidance the batch
is run as [conditional; unconditional] and the logits are combined before filtering. `cfg_interval` has
LlamaGen's meaning: the first code is always guided, decode step i (producing code i + 1) is guided while
i <= cfg_interval; None (or -1) guides every code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from vqar.sampling.filters import check_sampling_args, guide, per_depth_settings, sample_logits


def _guided_at(index: int, cfg_scale: float, cfg_interval: int | None) -> bool:
    if cfg_scale == 1.0:
        return False
    return index == 0 or cfg_interval is None or cfg_interval < 0 or index - 1 <= cfg_interval


def _condition_ids(model, embedding, cond, batch_size, cfg_scale) -> tuple[torch.Tensor, int]:
    ids = embedding.ids(cond, batch_size)
    if cfg_scale != 1.0:
        return torch.cat([ids, embedding.null_ids(len(ids))]), len(ids)
    return ids, len(ids)


def _cfg_rows(x: torch.Tensor, doubled: bool) -> torch.Tensor:
    """The same rows for both halves of a [conditional; unconditional] batch."""
    return torch.cat([x, x]) if doubled else x


def _pick(logits: torch.Tensor, n: int, guided: bool, scale: float) -> torch.Tensor:
    """The logits to sample from: guided, or the conditional half when the batch is doubled."""
    if guided:
        return guide(logits, scale)
    return logits[:n]


@torch.no_grad()
def generate_gpt(
    model,
    cond: torch.Tensor | None = None,
    *,
    batch_size: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    cfg_interval: int | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
    use_cache: bool = True,
) -> torch.Tensor:
    """Samples codes (B, h, w) from a `GPT`. `cond`: class ids (B,), or None with `batch_size` when unconditional.
    `use_cache=False` recomputes the whole prefix at every step (a reference for tests and benchmarks)."""
    check_sampling_args(temperature, top_k, top_p, cfg_scale, cfg_interval)
    ids, n = _condition_ids(model, model.cls_embedding, cond, batch_size, cfg_scale)
    doubled = cfg_scale != 1.0
    caches = model.new_caches()
    total = model.cfg.num_tokens
    tokens = torch.empty(n, total, dtype=torch.long, device=ids.device)
    logits = (
        model.prefill(ids, caches) if use_cache else model.next_token_logits(ids, _cfg_rows(tokens[:, :0], doubled))
    )
    for t in tqdm(range(total), desc="sampling", disable=not progress, leave=False):
        chosen = _pick(logits, n, _guided_at(t, cfg_scale, cfg_interval), cfg_scale)
        tokens[:, t] = sample_logits(chosen, temperature, top_k, top_p, greedy, generator)
        if t + 1 < total:
            if use_cache:
                logits = model.decode_one_token(_cfg_rows(tokens[:, t], doubled), t, caches)
            else:
                logits = model.next_token_logits(ids, _cfg_rows(tokens[:, : t + 1], doubled))
    return tokens.view(n, *model.code_shape)


@torch.no_grad()
def generate_rq(
    model,
    cond: torch.Tensor | None = None,
    *,
    batch_size: int | None = None,
    temperature: float | Sequence[float] = 1.0,
    top_k: int | None | Sequence[int | None] = None,
    top_p: float | None | Sequence[float | None] = None,
    cfg_scale: float = 1.0,
    cfg_interval: int | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
    use_cache: bool = True,
) -> torch.Tensor:
    """Samples codes (B, h, w, D) from an `RQTransformer`; temperature, top_k and top_p may be per-depth lists.
    `use_cache=False` recomputes both transformers from scratch at every step."""
    depth = model.depth
    temps, ks, ps = per_depth_settings(depth, temperature, top_k, top_p, cfg_scale, cfg_interval)
    ids, n = _condition_ids(model, model.cond_emb, cond, batch_size, cfg_scale)
    doubled = cfg_scale != 1.0
    body_caches, head_caches = model.new_caches()
    positions = model.cfg.num_positions
    codes = torch.empty(n, positions, depth, dtype=torch.long, device=ids.device)
    context = (
        model.prefill(ids, body_caches) if use_cache else model.context_uncached(ids, _cfg_rows(codes[:, :0], doubled))
    )
    for p in tqdm(range(positions), desc="sampling", disable=not progress, leave=False):
        guided = _guided_at(p, cfg_scale, cfg_interval)
        running = None
        for d in range(depth):
            if use_cache:
                logits = model.depth_logits(context, running, d, head_caches)
            else:
                logits = model.depth_logits_uncached(context, _cfg_rows(codes[:, p, :d], doubled))
            chosen = _pick(logits, n, guided, cfg_scale)
            codes[:, p, d] = sample_logits(chosen, temps[d], ks[d], ps[d], greedy, generator)
            if d + 1 < depth:
                vector = model.embed_code_at(_cfg_rows(codes[:, p, d], doubled), d)
                running = vector if running is None else running + vector
        if p + 1 < positions:
            if use_cache:
                context = model.decode_one_position(_cfg_rows(codes[:, p], doubled), p, body_caches)
            else:
                context = model.context_uncached(ids, _cfg_rows(codes[:, : p + 1], doubled))
    return codes.view(n, *model.code_shape)
