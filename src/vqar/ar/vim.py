"""VIM: the decoder-only transformer of "Vector-quantized Image Modeling with Improved VQGAN" (Yu et al., ICLR
2022), over ViT-VQGAN codes.

A GPT-2 style stack (pre-LN blocks, GELU MLP, learned position embeddings) over [class-id token, code_0, ...,
code_{n-2}]; position i predicts code i. Its blocks are the RQ-Transformer's spatial blocks, so sampling uses the
same static KV cache and the GPT's generation loop (`prefill` / `decode_one_token`). The linear probe of the
evaluation tools reads the output of any block.

Sizes: VIM-Base 24 layers x 1536 (650M with 8192 codes over a 32x32 grid), VIM-Large 36 x 2048 (1.7B).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vqar.ar.conditioning import ClassEmbedding
from vqar.ar.layers import CodeModel, KVCache
from vqar.ar.rq_transformer import Block
from vqar.quantize.codebook import check_codes


@dataclass
class VIMConfig:
    vocab_size: int = 8192
    grid: list[int] = field(default_factory=lambda: [32, 32])
    embed_dim: int = 1536
    n_head: int = 16
    n_layer: int = 24
    mlp_ratio: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.0
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.0
    initializer_range: float = 0.02
    # The fields the shared blocks read (VIM uses exact GELU and biased layers).
    mlp_bias: bool = True
    attn_bias: bool = True
    gelu: str = "exact"

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def validate(self) -> None:
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be [height, width], got {list(self.grid)}")
        if self.embed_dim % self.n_head:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by n_head={self.n_head}")
        if self.vocab_size < 2 or self.num_classes < 0:
            raise ValueError("need vocab_size >= 2 and num_classes >= 0")


class VIM(CodeModel):
    kind = "vim"
    tokenizer = None  # set by `vqar.load` when the model folder holds its tokenizer

    def __init__(self, cfg: VIMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        e = cfg.embed_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, e)
        self.cls_embedding = ClassEmbedding(cfg.num_classes, e, cfg.class_dropout_prob)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.num_tokens, e))
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(e)
        self.head = nn.Linear(e, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=cfg.initializer_range)

    @property
    def code_shape(self) -> tuple[int, int]:
        return tuple(self.cfg.grid)

    @property
    def layers(self) -> nn.ModuleList:
        """The blocks, under the name the linear probe and the GPT share."""
        return self.blocks

    def _run(self, x: torch.Tensor, caches: list[KVCache] | None = None, start: int = 0) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None, start)
        return self.head(self.norm(x))

    def _inputs(self, ids: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """[class token, codes of `prefix` + their positions]; the class token carries no position."""
        codes = self.tok_emb(prefix) + self.pos_emb[:, : prefix.shape[1]]
        return torch.cat([self.cls_embedding(ids)[:, None], codes], dim=1)

    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, h, w, V)."""
        tokens = check_codes(codes, self.cfg.vocab_size, self.code_shape).flatten(1)
        ids = self.cls_embedding.ids(cond, len(tokens))
        logits = self._run(self.drop(self._inputs(ids, tokens[:, :-1]))).float()
        return logits.view(*codes.shape, -1)

    def loss(self, logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))

    # ---------------------------------------------------------------- sampling (the GPT's interface)
    def new_caches(self) -> list[KVCache]:
        return [KVCache(self.cfg.num_tokens) for _ in self.blocks]

    def prefill(self, ids: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        return self._run(self.cls_embedding(ids)[:, None], caches, 0)[:, -1]

    def decode_one_token(self, tokens: torch.Tensor, index: int, caches: list[KVCache]) -> torch.Tensor:
        x = (self.tok_emb(tokens) + self.pos_emb[:, index])[:, None]
        return self._run(x, caches, index + 1)[:, -1]

    def next_token_logits(self, ids: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        return self._run(self._inputs(ids, prefix))[:, -1]

    @torch.no_grad()
    def generate(self, cond: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Codes (B, h, w); see `vqar.sampling.generate_gpt` for the arguments."""
        from vqar.sampling.generate import generate_gpt

        return generate_gpt(self, cond, **kwargs)
