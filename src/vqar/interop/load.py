"""`load_pretrained` (`vqar.load_pretrained`): the one entry point for every model format vqar reads.

* a vqar bundle folder (`config.json` + `model.safetensors`, what `vqar convert` and training write; also those of
  vqar 0.1) or a Hub repo id;
* an RQ release: `<name>/` (its stage-2 model, or stage 1 alone), `<name>/stage1` or `<name>/stage2`, or the
  `model.pt` inside one;
* a LlamaGen / NPP `.pt` file (VQ tokenizer or GPT, told apart by their weights), whose architecture `config`
  names;
* an official VAR VQVAE `.pth` (`vae_ch160v4096z32.pth`), told apart by its weights; `config` may give its scales
  (`{"patch_nums": [...]}`, default the 256px release's);
* an official VAR transformer `.pth` (`var_d16.pth` ... `var_d36.pth`), with its tokenizer given or found beside it
  as `vae_ch160v4096z32.pth`, read at the transformer's scales.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vqar.ar import ARModel
from vqar.ar.contract import CodeTokenizer
from vqar.bundle import CONFIG_FILE, TOKENIZER_KIND, WEIGHTS_FILE, is_hub_repo_id, load, read_config
from vqar.data.codes import is_code_store
from vqar.data.pack import is_shard_folder
from vqar.data.shards import SHARD_INDEX
from vqar.interop import llamagen, rq_release, var, var_transformer
from vqar.interop.state import NoEMAWeights
from vqar.interop.vqar_v1 import is_v1_ar_folder, load_v1
from vqar.sampling.export import is_sample_folder
from vqar.utils.device import resolve_device
from vqar.utils.io import describe_entries, folder_entries
from vqar.utils.runs import SET_ASIDE, list_checkpoints, run_kind, run_of_checkpoints
from vqar.utils.safe_load import load_checkpoint

VAR_VQVAE_FILE = "vae_ch160v4096z32.pth"  # the released VAR tokenizer, looked for beside a var_d*.pth


def load_pretrained(path, config=None, ema: bool = False, tokenizer=None, device="cpu") -> nn.Module:
    """A vqar model in eval mode on `device` from `path` (file, folder or Hub repo id); see the module docstring.

    Args:
        config: the architecture where the files do not carry it (LlamaGen): a preset name (`VQ-16`, `GPT-XL`),
            a dict of the upstream constructor fields, or a JSON file of them; a VAR VQVAE's scales. A ValueError
            for the formats that record their own (vqar folders, RQ releases, VAR transformers).
        ema: load the EMA weights the checkpoint carries instead of the raw ones (an RQ release's `state_dict_ema`, a
            LlamaGen file's `ema`). A ValueError, before the weights are read, for sources with no separate EMA
            weights: vqar folders and Hub repositories (which hold one set, the EMA average where the run used
            `train.ema_decay`) and VAR's files. The tokenizer (`tokenizer`, or an RQ release's stage 1) is read
            with its EMA weights where its checkpoint carries them, else with its one set.
        tokenizer: the stage-1 model for an AR model, a loaded tokenizer or anything `load_pretrained` reads;
            an RQ-Transformer without one looks for `stage1/` beside its folder. A ValueError for a stage-1 model.
        device: where the model (and the tokenizer it carries) is put: a name or torch.device, or "auto" (CUDA
            when available, else the CPU). A ValueError, before any weights are read, for a device this machine
            lacks ("cuda" without a GPU) or a name that is none ("gpu").
    """
    if not isinstance(ema, bool):  # ema="no" is truthy: it loaded the EMA weights
        raise TypeError(f"ema must be True or False, got {ema!r}")
    # Checked first: torch would say so only when the loaded model is moved there, as an AssertionError ("Torch not
    # compiled with CUDA enabled") or a RuntimeError listing every device type, after reading all the weights.
    return _load_pretrained(path, config, ema, tokenizer, resolve_device(device))


def _load_pretrained(path, config, ema: bool, tokenizer, device, vqvae_scales=None) -> nn.Module:
    """`load_pretrained`; `vqvae_scales`, the scales a VAR VQVAE file is read at where `config` gives none (those
    of the VAR transformer it is the tokenizer of), is ignored by every other format, which records its own."""
    if ema:
        _refuse_ema_of_bundle(path)
    given_as = tokenizer if isinstance(tokenizer, (str, Path)) else "given"
    source = Path(path)
    if source.is_file() and source.name == rq_release.WEIGHTS_FILE and rq_release.is_release_stage(source.parent):
        source = source.parent
    if source.is_file() and source.name == CONFIG_FILE and (source.parent / WEIGHTS_FILE).is_file():
        raise ValueError(f"{source} is the configuration of a vqar model, which the files beside it make up: give "
                         f"their folder, {source.parent}")  # fmt: skip (it was "not a checkpoint")
    # Each loader checks that `config` and `tokenizer` apply to the kind of model it finds, and loads the tokenizer
    # only then (a VAR one at its transformer's scales): an option that does not apply is refused, not ignored.
    if source.is_dir():
        model, tokenizer = _load_folder(source, config, ema, tokenizer)
    elif source.is_file():
        model, tokenizer = _load_file(source, config, ema, tokenizer, vqvae_scales)
    else:
        if config is not None and is_hub_repo_id(path):
            raise _does_not_apply("config", path, _BUNDLE_HAS_CONFIG)
        tokenizer = _load_tokenizer(tokenizer, ema)
        model = load(str(path))  # a Hub repo id, or a clear "not found"
        if tokenizer is not None and not isinstance(model, ARModel):
            raise _does_not_apply("tokenizer", path, _NOT_AR.format(kind=f"a {type(model).__name__}"))
    if tokenizer is not None:
        if isinstance(model, ARModel):  # the kind first: a VQ tokenizer beside VAR was "another codebook"
            model.check_companions(tokenizer)
        _check_same_codebook(model, tokenizer, given_as, path)
        model.attach(tokenizer.eval())
    model = model.to(device)
    if isinstance(model, ARModel) and model.tokenizer is not None:
        model.attach(model.tokenizer.to(device))
    return model


def _check_same_codebook(model: nn.Module, tokenizer: nn.Module, given_as, path) -> None:
    """ValueError when a tokenizer given beside an AR model codes with another codebook than the one the model was
    trained on, which an RQ-Transformer keeps (its code embeddings) and a vqar folder keeps with its own tokenizer.
    Another decoder over that codebook (a fine-tuned one) fits; another codebook of the same size would decode
    every sample to noise without a word. A tokenizer of another codebook size or depth is left to `attach`,
    which names the sizes."""
    if not isinstance(model, ARModel):
        return
    if tokenizer.codebook_size != model.codebook_size or tokenizer.depth != model.depth:
        return
    known = getattr(model, "code_embeddings", None)
    if known is None and model.tokenizer is not None and model.tokenizer is not tokenizer:
        known = model.tokenizer.code_vectors()
    if known is None:  # a release whose tokenizer comes from the caller alone: nothing to compare with
        return
    # A bf16 / fp16 copy of the same codebook differs by its rounding (bf16: up to 0.4%), wherever its vectors are
    # computed in fp32; another codebook differs by the vectors' own size.
    stored = {known.dtype} | {weight.dtype for weight in tokenizer.parameters()}
    if model.tokenizer is not None:
        stored |= {weight.dtype for weight in model.tokenizer.parameters()}
    rounding = max([torch.finfo(dtype).eps for dtype in stored if dtype.is_floating_point] + [1e-3])
    given = tokenizer.code_vectors().detach().float().cpu()
    known = known.detach().float().cpu()
    if given.shape == known.shape and not torch.allclose(given, known, rtol=rounding, atol=1e-5):
        raise ValueError(f"the tokenizer {given_as} codes with another codebook than the one {path} was trained on "
                         "(the same size, other vectors), so its codes would decode to noise: give the tokenizer "
                         "the model's codes were extracted with (a vqar AR folder carries it: leave --tokenizer "
                         "out)")  # fmt: skip


_ONE_SET_OF_WEIGHTS = ("it holds one set of weights, no separate EMA ones (a vqar run trained with train.ema_decay "
                       "exported its EMA average as those weights); drop --ema")
_VAR_HAS_NO_EMA = "VAR's released checkpoints hold one set of weights, with no EMA entry; drop --ema"


def _refuse_ema_of_bundle(path, what: str = "") -> None:
    """ValueError when `path` is a vqar model folder (of any vqar version) or a Hub repository id, read from its
    name alone: neither carries separate EMA weights, and refusing here spares loading (or downloading) them."""
    if isinstance(path, nn.Module):
        return
    folder = Path(path)
    if (folder / CONFIG_FILE).is_file() or (not folder.exists() and is_hub_repo_id(path)):
        kind = "a vqar model folder" if folder.exists() else "a Hub repository (a vqar model folder)"
        raise _does_not_apply("ema", f"{what}{path}", f"{kind}: {_ONE_SET_OF_WEIGHTS}")


_BUNDLE_HAS_CONFIG = "a vqar model folder (a Hub repository's too) records its architecture in its config.json"
_NOT_AR = "it holds {kind} (a stage-1 model itself); only an autoregressive model takes one, to decode its codes"


class OptionDoesNotApply(ValueError):
    """An option of `load_pretrained` (config=, tokenizer=, ema=) given for a source it does not apply to."""

    def __init__(self, option: str, source, why: str):
        super().__init__(f"{option}= (--{option}) does not apply to {source}: {why}")
        self.option, self.source, self.why = option, source, why


def _does_not_apply(option: str, source, why: str) -> ValueError:
    return OptionDoesNotApply(option, source, why)


def _load_tokenizer(path, ema: bool, vqvae_scales=None) -> nn.Module | None:
    """The stage-1 model at `path` (None and loaded models as they are), a VAR VQVAE file read at `vqvae_scales`;
    ValueError naming the path when it holds another kind of model (an AR run given as --tokenizer, say), which
    `attach` would only report as a TypeError without it."""
    if path is None or isinstance(path, nn.Module):
        return path
    try:
        try:
            tokenizer = _load_pretrained(path, None, ema, None, "cpu", vqvae_scales)
        except (NoEMAWeights, OptionDoesNotApply) as err:
            if isinstance(err, OptionDoesNotApply) and err.option != "ema":
                raise
            # ema= asks for the AR model's EMA weights; a tokenizer that carries none (a vqar folder, a file
            # without an EMA entry) is read with its one set of weights.
            tokenizer = _load_pretrained(path, None, False, None, "cpu", vqvae_scales)
    except llamagen.ConfigNeeded as err:  # config= (--config) is the AR model's: the tokenizer's cannot be given
        if err.what != "VQ":  # a GPT given as the tokenizer: it holds no tokenizer, and is reported as such
            raise ValueError(f"the tokenizer {path} is a LlamaGen GPT checkpoint, not a stage-1 tokenizer") from None
        raise ValueError(f"the tokenizer {path} is a LlamaGen VQ checkpoint, which does not record its architecture: "
                         f"convert it once with it (`vqar convert {path} VQ_FOLDER --config VQ-16`, or VQ-8) and give "
                         "that folder as the tokenizer (in Python, a tokenizer loaded with "
                         f"load_pretrained({str(path)!r}, config='VQ-16') does too)") from None  # fmt: skip
    if isinstance(tokenizer, ARModel) or not isinstance(tokenizer, CodeTokenizer):
        raise ValueError(f"the tokenizer {path} holds a {type(tokenizer).__name__}, not a stage-1 tokenizer")
    return tokenizer


def _load_folder(folder: Path, config, ema: bool, tokenizer) -> tuple[nn.Module, nn.Module | None]:
    """(model, tokenizer to attach) of a folder."""
    if (folder / CONFIG_FILE).is_file():  # a vqar folder (a missing model.safetensors is reported by `load`)
        if config is not None:
            raise _does_not_apply("config", folder, _BUNDLE_HAS_CONFIG)
        if tokenizer is not None and read_config(folder)[0] == TOKENIZER_KIND:
            raise _does_not_apply("tokenizer", folder, _NOT_AR.format(kind="a tokenizer"))
        tokenizer = _load_tokenizer(tokenizer, ema)
        v1 = is_v1_ar_folder(folder) and (folder / WEIGHTS_FILE).is_file()
        return (load_v1(folder) if v1 else load(folder)), tokenizer
    # A stage with its config but not its weights (an unpacking that stopped short) is named, not passed over:
    # a release whose stage2/model.pt is missing was loaded as its stage-1 tokenizer.
    for stage in (folder, folder / "stage2"):
        if (stage / rq_release.CONFIG_FILE).is_file() and not rq_release.is_release_stage(stage):
            raise FileNotFoundError(f"{stage} has a {rq_release.CONFIG_FILE} but no {rq_release.WEIGHTS_FILE}")
    for stage in (folder, folder / "stage2", folder / "stage1"):
        if rq_release.is_release_stage(stage):
            if config is not None:
                raise _does_not_apply("config", stage, f"an RQ release records its architecture in its "
                                      f"{rq_release.CONFIG_FILE}")  # fmt: skip
            arch = rq_release.read_arch(stage)
            if arch["type"] == "rq-vae":
                if tokenizer is not None:
                    raise _does_not_apply("tokenizer", stage, _NOT_AR.format(kind="an RQ-VAE"))
                return rq_release.load_rqvae(stage, ema=ema), None
            tokenizer = _load_tokenizer(tokenizer, ema)
            return rq_release.load_rq_transformer(stage, ema=ema, tokenizer=tokenizer), tokenizer
    raise FileNotFoundError(_not_a_model(folder))


def _not_a_model(folder: Path) -> str:
    """Why `folder` holds no model, where it is another folder vqar makes, and what to do with it; the formats vqar
    reads otherwise."""
    expected = (f"expected {CONFIG_FILE} + {WEIGHTS_FILE} (vqar), {rq_release.CONFIG_FILE} + {rq_release.WEIGHTS_FILE} "
                "(an RQ release stage) or stage1/ stage2/ folders")  # fmt: skip
    if not any(folder.iterdir()):  # a typo'd or not yet filled --out, say: "not a folder vqar knows" would mislead
        return f"{folder} is an empty folder, not a model: {expected}"
    if is_code_store(folder):
        return (f"{folder} is a code store (made by `vqar extract-codes`), not a model: train an AR model on it with "
                f"`vqar train ar PRESET codes={folder}`")  # fmt: skip
    if is_shard_folder(folder):
        return (f"{folder} is a folder of tar shards (made by `vqar pack-shards`), not a model: train a tokenizer on "
                f"it with `vqar train tokenizer PRESET data.source={folder / SHARD_INDEX}`")  # fmt: skip
    owner = run_of_checkpoints(folder)
    if owner is not None:
        return _inside_checkpoints(folder, owner)
    run = _stopped_run(folder)
    if run is not None:
        return run
    entries = folder_entries(folder)
    if entries and is_sample_folder(folder):
        return (f"{folder} holds the samples of `vqar sample` ({describe_entries(entries)}), not a model: give the "
                f"model folder that drew them ({CONFIG_FILE} + {WEIGHTS_FILE})")  # fmt: skip
    return f"{folder} is not a model folder vqar knows: {expected}"


def _inside_checkpoints(folder: Path, run: Path) -> str:
    """A checkpoint (or the checkpoints folder) given as a model: it was taken for a run stopped before its first
    checkpoint, whose advice, `--resume --out` the checkpoint, trained a new run inside it."""
    kind = run_kind(run) or "ar"
    what = "a training checkpoint" if folder.name.startswith("step-") else "the checkpoints folder"
    return (f"{folder} is {what} of the run {run}, not a model: load the model the run exported ({run}), or continue "
            f"the run with `vqar train {kind} --resume --out {run}`")  # fmt: skip


def _stopped_run(folder: Path) -> str | None:
    """What to do with a training run that has not exported its model (stopped before its first checkpoint, or
    whose export failed, a full disk say); None for a folder that is no run. Resuming exports the model of the newest
    checkpoint before it trains on (`Trainer.export_if_behind`), so that is what the message offers."""
    kind = run_kind(folder)
    if kind is None:
        return None
    what = {"ar": "an AR model", "tokenizer": "a tokenizer"}[kind]
    resume = f"`vqar train {kind} --resume --out {folder}`"
    checkpoints = list_checkpoints(folder)
    if not checkpoints and (folder / SET_ASIDE).is_dir():  # killed: the next `vqar train` there puts it back
        return (f"{folder} is the training run of {what}, killed before its first checkpoint: it holds no model; the "
                f"run its --overwrite was to replace is set aside in {folder / SET_ASIDE}, and {resume} puts it back "
                "and continues it")  # fmt: skip
    if not checkpoints:
        return (f"{folder} is the training run of {what}, stopped before its first checkpoint: it holds no model; "
                f"{resume} starts it again")  # fmt: skip
    return (f"{folder} is the training run of {what}, stopped before it exported its model (newest checkpoint: "
            f"{checkpoints[-1].path}); {resume} exports that checkpoint's model into it, then trains on to its "
            "train.steps")


def _load_file(path: Path, config, ema: bool, tokenizer, vqvae_scales=None) -> tuple[nn.Module, nn.Module | None]:
    """(model, tokenizer to attach) of a checkpoint file, told apart by its content: a VAR VQVAE or transformer
    (plain state dicts) or a LlamaGen / NPP file. A VAR transformer without a tokenizer looks for the release
    VQVAE beside it."""
    checkpoint = load_checkpoint(path)
    if var_transformer.is_var_transformer_state(checkpoint):
        if ema:
            raise _does_not_apply("ema", path, f"a VAR transformer: {_VAR_HAS_NO_EMA}")
        if config is not None:
            raise _does_not_apply("config", path, "a VAR transformer's architecture (its scales too) is read off "
                                  "its weights")  # fmt: skip
        # A VAR tokenizer is read with the scales of the transformer it serves (VAR-d36: the 512 px ones).
        scales = var_transformer.var_transformer_config(checkpoint, str(path)).patch_nums
        try:
            tokenizer = _load_tokenizer(tokenizer, ema, list(scales))
        except ValueError:
            # A LlamaGen VQ file asked for its config=, which this transformer then refused: a loop of advice.
            if _is_llamagen_vq_file(tokenizer):
                raise ValueError(f"the tokenizer {tokenizer} is not a VAR VQVAE but a LlamaGen VQ tokenizer: a VAR "
                                 f"transformer ({path}) decodes its codes with a multi-scale tokenizer (the release's "
                                 f"{VAR_VQVAE_FILE} beside it, or a vqar tokenizer trained with the var-mnist "
                                 "preset)") from None  # fmt: skip
            raise
        found = tokenizer
        if found is None and (path.parent / VAR_VQVAE_FILE).is_file():
            found = var.load_var_vqvae(path.parent / VAR_VQVAE_FILE, patch_nums=scales)
        return var_transformer.load_var_transformer(checkpoint, tokenizer=found, source=str(path)), tokenizer
    if var.is_var_vqvae_state(checkpoint):
        if ema:
            raise _does_not_apply("ema", path, f"a VAR VQVAE: {_VAR_HAS_NO_EMA}")
        if tokenizer is not None:
            raise _does_not_apply("tokenizer", path, _NOT_AR.format(kind="a VAR VQVAE"))
        # `config`, when given: a dict / JSON of load_var_vqvae's keywords (patch_nums, phi_ratio, beta).
        fields = llamagen.read_config(config, {}, "VAR VQVAE") if config is not None else {}
        llamagen.check_fields(fields, {"patch_nums": [1], "phi_ratio": 0.5, "beta": 0.25}, "VAR VQVAE")
        if "patch_nums" in fields and not (fields["patch_nums"] and min(fields["patch_nums"]) >= 1):
            raise ValueError(f"VAR VQVAE config field 'patch_nums' takes the sides of its scales (1, 2, 3, ...), got "
                             f"{fields['patch_nums']!r}")  # fmt: skip
        if vqvae_scales is not None:
            fields.setdefault("patch_nums", vqvae_scales)
        return var.load_var_vqvae(checkpoint, source=str(path), **fields), None
    return _load_llamagen(checkpoint, path, config, ema, tokenizer)


def _is_llamagen_vq_file(path) -> bool:
    """Whether `path` holds a LlamaGen VQ tokenizer, and not a VAR VQVAE, whose names it shares (a damaged VAR
    VQVAE's own error was replaced by "a LlamaGen VQ tokenizer")."""
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        return False
    try:
        checkpoint = load_checkpoint(Path(path))
        if var.is_var_vqvae_state(checkpoint):
            return False
        return llamagen.looks_like_vq(llamagen.checkpoint_state(checkpoint, Path(path), False))
    except (ValueError, TypeError, KeyError, AttributeError):
        return False


def _load_llamagen(checkpoint, path: Path, config, ema: bool, tokenizer) -> tuple[nn.Module, nn.Module | None]:
    state = llamagen.checkpoint_state(checkpoint, path, ema)
    if llamagen.looks_like_gpt(state):
        tokenizer = _load_tokenizer(tokenizer, ema)
        return llamagen.build_gpt(state, config, str(path)), tokenizer
    if llamagen.looks_like_vq(state):
        if tokenizer is not None:
            raise _does_not_apply("tokenizer", path, _NOT_AR.format(kind="a LlamaGen VQ tokenizer"))
        return llamagen.build_vq(state, config, str(path)), None
    raise ValueError(_unknown_state(checkpoint, state, path))


def _unknown_state(checkpoint, state: dict, path: Path) -> str:
    """Why a file of tensors is no model vqar reads: a VAR transformer that lacks entries, or one inside a
    wrapper dict, is said to be one (the VAR loaders want a complete plain state dict, as released); anything else
    is named as neither LlamaGen kind."""
    required = var_transformer.REQUIRED_KEYS
    if var_transformer.is_var_transformer_state(state):  # under a "model" entry, or with "module." names
        key = next((k for k in ("model", "state_dict") if k in checkpoint), None)
        where = f"under {key!r}" if key else "with wrapper prefixes in its names (module., _orig_mod.)"
        return (f"{path} holds a VAR transformer's weights {where}, not as the plain state dict the release files "
                f"are: save that state dict alone, with the official names, and load that file")  # fmt: skip
    found = [k for k in required if k in state]
    if len(found) >= 2:
        missing = [k for k in required if k not in state]
        return (f"{path} looks like a VAR transformer but lacks {', '.join(missing)}: a damaged or cut-down state "
                f"dict; use the complete file")  # fmt: skip
    return (f"{path} is neither a LlamaGen GPT (no tok_embeddings.weight) nor a VQ tokenizer (no encoder.* / "
            f"quantize.*) nor a VAR transformer or VQVAE; first keys: {list(state)[:5]}")  # fmt: skip
