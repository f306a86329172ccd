"""The condition of a stage-2 model: a class, a caption, or nothing, embedded as the tokens before the first code.

Both embeddings answer the same questions: `ids(cond, batch_size)` validates what a caller passes, `has_null` says
whether the model learned a null condition, and `null_ids(batch_size)` gives it. The null condition is what
classifier-free guidance ("Classifier-Free Diffusion Guidance", Ho & Salimans, 2021) compares against, and a model
has one only when it was trained with condition dropout: in training a class is replaced by the null class (or a
caption by the empty caption) with probability `class_dropout_prob`, so the same network also learns the
unconditional distribution. An unconditional model has a single learned start row and no null condition.
"""

from __future__ import annotations

import torch
from torch import nn


class ClassEmbedding(nn.Module):
    def __init__(self, num_classes: int, dim: int, dropout_prob: float = 0.0):
        super().__init__()
        if num_classes < 0 or not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"need num_classes >= 0 and dropout_prob in [0, 1), got {num_classes}, {dropout_prob}")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob if num_classes else 0.0
        self.has_null = num_classes > 0 and dropout_prob > 0
        rows = num_classes + int(self.has_null) if num_classes else 1
        self.embedding_table = nn.Embedding(rows, dim)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def ids(self, cond: torch.Tensor | None, batch_size: int | None = None) -> torch.Tensor:
        """Validated class ids (B,) for `cond`. cond=None means no condition: the start row of an unconditional
        model, or the null class of a conditional one trained with class dropout (`batch_size` rows). With both,
        `cond` must hold `batch_size` rows (one per code grid of a forward pass)."""
        device = self.embedding_table.weight.device
        if not self.conditional:
            if cond is not None:
                raise ValueError("this model is unconditional; pass cond=None")
            if batch_size is None:
                raise ValueError("an unconditional model needs batch_size")
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        if cond is None:
            if not self.has_null or batch_size is None:
                raise ValueError(
                    f"this model is class-conditional ({self.num_classes} classes); pass class ids as cond"
                )
            return self.null_ids(batch_size)
        if not isinstance(cond, torch.Tensor) or cond.dtype not in ID_DTYPES or cond.dim() != 1:
            raise TypeError(f"cond must be a 1-D tensor of class ids of an integer dtype ({ID_DTYPE_NAMES}), got "
                            f"{_described(cond)}")  # fmt: skip
        if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= self.num_classes):
            raise ValueError(
                f"class ids must lie in [0, {self.num_classes}), got values in [{int(cond.min())}, {int(cond.max())}]"
            )
        return _one_per_row(cond, batch_size, "class ids").long().to(device)

    def null_ids(self, batch_size: int) -> torch.Tensor:
        """The null class (B,); ValueError when the model has none (see the module docstring)."""
        if not self.has_null:
            what = "class dropout (a null class)" if self.conditional else "a condition (this model is unconditional)"
            raise ValueError(f"classifier-free guidance needs a model trained with {what}")
        return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=self.embedding_table.weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, 1, dim); in training, ids are dropped to the null class with probability dropout_prob."""
        if self.training and self.has_null and self.dropout_prob > 0:
            drop = torch.rand(ids.shape, device=ids.device) < self.dropout_prob
            ids = torch.where(drop, torch.full_like(ids, self.num_classes), ids)
        return self.embedding_table(ids)[:, None]


class TextEmbedding(nn.Module):
    """A caption as a prefix of `length` token embeddings (RQ-Transformer text-to-image; LlamaGen's text prefix).

    The null caption is the empty one (all `pad_id`). A model trained with caption dropout (`has_null`) learned it
    as "no condition"; the RQ release models did not, so guidance is refused for them. Captions are dropped by the
    training task, not here, so a text head is trained on what the model saw."""

    conditional = True

    def __init__(self, vocab_size: int, length: int, dim: int, *, has_null: bool = False, pad_id: int = 0):
        super().__init__()
        if vocab_size < 2 or length < 1:
            raise ValueError(f"need a text vocabulary of >= 2 tokens and length >= 1, got {vocab_size}, {length}")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"the padding id {pad_id} is outside the text vocabulary of {vocab_size}")
        self.vocab_size, self.length, self.has_null, self.pad_id = vocab_size, length, has_null, pad_id
        self.embedding_table = nn.Embedding(vocab_size, dim)

    def ids(self, cond: torch.Tensor | None, batch_size: int | None = None) -> torch.Tensor:
        """Validated text token ids (B, length); None means the null caption (`batch_size` rows). With both, `cond`
        must hold `batch_size` rows."""
        if cond is None:
            if not self.has_null or batch_size is None:
                raise ValueError(f"this model is text-conditioned; pass token ids of shape (B, {self.length}) as cond")
            return self.null_ids(batch_size)
        if not isinstance(cond, torch.Tensor) or cond.dtype not in ID_DTYPES:
            raise TypeError(f"cond must be a tensor of text token ids of an integer dtype ({ID_DTYPE_NAMES}), got "
                            f"{_described(cond)}")  # fmt: skip
        if cond.dim() != 2 or cond.shape[1] != self.length:
            raise ValueError(f"text ids must have shape (B, {self.length}), got {tuple(cond.shape)}")
        if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= self.vocab_size):
            raise ValueError(f"text token ids must lie in [0, {self.vocab_size})")
        return _one_per_row(cond, batch_size, "captions").long().to(self.embedding_table.weight.device)

    def null_ids(self, batch_size: int) -> torch.Tensor:
        if not self.has_null:
            raise ValueError("classifier-free guidance needs a model trained with caption dropout; this one was not")
        device = self.embedding_table.weight.device
        return torch.full((batch_size, self.length), self.pad_id, dtype=torch.long, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, length, dim)."""
        return self.embedding_table(ids)


# The integer dtypes whose min() and max() torch computes (not uint16/32/64): ids are read as int64 after the check.
ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
ID_DTYPE_NAMES = ", ".join(str(dtype).removeprefix("torch.") for dtype in ID_DTYPES)


def _described(cond) -> str:
    if isinstance(cond, torch.Tensor):
        return f"a {cond.dim()}-D tensor of {str(cond.dtype).removeprefix('torch.')}"
    return type(cond).__name__


def _one_per_row(cond: torch.Tensor, batch_size: int | None, what: str) -> torch.Tensor:
    """`cond`, or a ValueError when it does not hold one row per code grid of the batch: the condition prefix and
    the codes would otherwise meet as torch's "Sizes of tensors must match" deep in the model."""
    if batch_size is not None and len(cond) != batch_size:
        raise ValueError(f"cond holds {len(cond)} {what} for {batch_size} code grids: give one condition per row of "
                         "codes")  # fmt: skip
    return cond


def condition_embedding(cfg, dim: int) -> ClassEmbedding | TextEmbedding:
    """The embedding an `ARConfig` asks for: a caption prefix when `text_length` > 0, else a class (or start) row."""
    if cfg.text_length:
        return TextEmbedding(cfg.text_vocab_size, cfg.text_length, dim, has_null=cfg.class_dropout_prob > 0,
                             pad_id=cfg.text_pad_id)  # fmt: skip
    return ClassEmbedding(cfg.num_classes, dim, cfg.class_dropout_prob)
