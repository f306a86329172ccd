"""The generation loop every model samples through, over its static KV cache (gpt-fast's prefill / decode split).

One prefill of the condition, then for each position one `code_logits` step per depth (1 for GPT and VIM, D for
the RQ-Transformer, whose depth steps share a short cache reused at every position) and one `decode_position`
step; the steps run eagerly or compiled (`vqar.sampling.compiled`). With classifier-free guidance the batch runs
as [conditional; null condition] and the logits are combined before filtering. The semantics of every setting are
in `vqar.sampling.settings`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from vqar.ar import ARModel
from vqar.sampling.compiled import decode_steps
from vqar.sampling.filters import guide, sample_logits
from vqar.sampling.settings import DepthSettings, SamplingSettings


def image_noise(model: ARModel, seeds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The uniform numbers (B, positions * depth) that image `index[b]` of a run with seed `seeds[b]` draws its
    codes with: a stream that depends on (seed, index) alone. Drawn on the CPU, so they do not depend on the
    device either."""
    count = model.num_positions * model.depth
    rows = []
    for seed, i in zip(seeds.tolist(), index.tolist(), strict=True):
        state = np.random.SeedSequence([seed, i]).generate_state(2, dtype=np.uint32)
        stream = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        rows.append(torch.rand(count, generator=stream))
    return torch.stack(rows) if rows else torch.empty(0, count)


@dataclass
class Plan:
    """What a generation starts from: validated settings, the filters of each depth, the condition ids (B, ...)
    and the uniform numbers (B, positions * depth) of the draws (None when greedy)."""

    settings: SamplingSettings
    filters: list[DepthSettings]
    ids: torch.Tensor
    noise: torch.Tensor | None


def plan(model: ARModel, cond, settings: SamplingSettings | None, batch_size: int | None, noise) -> Plan:
    """The start of a generation (see `generate` for the arguments); ValueError naming what does not fit."""
    settings = settings or SamplingSettings()
    filters = settings.per_depth(model.depth)
    ids = model.cond_embedding.ids(cond, batch_size)
    n, count = len(ids), model.num_positions * model.depth
    if noise is None and not settings.greedy:
        noise = image_noise(model, torch.full((n,), settings.seed), torch.arange(n))
    if noise is not None and noise.shape != (n, count):
        raise ValueError(f"noise must have shape ({n}, {count}), got {tuple(noise.shape)}")
    return Plan(settings, filters, ids, None if noise is None else noise.to(ids.device))


@torch.no_grad()
def generate(
    model: ARModel,
    cond: torch.Tensor | None = None,
    settings: SamplingSettings | None = None,
    *,
    batch_size: int | None = None,
    noise: torch.Tensor | None = None,
    compile: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Codes (B, *code_shape) drawn from `model`. `cond`: class ids (B,), caption ids (B, text_length), or None
    with `batch_size` for an unconditional model (or the null condition). `noise` (B, positions * depth) replaces
    the uniform numbers of images 0..B-1 of `settings.seed` (see `image_noise`). `compile` runs the decode steps
    compiled (`vqar.sampling.compiled`); the codes are the same."""
    run = plan(model, cond, settings, batch_size, noise)
    steps = decode_steps(model, compile)
    settings, ids, n = run.settings, run.ids, len(run.ids)
    if settings.guided:
        ids = torch.cat([ids, model.cond_embedding.null_ids(n)])

    def both_halves(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if settings.guided else x

    depth, positions = model.depth, model.num_positions
    codes = torch.empty(n, positions, depth, dtype=torch.long, device=ids.device)
    state = steps.new_state(len(ids))
    context = model.prefill(ids, state)
    for p in tqdm(range(positions), desc="sampling", disable=not progress, leave=False):
        guided = settings.guided_at(p)
        for d, f in enumerate(run.filters):
            logits = steps.code_logits(context, both_halves(codes[:, p, :d]), state)
            logits = guide(logits, settings.cfg_scale) if guided else logits[:n]
            codes[:, p, d] = pick(logits, f, settings.greedy, run.noise, p * depth + d)
        if p + 1 < positions:
            context = steps.decode_position(both_halves(codes[:, p]), p, state)
    return codes.view(n, *model.code_shape)


def pick(logits: torch.Tensor, f: DepthSettings, greedy: bool, noise: torch.Tensor | None, step: int) -> torch.Tensor:
    """The codes (B,) of draw number `step` of each image: the argmax, or a draw with its own uniform number."""
    return logits.argmax(-1) if greedy else sample_logits(logits, *f, uniform=noise[:, step])
