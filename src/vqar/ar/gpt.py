"""LlamaGen's GPT: "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation" (Sun et al., 2024).

A decoder-only Llama transformer over a raster-ordered grid of VQ codes: pre-norm RMSNorm (float32), SwiGLU FFN,
fused bias-free qkv, 2D rotary embeddings over the code grid, untied input and output embeddings. The condition
(a class embedding with a null row for classifier-free guidance) is the first token, or a caption of
`text_length` token embeddings is the prefix (as LlamaGen's text-to-image GPT, with BPE ids instead of T5
features; the empty caption is the null condition); the output at the last prefix position predicts the first
code. Module names are LlamaGen's but for `cond_embedding` (its `cls_embedding`; see `vqar.interop.llamagen`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vqar.ar.conditioning import condition_embedding
from vqar.ar.contract import ARConfig, ARModel, ModelOutput
from vqar.ar.layers import (
    KVCache,
    RMSNorm,
    SwiGLU,
    apply_rope,
    causal_attention,
    rope_2d_table,
    rotation_table,
    rows_at,
    run_blocks,
    swiglu_hidden_dim,
)
from vqar.utils.codes import check_codes


@dataclass
class GPTConfig(ARConfig):
    code_shape: list[int] = field(default_factory=lambda: [16, 16])
    class_dropout_prob: float = 0.1
    token_dropout_p: float = 0.1
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    ffn_dropout_p: float = 0.1

    def validate(self) -> None:
        super().validate()
        if len(self.code_shape) != 2:
            raise ValueError(f"a GPT models one code per position: code_shape must be [height, width], "
                             f"got {self.code_shape}")  # fmt: skip
        kv = self.n_kv_head or self.n_head
        if self.n_head % kv:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={kv}")
        if self.head_dim % 4:
            raise ValueError(f"2D RoPE needs dim / n_head divisible by 4, got {self.head_dim}")


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.wqkv = nn.Linear(cfg.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: KVCache | None, start: int) -> torch.Tensor:
        b, length, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(b, length, self.n_head, self.head_dim), rope)
        k = apply_rope(k.view(b, length, self.n_kv_head, self.head_dim), rope)
        v = v.view(b, length, self.n_kv_head, self.head_dim)
        dropout = self.attn_dropout_p if self.training else 0.0
        out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cache, start, dropout)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, length, q_size)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        hidden = swiglu_hidden_dim(cfg.dim, cfg.multiple_of, cfg.ffn_dim_multiplier)
        self.feed_forward = SwiGLU(cfg.dim, hidden, cfg.ffn_dropout_p)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: KVCache | None, start: int) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, cache, start)
        return h + self.feed_forward(self.ffn_norm(h))


class GPT(ARModel):
    arch = "gpt"

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.cond_embedding = condition_embedding(cfg, cfg.dim)
        self.token_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        table = rope_2d_table(*cfg.code_shape, cfg.head_dim, cfg.rope_base, cfg.prefix_length)
        self.register_buffer("rope", rotation_table(table), persistent=False)
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)  # LlamaGen starts from uniform predictions

    # ---------------------------------------------------------------- training
    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None, patch_side: int = 1) -> ModelOutput:
        """Teacher-forced logits (B, h, w, V). `patch_side` p > 1 gives next-patch-prediction training logits
        (B, hw / p^2, V) instead (see `vqar.ar.next_patch`); it is an argument of forward so that wrappers such
        as DDP see the pass."""
        if patch_side > 1:
            from vqar.ar.next_patch import next_patch_logits

            return ModelOutput(next_patch_logits(self, codes, cond, patch_side))
        tokens = check_codes(codes, self.cfg.vocab_size, self.code_shape).flatten(1)
        logits = self.logits_after(cond, self.tok_embeddings(tokens[:, :-1]), self.rope)
        return ModelOutput(logits.view(*codes.shape, -1))

    def logits_after(self, cond: torch.Tensor | None, inputs: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """Float logits (B, L + 1, V) of [condition prefix, inputs (B, L, dim)] under the rotary table `rope`:
        entry i predicts what follows inputs[:, i - 1] (entry 0: what follows the condition)."""
        ids = self.cond_embedding.ids(cond, len(inputs))
        x = torch.cat([self.cond_embedding(ids), inputs], dim=1)
        hidden = run_blocks(self.layers, self.token_dropout(x), rope=rope[: x.shape[1]])
        return self.output(self.norm(hidden[:, self.cfg.prefix_length - 1 :])).float()

    # ---------------------------------------------------------------- sampling
    def new_decode_state(self) -> list[KVCache]:
        return [KVCache(self.cfg.prefix_length + self.cfg.num_positions) for _ in self.layers]

    def prefill(self, cond_ids: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        x = self.cond_embedding(cond_ids)
        return run_blocks(self.layers, x, caches, 0, rope=self.rope[: x.shape[1]])[:, -1:]

    def code_logits(self, context: torch.Tensor, chosen: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        return self.output(self.norm(context))

    def decode_block(self, codes: torch.Tensor, start, caches: list[KVCache], smooth=None) -> torch.Tensor:
        position = self.cfg.prefix_length + start
        x = self.tok_embeddings(codes[..., 0])
        return run_blocks(self.layers, x, caches, position, rope=rows_at(self.rope, position, x.shape[1]))
