"""VAR: "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction" (Tian et al., NeurIPS
2024; FoundationVision/VAR).

The codes of a multi-scale residual tokenizer (`vqar.quantize.multiscale`) are K token maps of p_0^2, ..., p_{K-1}^2
codes laid end to end (L = sum p_k^2 positions, scale by scale, row-major inside a scale). The transformer predicts a
whole scale per call:

* input of scale 0 (p_0^2 start tokens): the class embedding + `pos_start`; input of scale k > 0: the tokenizer's
  f_hat after scales 0..k-1, area-resized to p_k x p_k and projected by `tok_embeddings` (Linear code_dim -> dim);
  every token then gets its scale's level embedding and its own absolute position embedding;
* a block-causal mask: a token sees every token of its own and of coarser scales, so the teacher-forced pass trains
  all scales at once and sampling runs one scale per call over a KV cache (no mask needed then);
* blocks with adaptive LayerNorm: six vectors (gamma1, gamma2, scale1, scale2, shift1, shift2) from the class
  embedding, made per block (SiLU -> Linear) or, with `shared_adaln` (VAR-d36), by one shared Linear plus a learned
  per-block offset; x += gamma1 * attn(LN(x) * (1 + scale1) + shift1), then the same with the FFN (GELU, tanh);
* attention with a bias on queries and values only; with `attn_l2_norm` (every release) queries and keys are
  l2-normalised per head and queries multiplied by exp(min(s_h, ln 100)), s_h a learned per-head log-scale, with no
  further scaling; without it the logits are scaled by 0.25 / sqrt(head_dim) (the official constant, not 1/sqrt);
* an AdaLN (scale, shift from the class) before the output head; logits in float32.

Differences from the official code, both deliberate: condition dropout (`class_dropout_prob`, its
`cond_drop_rate`) applies in training only (the official `forward` also drops labels in eval mode); drop path is
active in training only, as there. Official parameter names are mapped in `vqar.interop.var_transformer`.

The model reads its tokenizer's quantizer (the shared codebook and the Phi convolutions) in training and in
sampling: attach it with `model.attach(tokenizer)`. Sizes: width 64 * depth, depth heads, drop path 0.1 * depth /
24, as the official `build_vae_var` (VAR-d16 310M ... VAR-d36 2.35B with shared AdaLN at 512 px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from vqar.ar.conditioning import ClassEmbedding
from vqar.ar.contract import ARConfig, ARModel, ModelOutput
from vqar.ar.layers import KVCache
from vqar.utils.codes import check_codes

# The official patch_nums (side of each scale's token map) of the 256 px and 512 px releases.
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
MAX_LOG_SCALE = math.log(100.0)  # the clamp of the per-head attention log-scale


def _size(depth: int, **extra) -> dict:
    """The official `build_vae_var` rule: width 64 * depth, depth heads, drop path 0.1 * depth / 24."""
    return {"n_layer": depth, "n_head": depth, "dim": 64 * depth, "drop_path_rate": 0.1 * depth / 24, **extra}


VAR_SIZES: dict[str, dict] = {
    "VAR-d16": _size(16),  # 310M at 256 px (4096 codes of dimension 32, 1000 classes)
    "VAR-d20": _size(20),  # 601M
    "VAR-d24": _size(24),  # 1.03B
    "VAR-d30": _size(30),  # 2.01B
    "VAR-d36": _size(36, shared_adaln=True),  # 2.35B; released at 512 px (patch_nums PATCH_NUMS_512, a data field)
    # CPU-sized
    "VAR-S": _size(6, n_head=4, dim=256),
    "VAR-XS": _size(4, n_head=2, dim=128),
}


@dataclass
class VARConfig(ARConfig):
    """`code_shape` is [L] with L = sum(p * p for p in patch_nums). `patch_nums` and `code_dim` (the tokenizer's
    code vector size, Cvae) describe the tokenizer and are data fields, taken from a code store."""

    vocab_size: int = 4096
    code_shape: list[int] = field(default_factory=lambda: [sum(p * p for p in PATCH_NUMS_256)])
    patch_nums: list[int] = field(default_factory=lambda: list(PATCH_NUMS_256))
    code_dim: int = 32
    class_dropout_prob: float = 0.1
    dim: int = 1024
    n_layer: int = 16
    n_head: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_adaln: bool = False
    attn_l2_norm: bool = True
    drop_path_rate: float = 0.0
    resid_dropout_p: float = 0.0  # the official drop_rate (after the attention projection and the FFN)

    DATA_FIELDS = (*ARConfig.DATA_FIELDS, "patch_nums", "code_dim")

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def validate(self) -> None:
        if len(self.code_shape) != 1:
            raise ValueError(f"VAR lays its scales end to end: code_shape must be [L], got {self.code_shape}")
        sides = list(self.patch_nums)
        if not sides or min(sides) < 1 or sides != sorted(set(sides)):  # as the tokenizer's scales
            raise ValueError(f"patch_nums must be increasing positive scale sides, got {sides}")
        total = sum(p * p for p in self.patch_nums)
        if self.code_shape[0] != total:
            raise ValueError(f"code_shape [{self.code_shape[0]}] does not match patch_nums {list(self.patch_nums)} "
                             f"(sum of squares {total})")  # fmt: skip
        super().validate()
        if self.text_length:
            raise ValueError("VAR is class-conditional or unconditional; captions are not supported")
        for name, ok, wanted in (("code_dim", self.code_dim >= 1, ">= 1"),
                                 ("drop_path_rate", 0.0 <= self.drop_path_rate < 1.0, "in [0, 1)")):  # fmt: skip
            if not ok:  # the one at fault, by name (all were listed, with mlp_ratio, which the base checks)
                raise ValueError(f"model.{name} must be {wanted}, got {getattr(self, name)}")
        defaults = {f.name: f.default for f in fields(self)}
        for name, why in (("token_dropout_p", "drops no input codes"),
                          ("initializer_range", "takes the official scales, sqrt(1 / (3 dim))")):  # fmt: skip
            if getattr(self, name) != defaults[name]:  # else saved in run.yaml and trained the very same weights
                raise ValueError(f"{name}={getattr(self, name)} does nothing in VAR, which {why}: leave it out")


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth ("Deep Networks with Stochastic Depth", Huang et al., 2016): a sample's branch is dropped
    with probability `rate` and kept ones are rescaled by 1 / (1 - rate); identity outside training."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.dim() - 1)).bernoulli_(1.0 - rate)
    return x * keep.div_(1.0 - rate)


class VARAttention(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.dim))
        self.v_bias = nn.Parameter(torch.zeros(cfg.dim))
        self.register_buffer("zero_k_bias", torch.zeros(cfg.dim), persistent=False)  # keys have no bias
        self.l2_norm = cfg.attn_l2_norm
        if self.l2_norm:
            self.log_scale = nn.Parameter(torch.full((1, cfg.n_head, 1, 1), math.log(4.0)))
        self.wo = nn.Linear(cfg.dim, cfg.dim)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, start: int) -> torch.Tensor:
        b, n, dim = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.wqkv.weight, bias).view(b, n, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, n, hd)
        if self.l2_norm:
            q = F.normalize(q, dim=-1) * self.log_scale.clamp_max(MAX_LOG_SCALE).exp()
            k = F.normalize(k, dim=-1)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(self.head_dim)
        if cache is not None:  # sampling: a scale attends to itself and every cached coarser scale, so no mask
            k, v = cache.update(start, k, v)
            k, v = k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
        dropout = self.attn_dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, n, dim)))


class VARFeedForward(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        hidden = round(cfg.dim * cfg.mlp_ratio)
        self.w1 = nn.Linear(cfg.dim, hidden)
        self.w2 = nn.Linear(hidden, cfg.dim)
        self.ffn_dropout = nn.Dropout(cfg.resid_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.gelu(self.w1(x), approximate="tanh")))


class VARBlock(nn.Module):
    """A transformer block under adaptive LayerNorm (see the module docstring). `modulation(cond)` gives its six
    vectors (B, 1, 6, dim): from the class embedding (B, dim) through its own `adaln`, or, with `shared_adaln`,
    from the shared table (B, 1, 6, dim) plus its learned `adaln_offset`."""

    def __init__(self, cfg: VARConfig, drop_path_rate: float):
        super().__init__()
        self.dim = cfg.dim
        self.attention_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.attention = VARAttention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.feed_forward = VARFeedForward(cfg)
        if cfg.shared_adaln:
            self.adaln_offset = nn.Parameter(torch.zeros(1, 1, 6, cfg.dim))
        else:
            self.adaln = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.drop_path_rate = drop_path_rate

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "adaln_offset"):
            return self.adaln_offset + cond
        return self.adaln(F.silu(cond)).view(-1, 1, 6, self.dim)

    def forward(self, x: torch.Tensor, ada: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, start: int = 0) -> torch.Tensor:  # fmt: skip
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)
        h = self.attention(self.attention_norm(x) * (scale1 + 1) + shift1, mask, cache, start)
        x = x + drop_path(h * gamma1, self.drop_path_rate, self.training)
        h = self.feed_forward(self.ffn_norm(x) * (scale2 + 1) + shift2)
        return x + drop_path(h * gamma2, self.drop_path_rate, self.training)


class AdaLNNorm(nn.Module):
    """The LayerNorm before the head, modulated by (scale, shift) = Linear(SiLU(class)); normalises in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.adaln = nn.Linear(dim, 2 * dim)

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        return self.adaln(F.silu(cond)).view(-1, 1, 2, self.dim)

    def forward(self, x: torch.Tensor, ada: torch.Tensor) -> torch.Tensor:
        scale, shift = ada.unbind(2)
        return self.norm(x.float()) * (scale + 1) + shift


@dataclass
class VARDecodeState:
    """One generation: KV caches over all L positions, the AdaLN vectors of the condition (computed once), and the
    tokenizer's f_hat (B, code_dim, P, P) after the scales decoded so far, for every row of the batch."""

    caches: list[KVCache]
    ada: list[torch.Tensor] | None = None
    head_ada: torch.Tensor | None = None
    fhat: torch.Tensor | None = None


class VAR(ARModel):
    arch = "var"
    cfg: VARConfig

    def __init__(self, cfg: VARConfig):
        super().__init__(cfg)
        dim, scales = cfg.dim, cfg.patch_nums
        self.cond_embedding = ClassEmbedding(cfg.num_classes, dim, cfg.class_dropout_prob)
        self.pos_start = nn.Parameter(torch.zeros(1, scales[0] ** 2, dim))
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.num_positions, dim))
        self.level_emb = nn.Embedding(len(scales), dim)
        self.tok_embeddings = nn.Linear(cfg.code_dim, dim)
        if cfg.shared_adaln:
            self.shared_adaln = nn.Linear(dim, 6 * dim)
        rates = [cfg.drop_path_rate * i / max(cfg.n_layer - 1, 1) for i in range(cfg.n_layer)]  # linear in depth
        self.layers = nn.ModuleList(VARBlock(cfg, rate) for rate in rates)
        self.norm = AdaLNNorm(dim, cfg.norm_eps)
        self.output = nn.Linear(dim, cfg.vocab_size)
        levels = torch.cat([torch.full((p * p,), k) for k, p in enumerate(scales)])
        self.register_buffer("level_ids", levels, persistent=False)
        self.register_buffer("block_mask", levels[None, :] <= levels[:, None], persistent=False)  # (query, key)
        self.scale_starts = [0]
        for p in scales:
            self.scale_starts.append(self.scale_starts[-1] + p * p)
        self.reset_parameters()

    def reset_parameters(self, adaln: float = 0.5, adaln_gamma: float = 1e-5, head: float = 0.02) -> None:
        """The official initialisation (`build_vae_var`'s arguments): truncated normals of std sqrt(1 / (3 dim)),
        output projections of the blocks divided by sqrt(2 n_layer), AdaLN weights scaled by `adaln` (the gammas
        by `adaln_gamma`, so every block starts close to the identity) and the head by `head`."""
        std = (1 / self.cfg.dim / 3) ** 0.5
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for pos in (self.pos_start, self.pos_emb):
            nn.init.trunc_normal_(pos, std=std)
        self.output.weight.data.mul_(head)
        self.norm.adaln.weight.data.mul_(adaln)
        two = 2 * self.cfg.dim
        for block in self.layers:
            block.attention.wo.weight.data.div_(math.sqrt(2 * self.cfg.n_layer))
            block.feed_forward.w2.weight.data.div_(math.sqrt(2 * self.cfg.n_layer))
            nn.init.zeros_(block.attention.q_bias)
            nn.init.zeros_(block.attention.v_bias)
            if block.attention.l2_norm:
                nn.init.constant_(block.attention.log_scale, math.log(4.0))
            if hasattr(block, "adaln_offset"):
                nn.init.normal_(block.adaln_offset, std=self.cfg.dim**-0.5)
                block.adaln_offset.data[:, :, 2:].mul_(adaln)
                block.adaln_offset.data[:, :, :2].mul_(adaln_gamma)
            else:
                block.adaln.weight.data[two:].mul_(adaln)
                block.adaln.weight.data[:two].mul_(adaln_gamma)

    # ---------------------------------------------------------------- description
    @property
    def latent_grid(self) -> tuple[int, int]:
        return (self.cfg.patch_nums[-1],) * 2

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return tuple(p * p for p in self.cfg.patch_nums)

    @property
    def raster(self) -> bool:
        return False

    @property
    def cfg_schedule(self) -> str:
        return "linear"

    @property
    def smooth_embedding(self) -> bool:
        return True

    def check_companions(self, tokenizer=None, text_tokenizer=None) -> None:
        """Also checks that the tokenizer's quantizer is multi-scale with this model's scales and code size."""
        if tokenizer is not None:
            quantizer = getattr(tokenizer, "quantizer", None)
            scales = getattr(quantizer, "patch_nums", None)
            if scales is None:
                raise ValueError("VAR needs a multi-scale tokenizer (quantizer kind 'multiscale')")
            if tuple(scales) != tuple(self.cfg.patch_nums) or quantizer.dim != self.cfg.code_dim:
                raise ValueError(f"the tokenizer's scales {tuple(scales)} (code dim {quantizer.dim}) do not fit the "
                                 f"model's {tuple(self.cfg.patch_nums)} (code dim {self.cfg.code_dim})")  # fmt: skip
        super().check_companions(tokenizer, text_tokenizer)

    def quantizer(self):
        """The attached tokenizer's multi-scale quantizer; RuntimeError when no tokenizer is attached."""
        if self.tokenizer is None:
            raise RuntimeError("VAR builds its inputs with its tokenizer's quantizer (codebook and Phi convolutions): "
                               "call model.attach(tokenizer) first")  # fmt: skip
        return self.tokenizer.quantizer

    # ---------------------------------------------------------------- pieces
    def level_pos(self) -> torch.Tensor:
        """Level + position embedding of every token, (1, L, dim)."""
        return self.level_emb(self.level_ids)[None] + self.pos_emb

    def start_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """The p_0^2 start tokens (B, p_0^2, dim) of class embeddings (B, dim), without level / position."""
        return cond[:, None] + self.pos_start

    def modulations(self, cond: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The AdaLN vectors of every block (B, 1, 6, dim) and of the head (B, 1, 2, dim) for class embeddings."""
        shared = self.shared_adaln(F.silu(cond)).view(-1, 1, 6, self.cfg.dim) if self.cfg.shared_adaln else cond
        return [block.modulation(shared) for block in self.layers], self.norm.modulation(cond)

    def run_layers(self, x: torch.Tensor, ada: list[torch.Tensor], mask: torch.Tensor | None = None,
                   caches: list[KVCache] | None = None, start: int = 0) -> torch.Tensor:  # fmt: skip
        for i, block in enumerate(self.layers):
            x = block(x, ada[i], mask, None if caches is None else caches[i], start)
        return x

    # ---------------------------------------------------------------- training
    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None) -> ModelOutput:
        """Teacher-forced logits (B, L, V): the logits of scale k see the class and the codes of scales < k."""
        codes = check_codes(codes, self.cfg.vocab_size, self.code_shape)
        quantizer = self.quantizer()
        with torch.no_grad():
            inputs = quantizer.next_scale_inputs(codes)
        return ModelOutput(self.forward_inputs(inputs, cond))

    def forward_inputs(self, inputs: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Float logits (B, L, V) from the scale inputs (B, L - p_0^2, code_dim) that the quantizer's
        `next_scale_inputs` makes of the codes (f_hat of the coarser scales, resized to each scale)."""
        expected = (self.cfg.num_positions - self.block_sizes[0], self.cfg.code_dim)
        if inputs.dim() != 3 or tuple(inputs.shape[1:]) != expected:
            raise ValueError(f"scale inputs must have shape (B, {expected[0]}, {expected[1]}), "
                             f"got {tuple(inputs.shape)}")  # fmt: skip
        return self.teacher_forced(inputs, self.cond_embedding.ids(cond, len(inputs)))

    def teacher_forced(self, inputs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """`forward_inputs` for validated class ids (B,), which may hold the null class (as the sampler's)."""
        cond_vec = self.cond_embedding(ids)[:, 0]  # the (possibly dropped) class drives the start and every AdaLN
        x = torch.cat([self.start_tokens(cond_vec), self.tok_embeddings(inputs)], dim=1) + self.level_pos()
        ada, head_ada = self.modulations(cond_vec)
        hidden = self.run_layers(x, ada, self.block_mask)
        return self.output(self.norm(hidden, head_ada)).float()

    # ---------------------------------------------------------------- sampling
    def new_decode_state(self) -> VARDecodeState:
        return VARDecodeState([KVCache(self.cfg.num_positions) for _ in self.layers])

    def prefill(self, cond_ids: torch.Tensor, state: VARDecodeState) -> torch.Tensor:
        """Context (B, p_0^2, dim) of the first scale: the start tokens through the blocks."""
        cond = self.cond_embedding.embedding_table(cond_ids)  # validated ids; no condition dropout in sampling
        state.ada, state.head_ada = self.modulations(cond)
        state.fhat = None
        x = self.start_tokens(cond) + self.level_pos()[:, : self.block_sizes[0]]
        return self.run_layers(x, state.ada, caches=state.caches, start=0)

    def code_logits(self, context: torch.Tensor, chosen: torch.Tensor, state: VARDecodeState) -> torch.Tensor:
        return self.output(self.norm(context, state.head_ada))

    def decode_block(self, codes: torch.Tensor, start: int | torch.Tensor, state: VARDecodeState,
                     smooth: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        """Adds scale k's codes (B, p_k^2, 1) at `start` to f_hat; returns the context (B, p_{k+1}^2, dim) of
        scale k + 1. `smooth` = (the filtered logits (B, p_k^2, V) the codes were drawn from, Gumbel noise of the
        same shape): the scale then adds softmax((logits * (1 + r) + noise) / tau) @ codebook instead of the codes'
        vectors, with r = k / (K - 1) and tau = max(0.27 (1 - 0.95 r), 0.005) (the official `more_smooth`)."""
        start = int(start)
        decodable = self.scale_starts[:-2]  # every scale but the last has a next one
        if start not in decodable:
            raise ValueError(f"decode_block takes the start of a scale that has a next one ({decodable}), got {start}")
        k = decodable.index(start)
        side, size = self.cfg.patch_nums[k], self.block_sizes[k]
        if codes.shape[1:] != (size, 1):
            raise ValueError(f"scale {k} takes codes of shape (B, {size}, 1), got {tuple(codes.shape)}")
        quantizer = self.quantizer()
        # (V, code_dim); detached, as sampling needs no gradient (a tensor that requires one also takes another
        # matmul kernel for the smooth mix below, which would move its last bits away from the official's)
        vectors = quantizer.code_vectors()[0].detach()
        if smooth is None:
            h = F.embedding(codes[..., 0], vectors)
        else:
            logits, noise = smooth
            r = k / max(self.cfg.num_scales - 1, 1)
            tau = max(0.27 * (1 - 0.95 * r), 0.005)
            h = ((logits.float() * (1 + r) + noise.float()) / tau).softmax(-1) @ vectors.float()[None]
        h = h.to(vectors.dtype).transpose(1, 2).reshape(len(codes), -1, side, side)
        if state.fhat is None:
            full = self.cfg.patch_nums[-1]
            state.fhat = h.new_zeros(len(codes), h.shape[1], full, full)
        # Kept contiguous (as the official in-place sum is): the layout decides the kernels of the next scale's
        # resize and projection, and with it the last bits of the logits.
        state.fhat = quantizer.add_scale(state.fhat, h, k).contiguous()
        nxt = start + size
        x = self.tok_embeddings(quantizer.scale_input(state.fhat, k + 1))
        x = x + self.level_pos()[:, nxt : nxt + self.block_sizes[k + 1]]
        return self.run_layers(x, state.ada, caches=state.caches, start=nxt)
