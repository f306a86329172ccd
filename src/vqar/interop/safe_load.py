"""Reading released checkpoints without unpickling arbitrary objects.

`.pt` files are pickles, and a pickle can run any code when loaded. Every checkpoint is read with
`torch.load(weights_only=True)`, which rebuilds tensors and plain containers only, plus an explicit allow-list of
the few data-only types that the official files carry besides their weights:

* `argparse.Namespace`: LlamaGen's training checkpoints store their command-line arguments (`"args"`);
* OmegaConf containers and value nodes: the RQ trainer's optimizer state holds its config's `betas` list.

A file that needs anything else is refused with the names of the types it asks for; nothing in it is executed.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import typing
from pathlib import Path

import torch


class UnsafeCheckpointError(ValueError):
    """The file asks for Python objects outside the allow-list; it was not loaded."""


def allowed_globals() -> list:
    allowed: list = [argparse.Namespace, collections.OrderedDict, collections.defaultdict, typing.Any]
    allowed += [dict, list, tuple, set, int, float, str, bool]
    try:
        from omegaconf import DictConfig, ListConfig
        from omegaconf.base import ContainerMetadata, Metadata
        from omegaconf.nodes import AnyNode, BooleanNode, BytesNode, FloatNode, IntegerNode, PathNode, StringNode
    except ImportError:  # pragma: no cover - omegaconf is a dependency of vqar
        return allowed
    return allowed + [
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        BooleanNode,
        BytesNode,
        FloatNode,
        IntegerNode,
        PathNode,
        StringNode,
    ]


def _qualified(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}" if hasattr(obj, "__qualname__") else str(obj)


def load_checkpoint(path: str | Path) -> typing.Any:
    """The object stored in a `.pt`/`.pth`/`.bin` file, loaded on the CPU with only allow-listed types."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    allowed = allowed_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = {_qualified(obj) for obj in allowed}
        try:
            wanted = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in names]
        except Exception:  # an old-format or damaged file: report what torch said
            wanted = []
        detail = f"it needs {', '.join(sorted(wanted))}" if wanted else str(err).splitlines()[-1][:300]
        raise UnsafeCheckpointError(
            f"refused to load {path}: it contains Python objects that are not on vqar's allow-list ({detail}). "
            "Loading them would run code from the file; convert it with the code that wrote it, or load only "
            "files you trust with torch.load(weights_only=False) yourself."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from None
