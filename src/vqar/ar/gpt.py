"""LlamaGen's GPT: "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation" (Sun et al., 2024).

A decoder-only Llama transformer over a raster-ordered grid of VQ codes: pre-norm RMSNorm (float32), SwiGLU FFN,
fused bias-free qkv, 2D rotary embeddings over the code grid, untied input and output embeddings. The condition
(a class embedding with a null row for classifier-free guidance) is the first token, or a caption of
`text_length` token embeddings is the prefix (as LlamaGen's text-to-image GPT, with BPE ids instead of T5
features; the empty caption is the null condition); the output at the last prefix position predicts the first
code. Module names follow LlamaGen, so its checkpoints map one to one.

Sampling uses a static KV cache: `prefill` runs the condition token, `decode_one_token` feeds one code at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vqar.ar.conditioning import ClassEmbedding, TextEmbedding
from vqar.ar.layers import (
    CodeModel,
    KVCache,
    RMSNorm,
    SwiGLU,
    apply_rope,
    causal_attention,
    rope_2d_table,
    swiglu_hidden_dim,
)
from vqar.quantize.codebook import check_codes


@dataclass
class GPTConfig:
    vocab_size: int = 16384
    grid: list[int] = field(default_factory=lambda: [16, 16])
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    cls_token_num: int = 1
    text_length: int = 0  # > 0: conditioned on a caption of this many tokens instead of a class
    text_vocab_size: int = 0
    text_pad_id: int = 0

    @property
    def prefix_length(self) -> int:
        """Condition tokens before the first code: the caption, or one class / start token."""
        return self.text_length or self.cls_token_num

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def validate(self) -> None:
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be [height, width] of positive sizes, got {list(self.grid)}")
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} must be divisible by n_head={self.n_head}")
        kv = self.n_kv_head or self.n_head
        if self.n_head % kv:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={kv}")
        if self.head_dim % 4:
            raise ValueError(f"2D RoPE needs dim / n_head divisible by 4, got {self.head_dim}")
        if self.cls_token_num != 1:
            raise ValueError("class-conditional and unconditional GPTs use cls_token_num=1")
        if self.vocab_size < 2 or self.num_classes < 0:
            raise ValueError("need vocab_size >= 2 and num_classes >= 0")
        if self.text_length and (self.num_classes or self.text_vocab_size < 2):
            raise ValueError("a text-conditioned GPT needs num_classes=0 and text_vocab_size >= 2")


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


class GPT(CodeModel):
    kind = "gpt"
    tokenizer = None  # set by `vqar.load` when the model folder holds its tokenizer
    text_tokenizer = None  # likewise, the caption tokenizer of a text-to-image model

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.text_length:
            self.cls_embedding = TextEmbedding(cfg.text_vocab_size, cfg.text_length, cfg.dim,
                                               has_null=cfg.class_dropout_prob > 0, pad_id=cfg.text_pad_id)  # fmt: skip
        else:
            self.cls_embedding = ClassEmbedding(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        table = rope_2d_table(*cfg.grid, cfg.head_dim, cfg.rope_base, cfg.prefix_length)
        self.register_buffer("rope", table, persistent=False)
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)  # LlamaGen starts from uniform predictions

    @property
    def code_shape(self) -> tuple[int, int]:
        return tuple(self.cfg.grid)

    @property
    def is_text_conditioned(self) -> bool:
        return self.cfg.text_length > 0

    def condition_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The prefix (B, prefix_length, dim) for validated condition ids: (B,) classes or (B, text_length)."""
        emb = self.cls_embedding(ids)
        return emb if emb.dim() == 3 else emb[:, None]

    # ---------------------------------------------------------------- training
    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None, patch_side: int = 1) -> torch.Tensor:
        """Teacher-forced logits (B, h, w, V): position (i, j) predicts codes[:, i, j] from earlier codes.
        `patch_side` p > 1 gives next-patch-prediction training logits (B, hw / p^2, V) instead (see
        `vqar.ar.next_patch`); it is an argument of forward so that wrappers such as DDP see the pass."""
        if patch_side > 1:
            from vqar.ar.next_patch import next_patch_logits

            return next_patch_logits(self, codes, cond, patch_side)
        tokens = check_codes(codes, self.cfg.vocab_size, self.code_shape).flatten(1)
        ids = self.cls_embedding.ids(cond, len(tokens))
        x = torch.cat([self.condition_tokens(ids), self.tok_embeddings(tokens[:, :-1])], dim=1)
        hidden = self.run_layers(self.tok_dropout(x), self.rope[: x.shape[1]])
        logits = self.output(self.norm(hidden[:, self.cfg.prefix_length - 1 :])).float()
        return logits.view(*codes.shape, -1)

    def run_layers(
        self, x: torch.Tensor, rope: torch.Tensor, caches: list[KVCache] | None = None, start: int = 0
    ) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, caches[i] if caches is not None else None, start)
        return x

    def loss(self, logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))

    # ---------------------------------------------------------------- sampling
    # Step logits stay in the compute dtype: under bf16, converting all V logits every step costs more than the
    # sampler, which converts only the top-k candidates.
    def new_caches(self) -> list[KVCache]:
        return [KVCache(self.cfg.prefix_length + self.cfg.num_tokens) for _ in self.layers]

    def prefill(self, ids: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """Runs the condition token(s) of each row; returns the logits (B, V) of the first code."""
        x = self.condition_tokens(ids)
        hidden = self.run_layers(x, self.rope[: x.shape[1]], caches, 0)
        return self.output(self.norm(hidden[:, -1]))

    def decode_one_token(self, tokens: torch.Tensor, index: int, caches: list[KVCache]) -> torch.Tensor:
        """Feeds code number `index` (B,) of the raster order; returns the logits (B, V) of code index + 1."""
        position = self.cfg.prefix_length + index
        x = self.tok_embeddings(tokens)[:, None]
        hidden = self.run_layers(x, self.rope[position : position + 1], caches, position)
        return self.output(self.norm(hidden[:, -1]))

    def next_token_logits(self, ids: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the code after `prefix` (B, t), recomputed from scratch (no cache)."""
        x = torch.cat([self.condition_tokens(ids), self.tok_embeddings(prefix)], dim=1)
        hidden = self.run_layers(x, self.rope[: x.shape[1]])
        return self.output(self.norm(hidden[:, -1]))

    @torch.no_grad()
    def generate(self, cond: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Codes (B, h, w); see `vqar.sampling.generate_gpt` for the arguments."""
        from vqar.sampling.generate import generate_gpt

        return generate_gpt(self, cond, **kwargs)
