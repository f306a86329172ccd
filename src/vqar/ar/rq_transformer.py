"""RQ-Transformer: "Autoregressive Image Generation using Residual Quantization" (Lee et al., CVPR 2022).

Predicts a stack of D residual codes per position of an h x w grid with two transformers:

* the spatial transformer runs over positions; the input at position p is sum_d input_mlp(e(k_{p,d})) +
  pos_emb_hw[p], the sequence is [condition, x_0, ..., x_{hw-2}], so its output at p summarises everything before
  position p;
* the depth transformer runs, for each position, over D tokens [ctx_p, head_mlp(e_0), head_mlp(e_0 + e_1), ...]
  + pos_emb_d (cumulative sums of the codes already chosen at p) and predicts the D codes one after another.

Code embeddings e(.) are the tokenizer's codebook, kept here as a frozen buffer, so the model is self-contained.
Both transformers are pre-LN GPT-2 blocks (4x MLP with GELU, biased attention). The condition is a class id, a
start token (unconditional), or a caption of `text_length` tokens; a text model also predicts its caption with a
second classifier, as in the release's text-to-image models. Module names follow the official release, so its
checkpoints map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vqar.ar.conditioning import ClassEmbedding, TextEmbedding
from vqar.ar.layers import CodeModel, KVCache, causal_attention
from vqar.quantize.codebook import check_codes


@dataclass
class RQTransformerConfig:
    vocab_size: int = 16384
    code_shape: list[int] = field(default_factory=lambda: [8, 8, 4])
    code_dim: int = 256
    shared_codebook: bool = True
    embed_dim: int = 1536
    n_head: int = 24
    body_layers: int = 24
    head_layers: int = 4
    mlp_ratio: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.0
    text_length: int = 0  # > 0: conditioned on a caption of this many tokens instead of a class
    text_vocab_size: int = 0
    text_pad_id: int = 0  # the null caption (all padding) is "no condition" when class_dropout_prob > 0
    mlp_bias: bool = True
    attn_bias: bool = True
    gelu: str = "exact"  # or "sigmoid": x * sigmoid(1.702 x), the release's `gelu: v2`
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.0
    initializer_range: float = 0.02

    @property
    def num_positions(self) -> int:
        return self.code_shape[0] * self.code_shape[1]

    @property
    def depth(self) -> int:
        return self.code_shape[2]

    @property
    def cond_length(self) -> int:
        """Tokens before the first image position: the caption, or one class / start token."""
        return self.text_length or 1

    def validate(self) -> None:
        if len(self.code_shape) != 3 or min(self.code_shape) < 1:
            raise ValueError(f"code_shape must be [height, width, depth], got {list(self.code_shape)}")
        if self.embed_dim % self.n_head:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by n_head={self.n_head}")
        if self.vocab_size < 2 or self.num_classes < 0 or self.code_dim < 1:
            raise ValueError("need vocab_size >= 2, num_classes >= 0 and code_dim >= 1")
        if self.text_length and (self.num_classes or self.text_vocab_size < 2):
            raise ValueError("a text-conditioned model needs num_classes=0 and text_vocab_size >= 2")
        if self.gelu not in ("exact", "sigmoid"):
            raise ValueError(f"gelu must be 'exact' or 'sigmoid', got {self.gelu!r}")


class SelfAttention(nn.Module):
    def __init__(self, cfg: RQTransformerConfig):
        super().__init__()
        e = cfg.embed_dim
        self.n_head = cfg.n_head
        self.query, self.key, self.value, self.proj = (nn.Linear(e, e, bias=cfg.attn_bias) for _ in range(4))
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_drop = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x: torch.Tensor, cache: KVCache | None, start: int) -> torch.Tensor:
        b, length, e = x.shape
        q, k, v = (p(x).view(b, length, self.n_head, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
        out = causal_attention(q, k, v, cache, start, self.attn_pdrop if self.training else 0.0)
        return self.resid_drop(self.proj(out.transpose(1, 2).reshape(b, length, e)))


class SigmoidGELU(nn.Module):
    """The sigmoid approximation of GELU (Hendrycks & Gimpel, 2016), used by some released models."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, cfg: RQTransformerConfig):
        super().__init__()
        e = cfg.embed_dim
        self.ln1 = nn.LayerNorm(e)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(e)
        hidden = cfg.mlp_ratio * e
        self.mlp = nn.Sequential(
            nn.Linear(e, hidden, bias=cfg.mlp_bias),
            nn.GELU() if cfg.gelu == "exact" else SigmoidGELU(),
            nn.Linear(hidden, e, bias=cfg.mlp_bias),
            nn.Dropout(cfg.resid_pdrop),
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None, start: int) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, start)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: RQTransformerConfig, n_layer: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(n_layer))

    def forward(self, x: torch.Tensor, caches: list[KVCache] | None = None, start: int = 0) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None, start)
        return x

    def new_caches(self, length: int) -> list[KVCache]:
        return [KVCache(length) for _ in self.blocks]


class Classifier(nn.Module):
    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.layer_norm(x))


class RQTransformer(CodeModel):
    kind = "rq_transformer"
    tokenizer = None  # set by `vqar.load` when the model folder holds its tokenizer
    text_tokenizer = None  # likewise, the caption tokenizer of a text-to-image model

    def __init__(self, cfg: RQTransformerConfig, code_embeddings: torch.Tensor | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        e, (h, w, d) = cfg.embed_dim, cfg.code_shape
        books = 1 if cfg.shared_codebook else d
        self.register_buffer("code_embeddings", torch.zeros(books, cfg.vocab_size, cfg.code_dim))
        self.pos_emb_cond = nn.Parameter(torch.zeros(1, cfg.cond_length, e))
        self.pos_emb_hw = nn.Parameter(torch.zeros(1, h * w, e))
        self.pos_emb_d = nn.Parameter(torch.zeros(1, d, e))
        if cfg.text_length:
            self.cond_emb = TextEmbedding(
                cfg.text_vocab_size, cfg.text_length, e, has_null=cfg.class_dropout_prob > 0, pad_id=cfg.text_pad_id
            )
        else:
            self.cond_emb = ClassEmbedding(cfg.num_classes, e, cfg.class_dropout_prob)
        self.input_mlp = nn.Linear(cfg.code_dim, e)
        self.head_mlp = nn.Linear(cfg.code_dim, e)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.body_transformer = Transformer(cfg, cfg.body_layers)
        self.head_transformer = Transformer(cfg, cfg.head_layers)
        self.classifier = Classifier(e, cfg.vocab_size)
        if cfg.text_length > 1:
            self.cond_classifier = Classifier(e, cfg.text_vocab_size)
        self.apply(self._init_weights)
        for pos in (self.pos_emb_cond, self.pos_emb_hw, self.pos_emb_d):
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

    @property
    def code_shape(self) -> tuple[int, int, int]:
        return tuple(self.cfg.code_shape)

    @property
    def is_text_conditioned(self) -> bool:
        return self.cfg.text_length > 0

    def condition_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The prefix (B, cond_length, E) for validated condition ids: (B,) classes or (B, text_length) tokens."""
        emb = self.cond_emb(ids)
        return (emb if emb.dim() == 3 else emb[:, None]) + self.pos_emb_cond

    @property
    def depth(self) -> int:
        return self.cfg.depth

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Per-depth code vectors (..., D, code_dim) for codes (..., D)."""
        book = self.code_embeddings
        if book.shape[0] == 1:
            return F.embedding(codes, book[0])
        return torch.stack([F.embedding(codes[..., i], book[i]) for i in range(codes.shape[-1])], dim=-2)

    def embed_code_at(self, codes: torch.Tensor, d: int) -> torch.Tensor:
        """Code vectors (B, code_dim) of depth d for codes (B,)."""
        book = self.code_embeddings
        return F.embedding(codes, book[0 if book.shape[0] == 1 else d])

    # ---------------------------------------------------------------- training
    def forward(
        self, codes: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits (B, h, w, D, K): [b, i, j, d] predicts codes[b, i, j, d] from the condition,
        all earlier positions and codes[b, i, j, :d]. A text model conditioned on captions of more than one token
        returns (image logits, text logits (B, text_length - 1, text_vocab)); text position t predicts token t+1."""
        codes = check_codes(codes, self.cfg.vocab_size, self.code_shape)
        b, (h, w, d) = len(codes), self.cfg.code_shape
        emb = self.embed_codes(codes.view(b, h * w, d))  # (B, L, D, code_dim)
        x = self.input_mlp(emb).sum(2) + self.pos_emb_hw
        prefix = self.condition_tokens(self.cond_emb.ids(cond, b))
        hidden = self.body_transformer(self.drop(torch.cat([prefix, x[:, :-1]], dim=1)))
        context = hidden[:, prefix.shape[1] - 1 :]  # (B, L, E)
        depth_inputs = torch.cat([context[:, :, None], self.head_mlp(emb.cumsum(2)[:, :, : d - 1])], dim=2)
        depth_inputs = self.drop(depth_inputs + self.pos_emb_d[:, None])
        logits = self.classifier(self.head_transformer(depth_inputs.view(b * h * w, d, -1))).float()
        logits = logits.view(b, h, w, d, -1)
        if self.cfg.text_length > 1:
            return logits, self.cond_classifier(hidden[:, : prefix.shape[1] - 1]).float()
        return logits

    def loss(self, logits: torch.Tensor, codes: torch.Tensor, soft_targets: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over all codes, against the codes or against soft targets (..., K)."""
        flat = logits.reshape(-1, logits.shape[-1])
        if soft_targets is None:
            return F.cross_entropy(flat, codes.reshape(-1))
        return -(soft_targets.reshape(flat.shape) * F.log_softmax(flat.float(), dim=-1)).sum(-1).mean()

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
    def new_caches(self) -> tuple[list[KVCache], list[KVCache]]:
        """(spatial caches over the condition and hw - 1 positions, depth caches over D tokens, reused for every
        position)."""
        body_length = self.cfg.cond_length + self.cfg.num_positions - 1
        return self.body_transformer.new_caches(body_length), self.head_transformer.new_caches(self.depth)

    def prefill(self, ids: torch.Tensor, body_caches: list[KVCache]) -> torch.Tensor:
        """Runs the condition; returns the spatial context (B, E) of position 0."""
        return self.body_transformer(self.condition_tokens(ids), body_caches, 0)[:, -1]

    def decode_one_position(self, codes: torch.Tensor, index: int, body_caches: list[KVCache]) -> torch.Tensor:
        """Feeds the D codes (B, D) chosen at position `index`; returns the spatial context of position index+1."""
        x = self.input_mlp(self.embed_codes(codes)).sum(1) + self.pos_emb_hw[:, index]
        return self.body_transformer(x[:, None], body_caches, index + self.cfg.cond_length)[:, -1]

    def depth_logits(
        self, context: torch.Tensor, chosen: torch.Tensor | None, d: int, head_caches: list[KVCache]
    ) -> torch.Tensor:
        """Logits (B, K) of depth d at one position, given the spatial context (B, E) and, for d > 0, the running
        sum (B, code_dim) of the code vectors chosen at depths < d."""
        x = context if d == 0 else self.head_mlp(chosen)
        x = (x + self.pos_emb_d[:, d])[:, None]
        return self.classifier(self.head_transformer(x, head_caches, d)[:, -1])

    def context_uncached(self, ids: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Spatial context (B, E) of the position after `prefix` (B, p, D), recomputed from scratch."""
        start = self.condition_tokens(ids)
        x = self.input_mlp(self.embed_codes(prefix)).sum(2) + self.pos_emb_hw[:, : prefix.shape[1]]
        return self.body_transformer(torch.cat([start, x], dim=1))[:, -1]

    def depth_logits_uncached(self, context: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) of depth d = chosen.shape[1] given the codes (B, d) already chosen at this position."""
        d = chosen.shape[1]
        tokens = [context[:, None]]
        if d:
            tokens.append(self.head_mlp(self.embed_codes(chosen).cumsum(1)))
        x = torch.cat(tokens, dim=1) + self.pos_emb_d[:, : d + 1]
        return self.classifier(self.head_transformer(x)[:, -1])

    @torch.no_grad()
    def generate(self, cond: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Codes (B, h, w, D); see `vqar.sampling.generate_rq` for the arguments."""
        from vqar.sampling.generate import generate_rq

        return generate_rq(self, cond, **kwargs)
