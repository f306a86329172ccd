"""Vector quantization: "Neural Discrete Representation Learning" (VQ-VAE, van den Oord et al., NeurIPS 2017).

Nearest-neighbour quantization with a straight-through gradient and the commitment loss beta * ||z - sg(e)||^2.
The codebook is learned by EMA (with Laplace smoothing) or by gradient (adding ||sg(z) - e||^2); it can be
initialised by k-means on the first batch and its dead codes restarted from batch vectors (see `Codebook`).
The factorized, l2-normalised lookup of ViT-VQGAN ("Vector-quantized Image Modeling with Improved VQGAN",
Yu et al., ICLR 2022) is `lookup_dim` (a linear projection to a low-dimensional lookup space and back) plus
`l2_norm` (nearest neighbour by cosine similarity). The optional entropy penalty (LlamaGen's `entropy_loss_ratio`,
from MaskGIT's tokenizer) rewards confident per-vector assignments that still spread over the whole codebook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqar.quantize.codebook import Codebook, code_statistics
from vqar.quantize.contract import Quantizer, in_float32, refuse_scales
from vqar.quantize.output import QuantizerOutput
from vqar.utils.codes import check_codes


class VectorQuantizer(Quantizer):
    """Quantizes channels-last latents (..., dim) to one code per vector.

    Args:
        codebook_size: number of codes K.
        dim: latent dimension of the input and output.
        lookup_dim: dimension of the lookup space; when set and different from `dim`, linear projections map
            dim -> lookup_dim before the lookup and back after it (ViT-VQGAN's factorized codes).
        l2_norm: l2-normalise latents and codes before the lookup.
        beta: weight of the commitment loss.
        entropy_weight: weight of `entropy_penalty` on the soft assignments in training (0 = off).
        entropy_temperature: temperature of those soft assignments (softmax of -distance / temperature).
        **codebook_options: how the codebook learns (ema, decay, eps, kmeans_init, kmeans_iters, restart_dead,
            dead_threshold); see `Codebook`.
    """

    layout = "grid"
    code_axes = ("h", "w")
    depth = 1  # one code per vector; residual quantizers have D

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        *,
        lookup_dim: int | None = None,
        l2_norm: bool = False,
        beta: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        **codebook_options,
    ):
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.beta = beta
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
        self.l2_norm = l2_norm
        lookup_dim = lookup_dim or dim
        factorized = lookup_dim != dim
        self.project_in = nn.Linear(dim, lookup_dim) if factorized else nn.Identity()
        self.project_out = nn.Linear(lookup_dim, dim) if factorized else nn.Identity()
        self.codebook = Codebook(codebook_size, lookup_dim, l2_norm=l2_norm, **codebook_options)

    @classmethod
    def from_config(cls, cfg) -> VectorQuantizer:
        return cls(
            cfg.codebook_size,
            cfg.dim,
            lookup_dim=cfg.lookup_dim,
            l2_norm=cfg.l2_norm,
            entropy_weight=cfg.entropy_weight,
            entropy_temperature=cfg.entropy_temperature,
            beta=cfg.beta,
            **cfg.codebook_options(),
        )

    @classmethod
    def check_config(cls, cfg, latent_side: int | None = None) -> None:
        if cfg.depth != 1:
            raise ValueError(f"a 'vq' quantizer has depth 1 (got depth={cfg.depth}); use kind='rq' for depth > 1")
        refuse_scales(cfg, "vq")
        if cfg.entropy_weight and cfg.entropy_temperature <= 0:
            raise ValueError("entropy_weight needs entropy_temperature > 0")

    def code_shape(self, latent_side: int) -> tuple[int, ...]:
        return (latent_side, latent_side)

    def code_vectors(self) -> torch.Tensor:
        return self.codebook.vectors()[None]

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected latents with last dimension {self.dim}, got shape {tuple(z.shape)}")
        # Distances in bf16/fp16 pick wrong codes: the quantizer always runs in float32.
        with torch.autocast(z.device.type, enabled=False):
            h = in_float32(self.project_in, z.reshape(-1, self.dim))
            if self.l2_norm:
                h = F.normalize(h, dim=-1)
            if self.training:
                self.codebook.maybe_init(h.detach(), items=len(z))
            codes = self.codebook.nearest(h.detach())
            q = self.codebook.lookup(codes)  # looked up before this step's EMA update
            if self.training:
                self.codebook.update(h.detach(), codes, items=len(z))
            commitment = F.mse_loss(h, q.detach())
            loss = self.beta * commitment
            if not self.codebook.ema:
                loss = loss + F.mse_loss(q, h.detach())
            if self.training and self.entropy_weight:
                affinity = -self.codebook.distances(h)
                loss = loss + self.entropy_weight * entropy_penalty(affinity, self.entropy_temperature)
            out = in_float32(self.project_out, h + (q - h).detach())
        usage, perplexity = code_statistics(codes, self.codebook_size)
        return QuantizerOutput(
            quantized=out.view(z.shape).to(z.dtype),
            codes=codes.view(z.shape[:-1]),
            loss=loss,
            commitment=commitment,
            usage=usage,
            perplexity=perplexity,
        )

    def embed(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Latents (..., dim) for integer codes (...); `depth` may only be None or 1."""
        self.check_depth(depth)
        codes = check_codes(codes, self.codebook_size)
        with torch.autocast(codes.device.type, enabled=False):
            return in_float32(self.project_out, self.codebook.lookup(codes))


def entropy_penalty(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Mean per-vector entropy of softmax(affinity / temperature) minus the entropy of the mean assignment.

    `affinity` (..., K) is usually the negative squared distance to each code. Low when every vector picks one
    code confidently and all codes get picked; added to the loss with a small weight against codebook collapse."""
    logits = affinity.reshape(-1, affinity.shape[-1]).float() / temperature
    probs = logits.softmax(-1)
    sample_entropy = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    mean_probs = probs.mean(0)
    codebook_entropy = -(mean_probs * torch.log(mean_probs + 1e-5)).sum()
    return sample_entropy - codebook_entropy
