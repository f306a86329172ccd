"""Checking integer code tensors, the currency between stage 1 (tokenizers) and stage 2 (AR models)."""

from __future__ import annotations

import torch

CODE_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def check_codes(codes: torch.Tensor, size: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Validates user-supplied codes against a codebook of `size` (and, if given, a per-sample `shape`) and returns
    them as int64."""
    if not isinstance(codes, torch.Tensor) or codes.dtype not in CODE_DTYPES:
        kind = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"codes must be an integer tensor, got {kind}")
    if shape is not None and tuple(codes.shape[1:]) != tuple(shape):
        expected = f"(B, {', '.join(map(str, shape))})"
        raise ValueError(f"codes must have shape {expected}, got {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= size):
        raise ValueError(
            f"codes must lie in [0, {size}) for this codebook, got values in [{int(codes.min())}, {int(codes.max())}]"
        )
    return codes.long()
