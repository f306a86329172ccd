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
        codes: int64 code indices, (...) for a vector quantizer and (..., D) for a residual one.
        loss: the quantizer's training loss, already weighted (commitment times beta, plus the codebook loss when
            the codebook is learned by gradient); add it to the reconstruction loss.
        commitment: the unweighted commitment loss (the cumulative one for residual quantization).
        usage: % of the codebook used in this batch; shape (D,) for a residual quantizer.
        perplexity: exp(entropy) of the code histogram in this batch; shape (D,) for a residual quantizer.
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    commitment: torch.Tensor
    usage: torch.Tensor
    perplexity: torch.Tensor
