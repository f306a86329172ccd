"""RQ-Transformer: "Autoregressive Image Generation using Residual Quantization" (Lee et al., CVPR 2022).

Predicts a stack of D residual codes per position of an h x w grid with two transformers:

* the spatial transformer (`layers`) runs over positions; the input at position p is
  sum_d spatial_input(e(k_{p,d})) + pos_emb[p], the sequence is [condition, x_0, ..., x_{hw-2}], so its output at
  p summarises everything before position p;
* the depth transformer (`depth_layers`) runs, for each position, over D tokens
  [ctx_p, depth_input(e_0), depth_input(e_0 + e_1), ...] + depth_pos_emb (cumulative sums of the codes already
  chosen at p) and predicts the D codes one after another.

Code embeddings e(.) are the tokenizer's codebook, kept here as a frozen buffer, so the model is self-contained.
Both transformers are pre-LN GPT-2 blocks (4x MLP with GELU, biased attention). The condition is a class id, a
start token (unconditional), or a caption of `text_length` tokens; a text model also predicts its caption with a
second head (`text_norm`, `text_output`), as in the release's text-to-image models. The release's module names
are mapped to these in `vqar.interop.rq_release`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vqar.ar.conditioning import condition_embedding
from vqar.ar.contract import ARConfig, ARModel, ModelOutput
from vqar.ar.layers import GPT2Block, KVCache, check_gelu, rows_at, run_blocks
from vqar.utils.codes import check_codes


@dataclass
class RQTransformerConfig(ARConfig):
    """`n_layer` spatial blocks and `n_depth_layer` depth blocks. `code_dim` and `shared_codebook` describe the
    tokenizer's codebook, which a training run takes from its code store."""

    code_shape: list[int] = field(default_factory=lambda: [8, 8, 4])
    code_dim: int = 256
    shared_codebook: bool = True
    dim: int = 1536
    n_layer: int = 24
    n_depth_layer: int = 4
    n_head: int = 24
    mlp_ratio: int = 4
    mlp_bias: bool = True
    attn_bias: bool = True
    gelu: str = "exact"  # or "sigmoid": x * sigmoid(1.702 x), the release's `gelu: v2`

    DATA_FIELDS = (*ARConfig.DATA_FIELDS, "code_dim", "shared_codebook")

    def validate(self) -> None:
        super().validate()
        if len(self.code_shape) != 3:
            raise ValueError(f"an RQ-Transformer models stacks of codes: code_shape must be [height, width, depth], "
                             f"got {self.code_shape}")  # fmt: skip
        for name in ("code_dim", "n_depth_layer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_gelu(self.gelu)


class RQTransformer(ARModel):
    arch = "rq"

    def __init__(self, cfg: RQTransformerConfig, code_embeddings: torch.Tensor | None = None):
        super().__init__(cfg)
        dim, (h, w, d) = cfg.dim, cfg.code_shape
        books = 1 if cfg.shared_codebook else d
        self.register_buffer("code_embeddings", torch.zeros(books, cfg.vocab_size, cfg.code_dim))
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, cfg.prefix_length, dim))
        self.pos_emb = nn.Parameter(torch.zeros(1, h * w, dim))
        self.depth_pos_emb = nn.Parameter(torch.zeros(1, d, dim))
        self.cond_embedding = condition_embedding(cfg, dim)
        self.spatial_input = nn.Linear(cfg.code_dim, dim)
        self.depth_input = nn.Linear(cfg.code_dim, dim)
        self.token_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layer))
        self.depth_layers = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_depth_layer))
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, cfg.vocab_size)
        if cfg.text_length > 1:
            self.text_norm = nn.LayerNorm(dim)
            self.text_output = nn.Linear(dim, cfg.text_vocab_size)
        self.apply(self._init_weights)
        for pos in (self.cond_pos_emb, self.pos_emb, self.depth_pos_emb):
            nn.init.normal_(pos, std=cfg.initializer_range)
        if code_embeddings is not None:
            self.set_code_embeddings(code_embeddings)

    def set_code_embeddings(self, vectors: torch.Tensor) -> None:
        """Copies the tokenizer's codebook(s), (K, code_dim) or (books, K, code_dim)."""
        vectors = vectors.detach().float()
        if vectors.dim() == 2:
            vectors = vectors[None]
        expected = self.code_embeddings.shape
        if vectors.shape[1:] != expected[1:] or vectors.shape[0] not in (1, expected[0]):
            raise ValueError(
                f"codebook of shape {tuple(vectors.shape)} does not fit this model "
                f"(expects {tuple(self.code_embeddings.shape)})"
            )
        self.code_embeddings.copy_(vectors.expand_as(self.code_embeddings))

    def condition_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The prefix (B, prefix_length, dim) for validated condition ids."""
        return self.cond_embedding(ids) + self.cond_pos_emb

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors (..., d, code_dim) of codes (..., d), column i looked up in depth i's codebook."""
        book = self.code_embeddings
        if book.shape[0] == 1:
            return F.embedding(codes, book[0])
        return torch.stack([F.embedding(codes[..., i], book[i]) for i in range(codes.shape[-1])], dim=-2)

    # ---------------------------------------------------------------- training
    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None) -> ModelOutput:
        """Teacher-forced logits (B, h, w, D, K): [b, i, j, d] predicts codes[b, i, j, d] from the condition, all
        earlier positions and codes[b, i, j, :d]; a model with a text head also returns its caption logits."""
        codes = check_codes(codes, self.cfg.vocab_size, self.code_shape)
        b, (h, w, d) = len(codes), self.cfg.code_shape
        emb = self.embed_codes(codes.view(b, h * w, d))  # (B, L, D, code_dim)
        x = self.spatial_input(emb).sum(2) + self.pos_emb
        prefix = self.condition_tokens(self.cond_embedding.ids(cond, b))
        hidden = run_blocks(self.layers, self.token_dropout(torch.cat([prefix, x[:, :-1]], dim=1)))
        context = hidden[:, prefix.shape[1] - 1 :]  # (B, L, dim)
        depth_inputs = torch.cat([context[:, :, None], self.depth_input(emb.cumsum(2)[:, :, : d - 1])], dim=2)
        depth_inputs = self.token_dropout(depth_inputs + self.depth_pos_emb[:, None])
        out = run_blocks(self.depth_layers, depth_inputs.view(b * h * w, d, -1))
        logits = self.output(self.norm(out)).float().view(b, h, w, d, -1)
        text_logits = None
        if self.cfg.text_length > 1:
            text_logits = self.text_output(self.text_norm(hidden[:, : prefix.shape[1] - 1])).float()
        return ModelOutput(logits, text_logits)

    @torch.no_grad()
    def soft_targets(self, codes: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
        """Soft image targets (B, h, w, D, K) of the release's text-to-image training: at depth d,
        softmax(-||r_d - e_k||^2 / temperature) over the codebook, r_d the residual still to be coded.

        The release measures r_d from the encoder's output; a code store keeps only codes, so here r_d is the sum
        of the code vectors of depths >= d (the quantized feature, missing the last residual's small error)."""
        vectors = self.embed_codes(codes).float()  # (B, h, w, D, code_dim)
        residuals = vectors.flip(-2).cumsum(-2).flip(-2)
        book = self.code_embeddings.float()
        targets = []
        for d in range(self.depth):
            entries = book[0 if book.shape[0] == 1 else d]  # (K, code_dim)
            distances = torch.cdist(residuals[..., d, :].reshape(-1, entries.shape[1]), entries).square()
            targets.append(F.softmax(-distances / temperature, dim=-1).view(*codes.shape[:-1], -1))
        return torch.stack(targets, dim=-2)

    # ---------------------------------------------------------------- sampling
    def new_decode_state(self) -> tuple[list[KVCache], list[KVCache]]:
        """(spatial caches over the condition and hw - 1 positions, depth caches over D tokens, reused for every
        position)."""
        spatial = [KVCache(self.cfg.prefix_length + self.cfg.num_positions - 1) for _ in self.layers]
        return spatial, [KVCache(self.depth) for _ in self.depth_layers]

    def prefill(self, cond_ids: torch.Tensor, state) -> torch.Tensor:
        return run_blocks(self.layers, self.condition_tokens(cond_ids), state[0], 0)[:, -1:]

    def code_logits(self, context: torch.Tensor, chosen: torch.Tensor, state) -> torch.Tensor:
        b, n, d = chosen.shape
        # The cumulative sum, as in training: depth d reads the code vectors chosen at depths < d added up.
        x = context if d == 0 else self.depth_input(self.embed_codes(chosen).cumsum(-2)[..., -1, :])
        x = (x + self.depth_pos_emb[:, d]).reshape(b * n, 1, -1)  # each position's depth steps run side by side
        return self.output(self.norm(run_blocks(self.depth_layers, x, state[1], d))).view(b, n, -1)

    def decode_block(self, codes: torch.Tensor, start, state, smooth=None) -> torch.Tensor:
        x = self.spatial_input(self.embed_codes(codes)).sum(-2) + rows_at(self.pos_emb[0], start, codes.shape[1])
        return run_blocks(self.layers, x, state[0], start + self.cfg.prefix_length)
