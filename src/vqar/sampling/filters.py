"""Turning logits into codes: guidance, temperature, top-k, top-p and the draw, with the semantics stated in
`vqar.sampling.settings`. `filter_logits` is the readable definition (and what the LlamaGen fixtures test);
`sample_logits` draws from the same distribution where it is cheap."""

from __future__ import annotations

import torch


def guide(logits: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance on a batch stacked as [conditional; unconditional] -> (B/2, ..., V), in float32
    (`scale` a number, or a tensor that broadcasts against the logits)."""
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


def _top_k_widened(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest logits of each row, sorted, largest first, and their codes: a few more than k, because
    low-precision logits tie often and every code tied with the k-th is kept."""
    return torch.topk(logits, min(logits.shape[-1], k + max(16, k // 16)), dim=-1)


def _top_k_with_ties(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row and every code tied with the k-th, sorted (a row with fewer than the
    widest row's count is padded with -inf), and their codes. The common case costs one topk (`_top_k_widened`);
    only a row whose ties run past it counts the vocabulary."""
    values, candidates = _top_k_widened(logits, k)
    kth = values[..., k - 1 : k]
    if values.shape[-1] < logits.shape[-1] and bool((values[..., -1:] == kth).any()):
        values, candidates = torch.topk(logits, int((logits >= kth).sum(-1).max()), dim=-1)
    return values.masked_fill(values < kth, float("-inf")), candidates


def _top_k_static(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`_top_k_with_ties` for a compiled step, at shapes that never depend on the values: its fallback is a
    data-dependent branch, a graph break in every step with top-k (1.5x slower at batch 1). The tied codes one
    topk left out are counted instead (None when it took the whole vocabulary), to be drawn from as one column."""
    values, candidates = _top_k_widened(logits, k)
    kth = values.narrow(-1, k - 1, 1)
    values = values.masked_fill(values < kth, float("-inf"))
    if values.shape[-1] == logits.shape[-1]:
        return values, candidates, None
    return values, candidates, (logits == kth).sum(-1, keepdim=True) - (values == kth).sum(-1, keepdim=True)


def _nth_left_out(logits: torch.Tensor, candidates: torch.Tensor, kth: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The code of the n-th (from 0), in vocabulary order, of the codes tied with `kth` that are not candidates."""
    left_out = (logits == kth).scatter(-1, candidates, False)
    return ((left_out.cumsum(-1) == n + 1) & left_out).int().argmax(-1, keepdim=True)


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    uniform: torch.Tensor,
) -> torch.Tensor:
    """One code per row of `logits` (B, V), drawn from the filtered softmax by inverting its cumulative
    distribution at `uniform` (B,), numbers in [0, 1).

    The same distribution as `filter_logits` followed by a softmax, computed where it is cheap: top-k first selects
    the candidates (the temperature does not change their order), top-p then works on those sorted values instead
    of sorting the whole vocabulary, and the inverse-CDF draw is exact and several times faster on CPU than
    torch.multinomial. Because each row uses only its own number, a row's code does not depend on the other rows
    of the batch."""
    candidates = tied = None
    unfiltered = logits
    if top_k is not None and top_k < logits.shape[-1]:
        if torch.compiler.is_compiling():
            logits, candidates, tied = _top_k_static(logits, top_k)
        else:
            logits, candidates = _top_k_with_ties(logits, top_k)
    logits = logits.float() / max(temperature, 1e-5)
    if tied is not None:  # compiled: the tied codes left out, as one last column, each with the k-th's logit
        each = logits[..., top_k - 1 : top_k]
        logits = torch.cat([logits, each + tied.float().log()], dim=-1)  # log(0): no such column
    if top_p is not None and top_p < 1.0:
        if candidates is None:
            logits, candidates = torch.sort(logits, dim=-1, descending=True)
        cumulative = logits.softmax(-1).cumsum(-1)
        before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
        logits = logits.masked_fill(before > top_p, float("-inf"))  # the codes before it already reach p
        if tied is not None:  # of the column's codes, those before which p is not yet reached, as in sorted order
            share = (cumulative[..., -1:] - before[..., -1:]) / tied.clamp_min(1)
            reach = torch.floor((top_p - before[..., -1:]) / share.clamp_min(torch.finfo(share.dtype).tiny)) + 1
            tied = torch.minimum(tied, reach.clamp_min(0).to(tied.dtype))
            logits[..., -1:] = each + tied.float().log()
    cdf = logits.softmax(-1).cumsum(-1)
    u = uniform.to(cdf.device, cdf.dtype).view(-1, 1) * cdf[..., -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1)
    if candidates is None:
        return choice.squeeze(-1)
    listed = candidates.gather(-1, choice.clamp_max(candidates.shape[-1] - 1))
    if tied is None:
        return listed.squeeze(-1)
    # In the column, where u falls picks one of its codes, all equally likely; found only when one is drawn.
    in_column = (choice == candidates.shape[-1]) & (tied > 0)
    start, width = cdf[..., -2:-1], cdf[..., -1:] - cdf[..., -2:-1]
    n = torch.floor((u - start) / width.clamp_min(torch.finfo(width.dtype).tiny) * tied).long()
    n = torch.minimum(n.clamp_min(0), (tied - 1).clamp_min(0))
    kth = unfiltered.gather(-1, candidates[..., top_k - 1 : top_k])
    nth = torch.cond(in_column.any(), _nth_left_out, lambda logits, candidates, kth, n: torch.zeros_like(n),
                     (unfiltered, candidates, kth, n))  # fmt: skip
    return torch.where(in_column, nth, listed).squeeze(-1)
