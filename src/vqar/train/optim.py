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
