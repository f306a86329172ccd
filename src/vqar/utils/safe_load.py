"""Reading released checkpoints without unpickling arbitrary objects.

`.pt` files are pickles, and a pickle can run any code when loaded. Every checkpoint is read with
`torch.load(weights_only=True)`, which rebuilds tensors and plain containers only, plus an explicit allow-list of
the few data-only types that the official files carry besides their weights:

* `argparse.Namespace`: LlamaGen's training checkpoints store their command-line arguments (`"args"`);
* OmegaConf containers and value nodes: the RQ trainer's optimizer state holds its config's `betas` list.

A file that needs anything else is refused with the names of the types it asks for; nothing in it is executed.
Before torch.load runs, `pickle_scan.check_pickle` refuses a pickle that would build more than its file holds.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import re
import struct
import typing
import zipfile
from pathlib import Path

import torch

from vqar.utils.pickle_scan import CraftedPickleError, check_pickle


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
    if not _looks_like_torch_file(path):
        if _is_npy(path):  # an array saved with numpy.save: say so rather than only what it is not
            raise ValueError(f"{path} is a NumPy .npy array, not a PyTorch checkpoint")
        if _is_safetensors(path):  # a vqar folder's weights, given without their folder
            raise ValueError(f"{path} is a safetensors file of weights, which does not say what model they are: give "
                             "the folder that holds it with its config.json")  # fmt: skip
        raise ValueError(f"{path} is not a checkpoint: it is neither a PyTorch archive (torch.save's zip) nor a "
                         "pickle")  # fmt: skip
    foreign = _foreign_zip(path)
    if foreign:
        raise ValueError(f"{path} is {foreign}, not a PyTorch checkpoint")
    try:
        _check_crafted(path)
    except CraftedPickleError as err:
        raise UnsafeCheckpointError(f"refused to load {path}: {err}") from None
    allowed = allowed_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = {_qualified(obj) for obj in allowed}
        try:
            wanted = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in names]
        except Exception:  # a legacy (non-zip) file, which that scan cannot read: torch's error names the first
            wanted = [g for g in re.findall(r"GLOBAL ([\w.]+)", str(err)) if g not in names]
        if not wanted:  # no Python object it asks for is missing: the pickle itself is damaged or not one
            raise ValueError(
                f"{path} is not a checkpoint vqar can read: a damaged pickle, or one without tensors"
            ) from None
        raise UnsafeCheckpointError(
            f"refused to load {path}: it contains Python objects that are not on vqar's allow-list (it needs "
            f"{', '.join(sorted(wanted))}). "
            "Loading them would run code from the file; convert it with the code that wrote it, or load only "
            "files you trust with torch.load(weights_only=False) yourself."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"cannot read checkpoint {path}: {_first_line(err)}") from None
    except (IndexError, KeyError, TypeError, struct.error) as err:  # the unpickler's own, on a damaged stream
        raise ValueError(f"cannot read checkpoint {path}: a damaged pickle ({type(err).__name__}: "
                         f"{_first_line(err)})") from None  # fmt: skip


def _check_crafted(path: Path) -> None:
    """`check_pickle` on the pickle torch.load will run: a zip archive's data.pkl, or a legacy file's fourth pickle
    (after its magic number, protocol version and system information)."""
    size = path.stat().st_size
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if name == "data.pkl" or name.endswith("/data.pkl")]
            if names:
                with archive.open(names[0]) as stream:
                    check_pickle(stream, size)
        return
    with open(path, "rb") as stream:
        for _ in range(4):
            check_pickle(stream, size)


def _looks_like_torch_file(path: Path) -> bool:
    """Whether `path` starts like something torch.save writes: a zip archive, or (the legacy format) a pickle."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _is_safetensors(path: Path) -> bool:
    """Whether `path` starts as a safetensors file does: the length of a JSON header (8 bytes, little-endian),
    then the header's opening brace."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < path.stat().st_size


def _is_npy(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(6) == b"\x93NUMPY"  # the .npy format's magic string


def _foreign_zip(path: Path) -> str | None:
    """What a zip archive that torch.save did not write is (a NumPy .npz, another zip), or None. torch would stop
    on it with a bare `[enforce fail at inline_container.cc]`, which names neither the file's kind nor the problem."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):  # not a readable zip: torch's own message is the best there is
        return None
    if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        return None
    if names and all(name.endswith(".npy") for name in names):
        return f"a NumPy .npz archive (arrays: {_listed([name[:-4] for name in names])})"
    return f"a zip archive ({_listed(names)})" if names else "an empty zip archive"


def _listed(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", ... ({len(names)} in all)" if len(names) > most else "")


def _first_line(err: BaseException) -> str:
    """The first sentence of an error's message (torch's go on for lines of advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0].split(". ")[0] if lines else type(err).__name__)[:300]
