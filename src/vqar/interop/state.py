"""Renaming upstream state dicts into vqar's names and putting them into a vqar model, with errors that say what
does not fit."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vqar.bundle import check_finite
from vqar.utils.meta import bounded_meta_build
from vqar.utils.safe_load import load_checkpoint

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


class NoEMAWeights(ValueError):
    """EMA weights were asked of a checkpoint that carries none: an error for the model asked for, while its
    tokenizer is then read with its one set of weights."""


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops the prefixes DDP, torch.compile and FSDP add to parameter names."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
            key = key.replace("._fsdp_wrapped_module.", ".").replace("._checkpoint_wrapped_module.", ".")
        out[key] = value
    return out


def read_state(path_or_state: str | Path | dict, source: str | None, what: str) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a checkpoint file (loaded with the allow-list) or of a state dict given in memory, with the
    wrapper prefixes of DDP / compile / FSDP dropped, and how errors name it: `source`, else the path, else "the
    `what` state dict"."""
    if isinstance(path_or_state, (str, Path)):
        source = source or str(path_or_state)
        state = load_checkpoint(path_or_state)
    else:
        source, state = source or f"the {what} state dict", path_or_state
    return strip_wrapper_prefixes(tensors_only(state, source)), source


def tensors_only(state: dict, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{source} holds no state dict")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source} is not a state dict: entries {bad[:5]} are not tensors")
    return state


CONFIG_HINT = "Check that the config (preset name or JSON) is the one the checkpoint was trained with."
# For formats whose architecture is read off the weights themselves: a misfit is a file at odds with itself.
SELF_DESCRIBED_HINT = ("Its architecture is read off its own weights, which disagree with each other: the file is "
                       "damaged or was edited; use the released file.")  # fmt: skip


def build_fitting(make: Callable[[], nn.Module], state: dict[str, torch.Tensor], source: str,
                  ignore: tuple[str, ...] = (), hint: str = CONFIG_HINT,
                  file_state: dict[str, torch.Tensor] | None = None,
                  names: StateDictAdapter | None = None) -> nn.Module:  # fmt: skip
    """`make()` with `state` loaded (see `load_into`), after checking on a model built on the meta device that the
    state fits: a configuration that names the wrong (or an absurd) size is refused before it is allocated. `hint`
    closes the error of a state that does not fit: what to check. `names`: the adapter that renamed the file's
    state into `state`, so that errors name keys as the file does."""
    # An absurd configuration (a million layers) stops once it makes far more tensors than the checkpoint holds.
    with bounded_meta_build(2 * len(state) + 256, f"and {source} holds {len(state)}: check the configuration"):
        check_fits(make().state_dict(), state, source, ignore, hint, names)
    model = make()
    load_into(model, state, source, ignore, hint, file_state, names)
    return model


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, ignore: tuple[str, ...] = (),
              hint: str = CONFIG_HINT, file_state: dict[str, torch.Tensor] | None = None,
              names: StateDictAdapter | None = None) -> None:  # fmt: skip
    """Copies `state` into `model`; every parameter and persistent buffer must be present with its shape.
    Keys ending in one of `ignore` are training-only statistics that the model may lack. `file_state` is the
    state as the file names it, where `state` was renamed from it: errors about a weight's values use its names."""
    own = model.state_dict()
    check_fits(own, state, source, ignore, hint, names)
    weights = {k: state[k] for k in own}
    # As for vqar's own folders: NaN weights would sample meaningless codes.
    check_finite(weights, source, lambda key: name_in_file(weights[key], file_state, key))
    model.load_state_dict(weights, strict=True)


def name_in_file(tensor: torch.Tensor, file_state: dict[str, torch.Tensor] | None, ours: str) -> str:
    """The name under which `file_state` holds `tensor` (itself or a view into it, such as one of q, k, v split
    off a fused projection): a user looking into the file finds that name, not vqar's."""
    if file_state is not None:
        start, storage = tensor.data_ptr(), tensor.untyped_storage().data_ptr()
        for name, held in file_state.items():
            same_storage = held.untyped_storage().data_ptr() == storage
            if same_storage and held.data_ptr() <= start < held.data_ptr() + held.numel() * held.element_size():
                return name
    return ours if file_state is None else f"{ours}, as vqar names it"


def check_fits(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str,
               ignore: tuple[str, ...] = (), hint: str = CONFIG_HINT,
               names: StateDictAdapter | None = None) -> None:  # fmt: skip
    """ValueError listing what of `state` does not fit the model's `own` state, by the file's names where `names`
    renamed them (a key the file never has, `output.bias` for VAR's `head.bias`, was no help)."""
    named = names.upstream_name if names is not None else str
    missing = [named(k) for k in own if k not in state]
    unexpected = [named(k) for k in state if k not in own and not k.endswith(ignore)]
    shapes = [
        f"{named(k)}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches, first: {shapes[:3]}")
        if missing:
            parts.append(f"{len(missing)} missing keys, first: {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, first: {unexpected[:5]}")
        raise ValueError(f"{source} does not fit the configured architecture ({'; '.join(parts)}). {hint}")


class StateDictAdapter:
    """Maps an upstream checkpoint's parameter names to vqar's and back (torchtitan's `state_dict_adapter` idea),
    so vqar's models keep one vocabulary of their own.

    `rules` are (upstream, vqar) name prefixes; `{i}` stands for a block number. The first rule whose prefix
    matches renames a key (the rest of the key is kept); keys no rule matches keep their name."""

    def __init__(self, rules: list[tuple[str, str]]):
        self.rules = [(_prefix_pattern(up), up, _prefix_pattern(ours), ours) for up, ours in rules]

    def rule_pairs(self) -> list[tuple[str, str]]:
        return [(up, ours) for _, up, _, ours in self.rules]

    def from_upstream(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self._rename(key, to_vqar=True): value for key, value in state.items()}

    def to_upstream(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self._rename(key, to_vqar=False): value for key, value in state.items()}

    def upstream_name(self, key: str) -> str:
        """What the upstream checkpoint calls vqar's `key`."""
        return self._rename(key, to_vqar=False)

    def _rename(self, key: str, to_vqar: bool) -> str:
        for up_pattern, up, ours_pattern, ours in self.rules:
            match = (up_pattern if to_vqar else ours_pattern).match(key)
            if match:
                return (ours if to_vqar else up).format(**match.groupdict()) + key[match.end() :]
        return key


def _prefix_pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))
