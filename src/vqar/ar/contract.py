"""The contract of a stage-2 model: everything sampling, training, evaluation and serving may rely on.

`GPT`, `RQTransformer`, `VIM` and `VAR` implement `ARModel`. A model predicts one code map of shape `code_shape`:
(h, w) for one code per position, (h, w, D) for a residual stack of D codes per position (`depth` = D, 1
otherwise), or (L,) for VAR's scales laid end to end. Positions are produced in blocks, `block_sizes` of them per
model call: one position at a time in raster order for the GPT, VIM and the RQ-Transformer, a whole scale at a time
for VAR; within a block, depth by depth. The same call takes a window of several drafted positions (speculative
decoding), so the contract speaks of blocks, never of single positions.

Training: `forward(codes, cond)` is teacher-forced and returns a `ModelOutput`. Sampling (see
`vqar.sampling.generate`, the one loop that drives every model, in the manner of gpt-fast's `prefill` /
`decode_one_token`):

    state = model.new_decode_state()
    context = model.prefill(cond_ids, state)                   # the condition, once: context of block 0
    for each block [start, start + n):
        for each depth d:  logits = model.code_logits(context, codes chosen in the block so far, state)
        context = model.decode_block(the block's codes, start, state)   # context of the next block

Names are one vocabulary across the models (configs: `dim`, `n_layer`, `n_head`, `code_shape`, `*_dropout_p`;
modules: `cond_embedding`, `layers`, `norm`, `output`, blocks of `attention_norm`, `attention`, `ffn_norm`,
`feed_forward`); the official checkpoints' names are mapped in `vqar.interop`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from vqar.ar.conditioning import ClassEmbedding, TextEmbedding


class Conditioning(str, Enum):
    CLASS = "class"
    TEXT = "text"
    NONE = "none"


@dataclass
class ARConfig:
    """The fields every stage-2 model has. The first six describe the data, not the architecture: a training run
    takes them from its code store (and the caption tokenizer), never from a preset."""

    vocab_size: int = 16384
    code_shape: list[int] = field(default_factory=lambda: [16, 16])
    num_classes: int = 1000
    text_length: int = 0  # > 0: conditioned on a caption of this many tokens instead of a class
    text_vocab_size: int = 0
    text_pad_id: int = 0  # the null caption (all padding) is "no condition" when class_dropout_prob > 0
    class_dropout_prob: float = 0.0  # classes / captions dropped to the null condition in training (for CFG)
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    token_dropout_p: float = 0.0
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    initializer_range: float = 0.02

    DATA_FIELDS: ClassVar[tuple[str, ...]] = (
        "vocab_size", "code_shape", "num_classes", "text_length", "text_vocab_size", "text_pad_id",
    )  # fmt: skip
    # What shapes training but not the weights, so a resumed run may change it (each family has some of these).
    # Not class_dropout_prob: whether it is 0 decides if the model has a null condition (an embedding row).
    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = (
        "token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "drop_path_rate", "initializer_range",
    )  # fmt: skip

    @property
    def prefix_length(self) -> int:
        """Condition tokens before the first code: the caption, or one class / start token."""
        return self.text_length or 1

    @property
    def depth(self) -> int:
        """Codes per position: D for a residual stack, 1 otherwise."""
        return self.code_shape[2] if len(self.code_shape) == 3 else 1

    @property
    def num_positions(self) -> int:
        """h * w of a grid or a stack, L of codes laid end to end."""
        return self.code_shape[0] * (self.code_shape[1] if len(self.code_shape) > 1 else 1)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    def validate(self) -> None:
        if len(self.code_shape) not in (1, 2, 3) or min(self.code_shape) < 1:
            raise ValueError(f"code_shape must be [height, width], [height, width, depth] or [length], "
                             f"got {self.code_shape}")  # fmt: skip
        if self.dim < 1 or self.n_head < 1:  # a width of 0 ended in a ZeroDivisionError deep in the model
            raise ValueError(f"dim and n_head must be >= 1, got dim={self.dim}, n_head={self.n_head}")
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} must be divisible by n_head={self.n_head}")
        for name in ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p"):
            value = getattr(self, name, 0.0)  # each architecture has some of them
            if not 0.0 <= value <= 1.0:  # else torch's "dropout probability has to be between 0 and 1", unnamed
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        norm_eps = getattr(self, "norm_eps", 1.0)  # GPT's RMSNorm and VAR's LayerNorm; VIM has none to set
        if not norm_eps > 0:  # else NaN activations from the first step, and a run that ends 'done' with NaN nll
            raise ValueError(f"norm_eps must be positive, got {norm_eps}")
        for name, least in (("vocab_size", 2), ("num_classes", 0), ("n_layer", 1)):
            if getattr(self, name) < least:  # named with its value: a run's model.n_layer=0, say
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        for name in ("mlp_ratio", "multiple_of", "ffn_dim_multiplier", "initializer_range"):
            value = getattr(self, name, None)  # each architecture has some of them
            if value is not None and not (math.isfinite(value) and value > 0):  # else a traceback inside torch
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.text_length and (self.num_classes or self.text_vocab_size < 2):
            raise ValueError("a text-conditioned model needs num_classes=0 and text_vocab_size >= 2")


class ModelOutput(NamedTuple):
    """What a teacher-forced pass returns (a named tuple, which DDP and FSDP pass through).

    `logits` (B, *code_shape, K): entry [b, i, j(, d)] predicts that code from the condition and every code before
    it (for next-patch training, (B, num_patches, K)). `text_logits` (B, text_length - 1, text_vocab) for models
    that also predict their caption: position t predicts token t + 1."""

    logits: torch.Tensor
    text_logits: torch.Tensor | None = None


@runtime_checkable
class CodeTokenizer(Protocol):
    """What stage 2 needs of a stage-1 tokenizer to turn its codes into images."""

    codebook_size: int
    depth: int

    def decode(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor: ...


class ARModel(nn.Module, ABC):
    """A stage-2 model; see the module docstring. `tokenizer` and `text_tokenizer` are the companions a saved model
    folder carries (`attach` sets them); they are kept outside the module tree, so `state_dict()`, `parameters()`
    and `.to()` concern the AR model's own weights only."""

    arch: ClassVar[str]  # the name in `vqar.ar.ARCHITECTURES`, also written to saved models
    cfg: ARConfig
    cond_embedding: ClassEmbedding | TextEmbedding
    layers: nn.ModuleList  # the blocks a linear probe reads (an RQ-Transformer's spatial blocks)
    tokenizer: CodeTokenizer | None = None
    text_tokenizer: Any = None  # a `vqar.text.TextTokenizer`

    def __init__(self, cfg: ARConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg

    # ---------------------------------------------------------------- description
    @property
    def code_shape(self) -> tuple[int, ...]:
        return tuple(self.cfg.code_shape)

    @property
    def latent_grid(self) -> tuple[int, int]:
        """The (h, w) grid of tokenizer latents one image maps to: the code grid of a raster model; VAR, whose
        codes are scales laid end to end, overrides this with its finest scale."""
        return tuple(self.code_shape[:2])

    @property
    def depth(self) -> int:
        return self.cfg.depth

    @property
    def num_positions(self) -> int:
        return self.cfg.num_positions

    @property
    def codebook_size(self) -> int:
        """The size of the tokenizer codebook the model predicts over (`cfg.vocab_size`)."""
        return self.cfg.vocab_size

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def prefix_length(self) -> int:
        return self.cfg.prefix_length

    @property
    def conditioning(self) -> Conditioning:
        if self.cfg.text_length:
            return Conditioning.TEXT
        return Conditioning.CLASS if self.cfg.num_classes else Conditioning.NONE

    @property
    def has_null_condition(self) -> bool:
        """Whether classifier-free guidance is possible: the model learned a null class or the empty caption."""
        return self.cond_embedding.has_null

    # ---------------------------------------------------------------- companions
    def check_companions(self, tokenizer: CodeTokenizer | None = None, text_tokenizer=None) -> None:
        """Raises ValueError, naming the mismatch, when the tokenizer of the codes or the caption tokenizer does
        not fit this model."""
        if tokenizer is not None:
            check_tokenizer(self, tokenizer)
        if text_tokenizer is not None:
            if self.conditioning is not Conditioning.TEXT:
                raise ValueError("a caption tokenizer only fits a text-conditioned model")
            if text_tokenizer.vocab_size > self.cfg.text_vocab_size:
                raise ValueError(f"the caption tokenizer has {text_tokenizer.vocab_size} entries; the model knows "
                                 f"{self.cfg.text_vocab_size} text tokens")  # fmt: skip
            # Another vocabulary of a fitting size gives the prompt's words other ids: images of other captions.
            carried = self.text_tokenizer
            differing = carried.entries_differing_from(text_tokenizer) if carried not in (None, text_tokenizer) else 0
            if differing:
                raise ValueError(f"the caption tokenizer has another vocabulary than the one the model was trained "
                                 f"with ({differing} entries differ), so it would give a prompt's words ids that "
                                 "mean other words to the model: leave it out and the model's own is used")  # fmt: skip

    def attach(self, tokenizer: CodeTokenizer | None = None, text_tokenizer=None) -> ARModel:
        """Sets the tokenizer that decodes this model's codes and the caption tokenizer of a text model, after
        checking that they fit (`check_companions`); returns the model."""
        self.check_companions(tokenizer, text_tokenizer)
        if tokenizer is not None:
            object.__setattr__(self, "tokenizer", tokenizer)  # not a submodule: see the class docstring
        if text_tokenizer is not None:
            if text_tokenizer.length != self.cfg.text_length:
                text_tokenizer = text_tokenizer.with_length(self.cfg.text_length)
            object.__setattr__(self, "text_tokenizer", text_tokenizer)
        return self

    # ---------------------------------------------------------------- training
    @abstractmethod
    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None) -> ModelOutput:
        """Teacher-forced outputs for codes (B, *code_shape). `cond`: class ids (B,), caption ids
        (B, text_length), or None (an unconditional model, or the null condition)."""

    # ---------------------------------------------------------------- sampling
    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Positions produced per sampling call, in order (they add up to `num_positions`): one at a time for a
        raster model; a model that produces a whole group at once (VAR's scales) overrides this."""
        return (1,) * self.num_positions

    @property
    def raster(self) -> bool:
        """Whether `decode_block` of n positions returns the contexts of the n positions after them (a next-token
        model, which a speculative window can drive), rather than those of a fixed next block (VAR)."""
        return True

    @property
    def cfg_schedule(self) -> str:
        """How guidance is spread over the blocks when the settings leave it open (`SamplingSettings.cfg_schedule`):
        "constant" (LlamaGen, the RQ-Transformer) or "linear" (VAR: none at the first block, full at the last)."""
        return "constant"

    @property
    def smooth_embedding(self) -> bool:
        """Whether `decode_block` can feed back a Gumbel-softmax mix of code vectors (VAR's `more_smooth`)."""
        return False

    @abstractmethod
    def new_decode_state(self) -> Any:
        """Fresh static KV caches for one generation (opaque; passed back to the three methods below)."""

    @abstractmethod
    def prefill(self, cond_ids: torch.Tensor, state: Any) -> torch.Tensor:
        """Runs the condition tokens of validated ids; returns the context (B, n, dim) of the first block."""

    @abstractmethod
    def code_logits(self, context: torch.Tensor, chosen: torch.Tensor, state: Any) -> torch.Tensor:
        """Logits (B, n, K) of the next code at each of the block's n positions, given their context (B, n, dim)
        and the codes (B, n, d) already chosen there (d = 0 .. depth - 1). Kept in the compute dtype: under bf16,
        converting all K logits every step costs more than the sampler, which converts only its candidates."""

    @abstractmethod
    def decode_block(self, codes: torch.Tensor, start: int | torch.Tensor, state: Any, smooth=None) -> torch.Tensor:
        """Feeds the codes (B, n, depth) chosen at positions [start, start + n); returns the context of the next
        block: (B, n, dim) for positions start + 1 .. start + n of a raster model, the next scale's for VAR. A
        compiled decoder passes `start` as a tensor (1,), so one graph serves every block of a size; speculative
        decoding passes one start per row (B,), each row's window at its own position. `smooth`: see
        `smooth_embedding`."""

    # ---------------------------------------------------------------- initialisation
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 / LlamaGen initialisation of linear and embedding weights."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.initializer_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)


def check_tokenizer(model: ARModel, tokenizer) -> None:
    """The tokenizer must decode the model's codes: same codebook size, same codes per position. A conv tokenizer
    works at any multiple of its downsampling factor, so the grid may differ from the one it was trained at
    (LlamaGen's 384px GPTs use the 256px VQ-16)."""
    if not isinstance(tokenizer, CodeTokenizer):
        raise TypeError(f"the tokenizer must be a stage-1 tokenizer, got {type(tokenizer).__name__}")
    if tokenizer.codebook_size != model.codebook_size or tokenizer.depth != model.depth:
        raise ValueError(
            f"the tokenizer (codebook {tokenizer.codebook_size}, {tokenizer.depth} code(s) per position) does not fit "
            f"the model (codebook {model.codebook_size}, {model.depth} code(s) per position)"
        )
    # A multi-scale tokenizer's codes are VAR's scales laid end to end, not a grid: with the same codebook size
    # and depth it would pass the test above and fail only when decoding, after the whole sampling run.
    if model.raster and getattr(tokenizer, "layout", None) == "scales":
        raise ValueError(f"the tokenizer is a multi-scale (VAR) one, whose codes are scales, not the grid of codes a "
                         f"{type(model).__name__} draws: give the tokenizer the model was trained with")  # fmt: skip
