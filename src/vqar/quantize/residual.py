"""Residual quantization: "Autoregressive Image Generation using Residual Quantization" (RQ-VAE, Lee et al., CVPR 2022).

Each latent vector z is approximated by a stack of D codes chosen coarse to fine:

    r_0 = z,   k_d = argmin_k ||r_{d-1} - e_k||^2,   r_d = r_{d-1} - e(k_d),   z_q = sum_d e(k_d)

with one codebook shared across the depths (the paper's choice) or one per depth. The commitment loss is the
paper's cumulative one, mean over d of ||z - sg(sum_{i<=d} e(k_i))||^2, so every prefix of the stack is pushed
towards z. With a shared EMA codebook the update after depth d already changes the codebook that depth d+1 looks
up, as in the reference implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqar.quantize.codebook import Codebook, code_statistics
from vqar.quantize.contract import Quantizer, refuse_scales
from vqar.quantize.output import QuantizerOutput
from vqar.utils.codes import check_codes


class ResidualQuantizer(Quantizer):
    """Quantizes channels-last latents (..., dim) to D codes per vector, returned as (..., D).

    Args:
        codebook_size: number of codes K per codebook.
        dim: latent (and code) dimension.
        depth: number of residual steps D.
        shared_codebook: one codebook for all depths (otherwise one per depth).
        beta: weight of the cumulative commitment loss.
        **codebook_options: how the codebooks learn (ema, decay, eps, kmeans_init, kmeans_iters, restart_dead,
            dead_threshold); see `Codebook`.
    """

    layout = "stack"
    code_axes = ("h", "w", "D")
    codebook_per_depth = True

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        depth: int,
        *,
        shared_codebook: bool = True,
        beta: float = 0.25,
        **codebook_options,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"residual quantization needs depth >= 1, got {depth}")
        self.dim, self.depth, self.codebook_size = dim, depth, codebook_size
        self.shared_codebook = shared_codebook
        self.beta = beta
        self.codebooks = nn.ModuleList(
            Codebook(codebook_size, dim, **codebook_options) for _ in range(1 if shared_codebook else depth)
        )

    @classmethod
    def from_config(cls, cfg) -> ResidualQuantizer:
        return cls(cfg.codebook_size, cfg.dim, cfg.depth, shared_codebook=cfg.shared_codebook, beta=cfg.beta,
                   **cfg.codebook_options())  # fmt: skip

    @classmethod
    def check_config(cls, cfg, latent_side: int | None = None) -> None:
        if cfg.lookup_dim not in (None, cfg.dim) or cfg.l2_norm:
            raise ValueError("lookup_dim and l2_norm apply to 'vq' quantizers only")
        if cfg.entropy_weight:
            raise ValueError("entropy_weight applies to 'vq' quantizers only")
        refuse_scales(cfg, "rq")

    @property
    def levels(self) -> int:
        return self.depth

    def code_shape(self, latent_side: int) -> tuple[int, ...]:
        return (latent_side, latent_side, self.depth)

    def level_codes(self, codes: torch.Tensor) -> list[torch.Tensor]:
        return list(codes.reshape(-1, self.depth).unbind(1))

    def code_vectors(self) -> torch.Tensor:
        return torch.stack([book.vectors() for book in self.codebooks])

    def codebook(self, d: int) -> Codebook:
        """The codebook used at depth `d`."""
        return self.codebooks[0 if self.shared_codebook else d]

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected latents with last dimension {self.dim}, got shape {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):
            flat = z.reshape(-1, self.dim).float()
            residual = flat.detach()
            partial_sum = torch.zeros_like(residual)
            codes, commitments, codebook_losses = [], [], []
            for d in range(self.depth):
                codebook = self.codebook(d)
                if self.training:
                    codebook.maybe_init(residual, items=len(z))
                code = codebook.nearest(residual)
                q = codebook.lookup(code)  # looked up before this depth's EMA update
                if self.training:
                    codebook.update(residual, code, items=len(z))
                if not codebook.ema:
                    codebook_losses.append(F.mse_loss(q, residual))
                q = q.detach()
                residual = residual - q
                partial_sum = partial_sum + q
                commitments.append(F.mse_loss(flat, partial_sum))
                codes.append(code)
            commitment = torch.stack(commitments).mean()
            loss = self.beta * commitment
            if codebook_losses:
                loss = loss + torch.stack(codebook_losses).mean()
            quantized = flat + (partial_sum - flat).detach()
        stats = [code_statistics(c, self.codebook_size) for c in codes]
        return QuantizerOutput(
            quantized=quantized.view(z.shape).to(z.dtype),
            codes=torch.stack(codes, dim=-1).view(*z.shape[:-1], self.depth),
            loss=loss,
            commitment=commitment,
            usage=torch.stack([s[0] for s in stats]),
            perplexity=torch.stack([s[1] for s in stats]),
        )

    @torch.no_grad()
    def soft_codes(self, z: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
        """Soft assignments (..., D, K) of latents (..., dim): at depth d, softmax(-||r_d - e_k||^2 / temperature)
        where r_d is the residual after the hard codes of depths < d. RQ-Transformer trains on them as soft
        targets (the release's `soft_target_cross_entropy`, temperature 0.5)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        with torch.autocast(z.device.type, enabled=False):
            residual = z.reshape(-1, self.dim).float()
            probs = []
            for d in range(self.depth):
                distances = self.codebook(d).distances(residual)
                probs.append((-distances / temperature).softmax(-1))
                residual = residual - self.codebook(d).lookup(distances.argmin(-1))
        return torch.stack(probs, dim=1).view(*z.shape[:-1], self.depth, self.codebook_size)

    def embed_per_depth(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors per depth, (..., D, dim), for codes (..., D)."""
        codes = self._check(codes)
        return torch.stack([self.codebook(d).lookup(codes[..., d]) for d in range(self.depth)], dim=-2)

    def embed(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Latents (..., dim): the sum of the first `depth` (default all D) code vectors of each stack."""
        depth = self.check_depth(depth)
        return self.embed_per_depth(codes)[..., :depth, :].sum(-2)

    def _check(self, codes: torch.Tensor) -> torch.Tensor:
        codes = check_codes(codes, self.codebook_size)
        if codes.dim() == 0 or codes.shape[-1] != self.depth:
            raise ValueError(f"residual codes need a last axis of size D={self.depth}, got shape {tuple(codes.shape)}")
        return codes
