"""Multi-scale residual quantization: "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction" (VAR, Tian et al., NeurIPS 2024).

Where RQ-VAE stacks D codes on every latent position, VAR quantizes the residual of a P x P latent f across K
scales p_0 < ... < p_{K-1} = P with one shared codebook. Starting from r = f and f_hat = 0, scale k

    z_k   = area-resize(r, p_k)                       (not resized at the last scale)
    c_k   = argmin_c ||z_k - e_c||^2                   (p_k^2 codes, row-major)
    h_k   = bicubic-upsample(e[c_k], P)                (not resized at the last scale)
    h'_k  = Phi_k(h_k) = (1 - rho) h_k + rho conv3x3(h_k)
    f_hat <- f_hat + h'_k,   r <- r - h'_k

so the codes of an image are K token maps, flattened scale by scale into (B, L), L = sum p_k^2. The Phi
convolutions are shared in groups: with n of them, scale k takes the one whose "tick" (n evenly spaced points in
(0, 1)) lies closest to k / (K - 1) (`phi_index`). The straight-through latent is f + sg(f_hat - f); the loss is the
official mean over scales of beta ||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2 (the second term trains the
codebook, when it learns by gradient, and the Phi convolutions).

Beyond the paper (which learns the codebook by gradient and ships no tokenizer training code): the codebook may
learn by EMA, start from k-means and restart dead codes (`Codebook`), and both draw their vectors from every scale
in equal shares, so the few vectors of the coarse scales (B per batch at 1x1) get codes of their own instead of
collapsing onto a handful. The codebook statistics are updated once per training step, from all scales, after the
lookups.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vqar.quantize.codebook import Codebook, code_statistics, sample_vectors
from vqar.quantize.contract import Quantizer, in_float32
from vqar.quantize.output import QuantizerOutput
from vqar.utils.codes import check_codes

VAR_PHI_SHARE = 4  # VAR's share_quant_resi: 4 Phi convolutions shared by the scales, whatever their number

# The scales of the released 256px VQVAE (16 x 16 latents); 512px models use (1, 2, 3, 4, 6, 9, 13, 18, 24, 32).
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def phi_ticks(count: int) -> np.ndarray:
    """The float64 positions in (0, 1) of `count` shared Phi convolutions (VAR's rule: margins of 1/(3n) for
    n = 4, 1/(2n) otherwise). Computed with numpy's linspace, because exact ties between two ticks occur and are
    decided by its rounding."""
    margin = 1 / (3 * count) if count == 4 else 1 / (2 * count)
    return np.linspace(margin, 1 - margin, count)


def phi_index(scale: int, num_scales: int, count: int) -> int:
    """Which of `count` Phi convolutions scale `scale` of `num_scales` uses: the tick closest to scale/(K-1) in
    float64, the lower index on a tie (numpy's argmin)."""
    if count <= 1:
        return 0
    position = scale / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(phi_ticks(count) - position)))


@dataclass
class ScaleStep:
    """One scale of the recursion (module docstring), maps channels first.

    inputs: z_k (B, dim, p, p), the vectors matched to the codebook; codes: (B, p*p); vectors: e[c_k]
    (B, dim, p, p); upsampled: h_k (B, dim, P, P); refined: h'_k; fhat: f_hat after this scale."""

    inputs: torch.Tensor
    codes: torch.Tensor
    vectors: torch.Tensor
    upsampled: torch.Tensor
    refined: torch.Tensor
    fhat: torch.Tensor


class MultiScaleQuantizer(Quantizer):
    """Quantizes channels-last latents (B, P, P, dim), P = patch_nums[-1], to codes (B, L).

    Args:
        codebook_size: number of codes V of the shared codebook.
        dim: latent (and code) dimension (VAR's Cvae).
        patch_nums: the scale sides p_0 < ... < p_{K-1}.
        phi_ratio: rho, the weight of the Phi convolution (VAR's `quant_resi`; 0 = no Phi).
        phi_share: number of Phi convolutions: 0 = one per scale, 1 = one for all, n >= 2 = n shared by
            neighbouring scales (VAR's `share_quant_resi`; the release uses 4).
        beta: weight of the commitment loss.
        **codebook_options: how the codebook learns (ema, decay, eps, kmeans_init, kmeans_iters, restart_dead,
            dead_threshold); see `Codebook`.
    """

    layout = "scales"
    code_axes = ("L",)
    level_prefix = "s"
    depth = 1  # one code per token; the scales are the levels

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        patch_nums: Sequence[int] = PATCH_NUMS_256,
        *,
        phi_ratio: float = 0.5,
        phi_share: int = VAR_PHI_SHARE,
        beta: float = 0.25,
        **codebook_options,
    ):
        super().__init__()
        patch_nums = tuple(int(p) for p in patch_nums)
        _check_scales(patch_nums, phi_ratio, phi_share)
        self.codebook_size, self.dim, self.patch_nums = codebook_size, dim, patch_nums
        self.phi_ratio, self.beta = float(phi_ratio), beta
        self.codebook = Codebook(codebook_size, dim, **codebook_options)
        count = len(patch_nums) if phi_share == 0 else phi_share
        self.phis = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in range(count if phi_ratio else 0))
        self._phi_of_scale = tuple(phi_index(k, len(patch_nums), count) for k in range(len(patch_nums)))

    @classmethod
    def from_config(cls, cfg) -> MultiScaleQuantizer:
        return cls(cfg.codebook_size, cfg.dim, cfg.patch_nums, phi_ratio=cfg.phi_ratio, phi_share=cfg.phi_share,
                   beta=cfg.beta, **cfg.codebook_options())  # fmt: skip

    @classmethod
    def check_config(cls, cfg, latent_side: int | None = None) -> None:
        if not cfg.patch_nums:
            raise ValueError("a 'multiscale' quantizer needs patch_nums, the side of every scale, e.g. "
                             f"{list(PATCH_NUMS_256)} (VAR's 256px release)")  # fmt: skip
        _check_scales(tuple(cfg.patch_nums), cfg.phi_ratio, cfg.phi_share)
        if cfg.phi_ratio == 0 and cfg.phi_share not in (0, VAR_PHI_SHARE):  # 0: what a file without Phi converts to
            raise ValueError(f"phi_share={cfg.phi_share} with phi_ratio=0: phi_ratio 0 builds no Phi convolution, so "
                             "phi_share would be saved and ignored; leave model.quantizer.phi_share out")  # fmt: skip
        if cfg.depth != 1:
            raise ValueError(f"a 'multiscale' quantizer has one code per token (depth 1), got depth={cfg.depth}")
        if cfg.lookup_dim not in (None, cfg.dim) or cfg.l2_norm or cfg.entropy_weight:
            raise ValueError("lookup_dim, l2_norm and entropy_weight apply to 'vq' quantizers only")
        if latent_side is not None and latent_side != cfg.patch_nums[-1]:
            raise ValueError(f"the last scale of patch_nums {list(cfg.patch_nums)} must equal the latent side "
                             f"{latent_side} (image size / downsampling factor)")  # fmt: skip

    # ---------------------------------------------------------------- description
    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def levels(self) -> int:
        return self.num_scales

    @property
    def side(self) -> int:
        """P, the side of the latent grid (the last scale)."""
        return self.patch_nums[-1]

    @property
    def num_tokens(self) -> int:
        """L, the number of codes of one image."""
        return sum(p * p for p in self.patch_nums)

    def scale_slices(self) -> list[tuple[int, int]]:
        """[begin, end) of every scale's codes in the flat (B, L) codes."""
        ends = np.cumsum([p * p for p in self.patch_nums]).tolist()
        return list(zip([0, *ends[:-1]], ends, strict=True))

    def phi_index(self, k: int) -> int:
        """The Phi convolution scale k uses (see `phi_index`)."""
        return self._phi_of_scale[k]

    def code_shape(self, latent_side: int) -> tuple[int, ...]:
        if latent_side != self.side:
            raise ValueError(f"multi-scale codes need a {self.side}x{self.side} latent grid (the last of patch_nums "
                             f"{list(self.patch_nums)}), got {latent_side}x{latent_side}")  # fmt: skip
        return (self.num_tokens,)

    def level_codes(self, codes: torch.Tensor) -> list[torch.Tensor]:
        return [codes[:, begin:end].reshape(-1) for begin, end in self.scale_slices()]

    def code_vectors(self) -> torch.Tensor:
        return self.codebook.vectors()[None]

    # ---------------------------------------------------------------- the recursion
    def phi(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Phi_k(x) = (1 - rho) x + rho conv3x3(x) for maps (B, dim, h, w); the identity without Phi convs."""
        if not len(self.phis):
            return x
        return x.mul(1 - self.phi_ratio) + in_float32(self.phis[self._phi_of_scale[k]], x).mul(self.phi_ratio)

    def upsample(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """Scale k's code map (B, dim, p_k, p_k) bicubic-upsampled to P x P (the last scale is left as it is)."""
        if k == self.num_scales - 1:
            return h
        return F.interpolate(h, size=(self.side, self.side), mode="bicubic")

    def add_scale(self, fhat: torch.Tensor | None, h: torch.Tensor, k: int) -> torch.Tensor:
        """f_hat (B, dim, P, P) plus scale k's code map h (B, dim, p_k, p_k), upsampled and refined; `fhat` None
        stands for zeros."""
        refined = self.phi(self.upsample(h, k), k)
        return refined if fhat is None else fhat + refined

    def scale_input(self, fhat: torch.Tensor, k: int) -> torch.Tensor:
        """f_hat (B, dim, P, P) area-resized to scale k and flattened to tokens (B, p_k^2, dim): the input the
        transformer predicts scale k from."""
        p = self.patch_nums[k]
        return F.interpolate(fhat, size=(p, p), mode="area").flatten(2).transpose(1, 2)

    def scale_vectors(self, codes: torch.Tensor, k: int) -> torch.Tensor:
        """The code vectors of scale k of validated codes (B, L), as a map (B, dim, p_k, p_k)."""
        begin, end = self.scale_slices()[k]
        p = self.patch_nums[k]
        return self.codebook.lookup(codes[:, begin:end]).transpose(1, 2).reshape(len(codes), self.dim, p, p)

    def steps(self, f: torch.Tensor) -> Iterator[ScaleStep]:
        """The recursion of the module docstring on latents f (B, dim, P, P), one `ScaleStep` per scale. The
        residual is tracked without gradient; f_hat keeps the gradient of the code vectors and the Phi convs."""
        rest, fhat = f.detach(), None
        for k, p in enumerate(self.patch_nums):
            last = k == self.num_scales - 1
            inputs = rest if last else F.interpolate(rest, size=(p, p), mode="area")
            codes = self.codebook.nearest(inputs.permute(0, 2, 3, 1).reshape(-1, self.dim)).view(len(f), p * p)
            vectors = self.codebook.lookup(codes).transpose(1, 2).reshape(len(f), self.dim, p, p)
            upsampled = self.upsample(vectors, k)
            refined = self.phi(upsampled, k)
            fhat = refined if fhat is None else fhat + refined
            rest = rest - refined.detach()
            yield ScaleStep(inputs, codes, vectors, upsampled, refined, fhat)

    # ---------------------------------------------------------------- the contract
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check_latents(z)
        with torch.autocast(z.device.type, enabled=False):
            f = z.permute(0, 3, 1, 2).float()
            target = f.detach()
            if self.training:

                def init_pool() -> torch.Tensor:  # drawn only when the codebook is not initialised yet
                    views = _scale_views(target, self.patch_nums)
                    return self._balanced_pool(views, len(views[-1]))

                self.codebook.maybe_init(init_pool)
            total = f.new_zeros(())
            commitments, codes, inputs = [], [], []
            for step in self.steps(target):
                commitment = F.mse_loss(step.fhat.detach(), f)
                # The official vq loss: commitment (to the encoder) + f_hat's fit (to the codebook and Phi).
                total = total + (commitment * self.beta + F.mse_loss(step.fhat, target))
                commitments.append(commitment)
                fhat = step.fhat
                codes.append(step.codes)
                inputs.append(step.inputs.permute(0, 2, 3, 1).reshape(-1, self.dim))
            if self.training:
                share = -(-self.codebook_size // self.num_scales)

                def restart_pool() -> torch.Tensor:  # drawn only when there are dead codes
                    return self._balanced_pool(inputs, share)

                self.codebook.update(torch.cat(inputs), torch.cat([c.reshape(-1) for c in codes]), restart_pool)
            quantized = f + (fhat.detach() - target)  # straight-through: the value of f_hat, the gradient of f
        stats = [code_statistics(c, self.codebook_size) for c in codes]
        return QuantizerOutput(
            quantized=quantized.permute(0, 2, 3, 1).to(z.dtype),
            codes=torch.cat(codes, dim=1),
            loss=total * (1.0 / self.num_scales),
            commitment=torch.stack(commitments).mean(),
            usage=torch.stack([s[0] for s in stats]),
            perplexity=torch.stack([s[1] for s in stats]),
        )

    def embed(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Channels-last f_hat (B, P, P, dim) after the first `depth` scales (all by default) of codes (B, L)."""
        codes = self._check_codes(codes)
        depth = self.check_depth(depth)
        with torch.autocast(codes.device.type, enabled=False):
            fhat = None
            for k in range(depth):
                fhat = self.add_scale(fhat, self.scale_vectors(codes, k), k)
        return fhat.permute(0, 2, 3, 1)

    def native_fhats(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """f_hat after every scale at that scale's own size, channels-last (B, p_k, p_k, dim): the official
        experimental `same_shape=False` decoding (f_hat bicubic-resized to p_k before adding Phi_k of scale k's
        un-upsampled code map). Not what VAR samples with; decode each with `Tokenizer.decode_latent`."""
        codes = self._check_codes(codes)
        fhats = []
        with torch.autocast(codes.device.type, enabled=False):
            fhat = None
            for k, p in enumerate(self.patch_nums):
                refined = self.phi(self.scale_vectors(codes, k), k)
                fhat = refined if fhat is None else F.interpolate(fhat, size=(p, p), mode="bicubic") + refined
                fhats.append(fhat.permute(0, 2, 3, 1))
        return fhats

    def next_scale_inputs(self, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing inputs (B, L - p_0^2, dim) of codes (B, L): for k = 1..K-1, f_hat after scales < k
        area-resized to p_k and flattened, concatenated."""
        codes = self._check_codes(codes)
        with torch.autocast(codes.device.type, enabled=False):
            fhat, inputs = None, []
            for k in range(self.num_scales - 1):
                fhat = self.add_scale(fhat, self.scale_vectors(codes, k), k)
                inputs.append(self.scale_input(fhat, k + 1))
        if not inputs:
            return self.codebook.weight.new_zeros(len(codes), 0, self.dim)
        return torch.cat(inputs, dim=1)

    # ---------------------------------------------------------------- helpers
    def _balanced_pool(self, per_scale: list[torch.Tensor], share: int) -> torch.Tensor:
        """`share` vectors from each scale's rows (N_k, dim), tiled with a little noise where a scale has fewer:
        every scale equally represented. Empty when there are none (an empty batch on this rank)."""
        rows = [sample_vectors(x.float(), share) for x in per_scale if len(x)]
        return torch.cat(rows) if rows else per_scale[0].new_zeros(0, self.dim, dtype=torch.float32)

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.dim() != 4 or z.shape[-1] != self.dim or tuple(z.shape[1:3]) != (self.side, self.side):
            raise ValueError(f"expected channels-last latents (B, {self.side}, {self.side}, {self.dim}) (the last "
                             f"scale of patch_nums {list(self.patch_nums)}), got shape {tuple(z.shape)}")  # fmt: skip

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if isinstance(codes, torch.Tensor) and codes.dim() != 2:
            raise ValueError(f"multi-scale codes have shape (B, L) with L = {self.num_tokens}, got "
                             f"{tuple(codes.shape)}")  # fmt: skip
        return check_codes(codes, self.codebook_size, (self.num_tokens,))


def _scale_views(f: torch.Tensor, patch_nums: Sequence[int]) -> list[torch.Tensor]:
    """f (B, dim, P, P) area-resized to every scale, as rows (B p_k^2, dim): the k-means pool of the first step."""
    return [F.interpolate(f, size=(p, p), mode="area").permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for p in patch_nums]


def _check_scales(patch_nums: tuple[int, ...], phi_ratio: float, phi_share: int) -> None:
    if not patch_nums or min(patch_nums) < 1 or any(b <= a for a, b in zip(patch_nums, patch_nums[1:], strict=False)):
        raise ValueError(f"patch_nums must be increasing positive scale sides, got {list(patch_nums)}")
    if not 0.0 <= phi_ratio <= 1.0:
        raise ValueError(f"phi_ratio (VAR's quant_resi) must be in [0, 1], got {phi_ratio}")
    if phi_share < 0:
        raise ValueError(f"phi_share must be >= 0 (0 = one Phi per scale), got {phi_share}")
    # K scales use at most K of the shared convolutions (VAR's 4 shared ones are kept for fewer scales, as VAR
    # builds them); more were built and never used, 10^8 of them until memory ran out.
    most = max(len(patch_nums), VAR_PHI_SHARE)
    if phi_share > most:
        raise ValueError(f"phi_share {phi_share}: the {len(patch_nums)} scales of patch_nums {list(patch_nums)} use at "
                         f"most {most} shared Phi convolutions; more would be built and never used")  # fmt: skip
