"""vqar's model folder, the bundle a trained model travels in: `config.json` + `model.safetensors` (the Hugging Face
Hub layout) and, for an AR model, the companions it needs to make images: `tokenizer/` (the stage-1 model that
decodes its codes, a folder of the same layout) and, for a text-to-image model, `text_tokenizer/` (its caption
tokenizer). `save_pretrained` writes a bundle and `load` reads one; both are the only places that know the
layout. Training runs export a bundle into their run directory, so `load(RUN_DIR)` gives the trained model. The
public entry point is `vqar.load_pretrained` (`vqar.interop.load`), which reads bundles with `load` and every other
format besides.

Because the layout is the Hub's, a folder can be uploaded as a model repository as it is, and `load("owner/name")`
downloads one (with the optional `huggingface_hub` package) when no local folder of that name exists.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vqar.ar import ARCHITECTURES, ARModel
from vqar.configs import ConfigError, from_dict, to_dict
from vqar.text import TextTokenizer
from vqar.text.tokenizer import SETTINGS_FILE as TEXT_SETTINGS_FILE
from vqar.tokenizers import Tokenizer, TokenizerConfig
from vqar.utils.io import atomic_path, describe_entries, folder_entries
from vqar.utils.meta import ModelTooLarge, bounded_meta_build

FORMAT_VERSION = 2  # 2: the one vocabulary of module and config names across the AR models
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
TEXT_TOKENIZER_DIR = "text_tokenizer"
# Everything save_pretrained writes: a folder holding only these is a model, and nothing else of the user's.
MODEL_ENTRIES = frozenset({CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR, TEXT_TOKENIZER_DIR})
TOKENIZER_KIND = "tokenizer"
TEXT_TOKENIZER_FILES = frozenset({"vocab.json", "merges.txt", TEXT_SETTINGS_FILE})
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def bundle_patterns() -> list[str]:
    """The files of a bundle, as `huggingface_hub.snapshot_download(allow_patterns=...)` takes them."""
    return [CONFIG_FILE, WEIGHTS_FILE, f"{TOKENIZER_DIR}/{CONFIG_FILE}", f"{TOKENIZER_DIR}/{WEIGHTS_FILE}",
            f"{TEXT_TOKENIZER_DIR}/*"]  # fmt: skip


def vqar_version() -> str:
    try:
        return version("vqar")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _kinds() -> dict[str, tuple[type, type]]:
    """kind -> (config dataclass, model class)."""
    ar = {name: (arch.config, arch.model) for name, arch in ARCHITECTURES.items()}
    return {TOKENIZER_KIND: (TokenizerConfig, Tokenizer), **ar}


# ---------------------------------------------------------------- writing
def save_pretrained(
    model: nn.Module,
    folder: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    tokenizer: nn.Module | None = None,
    text_tokenizer: TextTokenizer | None = None,
    keep_companions: bool = False,
    trained_steps: int | None = None,
    overwrite: bool = False,
) -> None:
    """Writes `model` (a vqar tokenizer or AR model) as a bundle, each file atomically. `state_dict` replaces the
    model's own weights (e.g. the full weights gathered from FSDP shards). An AR model's companions are
    `tokenizer` and `text_tokenizer`, by default the ones attached to it; `keep_companions` leaves companion
    folders that already exist as they are (a training run exports the same tokenizer at every checkpoint);
    `trained_steps` records how far the model was trained. The folder must be new, empty or a model folder (which
    is written over); `overwrite` writes the model among other files too (a training run exports into its run
    folder, beside its checkpoints), leaving them as they are."""
    folder = Path(folder)
    kind = TOKENIZER_KIND if isinstance(model, Tokenizer) else model.arch if isinstance(model, ARModel) else None
    if kind is None:
        raise TypeError(f"save_pretrained needs a vqar tokenizer or AR model, got {type(model).__name__}")
    if isinstance(model, ARModel):
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        text_tokenizer = text_tokenizer if text_tokenizer is not None else model.text_tokenizer
    elif tokenizer is not None or text_tokenizer is not None:
        raise TypeError("tokenizer= and text_tokenizer= are an AR model's companions; a stage-1 tokenizer has none")
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer= must be the stage-1 tokenizer (a vqar.Tokenizer) that decodes the model's codes, "
                        f"got {type(tokenizer).__name__}")  # fmt: skip
    if isinstance(model, ARModel):
        try:  # a folder that load_pretrained would refuse is not written
            model.check_companions(tokenizer, text_tokenizer)
        except ValueError as err:
            raise ValueError(f"the companions given do not fit the model: {err}; nothing was written to {folder}") \
                from None
    if trained_steps is not None and (type(trained_steps) is not int or trained_steps < 0):
        raise ValueError(f"trained_steps must be a non-negative integer, got {trained_steps!r}")
    kept = keep_companions and (folder / TOKENIZER_DIR / CONFIG_FILE).is_file()
    writes_tokenizer = isinstance(model, ARModel) and tokenizer is not None and not kept
    # All checked before anything is written, so a refused tokenizer/ leaves no half-written model.
    for target in [folder, folder / TOKENIZER_DIR] if writes_tokenizer else [folder]:
        _check_destination(target, overwrite)
    # overwrite=True writes among other files and removes nothing (a run's export keeps its companions anyway)
    stale = [] if keep_companions or overwrite else _stale_companions(folder, tokenizer, text_tokenizer)
    tensors = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    if state_dict is not None:
        _check_state_fits(model, tensors)
    bad = nonfinite_tensors(tensors)
    if bad:
        raise ValueError(f"the weights hold NaN or infinite values in {len(bad)} of their {len(tensors)} tensors "
                         f"(the first: {bad[0]}), and would load as a model that samples meaningless codes: was "
                         f"the run diverging? Nothing was written to {folder}")  # fmt: skip
    config = {"vqar_format": FORMAT_VERSION, "vqar_version": vqar_version(), "kind": kind, "config": to_dict(model.cfg)}
    if trained_steps is not None:
        config["trained_steps"] = trained_steps
    # Both files are written in full before either replaces its old version (the weights first, then the config
    # that names their step): a write that fails, e.g. on a full disk, leaves the old pair as it was.
    with atomic_path(folder / CONFIG_FILE) as config_tmp, atomic_path(folder / WEIGHTS_FILE) as weights_tmp:
        save_file(tensors, str(weights_tmp), metadata={"format": "pt", "kind": kind})
        config_tmp.write_text(json.dumps(config, indent=2))
    for companion in stale:  # a model saved there before had them; this one would load with them attached
        shutil.rmtree(companion)
    if not isinstance(model, ARModel):
        return
    if writes_tokenizer:
        save_pretrained(tokenizer, folder / TOKENIZER_DIR, overwrite=overwrite)
    if text_tokenizer is not None and not (keep_companions and (folder / TEXT_TOKENIZER_DIR).is_dir()):
        text_tokenizer.save(folder / TEXT_TOKENIZER_DIR)


def _stale_companions(folder: Path, tokenizer, text_tokenizer) -> list[Path]:
    """The companion folders a model saved in `folder` before left that the model now saved lacks (all of them for a
    stage-1 tokenizer): left there, they would be attached to it on loading. One that holds anything but a
    companion's files is refused rather than removed."""
    stale = []
    for name, companion, files in ((TOKENIZER_DIR, tokenizer, MODEL_ENTRIES),
                                   (TEXT_TOKENIZER_DIR, text_tokenizer, TEXT_TOKENIZER_FILES)):  # fmt: skip
        path = folder / name
        if companion is not None or not (path.exists() or path.is_symlink()):
            continue
        foreign = [entry for entry in folder_entries(path) if entry not in files]
        if path.is_symlink() or not path.is_dir() or foreign:
            raise FileExistsError(f"{path} is in the way of the model saved in {folder}, which has no {name}, and "
                                  f"holds more than a {name}: move it away first")  # fmt: skip
        stale.append(path)
    return stale


def _check_state_fits(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """ValueError where the `state_dict` given does not have the model's tensor names and shapes: the folder would
    hold a config.json its weights do not fit, and be refused on loading."""
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    given = {name: tuple(value.shape) for name, value in tensors.items()}
    problems = shape_differences(expected, given, "given", "in the model")
    if problems:
        raise ValueError(f"the state_dict given does not fit the {type(model).__name__} saved ({len(problems)} "
                         f"differences; first: {'; '.join(problems[:3])})")  # fmt: skip


def shape_differences(expected: dict[str, tuple], found: dict[str, tuple], found_as: str,
                      expected_as: str) -> list[str]:  # fmt: skip
    """How tensor shapes `found` differ from those `expected`, by name: missing, unexpected, other shapes."""
    problems = [f"missing {k}" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [f"{k}: {found[k]} {found_as}, {expected[k]} {expected_as}" for k in expected
                 if k in found and found[k] != expected[k]]  # fmt: skip
    return problems


def _check_destination(folder: Path, overwrite: bool) -> None:
    """Refuses a file, or (without `overwrite`) a folder that holds more than a model: the model's files would
    otherwise land among a code store's or the user's own, and a folder that was something else would now also
    look like a model."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"cannot save a model into {folder}: it is a file, not a folder")
    foreign = [name for name in folder_entries(folder) if name not in MODEL_ENTRIES]
    if foreign and not overwrite:
        raise FileExistsError(f"{folder} holds files that are no part of a model ({describe_entries(foreign)}): "
                              "save into a new or empty folder, or pass overwrite=True to write the model among "
                              "them")  # fmt: skip


def is_model_folder(folder: str | Path) -> bool:
    """Whether `folder` holds a saved model and nothing else (what `vqar convert --overwrite` may write over): a
    training run exports its model among checkpoints and logs, and is not one."""
    entries = folder_entries(folder)
    return CONFIG_FILE in entries and set(entries) <= MODEL_ENTRIES


# ---------------------------------------------------------------- reading
def read_config(folder: Path) -> tuple[str, dict, int]:
    """(kind, config fields, format version) of a bundle folder."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a vqar model folder: it has no {CONFIG_FILE} "
            f"(a training run writes one at its first checkpoint)"
        )
    try:
        meta = json.loads(config_path.read_text())
    except (ValueError, RecursionError) as err:  # RecursionError: arrays nested thousands deep
        raise ValueError(f"{config_path} is not valid JSON: {str(err) or type(err).__name__}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{config_path} does not describe a model (expected a JSON object)")
    if "kind" not in meta:  # another program's config.json (a Hub model's, a release's notes): not vqar 0.1's either
        files = sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".ckpt"))
        hint = f"; to read a checkpoint in it, give its file ({', '.join(files)})" if files else ""
        raise ValueError(f"{folder} is not a vqar model folder: its {CONFIG_FILE} names no model kind, as the "
                         f"config.json vqar writes does{hint}")  # fmt: skip
    kind, fields, version = meta["kind"], meta.get("config", {}), meta.get("vqar_format", 1)
    if not isinstance(kind, str):
        raise ValueError(f"{config_path}: kind must be a model kind's name, got {kind!r:.80}")
    if not isinstance(fields, dict):
        raise ValueError(f"{config_path}: config must be a JSON object of the model's settings, got "
                         f"{type(fields).__name__}")  # fmt: skip
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{config_path}: vqar_format must be a format number (1, 2, ...), got {version!r:.80}")
    if version > FORMAT_VERSION:  # its names or layout may mean other things than this vqar reads into them
        raise ValueError(f"{config_path} is of format {version}, written by a newer vqar than this one (which reads "
                         f"formats up to {FORMAT_VERSION}): upgrade vqar to read it")  # fmt: skip
    return kind, fields, version


def trained_steps(folder: Path) -> int | None:
    """The training step a bundle was exported at (None for a folder without one, or none at all)."""
    try:
        meta = json.loads((Path(folder) / CONFIG_FILE).read_text())
        return int(meta["trained_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(_weights_path(folder)))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"cannot read {folder / WEIGHTS_FILE}: {err}") from None


def _weights_path(folder: Path) -> Path:
    path = folder / WEIGHTS_FILE
    if path.exists() and not path.is_file():  # a device or pipe was said to be missing
        raise ValueError(f"{path} is not a regular file (a folder, named pipe, socket or device); a model folder's "
                         "weights are a safetensors file")  # fmt: skip
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has a {CONFIG_FILE} but no {WEIGHTS_FILE}")
    return path


# Config fields that count layers (blocks, residual blocks), each of which holds tensors of its own.
LAYER_COUNTS = ("n_layer", "n_depth_layer", "num_res_blocks")


def check_weights_fit(kind: str, fields: dict, folder: Path) -> None:
    """Compares the tensor names and shapes in the weights file's header with those of the configured model: a
    config that does not fit its weights (or asks for an absurd size) is refused before anything is allocated.
    Layer counts are checked against the header arithmetically first; the model is then built on the meta device,
    and that build stops as soon as it makes far more tensors than the file holds."""
    path, config = _weights_path(folder), folder / CONFIG_FILE
    try:
        with safe_open(str(path), "pt") as weights:
            stored = {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"cannot read {path}: {err}") from None
    for name, value, unit in _layer_counts(fields):
        if value > len(stored):
            raise ValueError(f"{path} does not match {config}: {name} asks for {value} {unit}, more than the "
                             f"{len(stored)} tensors of the file")  # fmt: skip
    with bounded_meta_build(2 * len(stored) + 256, f"and {path} holds {len(stored)}: it does not match {config}"):
        expected = {k: tuple(v.shape) for k, v in build(kind, fields, config).state_dict().items()}
    problems = shape_differences(expected, stored, "in the file", "by the config")
    if problems:
        raise ValueError(f"{path} does not match {folder / CONFIG_FILE} ({len(problems)} differences; first: "
                         f"{'; '.join(problems[:3])})")  # fmt: skip


def _layer_counts(fields, prefix: str = ""):
    """(dotted name, count, unit) of every integer layer count and every list (per-level settings such as
    `conv.ch_mult`) in a config, nested sections included: none can exceed the tensor count of a fitting file."""
    if not isinstance(fields, dict):
        return
    for key, value in fields.items():
        if isinstance(value, dict):
            yield from _layer_counts(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            yield f"{prefix}{key}", len(value), "entries"
        elif key in LAYER_COUNTS and isinstance(value, int) and not isinstance(value, bool):
            yield f"{prefix}{key}", value, "layers"


def build(kind: str, fields: dict, source: Path) -> nn.Module:
    """An untrained model of `kind` from its config fields; settings that make no model (a negative width, no
    attention heads) are a ValueError naming `source`."""
    kinds = _kinds()
    if kind not in kinds:
        raise ValueError(f"{source} describes an unknown model kind {kind!r}; known: {', '.join(kinds)}")
    config_cls, model_cls = kinds[kind]
    try:
        config = from_dict(config_cls, fields)
    except ConfigError as err:
        raise ValueError(f"{source}: {err}") from None
    try:
        return model_cls(config)
    except ModelTooLarge:
        raise
    except Exception as err:  # the constructors' own checks, and torch's errors for sizes out of range
        raise ValueError(f"{source}: its settings make no {kind} model ({type(err).__name__}: {err})") from None


def _number_kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else "complex" if dtype.is_complex else "float" if dtype.is_floating_point \
        else "integer"  # fmt: skip


def dtype_kind_mismatches(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """'name (I32, expects F32)' for each tensor of `weights` whose kind of number (float, integer, bool, complex)
    is not its counterpart's in `expected`: loading casts it (an int32 weight read as floats of 1e9) unsaid. Another
    float precision (a bf16 copy of float32 weights) is the same kind."""
    return [f"{name} ({tensor.dtype}, expects {expected[name].dtype})".replace("torch.", "")
            for name, tensor in weights.items()
            if name in expected and _number_kind(tensor.dtype) != _number_kind(expected[name].dtype)]  # fmt: skip


def check_dtype_kinds(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: str | Path) -> None:
    """ValueError naming `path` and the first tensors that `dtype_kind_mismatches` finds."""
    wrong = dtype_kind_mismatches(weights, expected)
    if wrong:
        raise ValueError(f"{path} holds {len(wrong)} tensor(s) of another kind of number than the model's (the first: "
                         f"{', '.join(wrong[:2])}): the file is damaged or not this model's")  # fmt: skip


def nonfinite_tensors(weights: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors in `weights` that hold a NaN or an infinity."""
    return [name for name, tensor in weights.items() if tensor.is_floating_point() and not tensor.isfinite().all()]


def check_finite(weights: dict[str, torch.Tensor], path: str | Path,
                 name_in_file: Callable[[str], str] = str) -> None:  # fmt: skip
    """ValueError naming `path` where a weight is NaN or infinite: such a model samples NaN logits and, silently,
    meaningless codes (a damaged file, or a run that diverged before it was saved). `name_in_file` turns a key of
    `weights` into the name the file gives it, for files whose names were mapped to vqar's."""
    bad = nonfinite_tensors(weights)
    if bad:
        raise ValueError(f"{path} holds NaN or infinite values in {len(bad)} of its {len(weights)} tensors (the "
                         f"first: {name_in_file(bad[0])}): the file is damaged, or its run diverged")  # fmt: skip


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a bundle (or a training run directory), in eval mode, with its companions attached."""
    folder = Path(path)
    if not folder.exists():
        if not is_hub_repo_id(path):
            raise FileNotFoundError(f"no model at {folder}: the local path does not exist")
        folder = download_from_hub(str(path))
    kind, fields, format_version = read_config(folder)
    if format_version < FORMAT_VERSION and kind != TOKENIZER_KIND:
        raise ValueError(
            f"{folder} was written by vqar 0.1 (format {format_version}), whose AR models used other names; "
            f"read it with vqar.load_pretrained({str(folder)!r}), or rewrite it once with `vqar convert {folder} NEW`"
        )
    check_weights_fit(kind, fields, folder)
    model = build(kind, fields, folder / CONFIG_FILE)
    weights = read_weights(folder)
    check_finite(weights, _weights_path(folder))
    check_dtype_kinds(weights, model.state_dict(), _weights_path(folder))
    model.load_state_dict(weights)
    model = model.to(device).eval()
    if isinstance(model, ARModel):
        attach_companions(model, folder, device)
    return model


def attach_companions(model: ARModel, folder: Path, device: str | torch.device = "cpu") -> None:
    """Attaches the tokenizer and caption tokenizer a bundle folder carries beside `model`."""
    tokenizer = text_tokenizer = None
    if (folder / TOKENIZER_DIR / CONFIG_FILE).is_file():
        tokenizer = load(folder / TOKENIZER_DIR, device=device)
        if not isinstance(tokenizer, Tokenizer):  # e.g. `vqar convert AR_MODEL RUN/tokenizer --overwrite`
            raise ValueError(f"{folder / TOKENIZER_DIR} holds a {type(tokenizer).__name__}, not the stage-1 "
                             f"tokenizer that decodes the codes of the model in {folder}")  # fmt: skip
    if (folder / TEXT_TOKENIZER_DIR).is_dir():
        text_tokenizer = TextTokenizer.load(folder / TEXT_TOKENIZER_DIR)
    try:
        model.attach(tokenizer, text_tokenizer)
    except ValueError as err:
        raise ValueError(f"the companions in {folder} do not fit its model: {err}") from None


def is_hub_repo_id(path: str | Path) -> bool:
    """Whether a path that does not exist locally is to be tried on the Hub: a name shaped like `org/name` whose
    `org` is not a local folder (`runs/typo` is a local path with a typo, not a Hub repository)."""
    text = str(path)
    if not HUB_REPO_ID.match(text) or text.startswith((".", "~")):
        return False
    return not Path(text.split("/", 1)[0]).exists()


def download_from_hub(repo_id: str) -> Path:
    """The local snapshot of Hub model repository `repo_id` (only the files of a bundle)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"no local path {repo_id!r}; to load it as a model repository of the Hugging Face Hub, install "
            "huggingface_hub (pip install 'vqar[hub]')"
        ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=bundle_patterns()))
    except Exception as err:  # network errors, unknown repos, gated repos: say which repo and why
        reason = " ".join(str(err).split())[:300]  # one line: the Hub's messages span several
        raise FileNotFoundError(f"no local path {repo_id!r}, and it cannot be downloaded from the Hugging Face "
                                f"Hub: {reason}") from None  # fmt: skip
