"""What every quantizer returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizerOutput:
    """Result of quantizing a channels-last latent of shape (..., dim).

    Attributes:
        quantized: straight-through quantized latent, same shape as the input; its value is the code vectors, its
            gradient flows to the input unchanged.
        codes: int64 code indices, (...) for a vector quantizer, (..., D) for a residual one and (B, L) for a
            multi-scale one.
        loss: the quantizer's training loss, already weighted (commitment times beta, plus the codebook loss when
            the codebook is learned by gradient); add it to the reconstruction loss.
        commitment: the unweighted commitment loss (the cumulative one for residual and multi-scale quantization).
        usage: % of the codebook used in this batch; one per level for a quantizer with several (shape (D,) or
            (K,) scales).
        perplexity: exp(entropy) of the code histogram in this batch; per level like `usage`.
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    commitment: torch.Tensor
    usage: torch.Tensor
    perplexity: torch.Tensor
