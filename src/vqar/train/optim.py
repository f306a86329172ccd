"""Optimizer construction shared by both stages."""

from __future__ import annotations

import torch
from torch import nn

from vqar.parallel import sync
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


class StepGuard:
    """backward + clip + optimizer step for one optimizer, skipped when the loss or the gradient norm is NaN or
    infinite (the gradients are dropped and the weights stay as they were).

    With fp16 the loss is scaled (a `GradScaler` per optimizer): an overflow lowers the scale and skips the step,
    as GradScaler does, and is counted like any other non-finite step. Under torch.distributed the ranks agree
    on a non-finite loss before any backward, so no rank waits in a gradient all-reduce the others skip."""

    def __init__(self, precision: str = "fp32", device: torch.device | None = None):
        device_type = device.type if device is not None else "cpu"
        self.scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> bool:
        """Returns whether the step was taken. The parameters are the optimizer's own: after a forward pass an
        FSDP2 root module's `.parameters()` are its temporary unsharded copies, which never hold gradients."""
        optimizer.zero_grad(set_to_none=True)
        if sync.any_rank(not bool(torch.isfinite(loss.detach()).all()), loss.device):
            return False
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP: the norm over every shard
            norm = norm.full_tensor()
        if not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            return False
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return True

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def follow_configured_lr(sched: torch.optim.lr_scheduler.LambdaLR, base_lrs: list[float]) -> None:
    """After a resume, the learning rates of the configuration now (`--resume lr=...`, a raised `train.steps`), not
    the checkpoint's: its optimizer state holds the old base rate, and the rate its last step set for the next one
    under the old schedule."""
    sched.base_lrs = list(base_lrs)
    for group, base, factor in zip(sched.optimizer.param_groups, base_lrs, sched.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]  # what get_last_lr() reports
