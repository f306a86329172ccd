"""The image losses of stage-2 training, one per family that needs its own; each registry entry names its loss
(`vqar.ar.registry.Architecture.loss`), so the training task never asks which model it trains.

A loss takes the model, its teacher-forced `ModelOutput`, the codes it was fed and the run's `loss` settings
(`soft_targets`, `soft_temperature`, `label_smoothing`), and returns the loss and extra metrics to log.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vqar.ar.contract import ARModel, ModelOutput


def cross_entropy(model: ARModel, out: ModelOutput, codes: torch.Tensor, settings) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over every code, with the run's label smoothing (0 by default)."""
    flat = out.logits.reshape(-1, out.logits.shape[-1])
    return F.cross_entropy(flat, codes.reshape(-1), label_smoothing=settings.label_smoothing), {}


def soft_target_cross_entropy(model: ARModel, out: ModelOutput, codes: torch.Tensor,
                              settings) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """The RQ-Transformer's loss: with `soft_targets`, cross-entropy against the release's soft targets
    (`RQTransformer.soft_targets`); otherwise plain cross-entropy."""
    if not settings.soft_targets:
        return cross_entropy(model, out, codes, settings)
    flat = out.logits.reshape(-1, out.logits.shape[-1])
    targets = model.soft_targets(codes, settings.soft_temperature).reshape(flat.shape)
    return -(targets * F.log_softmax(flat.float(), dim=-1)).sum(-1).mean(), {}


def per_scale_cross_entropy(model: ARModel, out: ModelOutput, codes: torch.Tensor,
                            settings) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """VAR's loss: cross-entropy with label smoothing, every token weighted alike (the official recipe), and the
    loss of the first and the last scale logged apart (the official trainer's `Ltail`): small scales collapse
    first, and the last scale dominates the image."""
    loss, _ = cross_entropy(model, out, codes, settings)
    with torch.no_grad():
        per_token = F.cross_entropy(out.logits.detach().float().flatten(0, -2), codes.reshape(-1),
                                    reduction="none").view(codes.shape)  # fmt: skip
        sizes = model.block_sizes
        first, last = per_token[:, : sizes[0]].mean(), per_token[:, -sizes[-1] :].mean()
    return loss, {"loss_first_scale": first, "loss_last_scale": last}
