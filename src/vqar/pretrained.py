"""vqar's own model format: a folder with `config.json` and `model.safetensors` (the Hugging Face Hub layout).

An AR model's folder may hold its tokenizer in `tokenizer/`; `load` then attaches it as `model.tokenizer`
(and a text-to-image model's caption tokenizer in `text_tokenizer/`, as `model.text_tokenizer`).

`save_pretrained(model, folder)` writes it; `load(folder)` rebuilds the model from the config and loads the
weights. Training runs export this format into their run directory, so `load(RUN_DIR)` gives the trained model.
Because the layout is the Hub's, a folder can be uploaded as a model repository as it is, and `load("owner/name")`
downloads one (with the optional `huggingface_hub` package) when no local folder of that name exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vqar.configs import ConfigError, from_dict, to_dict
from vqar.utils.io import atomic_write, atomic_write_text

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _model_kinds() -> dict[str, tuple[type, type]]:
    """kind -> (config dataclass, model class). Imported lazily to keep `vqar.pretrained` cheap to import."""
    from vqar.ar import GPT, VIM, GPTConfig, RQTransformer, RQTransformerConfig, VIMConfig
    from vqar.tokenizers import Tokenizer, TokenizerConfig

    return {
        "tokenizer": (TokenizerConfig, Tokenizer),
        "gpt": (GPTConfig, GPT),
        "rq_transformer": (RQTransformerConfig, RQTransformer),
        "vim": (VIMConfig, VIM),
    }


HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def download_from_hub(repo_id: str) -> Path:
    """The local snapshot of Hub model repository `repo_id` (only vqar's files: config, weights, tokenizer/)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"no local model folder {repo_id!r}; to load it from the Hugging Face Hub, install huggingface_hub "
            "(pip install 'vqar[hub]')"
        ) from None
    patterns = [CONFIG_FILE, WEIGHTS_FILE, f"tokenizer/{CONFIG_FILE}", f"tokenizer/{WEIGHTS_FILE}"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # network errors, unknown repos, gated repos: say which repo and why
        raise FileNotFoundError(f"cannot download {repo_id!r} from the Hugging Face Hub: {err}") from None


def save_pretrained(model: nn.Module, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Writes `model` (a vqar model with `.kind` and `.cfg`) as config.json + model.safetensors, atomically;
    `state_dict` replaces the model's own weights (e.g. the full weights gathered from FSDP shards)."""
    folder = Path(folder)
    kind = getattr(model, "kind", None)
    if kind not in _model_kinds():
        raise TypeError(f"save_pretrained needs a vqar model, got {type(model).__name__}")
    import vqar

    config = {
        "vqar_format": FORMAT_VERSION,
        "vqar_version": vqar.__version__,
        "kind": kind,
        "config": to_dict(model.cfg),
    }
    state = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt", "kind": kind}))
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2))


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Loads a model saved by `save_pretrained` (or a training run directory), in eval mode."""
    folder = Path(path)
    if not folder.exists():
        if not HUB_REPO_ID.match(str(path)):
            raise FileNotFoundError(f"no model at {folder}")
        folder = download_from_hub(str(path))
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a vqar model folder: it has no {CONFIG_FILE} "
            f"(a training run writes one at its first checkpoint)"
        )
    try:
        meta = json.loads(config_path.read_text())
    except ValueError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    kinds = _model_kinds()
    kind = meta.get("kind")
    if kind not in kinds:
        raise ValueError(f"{config_path} describes an unknown model kind {kind!r}; known: {', '.join(kinds)}")
    config_cls, model_cls = kinds[kind]
    try:
        config = from_dict(config_cls, meta.get("config", {}))
    except ConfigError as err:
        raise ValueError(f"{config_path}: {err}") from None
    model = model_cls(config)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{folder} has a {CONFIG_FILE} but no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"cannot read {weights_path}: {err}") from None
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights_path} does not match its config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model = model.to(device).eval()
    if kind != "tokenizer" and (folder / "tokenizer" / CONFIG_FILE).is_file():
        # Kept out of the module tree on purpose: the AR model's own weights stay the AR model's only.
        object.__setattr__(model, "tokenizer", load(folder / "tokenizer", device=device))
    if (folder / "text_tokenizer" / "text_tokenizer.json").is_file():
        from vqar.text import TextTokenizer

        object.__setattr__(model, "text_tokenizer", TextTokenizer.load(folder / "text_tokenizer"))
    return model
