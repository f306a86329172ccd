"""The generation loop every model samples through, over its static KV cache (gpt-fast's prefill / decode split).

One prefill of the condition, then for each block of positions (`ARModel.block_sizes`: one position of a raster
model, one scale of VAR) one `code_logits` step per depth (1 for GPT, VIM and VAR, D for the RQ-Transformer, whose
depth steps share a short cache reused at every position) and one `decode_block` step; the steps run eagerly or
compiled (`vqar.sampling.compiled`). With classifier-free guidance the batch runs as [conditional; null
condition] and the logits are combined before filtering. The semantics of every setting are in
`vqar.sampling.settings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from vqar.ar import ARModel
from vqar.sampling.compiled import decode_steps
from vqar.sampling.filters import filter_logits, guide, sample_logits
from vqar.sampling.settings import DepthSettings, SamplingSettings, image_stream, settings_or_default
from vqar.sampling.speculative import (
    DecodeStats,
    numbers_per_image,
    speculative_codes,
    speculative_noise,
    window_of,
)
from vqar.utils.device import in_eval_mode


def image_noise(model: ARModel, seeds: torch.Tensor, index: torch.Tensor,
                settings: SamplingSettings | None = None) -> torch.Tensor:  # fmt: skip
    """The uniform numbers (B, positions * depth) that image `index[b]` of a run with seed `seeds[b]` draws its
    codes with: a stream that depends on (seed, index) alone. Drawn on the CPU, so they do not depend on the
    device either. Speculative settings take a larger table of their own (`speculative_noise`)."""
    if settings is not None and settings.speculative:
        return speculative_noise(model, settings, seeds, index)
    count = model.num_positions * model.depth
    rows = []
    for seed, i in zip(seeds.tolist(), index.tolist(), strict=True):
        rows.append(torch.rand(count, generator=image_stream(seed, i)))
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
    settings = settings_or_default(settings)
    filters = settings.per_depth(model.depth)
    if settings.speculative:
        window_of(model, settings)  # raises for a model that does not decode position by position
    check_cfg_interval(model, settings)
    if batch_size is not None:  # else torch's "negative dimension" or full()'s TypeError from inside the model
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 0:
            raise ValueError(f"batch_size must be a positive integer (with cond=None), got {batch_size!r}")
        batch_size = int(batch_size)
    ids = model.cond_embedding.ids(cond, batch_size if cond is None else None)  # a batch_size beside cond: below
    n = len(ids)
    if cond is not None and batch_size is not None and batch_size != n:  # one of them is not what the caller meant
        raise ValueError(f"batch_size={batch_size} disagrees with cond, which holds {n} conditions: leave batch_size "
                         "out (it is for cond=None)")  # fmt: skip
    if n == 0:  # else a reshape error deep in the model
        raise ValueError("nothing to draw: the batch is empty (cond holds no conditions, or batch_size=0)")
    count = numbers_per_image(model, settings) if settings.speculative else model.num_positions * model.depth
    if noise is not None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a tensor of shape ({n}, {count}), got {type(noise).__name__}")
        if noise.shape != (n, count):
            raise ValueError(f"noise must have shape ({n}, {count}), got {tuple(noise.shape)}")
        if not bool(((noise >= 0) & (noise < 1)).all()):  # else every code the first or the last of the vocabulary
            raise ValueError("noise must hold uniform numbers in [0, 1), as image_noise makes them; it holds values "
                             "outside that range, or NaN")  # fmt: skip
    elif not settings.greedy:
        noise = image_noise(model, torch.full((n,), settings.seed), torch.arange(n), settings)
    return Plan(settings, filters, ids, None if noise is None else noise.to(ids.device))


@torch.no_grad()
@in_eval_mode
def generate(
    model: ARModel,
    cond: torch.Tensor | None = None,
    settings: SamplingSettings | None = None,
    *,
    batch_size: int | None = None,
    noise: torch.Tensor | None = None,
    compile: bool = False,
    progress: bool = False,
    stats: DecodeStats | None = None,
    images: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Codes (B, *code_shape) drawn from `model`. `cond`: class ids (B,), caption ids (B, text_length), or None
    with `batch_size` for an unconditional model (or the null condition). `noise` (B, positions * depth) replaces
    the uniform numbers of images 0..B-1 of `settings.seed` (see `image_noise`). `compile` runs the decode steps
    compiled (`vqar.sampling.compiled`); the codes are the same. `stats`, when given, adds up the model calls
    (and the drafts of speculative decoding). `images`: the (seeds, index) of the B images, whose streams give
    the randomness that `noise` does not carry (`smooth`'s Gumbel noise); by default `settings.seed` and 0..B-1."""
    run = plan(model, cond, settings, batch_size, noise)
    steps = decode_steps(model, compile)
    settings, ids, n = run.settings, run.ids, len(run.ids)
    if settings.guided:
        ids = torch.cat([ids, model.cond_embedding.null_ids(n)])

    def both_halves(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if settings.guided else x

    if settings.speculative:
        scales = guidance_by_position(model, settings, ids.device)
        same = float(scales[0]) if bool((scales == scales[0]).all()) else None  # one scale everywhere: no lookup

        def guided_logits(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            if not settings.guided:
                return logits
            if same is not None:
                return logits[:n].float() if same == 1.0 else guide(logits, same)
            scale = scales[positions][..., None]
            return torch.where(scale == 1.0, logits[:n].float(), guide(logits, scale))

        codes = speculative_codes(model, steps, ids, n, settings, run.filters, run.noise, stats, both_halves,
                                  guided_logits)  # fmt: skip
        return codes.view(n, *model.code_shape)

    depth, blocks = model.depth, model.block_sizes
    codes = torch.empty(n, model.num_positions, depth, dtype=torch.long, device=ids.device)
    if images is None:
        images = (torch.full((n,), settings.seed), torch.arange(n))
    smooth = SmoothNoise(model, *images, ids.device) if settings.smooth else None
    state = steps.new_state(len(ids))
    context = model.prefill(ids, state)
    # Compiled on a CPU, a raster model's step (the model's calls, guidance and the draws) is one graph that takes
    # its position and scale as tensors, so that it serves every position; otherwise the steps run one by one.
    tensors = model.raster and smooth is None and steps.whole_steps
    draw = steps.graph(draw_block) if tensors else draw_block
    calls = model if tensors else steps
    every_position = torch.arange(model.num_positions, device=ids.device) if tensors else None
    start = 0
    for k, size in enumerate(tqdm(blocks, desc="sampling", disable=not progress, leave=False)):
        scale = settings.scale_at(k, len(blocks), model.cfg_schedule) if settings.guided_at(start) else 1.0
        if tensors:
            positions = every_position[start : start + size]
            block = Block(positions, positions, torch.tensor(scale), scale != 1.0)
        else:
            block = Block(start, slice(start, start + size), scale, scale != 1.0)
        if k + 1 < len(blocks):
            context = draw(calls, state, context, codes, block, run, n, settings.guided, smooth)
        else:  # the last block feeds nothing back: its draws alone (a raster model's eagerly: no graph for one step)
            draw_block(model if tensors else calls, state, context, codes, block, run, n, settings.guided, smooth,
                       decode=False)
        start += size
    if stats is not None:
        calls = torch.full((n,), len(blocks), dtype=torch.long)  # the prefill and a call per block but the last
        stats.add_rows(calls, torch.zeros_like(calls), torch.zeros_like(calls))
    return codes.view(n, *model.code_shape)


class Block(NamedTuple):
    """One step of plain sampling: where the block starts (a raster model's position as a tensor), its positions,
    its guidance scale (a tensor, so a schedule does not recompile) and whether it is guided at all."""

    start: int | torch.Tensor
    positions: slice | torch.Tensor
    scale: float | torch.Tensor
    guided: bool

    def noise_columns(self, depth: int, d: int) -> slice | torch.Tensor:
        """The columns of the uniform numbers (positions * depth) that draw the block's codes of depth d."""
        if isinstance(self.positions, slice):
            return slice(self.positions.start * depth + d, self.positions.stop * depth, depth)
        return self.positions * depth + d


def draw_block(calls, state, context: torch.Tensor, codes: torch.Tensor, block: Block, run: Plan, n: int,
               two_halves: bool, smooth: SmoothNoise | None, decode: bool = True) -> torch.Tensor:  # fmt: skip
    """Draws the codes of `block` (each depth from the logits given the depths before it) into `codes` and, with
    `decode`, returns the context of the next block. `calls`: the model, or the decode steps."""

    def both_halves(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if two_halves else x

    depth = codes.shape[-1]
    for d, f in enumerate(run.filters):
        logits = calls.code_logits(context, both_halves(codes[:, block.positions, :d]), state)
        logits = guide(logits, block.scale) if block.guided else logits[:n]
        draws = None if run.noise is None else run.noise[:, block.noise_columns(depth, d)]
        codes[:, block.positions, d] = pick(logits, f, run.settings.greedy, draws)
    if not decode:
        return context
    if smooth is None:
        mix = None
    else:  # greedy keeps the code it took alone, as VAR's greedy (top_k=1) does: else the mix drew other codes
        taken = codes[:, block.positions, -1] if run.settings.greedy else None
        mix = tuple(map(both_halves, smooth.next(logits, run.filters[-1], logits.shape[1], taken)))
    return calls.decode_block(both_halves(codes[:, block.positions]), block.start, state, mix)


def guidance_by_position(model: ARModel, settings: SamplingSettings, device) -> torch.Tensor:
    """The guidance scale of each position's codes (1 where unguided), for a raster model (a block per
    position)."""
    blocks = len(model.block_sizes)
    scales = [settings.scale_at(k, blocks, model.cfg_schedule) if settings.guided_at(k) else 1.0
              for k in range(blocks)]  # fmt: skip
    return torch.tensor(scales, device=device)


def pick(logits: torch.Tensor, f: DepthSettings, greedy: bool, uniform: torch.Tensor | None) -> torch.Tensor:
    """The codes (B, n) of a block's draws at one depth: the argmax, or a draw per code with its own uniform
    number (B, n)."""
    if greedy:
        return logits.argmax(-1)
    flat = sample_logits(logits.flatten(0, -2), *f, uniform=uniform.reshape(-1))
    return flat.view(logits.shape[:-1])


def check_cfg_interval(model: ARModel, settings: SamplingSettings) -> None:
    """ValueError for a `cfg_interval` on a model that draws whole blocks (VAR's scales): the interval counts
    positions one by one, so there it would guide whole scales past the codes it names."""
    if settings.cfg_interval not in (None, -1) and not model.raster:
        raise ValueError(f"cfg_interval guides the first codes of a model that draws one position per call; "
                         f"{type(model).__name__} draws a whole scale per call: leave cfg_interval out (guidance "
                         f"follows cfg_schedule, VAR's linear ramp by default)")  # fmt: skip


def check_smooth(model: ARModel) -> None:
    """ValueError for a model that cannot take `smooth` sampling."""
    if not model.smooth_embedding:
        raise ValueError(f"smooth sampling feeds back a mix of code vectors, which {type(model).__name__} "
                         "does not take (VAR only)")  # fmt: skip


class SmoothNoise:
    """The Gumbel noise of `smooth` sampling: each image draws from a stream of (seed, index) of its own, apart from
    the one its codes are drawn with, so the codes are those of the same run without `smooth`."""

    def __init__(self, model: ARModel, seeds: torch.Tensor, index: torch.Tensor, device: torch.device):
        check_smooth(model)
        self.device = device
        # the image's index in its run, not its row in this batch: else another batch size changed the pictures
        self.streams = [image_stream(seed, i, salt=1) for seed, i in zip(seeds.tolist(), index.tolist(), strict=True)]

    def next(self, logits: torch.Tensor, f: DepthSettings, size: int,
             taken: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(the filtered logits (B, n, K) the codes were drawn from, Gumbel noise -log(E), E ~ Exp(1)). With `taken`
        (greedy's codes, (B, n)) only those are kept: the mix is then their vectors, whatever the noise."""
        if taken is None:
            filtered = filter_logits(logits.float(), *f)
        else:
            index = taken.unsqueeze(-1)
            filtered = torch.full_like(logits, float("-inf"), dtype=torch.float32)
            filtered.scatter_(-1, index, logits.float().gather(-1, index))
        k = logits.shape[-1]
        gumbel = torch.stack([-torch.empty(size, k).exponential_(generator=g).log() for g in self.streams])
        return filtered, gumbel.to(self.device)


