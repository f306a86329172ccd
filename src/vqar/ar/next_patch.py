"""Next Patch Prediction: "Next Patch Prediction for Autoregressive Visual Generation" (Pang et al., arXiv
2412.15321).

Training-time only and parameter-free: the GPT reads a sequence of patches instead of tokens. The token
embeddings of each non-overlapping p x p block of the code grid (raster order over blocks, row-major inside) are
averaged into one patch embedding; the condition token comes first and 2D RoPE runs on the (h/p) x (w/p) grid of
patches. The output at patch position j is one distribution, scored against all p^2 tokens of patch j (the mean
negative log-likelihood). With p = 1 this is exactly next-token training; sampling is always token by token.

The released NPP code builds the targets with `F.unfold` on integer tensors, which PyTorch does not implement;
here the targets are rearranged with a reshape, which is exact for any dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vqar.ar.layers import rope_2d_table, rotation_table
from vqar.utils.codes import check_codes


def check_patch_size(grid: tuple[int, int], p: int) -> None:
    if p < 1 or grid[0] % p or grid[1] % p:
        raise ValueError(f"patch size {p} must be >= 1 and divide the code grid {grid[0]}x{grid[1]}")


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, h, w, ...) -> (B, (h/p) * (w/p), p * p, ...): p x p blocks in raster order, row-major inside."""
    b, h, w, *rest = x.shape
    blocks = x.reshape(b, h // p, p, w // p, p, *rest).transpose(2, 3)
    return blocks.reshape(b, (h // p) * (w // p), p * p, *rest)


def patch_embeddings(model, codes: torch.Tensor, p: int) -> torch.Tensor:
    """Mean token embedding of each p x p block, (B, num_patches, dim)."""
    return patchify(model.tok_embeddings(codes), p).mean(2)


def patch_rope(cfg, p: int) -> torch.Tensor:
    """The 2D RoPE table of a `GPTConfig`'s patch grid, (prefix_length + num_patches, head_dim / 2, 2)."""
    height, width = cfg.code_shape
    return rope_2d_table(height // p, width // p, cfg.head_dim, cfg.rope_base, cfg.prefix_length)


def next_patch_logits(model, codes: torch.Tensor, cond: torch.Tensor | None, p: int) -> torch.Tensor:
    """Logits (B, num_patches, V) of a `GPT`: position j predicts the tokens of patch j from the condition and
    patches 0..j-1."""
    check_patch_size(model.code_shape, p)
    codes = check_codes(codes, model.cfg.vocab_size, model.code_shape)
    rope = model.rope if p == 1 else rotation_table(patch_rope(model.cfg, p)).to(model.rope.device)
    return model.logits_after(cond, patch_embeddings(model, codes, p)[:, :-1], rope)


def next_patch_loss(logits: torch.Tensor, codes: torch.Tensor, p: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over patches and their p^2 tokens of -log softmax(logits of the patch)[token]. With `label_smoothing`
    e, each token's target is smoothed as `F.cross_entropy` smooths it (1 - e on the token, e spread over the
    codebook), so that p = 1 is token-level training's loss."""
    targets = patchify(codes, p)  # (B, num_patches, p*p)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    loss = -log_probs.gather(-1, targets).mean()
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * log_probs.mean()
    return loss
