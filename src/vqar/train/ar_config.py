"""Stage-2 run configurations: one architecture of `vqar.ar.ARCHITECTURES` per run, its data-dependent fields
read from the code store.

`arch` names the architecture, `size` fills its width and depth, and `model` is that architecture's config. The
data-dependent fields of `model` (vocabulary, code shape, classes, caption length and vocabulary, and family fields
such as an RQ-Transformer's code vectors) are read from the code store when the configuration is made, so `vqar
config ar PRESET codes=DIR` prints what the run will use and `run.yaml` records it; a preset or override that
contradicts the store is an error. The training itself is `vqar.train.ar`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from vqar.ar import get_architecture
from vqar.ar.contract import Conditioning
from vqar.bundle import read_config
from vqar.configs import ConfigError, changed_settings, compose_node, preset_fields, preset_names, to_config
from vqar.data.codes import read_manifest
from vqar.parallel import DistConfig
from vqar.sampling import SamplingSettings
from vqar.sampling.draw import check_settings_fit
from vqar.sampling.settings import PER_DEPTH, check_settings_apply
from vqar.train.config import TrainConfig
from vqar.train.npp import (
    NPPConfig,
    check_grid,
    check_segments,
)
from vqar.train.text import TextConfig


@dataclass
class CodeDataConfig:
    codes: str = ""
    val_fraction: float = 0.1
    split_seed: int = 0
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.batch_size < 1 or self.eval_batch_size < 1 or self.num_workers < 0:
            raise ValueError("data.batch_size and data.eval_batch_size must be positive, data.num_workers >= 0")


@dataclass
class SampleGridConfig(SamplingSettings):
    """The sample grid drawn after each evaluation: `n_per_class` samples for each of the first `max_classes`
    classes (or captions), with these sampling settings."""

    n_per_class: int = 8
    max_classes: int = 10

    def validate(self) -> None:
        super().validate()
        if self.n_per_class < 0 or self.max_classes < 1:
            raise ValueError("sample.n_per_class must be >= 0 and sample.max_classes >= 1")
        # As `vqar sample` refuses its flags: a setting another one turns off is saved in run.yaml and does nothing.
        given = changed_settings(self, [field.name for field in dataclasses.fields(SamplingSettings)])
        check_settings_apply(given, lambda field: f"sample.{field}")


@dataclass
class LossConfig:
    """The training loss: the RQ-Transformer's soft image targets as its releases set them (their `loss:` section,
    `soft_temperature` 0.5; off by default here), label smoothing (VAR's recipe: 0.1), and, for text-to-image
    models with a text head (the RQ-Transformer's), `txt_weight * caption CE + img_weight * image CE` (0.1 / 0.9)."""

    soft_targets: bool = False
    soft_temperature: float = 0.5
    label_smoothing: float = 0.0
    txt_weight: float = 0.1
    img_weight: float = 0.9

    def validate(self) -> None:
        if self.txt_weight < 0 or self.img_weight <= 0 or self.soft_temperature <= 0:
            raise ValueError("loss.txt_weight must be >= 0, loss.img_weight and loss.soft_temperature > 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class ARRunConfig:
    arch: str = "rq"
    size: str | None = None
    model: Any = None  # the config dataclass of `arch` (see `vqar.ar.ARCHITECTURES`)
    data: CodeDataConfig = field(default_factory=CodeDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleGridConfig = field(default_factory=SampleGridConfig)
    npp: NPPConfig = field(default_factory=NPPConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    text: TextConfig = field(default_factory=TextConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    ALIASES: ClassVar[dict[str, str]] = {"codes": "data.codes", "steps": "train.steps", "lr": "train.lr",
                                         "bs": "data.batch_size"}  # fmt: skip

    def validate(self) -> None:
        self.check()

    def check(self, store_known: bool = True) -> None:
        """ValueError for settings training refuses. With `store_known` False (`vqar config` without `codes=`: the
        store's model fields are the architecture's defaults), those only the store decides (its captions, its code
        grid) are left to it."""
        for section in (self.model, self.data, self.train, self.sample, self.npp, self.dist, self.text, self.loss):
            section.validate()
        arch = get_architecture(self.arch)
        if self.loss.soft_targets:
            arch.check_option("soft_targets", "loss.soft_targets")
        if self.loss.label_smoothing:
            arch.check_option("label_smoothing", "loss.label_smoothing")
        # Without a text head the image loss is the whole loss: both weights would go unused. Only values that
        # differ from the defaults are refused, since every run.yaml states those.
        weights = [f"loss.{name}={getattr(self.loss, name):g}" for name in ("txt_weight", "img_weight")
                   if getattr(self.loss, name) != getattr(LossConfig, name)]  # fmt: skip
        if weights:
            setting = " and ".join(weights)
            arch.check_option("caption_loss", f"{setting} (the caption loss of a text head)")
            if store_known and not self.model.text_length:
                raise ValueError(f"{setting} applies to a text-conditioned model (its caption loss against its "
                                 "image loss), and this one is conditioned on classes (its store holds no "
                                 "captions)")  # fmt: skip
        # A caption preset on a store without captions (rq-mnist-text on class codes) trained a class-conditional
        # model unsaid; every run.yaml states the defaults, so only settings that differ from them are refused.
        stated = [f"text.{name}={getattr(self.text, name)}" for name in TextConfig.__dataclass_fields__
                  if getattr(self.text, name) != getattr(TextConfig, name)]  # fmt: skip
        if stated and store_known and not self.model.text_length:
            raise ValueError(f"{' and '.join(stated)} shape{'s' * (len(stated) == 1)} the captions of a "
                             "text-conditioned model, and this store holds no captions (the model would be "
                             "conditioned on its classes): extract codes with captions (`vqar extract-codes --captions "
                             "digits|FILE`), or train a class-conditional preset without text.*")  # fmt: skip
        if self.dist.strategy == "fsdp" and self.train.ema_decay:
            raise ValueError(
                "train.ema_decay is not available with dist.strategy=fsdp (the average would need sharding too); "
                "use dist.strategy=ddp or train.ema_decay=null"
            )
        unused = self.npp.unused()
        if unused and self.npp.level == 1:  # plain next-token training: NPP's other settings would go unused, unsaid
            given = [f"npp.{name}={str(getattr(self.npp, name)).lower()}" for name in unused]
            raise ValueError(f"{' and '.join(given)} shape{'s' * (len(given) == 1)} next patch prediction, "
                             "which npp.level=1 (the default: plain next-token training) leaves off: set "
                             "npp.level=2 or more to train on patches, or leave "
                             f"{'it' if len(given) == 1 else 'them'} out")  # fmt: skip
        if unused:  # the per-segment schedule's settings, with npp.segment_lr=false; its defaults are every run's
            name = unused[0]
            raise ValueError(f"npp.{name}={getattr(self.npp, name):g} shapes the learning rate of each NPP segment, "
                             "which npp.segment_lr=false turns off (the run's train.warmup_steps and cosine apply): "
                             f"set npp.segment_lr=true, or leave npp.{name} out")  # fmt: skip
        if self.npp.level > 1:
            arch.check_option("next_patch", "next patch prediction (npp.level > 1)")
            if store_known:  # before any folder or model is made
                check_grid(self.npp.level, tuple(self.model.code_shape)[:2])
            check_segments(self.npp.level, self.npp.rate, self.train.steps,
                           self.npp.warmup_steps if self.npp.segment_lr else 0)  # fmt: skip


# ---------------------------------------------------------------- configuration
def compose_run_config(preset: str | Path | None, overrides: Iterable[str] = ()) -> tuple[DictConfig, dict]:
    """The merged configuration of a preset (see `vqar presets ar`) or YAML path plus overrides, with the
    data-dependent model fields read from the code store when `data.codes` names one ("???" otherwise), and
    those fields' origins. A `size` sets the architecture's width and depth first; explicit model fields in the
    preset or the overrides still win."""
    overrides = list(overrides)
    chosen = preset_fields("ar", preset, overrides, ("arch", "size"))
    try:
        arch = get_architecture(str(chosen.get("arch", ARRunConfig.arch)))
        size = chosen.get("size")
        base = {"model": arch.size_fields(str(size))} if size is not None else None
    except ValueError as err:
        raise ConfigError(_another_family_preset(preset, chosen) or f"{err} (arch=, size=)") from None

    def shape(schema: DictConfig) -> None:
        schema.model = OmegaConf.structured(arch.config)
        for name in arch.config.DATA_FIELDS:  # unknown until the store is read, unless a config states them
            schema.model[name] = MISSING

    node = compose_node(ARRunConfig, "ar", preset, overrides, ARRunConfig.ALIASES, base=base, shape=shape)
    # A run's own run.yaml (`--resume`) states the fields of the store it trained on, which the new store must match.
    run_yaml = preset if preset is not None and Path(str(preset)).name == "run.yaml" else None
    origins = resolve_data_fields(node, arch.config.DATA_FIELDS, run_yaml, overrides)
    return node, origins


def _another_family_preset(preset: str | Path | None, chosen: dict) -> str | None:
    """What to say when `arch=` asks for another family than the preset's (`var-mnist arch=gpt`), whose size and
    model fields are the preset family's: the presets of the asked family. None when the preset is of that family."""
    if preset is None:
        return None
    asked = str(chosen.get("arch", ARRunConfig.arch))
    own = str(preset_fields("ar", preset, [], ("arch",)).get("arch", ARRunConfig.arch))
    try:
        get_architecture(asked)
    except ValueError:  # an unknown name is said to be one
        return None
    if own == asked:
        return None
    fitting = [name for name in preset_names("ar") if preset_fields("ar", name, [], ("arch",)).get("arch") == asked]
    instead = f"use a preset for it ({', '.join(fitting)})" if fitting else "write a preset for it"
    return (f"preset {str(preset)!r} is for arch={own} ({get_architecture(own).description}), not arch={asked}: "
            f"to train arch={asked}, {instead}, or leave arch= out")  # fmt: skip


def load_run_config(preset: str | Path | None, overrides: Iterable[str] = ()) -> ARRunConfig:
    """An AR run configuration; every data-dependent field must be known (give `codes=DIR`)."""
    overrides = list(overrides)
    node, origins = compose_run_config(preset, overrides)
    missing = [name for name in node.model if OmegaConf.is_missing(node.model, name)]
    if missing:
        raise ConfigError(f"model.{missing[0]} (and {', '.join(missing[1:]) or 'nothing else'}) come from the code "
                          "store: set data.codes (codes=DIR) to a store made by `vqar extract-codes`")  # fmt: skip
    _no_condition_dropout_without_a_condition(node, overrides)
    _no_run_schedule_under_npp_segments(node, overrides)
    cfg = to_config(node)
    _no_grid_guidance_without_a_null_condition(cfg, overrides)
    return cfg


def _no_condition_dropout_without_a_condition(node: DictConfig, overrides: list[str]) -> None:
    """A store without classes or captions trains an unconditional model, which has no condition to drop for
    guidance: a `model.class_dropout_prob` given for it is refused, a preset's is set to 0 (config.json said 0.1,
    where nothing was dropped, and sampling then refused guidance for want of a condition)."""
    model = node.model
    if model.num_classes or model.get("text_length") or not model.get("class_dropout_prob"):
        return
    if any(item.partition("=")[0].strip() == "model.class_dropout_prob" for item in overrides):
        raise ConfigError(f"model.class_dropout_prob={model.class_dropout_prob} drops the class or caption for "
                          f"guidance, and the code store {node.data.codes} has neither (an unconditional model): "
                          "leave it out")  # fmt: skip
    model.class_dropout_prob = 0.0


def _no_run_schedule_under_npp_segments(node: DictConfig, overrides: list[str]) -> None:
    """NPP's per-segment learning rate replaces the run's warmup and cosine: a `train.warmup_steps` or
    `train.min_lr_ratio` given for such a run is refused (it changed nothing, unsaid), as npp.* schedule settings
    given with `npp.segment_lr=false` are. A preset's own values are every run's and go unsaid."""
    npp = node.get("npp") or {}
    if int(npp.get("level", 1)) <= 1 or not npp.get("segment_lr", True):
        return
    given = [name for name in ("train.warmup_steps", "train.min_lr_ratio")
             if any(item.partition("=")[0].strip() == name for item in overrides)]  # fmt: skip
    if given:
        raise ConfigError(f"{given[0]} shapes the run's warmup and cosine, which next patch prediction's per-segment "
                          "schedule replaces (npp.segment_lr=true, the default with npp.level > 1): set "
                          "npp.warmup_steps, npp.decay_ratio or npp.end_lr_ratio instead, or npp.segment_lr=false "
                          f"to train with {given[0]}")  # fmt: skip


def _no_grid_guidance_without_a_null_condition(cfg: ARRunConfig, overrides: list[str]) -> None:
    """A `sample.cfg_scale` above 1 given for a model that learns no null condition (an unconditional store, or
    `model.class_dropout_prob=0`) is refused: the grid was drawn without guidance, with a warning, where `vqar
    sample --cfg` refuses it. A preset's own scale still only warns (`ARTask._grid_settings`)."""
    given = any(item.partition("=")[0].strip() == "sample.cfg_scale" for item in overrides)
    if not given or not cfg.sample.guided or cfg.sample.n_per_class <= 0:
        return
    with torch.device("meta"):
        model = get_architecture(cfg.arch).model(cfg.model)
    if not model.has_null_condition:
        why = "model.class_dropout_prob=0" if model.conditioning is not Conditioning.NONE else "an unconditional model"
        raise ConfigError(f"sample.cfg_scale={cfg.sample.cfg_scale:g} guides the sample grid with the null condition, "
                          f"which {why} does not learn: leave it out, or train with model.class_dropout_prob above 0 "
                          "on a store with classes or captions")  # fmt: skip


def check_grid_settings(cfg: ARRunConfig, store_known: bool = True) -> None:
    """ConfigError for sample grid settings the configured model cannot take, told by a model on the meta device:
    `vqar config` refuses them as training does before its first step (`ARTask._grid_settings`). Without the store
    (`store_known` False: its model fields are the architecture's defaults), the number of values of a per-depth
    setting is left unchecked: the depth is the store's."""
    if cfg.sample.n_per_class <= 0:
        return
    with torch.device("meta"):  # the bare network: what it can draw does not hang on its tokenizer's codebook
        model = get_architecture(cfg.arch).model(cfg.model)
    settings = cfg.sample
    if not store_known:
        first = lambda values: values[0] if isinstance(values, (list, tuple)) else values  # noqa: E731
        settings = replace(settings, **{name: first(getattr(settings, name)) for name in PER_DEPTH})
    try:
        check_settings_fit(model, settings)
    except ValueError as err:
        raise ConfigError(f"the sample grid's settings (sample.*) do not fit the model: {err}") from None


def describe_run_config(preset: str | Path | None, overrides: Iterable[str] = ()) -> str:
    """The YAML of a run configuration, the data-dependent model fields marked with where they come from."""
    overrides = list(overrides)
    node, origins = compose_run_config(preset, overrides)
    _no_run_schedule_under_npp_segments(node, overrides)
    if not any(OmegaConf.is_missing(node.model, name) for name in node.model):
        _no_condition_dropout_without_a_condition(node, overrides)  # what training would use
        cfg = to_config(node.copy())
        check_grid_settings(cfg)  # a store this architecture cannot model is an error here too
        _no_grid_guidance_without_a_null_condition(cfg, overrides)
    else:  # the model waits for a store: check what does not hang on it as training would, the architecture's
        # defaults standing in for the store's fields
        whole, defaults = node.copy(), get_architecture(node.arch).config()
        for name in whole.model:
            if OmegaConf.is_missing(whole.model, name):
                whole.model[name] = getattr(defaults, name)
        cfg = to_config(whole, validate=False)
        try:
            cfg.check(store_known=False)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        check_grid_settings(cfg, store_known=False)
    lines, in_model = [], False
    for line in OmegaConf.to_yaml(node).splitlines():
        if not line.startswith(" "):
            in_model = line == "model:"
        name = line.strip().split(":")[0]
        if in_model and line.startswith("  ") and not line.startswith("   ") and name in origins:
            line += f"  # {origins[name]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def resolve_data_fields(node: DictConfig, names: tuple[str, ...], run_yaml: str | Path | None = None,
                        overrides: Iterable[str] = ()) -> dict[str, str]:  # fmt: skip
    """Fills the data-dependent `names` of `node.model` from the code store of `node.data.codes`; a value the
    preset, the `overrides` or a resumed run's `run_yaml` state must agree with the store. Returns where each field's
    value comes from."""
    codes = node.data.codes
    if not codes:
        return {name: "from the code store: give codes=DIR" for name in names}
    given = {item.partition("=")[0].strip() for item in overrides}
    fields = data_fields(node, Path(codes))
    for name, value in fields.items():
        if not OmegaConf.is_missing(node.model, name):
            stated = OmegaConf.to_container(node.model)[name]
            if stated != value and fields.get("text_length") and name in TEXT_SETTINGS:
                _refuse_changed_text_field(name, stated, value, run_yaml)
            if stated != value and run_yaml is not None and f"model.{name}" in given:  # the user's, not the run's
                trained = preset_fields("ar", run_yaml, [], ("model",)).get("model")
                trained = OmegaConf.to_container(trained).get(name) if isinstance(trained, DictConfig) else None
                raise ConfigError(f"resuming: model.{name}={stated} differs from the run's {trained} ({run_yaml}), "
                                  f"whose checkpoints hold that model's weights; leave model.{name} out, or start a "
                                  "new run in another --out")  # fmt: skip
            if stated != value and run_yaml is not None:
                raise ConfigError(f"the run of {run_yaml} trains on codes with model.{name}={stated}, and the code "
                                  f"store {codes} gives {value}: resume it on a store that gives {stated}, or start a "
                                  "new run in another --out")  # fmt: skip
            if stated != value:
                raise ConfigError(f"model.{name}={stated} contradicts the code store {codes}, which gives {value}; "
                                  f"leave model.{name} unset")  # fmt: skip
        node.model[name] = value
    return {name: f"from the code store {codes}" for name in names}


# The model's caption sizes are the text settings' (a text store's): their errors name those, not the store.
TEXT_SETTINGS = {"text_length": "text.length", "text_vocab_size": "text.vocab_size (or text.tokenizer)",
                 "text_pad_id": "text.tokenizer"}  # fmt: skip


def _refuse_changed_text_field(name: str, stated, value, run_yaml) -> None:
    setting = TEXT_SETTINGS[name]
    if run_yaml is not None:
        raise ConfigError(f"resuming: the run of {run_yaml} was trained with model.{name}={stated}, and "
                          f"{setting} now gives {value}; the caption settings cannot change on --resume (its "
                          f"checkpoints hold that model's weights): leave {setting.split(' ')[0]} out, or start a new "
                          "run in another --out")  # fmt: skip
    raise ConfigError(f"model.{name}={stated} contradicts {setting}, which gives {value} (a text model's caption "
                      f"sizes come from its text settings): leave model.{name} unset and set "
                      f"{setting.split(' ')[0]}")  # fmt: skip


def data_fields(node: DictConfig, codes: Path) -> dict[str, Any]:
    """The data-dependent model fields of a code store: vocabulary, code shape, classes, the caption sizes of a
    text store, and the fields the architecture's registry entry reads (an RQ-Transformer's code vectors, VAR's
    scales)."""
    try:
        manifest = read_manifest(codes)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.codes: {err}") from None
    captions = bool(manifest.get("captions"))
    values: dict[str, Any] = {
        "vocab_size": int(manifest["codebook_size"]),
        "code_shape": list(manifest["code_shape"]),
        "num_classes": 0 if captions else int(manifest["num_classes"]),
        "text_length": 0,
        "text_vocab_size": 0,
        "text_pad_id": 0,
    }
    arch = get_architecture(node.arch)
    if captions:
        try:
            arch.check_option("captions", f"a caption store ({codes})")
        except ValueError as err:
            raise ConfigError(f"{err}: train a model that takes captions") from None
        values.update(TextConfig(**OmegaConf.to_container(node.text)).model_fields())
    _, tokenizer, _ = read_config(codes / "tokenizer")
    try:
        values.update(arch.store_fields(manifest, tokenizer))
    except (KeyError, ValueError) as err:
        raise ConfigError(f"data.codes: the store {codes} does not suit arch={arch.name}: {err}") from None
    return values
