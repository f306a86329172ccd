"""Vector quantization: "Neural Discrete Representation Learning" (VQ-VAE, van den Oord et al., NeurIPS 2017).

Nearest-neighbour quantization with a straight-through gradient and the commitment loss beta * ||z - sg(e)||^2.
The codebook is learned by EMA (with Laplace smoothing) or by gradient (adding ||sg(z) - e||^2); it can be
initialised by k-means on the first batch and its dead codes restarted from batch vectors (see `Codebook`).
The factorized, l2-normalised lookup of ViT-VQGAN ("Vector-quantized Image Modeling with Improved VQGAN",
Yu et al., ICLR 2022) is `lookup_dim` (a linear projection to a low-dimensional lookup space and back) plus
`l2_norm` (nearest neighbour by cosine similarity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqar.quantize.codebook import Codebook, check_codes, code_statistics
from vqar.quantize.output import QuantizerOutput


class VectorQuantizer(nn.Module):
    """Quantizes channels-last latents (..., dim) to one code per vector.

    Args:
        codebook_size: number of codes K.
        dim: latent dimension of the input and output.
        lookup_dim: dimension of the lookup space; when set and different from `dim`, linear projections map
            dim -> lookup_dim before the lookup and back after it (ViT-VQGAN's factorized codes).
        l2_norm: l2-normalise latents and codes before the lookup.
        beta: weight of the commitment loss.
        **codebook_options: how the codebook learns (ema, decay, eps, kmeans_init, kmeans_iters, restart_dead,
            dead_threshold); see `Codebook`.
    """

    depth = 1  # one code per vector; residual quantizers have D

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        *,
        lookup_dim: int | None = None,
        l2_norm: bool = False,
        beta: float = 0.25,
        **codebook_options,
    ):
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.beta = beta
        self.l2_norm = l2_norm
        lookup_dim = lookup_dim or dim
        factorized = lookup_dim != dim
        self.project_in = nn.Linear(dim, lookup_dim) if factorized else nn.Identity()
        self.project_out = nn.Linear(lookup_dim, dim) if factorized else nn.Identity()
        self.codebook = Codebook(codebook_size, lookup_dim, l2_norm=l2_norm, **codebook_options)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected latents with last dimension {self.dim}, got shape {tuple(z.shape)}")
        # Distances in bf16/fp16 pick wrong codes: the quantizer always runs in float32.
        with torch.autocast(z.device.type, enabled=False):
            h = self.project_in(z.reshape(-1, self.dim).float())
            if self.l2_norm:
                h = F.normalize(h, dim=-1)
            if self.training:
                self.codebook.maybe_init(h.detach())
            codes = self.codebook.nearest(h.detach())
            q = self.codebook.lookup(codes)  # looked up before this step's EMA update
            if self.training:
                self.codebook.update(h.detach(), codes)
            commitment = F.mse_loss(h, q.detach())
            loss = self.beta * commitment
            if not self.codebook.ema:
                loss = loss + F.mse_loss(q, h.detach())
            out = self.project_out(h + (q - h).detach())
        usage, perplexity = code_statistics(codes, self.codebook_size)
        return QuantizerOutput(
            quantized=out.view(z.shape).to(z.dtype),
            codes=codes.view(z.shape[:-1]),
            loss=loss,
            commitment=commitment,
            usage=usage,
            perplexity=perplexity,
        )

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Latents (..., dim) for integer codes (...)."""
        codes = check_codes(codes, self.codebook_size)
        with torch.autocast(codes.device.type, enabled=False):
            return self.project_out(self.codebook.lookup(codes))
