"""Turning logits into codes: temperature, top-k, top-p (nucleus) and classifier-free guidance.

Semantics follow LlamaGen / Hugging Face: guidance acts on raw logits, `uncond + scale * (cond - uncond)`;
then logits are divided by the temperature; top-k keeps logits >= the k-th largest (ties kept); top-p keeps the
smallest set of most likely codes whose probability reaches p (the code that crosses p is kept, so at least one
always survives).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_sampling_args(
    temperature: float, top_k: int | None, top_p: float | None, cfg_scale: float = 1.0, cfg_interval: int | None = None
) -> None:
    """Raises ValueError for arguments that cannot be sampled with, before any work starts."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no top-k), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or None for no top-p), got {top_p}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if cfg_interval is not None and cfg_interval < -1:
        raise ValueError(f"cfg_interval must be None, -1 (guide every token) or >= 0, got {cfg_interval}")


def per_depth(value, depth: int, name: str) -> list:
    """A setting given once or as one value per depth (residual models), as a list of length `depth`."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != depth:
            raise ValueError(f"{name} has {len(value)} values but the model has depth {depth}")
        return list(value)
    return [value] * depth


def per_depth_settings(depth: int, temperature, top_k, top_p, cfg_scale: float = 1.0,
                       cfg_interval: int | None = None) -> tuple[list, list, list]:  # fmt: skip
    """Checked per-depth lists (temperatures, top-ks, top-ps) from settings given once or one per depth."""
    temps = per_depth(temperature, depth, "temperature")
    ks, ps = per_depth(top_k, depth, "top_k"), per_depth(top_p, depth, "top_p")
    for t, k, p in zip(temps, ks, ps, strict=True):
        check_sampling_args(t, k, p, cfg_scale, cfg_interval)
    return temps, ks, ps


def guide(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on a batch stacked as [conditional; unconditional] -> (B/2, V)."""
    cond, uncond = logits.float().chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Tempered logits with the codes outside top-k / top-p set to -inf."""
    logits = logits / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the code that crosses p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """One code per row of `logits` (B, V): the argmax when greedy, else a draw from the filtered softmax.
    `generator` may be one generator per row, so that each row's draws do not depend on which other rows share
    the batch (the server batches unrelated requests).

    Same distribution as `filter_logits` followed by a softmax draw, computed where it is cheap: top-k first
    selects the k candidates (the temperature does not change their order), top-p then works on those k sorted
    values instead of sorting the whole vocabulary, and the draw inverts the cumulative distribution with one
    uniform number per row (an exact sampler, several times faster on CPU than torch.multinomial)."""
    if greedy:
        return logits.argmax(-1)
    candidates = None
    if top_k is not None and top_k < logits.shape[-1]:
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # sorted, largest first
    logits = logits.float() / max(temperature, 1e-5)
    if top_p is not None and top_p < 1.0:
        if candidates is None:
            logits, candidates = torch.sort(logits, dim=-1, descending=True)
        probs = logits.softmax(-1)
        # Drop a code when the codes before it already reach p (the code that crosses p is kept).
        logits = logits.masked_fill(probs.cumsum(-1) - probs > top_p, float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)
    if isinstance(generator, Sequence):
        if len(generator) != len(cdf):
            raise ValueError(f"{len(generator)} generators for {len(cdf)} rows")
        u = torch.cat([torch.rand(1, generator=g, device=cdf.device) for g in generator]).view(-1, 1)
    else:
        u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device)
    u = u * cdf[..., -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1)
    return (choice if candidates is None else candidates.gather(-1, choice)).squeeze(-1)
