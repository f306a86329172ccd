"""`load_pretrained`: one entry point for every checkpoint format vqar reads.

* a vqar bundle folder (`config.json` + `model.safetensors`, what `vqar convert` and training write; also those of
  vqar 0.1) or a Hub repo id;
* an RQ release: `<name>/` (its stage-2 model, or stage 1 alone), `<name>/stage1` or `<name>/stage2`, or the
  `model.pt` inside one;
* a LlamaGen / NPP `.pt` file (VQ tokenizer or GPT, told apart by their weights), whose architecture `config`
  names.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from vqar.ar import ARModel
from vqar.bundle import CONFIG_FILE, WEIGHTS_FILE, load
from vqar.interop import llamagen, rq_release
from vqar.interop.safe_load import load_checkpoint
from vqar.interop.vqar_v1 import is_v1_ar_folder, load_v1


def load_pretrained(path, config=None, ema: bool = False, tokenizer=None) -> nn.Module:
    """A vqar model in eval mode from `path` (file, folder or Hub repo id); see the module docstring.

    Args:
        config: the architecture where the files do not carry it (LlamaGen): a preset name (`VQ-16`, `GPT-XL`),
            a dict of the upstream constructor fields, or a JSON file of them.
        ema: load the EMA weights the checkpoint carries instead of the raw ones.
        tokenizer: the stage-1 model for an AR model, a loaded tokenizer or anything `load_pretrained` reads;
            an RQ-Transformer without one looks for `stage1/` beside its folder.
    """
    if tokenizer is not None and not isinstance(tokenizer, nn.Module):
        tokenizer = load_pretrained(tokenizer, ema=ema)
    source = Path(path)
    if source.is_file() and source.name == rq_release.WEIGHTS_FILE and rq_release.is_release_stage(source.parent):
        source = source.parent
    if source.is_dir():
        model = _load_folder(source, config, ema, tokenizer)
    elif source.is_file():
        model = _load_llamagen(source, config, ema)
    else:
        model = load(str(path))  # a Hub repo id, or a clear "not found"
    if tokenizer is not None and isinstance(model, ARModel):
        model.attach(tokenizer.eval())
    return model


def _load_folder(folder: Path, config, ema: bool, tokenizer) -> nn.Module:
    if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        return load_v1(folder) if is_v1_ar_folder(folder) else load(folder)
    if (folder / rq_release.CONFIG_FILE).is_file() and not rq_release.is_release_stage(folder):
        raise FileNotFoundError(f"{folder} has a {rq_release.CONFIG_FILE} but no {rq_release.WEIGHTS_FILE}")
    for stage in (folder, folder / "stage2", folder / "stage1"):
        if rq_release.is_release_stage(stage):
            arch = rq_release.read_arch(stage)
            if arch["type"] == "rq-vae":
                return rq_release.load_rqvae(stage, ema=ema)
            return rq_release.load_rq_transformer(stage, ema=ema, tokenizer=tokenizer)
    raise FileNotFoundError(
        f"{folder} is not a model folder vqar knows: expected {CONFIG_FILE} + {WEIGHTS_FILE} (vqar), "
        f"{rq_release.CONFIG_FILE} + {rq_release.WEIGHTS_FILE} (an RQ release stage) or stage1/ stage2/ folders"
    )


def _load_llamagen(path: Path, config, ema: bool) -> nn.Module:
    state = llamagen.checkpoint_state(load_checkpoint(path), path, ema)
    if llamagen.looks_like_gpt(state):
        return llamagen.build_gpt(state, config, str(path))
    if llamagen.looks_like_vq(state):
        return llamagen.build_vq(state, config, str(path))
    raise ValueError(
        f"{path} is neither a LlamaGen GPT (no tok_embeddings.weight) nor a VQ tokenizer (no encoder.* / quantize.*); "
        f"first keys: {list(state)[:5]}"
    )
