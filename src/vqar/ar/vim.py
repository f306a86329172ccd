"""VIM: the decoder-only transformer of "Vector-quantized Image Modeling with Improved VQGAN" (Yu et al., ICLR
2022), over ViT-VQGAN codes.

A GPT-2 style stack (pre-LN blocks, GELU MLP, learned position embeddings) over [class-id token, code_0, ...,
code_{n-2}]; position i predicts code i. Its blocks are the RQ-Transformer's spatial blocks, so sampling uses the
same static KV cache. The linear probe of the evaluation tools reads the output of any block.

Sizes: VIM-Base 24 layers x 1536 (650M with 8192 codes over a 32x32 grid), VIM-Large 36 x 2048 (1.7B).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vqar.ar.conditioning import condition_embedding
from vqar.ar.contract import ARConfig, ARModel, ModelOutput
from vqar.ar.layers import GPT2Block, KVCache, check_gelu, rows_at, run_blocks
from vqar.utils.codes import check_codes


@dataclass
class VIMConfig(ARConfig):
    vocab_size: int = 8192
    code_shape: list[int] = field(default_factory=lambda: [32, 32])
    dim: int = 1536
    n_layer: int = 24
    n_head: int = 16
    mlp_ratio: int = 4
    mlp_bias: bool = True
    attn_bias: bool = True
    gelu: str = "exact"

    def validate(self) -> None:
        super().validate()
        if len(self.code_shape) != 2:
            raise ValueError(f"VIM models one code per position: code_shape must be [height, width], "
                             f"got {self.code_shape}")  # fmt: skip
        if self.text_length:
            raise ValueError("VIM is class-conditional or unconditional; train a gpt or rq model on captions")
        check_gelu(self.gelu)


class VIM(ARModel):
    arch = "vim"

    def __init__(self, cfg: VIMConfig):
        super().__init__(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.cond_embedding = condition_embedding(cfg, cfg.dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.num_positions, cfg.dim))
        self.token_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.dim)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=cfg.initializer_range)

    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None) -> ModelOutput:
        """Teacher-forced logits (B, h, w, V); the class token carries no position."""
        tokens = check_codes(codes, self.cfg.vocab_size, self.code_shape).flatten(1)
        ids = self.cond_embedding.ids(cond, len(tokens))
        inputs = self.tok_embeddings(tokens[:, :-1]) + self.pos_emb[:, : tokens.shape[1] - 1]
        x = torch.cat([self.cond_embedding(ids), inputs], dim=1)
        logits = self.output(self.norm(run_blocks(self.layers, self.token_dropout(x)))).float()
        return ModelOutput(logits.view(*codes.shape, -1))

    # ---------------------------------------------------------------- sampling
    def new_decode_state(self) -> list[KVCache]:
        return [KVCache(self.cfg.num_positions) for _ in self.layers]

    def prefill(self, cond_ids: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        return run_blocks(self.layers, self.cond_embedding(cond_ids), caches, 0)[:, -1:]

    def code_logits(self, context: torch.Tensor, chosen: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        return self.output(self.norm(context))

    def decode_block(self, codes: torch.Tensor, start, caches: list[KVCache], smooth=None) -> torch.Tensor:
        x = self.tok_embeddings(codes[..., 0]) + rows_at(self.pos_emb[0], start, codes.shape[1])
        return run_blocks(self.layers, x, caches, start + 1)
