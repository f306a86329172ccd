"""Stage-1 training: a `Tokenizer` (and optionally its discriminator) on images, through the shared loop."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from vqar.bundle import save_pretrained
from vqar.configs import changed_settings, compose_node, to_config, to_yaml
from vqar.data import Batch, DataConfig, build_datasets, check_readable, random_hflip
from vqar.parallel import DistConfig, Parallel, sync
from vqar.quantize.codebook import count_statistics
from vqar.tokenizers import Tokenizer, TokenizerConfig
from vqar.tokenizers.losses import TokenizerLossConfig, TokenizerObjective
from vqar.tokenizers.registry import BACKBONES, backbone
from vqar.train.checkpoint import refuse_changed_model, trained_settings
from vqar.train.config import TrainConfig
from vqar.train.launch import distributed_run
from vqar.train.loop import Trainer
from vqar.train.optim import StepGuard, adamw
from vqar.train.task import TrainTask
from vqar.utils.device import autocast
from vqar.utils.images import make_grid, psnr, save_image

log = logging.getLogger("vqar.train")

GRID_IMAGES = 16


@dataclass
class TokenizerRunConfig:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    # Shorthands accepted on the command line, in the style of the RQ-Transformer tools (`d=4 c=256`).
    ALIASES: ClassVar[dict[str, str]] = {
        "d": "model.quantizer.depth",
        "c": "model.quantizer.codebook_size",
        "steps": "train.steps",
        "lr": "train.lr",
        "bs": "data.batch_size",
    }

    def validate(self) -> None:
        self.model.validate()
        self.loss.validate()
        self.data.validate()
        self.train.validate()
        self.dist.validate()
        _refuse_fsdp(self.dist)
        if self.train.ema_decay is not None:  # the AR stage's: a tokenizer run would train without it, unsaid
            raise ValueError(f"train.ema_decay={self.train.ema_decay} keeps EMA weights of AR models only; a tokenizer "
                             "trains without them: set train.ema_decay=null")  # fmt: skip
        if self.data.captions not in (None, "none"):  # the AR stage's too: a tokenizer reads images alone
            raise ValueError(f"data.captions={self.data.captions} is for text-to-image training, which reads them "
                             "from a code store; a tokenizer trains on the images alone: leave it out (`vqar "
                             "extract-codes --captions` gives the code store its captions)")  # fmt: skip
        if self.data.val_fraction == 0:  # 0 suits extraction, but a run is scored on its validation split
            raise ValueError("data.val_fraction must be in (0, 1) for training (evaluation scores the run on the "
                             "validation split), got 0")  # fmt: skip
        arch = self.model.arch
        _refuse_unbuilt_backbones(self.model)
        net = self.model.backbone
        if self.data.channels != net.in_channels or net.out_channels != net.in_channels:
            raise ValueError(
                f"data.channels={self.data.channels} must equal model.{arch}.in_channels={net.in_channels} "
                f"and model.{arch}.out_channels={net.out_channels}"
            )
        if self.data.image_size != net.image_size:
            name = backbone(arch).size_field
            raise ValueError(
                f"data.image_size={self.data.image_size} differs from model.{arch}.{name}={net.image_size}; set both"
            )


def _refuse_fsdp(dist: DistConfig) -> None:
    if dist.strategy != "ddp":
        raise ValueError(f"tokenizers train with dist.strategy=ddp (FSDP is for AR models), not {dist.strategy}")


def _refuse_unbuilt_backbones(config: TokenizerConfig) -> None:
    """Settings of the backbone sections `model.arch` does not build (`model.conv.*` of a ViT-VQGAN) would be saved
    in run.yaml and do nothing, however absurd (`model.conv.ch=-16`)."""
    for name in BACKBONES:
        if name == config.arch:
            continue
        for setting, value in changed_settings(getattr(config, name)).items():
            raise ValueError(f"model.{name}.{setting}={value} shapes the {name} backbone, which "
                             f"model.arch={config.arch} does not build: leave it out")  # fmt: skip


def load_run_config(preset: str | Path | None, overrides: Iterable[str] = ()) -> TokenizerRunConfig:
    """A tokenizer run configuration from a preset name (see `vqar presets`) or YAML path, plus overrides."""
    return to_config(compose_node(TokenizerRunConfig, "tokenizer", preset, list(overrides), TokenizerRunConfig.ALIASES))


class TokenizerTask(TrainTask):
    best_metric = ("psnr", "max")
    progress_metrics = ("loss", "psnr", "usage", "d_loss")
    pictures = ("recon_grid.png",)

    def __init__(self, cfg: TokenizerRunConfig, device: torch.device, par: Parallel | None = None):
        self.cfg, self.device, self.par = cfg, device, par or Parallel()
        self.model = Tokenizer(cfg.model).to(device)
        self.objective = TokenizerObjective(cfg.loss, cfg.model.backbone.in_channels, cfg.data.image_size).to(device)
        # Training forward passes go through the DDP wrappers; everything else uses the modules themselves.
        self.train_model = self.par.wrap(self.model)
        self.optimizer = adamw(self.model, cfg.train)
        self.guard = StepGuard(cfg.train.precision, device)
        self.disc_optimizer = self.train_disc = None
        if self.objective.discriminator is not None:
            self.train_disc = self.par.wrap(self.objective.discriminator)
            disc_lr = cfg.train.lr if cfg.loss.disc_lr is None else cfg.loss.disc_lr
            disc_cfg = dataclasses.replace(cfg.train, lr=disc_lr)
            self.disc_optimizer = adamw(self.objective.discriminator, disc_cfg)
            self.disc_guard = StepGuard(cfg.train.precision, device)
        self._grid_images: torch.Tensor | None = None
        self.flip_generator = torch.Generator().manual_seed(cfg.train.seed + 1 + self.par.rank)

    def modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"model": self.model}
        if self.objective.discriminator is not None:
            modules["discriminator"] = self.objective.discriminator
        return modules

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = {"model": self.optimizer}
        if self.disc_optimizer is not None:
            opts["discriminator"] = self.disc_optimizer
        return opts

    def state_dict(self) -> dict:
        state = {"flip_generator": self.flip_generator.get_state(), "guard": self.guard.state_dict()}
        if self.disc_optimizer is not None:
            state["disc_guard"] = self.disc_guard.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.flip_generator.set_state(state["flip_generator"])
        self.guard.load_state_dict(state.get("guard", {}))
        if self.disc_optimizer is not None:
            self.disc_guard.load_state_dict(state.get("disc_guard", {}))

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        images = batch.images
        if self.cfg.data.random_flip:
            images = random_hflip(images, self.flip_generator)
        images = images.to(self.device)
        precision = self.cfg.train.precision
        self.model.train()
        with autocast(self.device, precision):
            out = self.train_model(images)
            loss, metrics = self.objective.generator_loss(images, out, self.model.last_layer(), step)
        grad_clip = self.cfg.train.grad_clip
        if not self.guard.step(loss, self.optimizer, grad_clip):
            return {"skipped": 1.0}
        if self.disc_optimizer is not None and self.objective.gan_active(step):
            with autocast(self.device, precision):
                d_loss, d_metrics = self.objective.discriminator_step_loss(images, out.recon, self.train_disc)
            if self.disc_guard.step(d_loss, self.disc_optimizer, grad_clip):
                metrics.update(d_metrics)
        usage, perplexity = out.quant.usage, out.quant.perplexity
        if self.par.distributed:
            usage, perplexity = self._global_code_statistics(out.quant.codes)
        metrics.update(
            psnr=psnr(images, out.recon.detach()).mean(),
            usage=usage.float().mean(),
            perplexity=perplexity.float().mean(),
            commitment=out.quant.commitment.detach(),
        )
        metrics.update(self._per_level("usage", usage))
        return {k: float(v) for k, v in metrics.items()}

    def _global_code_statistics(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-level (usage, perplexity) of the global batch's codes. Each process's share of the batch uses fewer
        codes than the whole: their mean fell as processes were added, though the weights trained alike."""
        size = self.model.codebook_size
        levels = self.model.quantizer.level_codes(codes.detach())
        counts = torch.stack([torch.bincount(level, minlength=size) for level in levels]).float()
        sync.all_reduce_sum_(counts)
        return count_statistics(counts)

    def _per_level(self, name: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """`usage_d0`, `usage_d1`, ... (depths) or `usage_s0`, ... (scales) for a quantizer with several levels."""
        if self.model.levels == 1:
            return {}
        prefix = self.model.quantizer.level_prefix
        return {f"{name}_{prefix}{i}": value for i, value in enumerate(values.reshape(-1))}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[Batch, int]]) -> dict[str, float]:
        self.model.eval()
        size, levels = self.model.codebook_size, self.model.levels
        seen = torch.zeros(levels, size, dtype=torch.bool, device=self.device)
        total_psnr = total_mse = 0.0
        count = 0
        grid = _GridPicker(GRID_IMAGES)
        for batch, counted in batches:
            images = batch.images.to(self.device)
            with autocast(self.device, self.cfg.train.precision):
                out = self.model(images)
            recon, images = out.recon[:counted].float(), images[:counted]
            total_psnr += float(psnr(images, recon).sum())
            total_mse += float((recon - images).pow(2).flatten(1).mean(1).sum())
            count += counted
            for level, codes in enumerate(self.model.quantizer.level_codes(out.quant.codes[:counted])):
                seen[level, codes] = True
            grid.offer(batch)
        totals = torch.tensor([total_psnr, total_mse, count], dtype=torch.float64, device=self.device)
        seen = seen.float()
        sync.all_reduce_sum_(totals, seen)  # each rank scored its share of the validation split
        total_psnr, total_mse, count = totals.tolist()
        if count == 0:
            raise ValueError(f"no readable image in the validation split of {self.cfg.data.source} (empty, or every "
                             "file failed to load: see the warnings above); raise data.val_fraction")  # fmt: skip
        self._grid_images = grid.images()
        usage = (seen > 0).float().mean(1) * 100
        metrics = {"psnr": total_psnr / count, "mse": total_mse / count, "usage": float(usage.mean())}
        metrics.update({k: float(v) for k, v in self._per_level("usage", usage).items()})
        return metrics

    @torch.no_grad()
    def write_artifacts(self, run_dir: Path, step: int) -> None:
        """recon_grid.png: originals on top, then reconstructions (one row per level, coarse to fine, for residual
        and multi-scale tokenizers)."""
        if self._grid_images is None:
            return
        self.model.eval()
        images = self._grid_images.to(self.device)
        codes = self.model.encode(images)
        depths = range(1, self.model.levels + 1) if self.model.levels > 1 else [None]
        rows = [images] + [self.model.decode(codes, depth=d) for d in depths]
        save_image(make_grid([r.float().cpu() for r in rows]), Path(run_dir) / "recon_grid.png")

    def export(self, out_dir: Path, weights: dict[str, dict[str, torch.Tensor]], step: int) -> None:
        # the run folder holds the checkpoints and logs beside the model
        save_pretrained(self.model, out_dir, weights["model"], trained_steps=step, overwrite=True)


class _GridPicker:
    """Chooses validation images for the picture: one per class first (validation splits are often sorted by
    class), then the earliest others."""

    def __init__(self, size: int):
        self.size = size
        self.picked: list[torch.Tensor] = []
        self.spare: list[torch.Tensor] = []
        self.labels: set[int] = set()

    def offer(self, batch: Batch) -> None:
        for image, label in zip(batch.images, batch.labels.tolist(), strict=True):
            if len(self.picked) >= self.size:
                return
            if label >= 0 and label not in self.labels:
                self.labels.add(label)
                self.picked.append(image)
            elif len(self.spare) < self.size:
                self.spare.append(image)

    def images(self) -> torch.Tensor | None:
        chosen = (self.picked + self.spare)[: self.size]
        return torch.stack(chosen) if chosen else None


def train_tokenizer(
    cfg: TokenizerRunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False
) -> dict[str, float]:
    """Trains a tokenizer into `run_dir` and returns the final validation metrics."""
    _refuse_fsdp(cfg.dist)  # validated already, unless the config was built in code
    if resume:
        check_same_model(cfg, Path(run_dir))
    with distributed_run(cfg.dist, cfg.train.device, run_dir, resume, overwrite, "tokenizer") as (par, run_dir):
        train_set, val_set = build_datasets(cfg.data)
        check_readable(train_set, cfg.data.source)
        if len(val_set):  # found at the first evaluation, the steps before it were lost with the run
            try:
                check_readable(val_set, cfg.data.source)
            except ValueError as err:
                raise ValueError(f"the validation split ({len(val_set)} images held out by data.val_fraction="
                                 f"{cfg.data.val_fraction:g}, data.split_seed={cfg.data.split_seed}) has {err}: "
                                 "change data.split_seed or raise data.val_fraction") from None  # fmt: skip
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        task = TokenizerTask(cfg, par.device, par)
        torch.manual_seed(cfg.train.seed + par.rank)  # then a random stream of its own per rank
        log.info(
            "training a %s tokenizer (codes %s, K=%d) on %d images (%d for validation) on %s%s",
            cfg.model.quantizer.kind.upper(),
            "x".join(map(str, task.model.code_shape())),
            cfg.model.quantizer.codebook_size,
            len(train_set),
            len(val_set),
            par.device,
            f" x {par.world_size} processes" if par.distributed else "",
        )
        if cfg.loss.disc_weight > 0 and cfg.loss.disc_start >= cfg.train.steps and par.is_main:
            # Not refused: a short run resumed with more steps reaches it. Said, as its checkpoints carry it.
            log.warning("loss.disc_start=%d is past train.steps=%d: the discriminator is built and saved but never "
                        "trains in this run (only a --resume with more steps reaches it)", cfg.loss.disc_start,
                        cfg.train.steps)  # fmt: skip
        trainer = Trainer(task, train_set, val_set, cfg.data, cfg.train, run_dir, to_yaml(cfg), par)
        return trainer.fit(resume=resume)


# Settings of the model section that shape how it trains, not what its weights mean: they may change on --resume.
TRAINING_ONLY = {"conv.dropout", "vit.dropout", *(f"quantizer.{name}" for name in (
    "beta", "entropy_weight", "entropy_temperature", "decay", "eps", "kmeans_init", "kmeans_iters", "restart_dead",
    "dead_threshold"))}  # fmt: skip


def check_same_model(cfg: TokenizerRunConfig, run_dir: Path) -> None:
    """Refuses to resume a run with settings that change the tokenizer it trains (`d=2`, `model.conv.resolution`):
    a depth-4 shared codebook loads into a depth-2 model, whose export then gives other codes than the stores and AR
    models made from the run. The settings of the backbone not in use (`model.vit.*` of a conv tokenizer) and the
    training-only ones (`TRAINING_ONLY`) may change."""
    trained = trained_settings(run_dir).get("model")
    if not isinstance(trained, dict):
        return
    model = dataclasses.asdict(cfg.model)
    sections = (backbone(cfg.model.arch).name, "quantizer")
    given = {f"model.{key}": value for key, value in model.items() if key not in ("conv", "vit", "quantizer")}
    given.update((f"model.{section}.{key}", value) for section in sections for key, value in model[section].items()
                 if f"{section}.{key}" not in TRAINING_ONLY)  # fmt: skip
    before = {f"model.{key}": value for key, value in trained.items() if not isinstance(value, dict)}
    before.update((f"model.{section}.{key}", value) for section in sections
                  if isinstance(trained.get(section), dict) for key, value in trained[section].items())  # fmt: skip
    refuse_changed_model(run_dir, given, before)
