"""What to draw: classes, prompts or nothing, turned into the condition rows of a model, checked once for every
entry point."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vqar.ar import ARModel, Conditioning


@dataclass
class Conditions:
    """`rows`: the condition of each image, class ids (N,) or caption ids (N, text_length), None when the model
    is unconditional. `labels` (N,): the class id, the prompt number (with `prompts`), or -1 (unconditional)."""

    rows: torch.Tensor | None
    labels: torch.Tensor
    prompts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, index: torch.Tensor) -> torch.Tensor | None:
        return None if self.rows is None else self.rows[index]


def make_conditions(
    model: ARModel,
    *,
    classes: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    n_per_condition: int = 1,
    text_tokenizer=None,
    strict_prompts: bool = True,
) -> Conditions:
    """`n_per_condition` images of each class or prompt (or in all, for an unconditional model), in that order.
    A text model's prompts are tokenized by `text_tokenizer`, by default the model's own; `strict_prompts` (prompts
    a user typed) makes an empty prompt an error and a truncated one a warning. Raises ValueError naming what does
    not fit the model."""
    if not _is_integer(n_per_condition) or n_per_condition < 1:
        raise ValueError(f"the number of images per class or prompt must be a positive integer, "
                         f"got {n_per_condition!r}")  # fmt: skip
    classes = _class_ids(classes)
    kind = model.conditioning
    if kind is Conditioning.TEXT:
        return _prompt_conditions(model, classes, prompts, n_per_condition, text_tokenizer, strict_prompts)
    if prompts:
        how = "without prompts" if kind is Conditioning.NONE else "with classes, not prompts"
        raise ValueError(f"this model is not text-conditioned: sample it {how}")
    if kind is Conditioning.NONE:
        if classes:
            raise ValueError("this model is unconditional: sample it without classes")
        return Conditions(None, torch.full((n_per_condition,), -1, dtype=torch.long))
    last = model.num_classes - 1
    if not classes:
        raise ValueError(f"this model is class-conditional: give a class id in 0..{last} (or several)")
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= last]
    if bad:
        # repr: the string "3" printed as 3 would read as a valid id refused
        named = any(isinstance(c, str) for c in bad)
        hint = " (class ids are integers; the model holds no class names)" if named else ""
        raise ValueError(f"unknown class id {', '.join(map(repr, bad))}: this model has classes 0..{last}{hint}")
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(n_per_condition)
    return Conditions(labels.clone(), labels)


def _class_ids(classes) -> list | None:
    """`classes` as a list, NumPy and torch integers as ints (`np.arange(10)` and `torch.tensor([3, 7])` are class
    ids too); one id or a string is refused rather than iterated (the digits of "37" would read as ids)."""
    if isinstance(classes, (np.ndarray, torch.Tensor)):
        if classes.ndim != 1:
            raise ValueError(f"classes must be a 1-D list of class ids, got an array of shape {tuple(classes.shape)}")
        classes = classes.tolist()
    if _is_integer(classes):
        raise ValueError(f"classes must be a list of class ids, got the single id {classes}: give [{classes}]")
    if isinstance(classes, Mapping):  # its keys were taken, where the user may have meant {class: count}
        raise ValueError(f"classes must be a list of class ids, got a {type(classes).__name__}; n_per_condition "
                         "gives the number of images per class")  # fmt: skip
    if classes is not None and (isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable)):
        raise ValueError(f"classes must be a list of class ids, got {classes!r:.80} ({type(classes).__name__})")
    return None if classes is None else [int(c) if _is_integer(c) else c for c in classes]


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _prompt_conditions(model, classes, prompts, n_per_condition, text_tokenizer, strict: bool) -> Conditions:
    if classes is not None and len(list(classes)):
        raise ValueError("this model is text-conditioned: give prompts, not classes")
    if isinstance(prompts, np.ndarray):  # the prompts an .npz of samples keeps: NumPy strings
        prompts = prompts.tolist() if prompts.ndim == 1 else prompts
    if not isinstance(prompts, (str, bytes)) and isinstance(prompts, Iterable) and not isinstance(prompts, Sequence):
        prompts = list(prompts)  # a generator: read once, as it is used twice below
    if prompts is not None and not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of strings, got {prompts!r:.80} ({type(prompts).__name__})")
    if prompts is None or not len(prompts):
        raise ValueError("this model is text-conditioned: give prompts (e.g. 'a painting of a cat')")
    if isinstance(prompts, str):  # a string is a sequence too: each of its characters would be a prompt
        raise ValueError(f"prompts must be a list of strings, got the single string {prompts[:80]!r}: give "
                         f"[{prompts[:80]!r}] for one prompt")  # fmt: skip
    not_text = [prompts] if isinstance(prompts, bytes) else [p for p in prompts if not isinstance(p, str)]
    if not_text:
        hint = ": decode them first (text.decode('utf-8'))" if isinstance(not_text[0], bytes) else ""
        raise ValueError(f"prompts must be strings, got {not_text[0]!r:.80} ({type(not_text[0]).__name__}){hint}")
    text_tokenizer = text_tokenizer or model.text_tokenizer
    if text_tokenizer is None:
        raise ValueError("this text-to-image model has no caption tokenizer; pass one (--text-tokenizer)")
    captions = text_tokenizer.encode(list(prompts), strict=strict)
    if captions.shape[1] != model.cfg.text_length:
        raise ValueError(f"the text tokenizer makes {captions.shape[1]}-token captions; the model takes "
                         f"{model.cfg.text_length}")  # fmt: skip
    labels = torch.arange(len(prompts)).repeat_interleave(n_per_condition)
    return Conditions(captions[labels], labels, list(prompts))
