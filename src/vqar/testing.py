"""Reference implementations for tests and benchmarks, kept out of the production path.

`generate_uncached` draws exactly what `vqar.sampling.generate` draws, but without the KV cache and without the
models' decode methods: before each code it runs the teacher-forced `forward` (the training path) over the codes
drawn so far and reads the logits of the code to draw. Causality makes the codes not yet drawn irrelevant, so the
result must equal the cached loop's; every step costs a whole forward pass.
"""

from __future__ import annotations

import torch

from vqar.ar import ARModel
from vqar.sampling.filters import guide
from vqar.sampling.generate import pick, plan
from vqar.sampling.settings import SamplingSettings


@torch.no_grad()
def generate_uncached(model: ARModel, cond, settings: SamplingSettings | None = None, **options) -> torch.Tensor:
    """Codes (B, *code_shape); `options` (batch_size, noise) are those of `vqar.sampling.generate`."""
    run = plan(model, cond, settings, options.get("batch_size"), options.get("noise"))
    n, depth, blocks = len(run.ids), model.depth, model.block_sizes
    codes = torch.zeros(n, model.num_positions, depth, dtype=torch.long, device=run.ids.device)
    start = 0
    for k, size in enumerate(blocks):
        block = slice(start, start + size)
        scale = run.settings.scale_at(k, len(blocks), model.cfg_schedule) if run.settings.guided_at(start) else 1.0
        for d, f in enumerate(run.filters):
            logits = _logits_at(model, codes, cond, n, block, d)
            if scale != 1.0:
                logits = guide(torch.cat([logits, _logits_at(model, codes, None, n, block, d)]), scale)
            noise = None if run.noise is None else run.noise[:, start * depth + d : (start + size) * depth : depth]
            codes[:, block, d] = pick(logits, f, run.settings.greedy, noise)
        start += size
    return codes.view(n, *model.code_shape)


def _logits_at(model: ARModel, codes: torch.Tensor, cond, n: int, block: slice, d: int) -> torch.Tensor:
    """Teacher-forced logits (B, n, K) of the codes of `block` at depth d given `codes` (B, positions, depth)."""
    logits = model(codes.view(n, *model.code_shape), cond).logits
    return logits.reshape(n, model.num_positions, model.depth, -1)[:, block, d]
