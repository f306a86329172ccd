"""Stage-2 training: any architecture of `vqar.ar.ARCHITECTURES` on a code store, through the shared loop.

A run configuration holds one architecture: `arch` names it in `vqar.ar.ARCHITECTURES`, `size` fills its width and
depth, and `model` is that architecture's config. What differs between families (the fields they read from the
store, what they need of the tokenizer, their loss, the options they take) is their registry entry's; nothing here
asks which family it trains. The data-dependent fields of `model` (vocabulary, code shape, classes, caption length
and vocabulary, and family fields such as an RQ-Transformer's code vectors) are read from the code store when
the configuration is made, so `vqar config ar PRESET codes=DIR` prints what the run will use and `run.yaml`
records it; a preset or override that contradicts the store is an error.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import MISSING, DictConfig, OmegaConf

from vqar.ar import ARModel, Conditioning, get_architecture
from vqar.ar.next_patch import next_patch_loss
from vqar.bundle import load, read_config, save_pretrained
from vqar.configs import ConfigError, compose_node, preset_fields, preset_names, to_config, to_yaml
from vqar.data import split_dataset
from vqar.data.codes import CodeBatch, CodeDataset, check_labelled, collate_codes, read_manifest
from vqar.data.extraction import tokenizer_fingerprint
from vqar.parallel import DistConfig, Parallel, sync
from vqar.parallel.runtime import launch_main
from vqar.sampling import SamplingSettings, draw, make_conditions
from vqar.sampling.draw import check_drawable, check_settings_fit
from vqar.text import TextTokenizer
from vqar.train.checkpoint import (
    DamagedCheckpointsError,
    has_run,
    latest_checkpoint,
    refuse_changed_model,
    trained_settings,
)
from vqar.train.config import TrainConfig
from vqar.train.ema import ModelEMA
from vqar.train.launch import distributed_run
from vqar.train.loop import Trainer
from vqar.train.npp import (
    NPPConfig,
    check_grid,
    check_resumed_schedule,
    check_segments,
    patch_side_at,
    segment_ends,
    segment_lr,
)
from vqar.train.optim import StepGuard, adamw
from vqar.train.task import TrainTask
from vqar.train.text import TextConfig, caption_ids, prepare_text_tokenizer, text_loss
from vqar.utils.device import autocast
from vqar.utils.images import make_grid, save_image

log = logging.getLogger("vqar.train")


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
            if not self.model.text_length:
                raise ValueError(f"{setting} applies to a text-conditioned model (its caption loss against its "
                                 "image loss), and this one is conditioned on classes (its store holds no "
                                 "captions)")  # fmt: skip
        # A caption preset on a store without captions (rq-mnist-text on class codes) trained a class-conditional
        # model unsaid; every run.yaml states the defaults, so only settings that differ from them are refused.
        stated = [f"text.{name}={getattr(self.text, name)}" for name in TextConfig.__dataclass_fields__
                  if getattr(self.text, name) != getattr(TextConfig, name)]  # fmt: skip
        if stated and not self.model.text_length:
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
            check_grid(self.npp.level, tuple(self.model.code_shape)[:2])  # before any folder or model is made
            check_segments(self.npp.level, self.npp.rate, self.train.steps)


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
    return to_config(node)


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


def check_grid_settings(cfg: ARRunConfig) -> None:
    """ConfigError for sample grid settings the configured model cannot take, told by a model on the meta device:
    `vqar config` refuses them as training does before its first step (`ARTask._grid_settings`)."""
    if cfg.sample.n_per_class <= 0:
        return
    with torch.device("meta"):  # the bare network: what it can draw does not hang on its tokenizer's codebook
        model = get_architecture(cfg.arch).model(cfg.model)
    try:
        check_settings_fit(model, cfg.sample)
    except ValueError as err:
        raise ConfigError(f"the sample grid's settings (sample.*) do not fit the model: {err}") from None


def describe_run_config(preset: str | Path | None, overrides: Iterable[str] = ()) -> str:
    """The YAML of a run configuration, the data-dependent model fields marked with where they come from."""
    overrides = list(overrides)
    node, origins = compose_run_config(preset, overrides)
    if not any(OmegaConf.is_missing(node.model, name) for name in node.model):
        _no_condition_dropout_without_a_condition(node, overrides)  # what training would use
        check_grid_settings(to_config(node.copy()))  # a store this architecture cannot model is an error here too
    else:  # the model waits for a store, but the other sections are whole: check them as training would
        for section in node:
            if section != "model" and isinstance(node[section], DictConfig):
                to_config(node[section].copy())
        # and the model's own fields (n_layer=0), with the architecture's defaults standing in for the store's
        model, defaults = node.model.copy(), get_architecture(node.arch).config()
        for name in model:
            if OmegaConf.is_missing(model, name):
                model[name] = getattr(defaults, name)
        to_config(model)
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
    for name, value in data_fields(node, Path(codes)).items():
        if not OmegaConf.is_missing(node.model, name):
            stated = OmegaConf.to_container(node.model)[name]
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


# ---------------------------------------------------------------- the task
def build_model(cfg: ARRunConfig, tokenizer=None) -> ARModel:
    """The configured model, given what it needs of `tokenizer` (see `Architecture.build`)."""
    return get_architecture(cfg.arch).build(cfg.model, tokenizer)


class ARTask(TrainTask):
    collate = staticmethod(collate_codes)
    best_metric = ("nll", "min")
    progress_metrics = ("loss", "accuracy")
    pictures = ("samples_grid.png",)

    def __init__(self, cfg: ARRunConfig, store: CodeDataset, device: torch.device, par: Parallel | None = None,
                 text_tokenizer: TextTokenizer | None = None):  # fmt: skip
        self.cfg, self.store, self.device, self.par = cfg, store, device, par or Parallel()
        self.arch = get_architecture(cfg.arch)
        self.tokenizer = load(store.tokenizer_path, device=device)
        self.text_tokenizer = text_tokenizer
        self.model = build_model(cfg, self.tokenizer).to(device)
        # Training forward passes go through `train_model` (DDP's wrapper; under FSDP the model itself, sharded
        # in place before the optimizer sees its parameters).
        self.train_model = self.par.wrap(self.model, units=self.arch.fsdp_units(self.model))
        self.optimizer = adamw(self.model, cfg.train)
        self.guard = StepGuard(cfg.train.precision, device)
        self.ema = ModelEMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.grid_settings = self._grid_settings()
        if cfg.npp.level > 1:
            ends = segment_ends(cfg.train.steps, cfg.npp.level, cfg.npp.rate)
            shortest = min(b - a for a, b in zip([0, *ends], ends, strict=False))
            if cfg.npp.segment_lr and cfg.npp.warmup_steps >= shortest:
                log.warning("npp.warmup_steps=%d is not shorter than the shortest NPP segment (%d steps): that "
                            "segment never reaches the full learning rate", cfg.npp.warmup_steps, shortest)  # fmt: skip

    def _grid_settings(self) -> SamplingSettings:
        """The grid's sampling settings; guidance needs a null condition, which some runs do not train. Settings
        the model cannot take (`sample.cfg_interval` or `sample.speculative` on VAR, `sample.smooth` on any other,
        per-depth lists of the wrong length) are refused here, before the first step, not at the first evaluation
        after hours of training."""
        grid = self.cfg.sample
        if grid.guided and not self.model.has_null_condition:
            log.warning("sample.cfg_scale=%g needs a null condition (a conditional store and "
                        "model.class_dropout_prob > 0); the sample grids are drawn without guidance", grid.cfg_scale)
            grid = replace(grid, cfg_scale=1.0)
        if grid.n_per_class > 0:
            try:
                check_drawable(self.model, grid, self.tokenizer)
            except ValueError as err:
                raise ValueError(f"the sample grid's settings (sample.*) do not fit the model: {err}") from None
        return grid

    def patch_side(self, step: int) -> int:
        npp = self.cfg.npp
        return patch_side_at(step, self.cfg.train.steps, npp.level, npp.rate) if npp.level > 1 else 1

    def lr_factor(self, step: int) -> float | None:
        """NPP's per-segment learning rate when asked for; None keeps the loop's warmup + cosine."""
        npp = self.cfg.npp
        if npp.level == 1 or not npp.segment_lr:
            return None
        ends = segment_ends(self.cfg.train.steps, npp.level, npp.rate)
        return segment_lr(step, ends, npp.warmup_steps, npp.decay_ratio, npp.end_lr_ratio)

    @property
    def eval_model(self) -> ARModel:
        return self.ema.shadow if self.ema is not None else self.model

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, **({"ema": self.ema.shadow} if self.ema is not None else {})}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self.optimizer}

    def state_dict(self) -> dict:
        return {"guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.guard.load_state_dict(state.get("guard", {}))

    def _inputs(self, batch: CodeBatch, random_view: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        codes = batch.codes
        if random_view:  # one of the stored views (flip / ten-crop) per item; the global RNG is checkpointed
            view = torch.randint(codes.shape[1], (len(codes),))
            codes = codes[torch.arange(len(codes)), view]
        else:
            codes = codes[:, 0]
        conditioning = self.model.conditioning
        if conditioning is Conditioning.TEXT:
            cond = caption_ids(self.text_tokenizer, batch.captions, train=random_view,
                               drop_prob=self.model.cfg.class_dropout_prob, device=self.device)  # fmt: skip
        else:
            cond = batch.labels.to(self.device) if conditioning is Conditioning.CLASS else None
        return codes.to(self.device), cond

    def _loss(self, out, codes: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """The family's image loss (its registry entry's), plus the weighted text loss of a model that predicts
        its caption."""
        c = self.cfg.loss
        image, parts = self.arch.loss(self.model, out, codes, c)
        if out.text_logits is None:
            return image, parts
        caption = text_loss(out.text_logits, cond)
        return c.img_weight * image + c.txt_weight * caption, {**parts, "image_loss": image, "text_loss": caption}

    def train_step(self, batch: CodeBatch, step: int) -> dict[str, float]:
        codes, cond = self._inputs(batch, random_view=True)
        self.model.train()
        side = self.patch_side(step)
        with autocast(self.device, self.cfg.train.precision):
            out = self.train_model(codes, cond) if side == 1 else self.train_model(codes, cond, patch_side=side)
        parts = {}
        if side == 1:
            loss, parts = self._loss(out, codes, cond)
        else:
            loss = next_patch_loss(out.logits, codes, side)
        if not self.guard.step(loss, self.optimizer, self.cfg.train.grad_clip):
            return {"skipped": 1.0}
        if self.ema is not None:
            self.ema.update(self.model)
        positions = self.model.num_positions // (side * side)
        metrics = {
            "loss": float(loss.detach()),
            "positions": float(positions * len(codes) * self.par.world_size),
            "patch": float(side),
            **{name: float(value.detach()) for name, value in parts.items()},
        }
        if side == 1:
            metrics["accuracy"] = float((out.logits.detach().argmax(-1) == codes).float().mean())
        return metrics

    @torch.no_grad()
    def evaluate(self, batches: Iterable[CodeBatch]) -> dict[str, float]:
        model = self.eval_model.eval()
        total_nll = total_correct = count = 0.0
        for batch in batches:
            codes, cond = self._inputs(batch, random_view=False)
            with autocast(self.device, self.cfg.train.precision):
                logits = model(codes, cond).logits.float()
            total_nll += float(F.cross_entropy(logits.flatten(0, -2), codes.flatten(), reduction="sum"))
            total_correct += float((logits.argmax(-1) == codes).sum())
            count += codes.numel()
        totals = torch.tensor([total_nll, total_correct, count], dtype=torch.float64, device=self.device)
        sync.all_reduce_sum_(totals)  # each rank scored its share of the validation split
        total_nll, total_correct, count = totals.tolist()
        return {"nll": total_nll / count, "accuracy": total_correct / count}

    @torch.no_grad()
    def write_artifacts(self, run_dir: Path, step: int) -> None:
        """samples_grid.png: one row per class or caption (or rows of unconditional samples)."""
        grid = self.cfg.sample
        if grid.n_per_class == 0:
            return
        model = self.eval_model.eval()
        conditioning = model.conditioning
        prompts = None
        if conditioning is Conditioning.TEXT:
            prompts = self._sample_prompts(min(len(self.store), grid.max_classes))
            conditions = make_conditions(model, prompts=prompts, n_per_condition=grid.n_per_class,
                                         text_tokenizer=self.text_tokenizer, strict_prompts=False)  # fmt: skip
        elif conditioning is Conditioning.CLASS:
            classes = list(range(min(model.num_classes, grid.max_classes)))
            conditions = make_conditions(model, classes=classes, n_per_condition=grid.n_per_class)
        else:
            conditions = make_conditions(model, n_per_condition=2 * grid.n_per_class)
        with self.par.full_params(model):  # under FSDP every rank runs this same sampling
            result = draw(model, conditions, self.grid_settings, tokenizer=self.tokenizer,
                          batch_size=len(conditions))  # fmt: skip
        if not self.par.is_main:
            return
        save_image(make_grid(list(result.images.split(grid.n_per_class))), Path(run_dir) / "samples_grid.png")
        if prompts is not None:
            (Path(run_dir) / "samples_grid_prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")

    def _sample_prompts(self, rows: int) -> list[str]:
        """One caption from each of `rows` items spread over the store: the rows of the sample grid."""
        captions = self.store.captions
        return [captions[i * len(captions) // rows][0] for i in range(rows)]

    def export(self, out_dir: Path, weights: dict[str, dict[str, torch.Tensor]], step: int) -> None:
        # the run folder holds the checkpoints and logs beside the model
        save_pretrained(self.eval_model, out_dir, weights["ema" if self.ema is not None else "model"],
                        tokenizer=self.tokenizer, text_tokenizer=self.text_tokenizer, keep_companions=True,
                        trained_steps=step, overwrite=True)  # fmt: skip


def train_ar(cfg: ARRunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Trains an AR model on `cfg.data.codes` into `run_dir` and returns the final validation metrics."""
    if not cfg.data.codes:
        raise ValueError("set data.codes (or codes=...) to a code store made by `vqar extract-codes`")
    if resume:
        check_same_model(cfg, Path(run_dir))
    store = CodeDataset(cfg.data.codes)
    check_labelled(store, cfg.model.num_classes)
    text_dir = Path(run_dir) / "text_tokenizer"
    made_here = not text_dir.exists()
    try:
        return _train_ar(cfg, run_dir, store, resume, overwrite)
    except BaseException:
        # A run that fails before it starts (too little memory, too few captions) leaves no caption tokenizer:
        # alone in the folder, it made the same command, run again, refuse the folder as "not a training run".
        if made_here and text_dir.is_dir() and not has_run(Path(run_dir)) and launch_main():
            shutil.rmtree(text_dir, ignore_errors=True)
        raise


def _train_ar(cfg: ARRunConfig, run_dir: str | Path, store: CodeDataset, resume: bool, overwrite: bool) -> dict:
    with distributed_run(cfg.dist, cfg.train.device, run_dir, resume, overwrite, "ar") as (par, run_dir):
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        train_set, val_set = split_dataset(store, cfg.data.val_fraction, cfg.data.split_seed)
        text_tokenizer = None
        if store.has_captions:
            text_tokenizer = prepare_text_tokenizer(cfg.text, store, list(train_set.indices), run_dir, par)
            torch.manual_seed(cfg.train.seed)
        task = ARTask(cfg, store, par.device, par, text_tokenizer)
        if resume:
            check_same_tokenizer(run_dir, task.tokenizer, cfg.data.codes)
        torch.manual_seed(cfg.train.seed + par.rank)  # then a random stream of its own per rank
        params = sum(p.numel() for p in task.model.parameters())
        log.info(
            "training a %s (%.1fM parameters) on %d code maps of shape %s (%d for validation) on %s%s",
            type(task.model).__name__,
            params / 1e6 * (par.world_size if par.sharded else 1),
            len(train_set),
            "x".join(map(str, store.code_shape)),
            len(val_set),
            par.device,
            f" x {par.world_size} processes ({cfg.dist.strategy})" if par.distributed else "",
        )
        trainer = Trainer(task, train_set, val_set, cfg.data, cfg.train, run_dir, to_yaml(cfg), par)
        return trainer.fit(resume=resume)


def check_same_model(cfg: ARRunConfig, run_dir: Path) -> None:
    """Refuses to resume a run with settings that change the model it trains (`model.n_head=8`, `size=`). Settings
    that only shape training (`train.*`, `ARConfig.TRAINING_FIELDS`) may change; the data fields are checked against
    the store instead."""
    trained = trained_settings(run_dir)
    fields = get_architecture(cfg.arch).config
    given = {"arch": cfg.arch, "size": cfg.size}
    given.update((f"model.{name}", value) for name, value in asdict(cfg.model).items()
                 if name not in fields.DATA_FIELDS and name not in fields.TRAINING_FIELDS)  # fmt: skip
    model = trained.get("model") if isinstance(trained.get("model"), dict) else {}
    before = {"arch": trained.get("arch"), "size": trained.get("size"), **{f"model.{k}": v for k, v in model.items()}}
    if trained:
        refuse_changed_model(run_dir, given, before, _model_defining)
    try:
        ckpt = latest_checkpoint(run_dir)
        npp = NPPConfig(**trained.get("npp") or {})
        total = int(trained.get("train", {}).get("steps"))
    except (DamagedCheckpointsError, TypeError, ValueError, AttributeError):  # the trainer names what is wrong
        return
    if ckpt is not None:
        check_resumed_schedule(run_dir, ckpt.step, (total, npp), (cfg.train.steps, cfg.npp))


def _model_defining(key: str, value: Any) -> Any:
    """What of a setting's value decides the model: of the condition dropout rate, whether there is one (a model
    trained with it has a null condition); the rate itself only shapes training and may change."""
    if key == "model.class_dropout_prob" and isinstance(value, int | float):
        return value > 0
    return value


def check_same_tokenizer(run_dir: Path, tokenizer, codes: str) -> None:
    """Refuses to resume a run on the codes of another tokenizer than the one it exported with its model: the
    codes would mean other things, and the export keeps the run's tokenizer (so the model would be sampled through
    the wrong one). A run that exported nothing yet has nothing to compare."""
    exported = Path(run_dir) / "tokenizer"
    if not (exported / "config.json").is_file():
        return
    if tokenizer_fingerprint(load(exported)) != tokenizer_fingerprint(tokenizer):
        raise ValueError(
            f"data.codes: the store {codes} holds the codes of another tokenizer than the one this run trained with "
            f"({exported}); resume on that tokenizer's codes, or start a new run"
        )
