"""Building a model on the meta device to compare its shapes with a weights file, with a bound on its size: a
configuration that asks for an absurd number of layers is refused after a few thousand tensors, not hours later."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch.nn.modules import module as _module


class ModelTooLarge(ValueError):
    """The configuration builds more tensors than the weights file holds (by far): it cannot fit the file."""


@contextlib.contextmanager
def bounded_meta_build(max_tensors: int, what: str) -> Iterator[None]:
    """The block runs under `torch.device("meta")`; creating more than `max_tensors` parameters and buffers in this
    thread raises `ModelTooLarge` (naming `what`, e.g. the weights file and its tensor count) at once."""
    owner, created = threading.get_ident(), [0]

    def count(*_) -> None:
        if threading.get_ident() != owner:
            return
        created[0] += 1
        if created[0] > max_tensors:
            raise ModelTooLarge(f"the configuration builds more than {max_tensors} tensors, {what}")

    handles = [_module.register_module_parameter_registration_hook(count),
               _module.register_module_buffer_registration_hook(count)]  # fmt: skip
    try:
        with torch.device("meta"):
            yield
    finally:
        for handle in handles:
            handle.remove()
