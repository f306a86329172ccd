"""Optimizer construction shared by both stages."""

from __future__ import annotations

import torch
from torch import nn

from vqar.train.config import TrainConfig


def adamw(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices, convolution kernels and embedding tables only: biases, norm
    gains and position embeddings are not decayed (as in minGPT and LlamaGen)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and "pos_emb" not in name else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas))


def guarded_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters: list[nn.Parameter], grad_clip: float | None
) -> bool:
    """backward + clip + step, unless the loss or the gradient norm is NaN or infinite: then the gradients are
    dropped and the weights stay as they were. Returns whether the step was taken."""
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss.detach()).all():
        return False
    loss.backward()
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"))
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True
