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

from vqar.configs import compose, to_yaml
from vqar.data import Batch, DataConfig, build_datasets, random_hflip
from vqar.pretrained import save_pretrained
from vqar.tokenizers import Tokenizer, TokenizerConfig
from vqar.tokenizers.losses import TokenizerLossConfig, TokenizerObjective
from vqar.train.checkpoint import prepare_run_dir
from vqar.train.config import TrainConfig
from vqar.train.loop import Trainer, TrainTask
from vqar.train.optim import adamw, guarded_step
from vqar.utils.device import autocast, resolve_device
from vqar.utils.images import make_grid, psnr, save_image
from vqar.utils.io import atomic_write_text

log = logging.getLogger("vqar.train")

GRID_IMAGES = 16


@dataclass
class TokenizerRunConfig:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

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
        arch = self.model.arch
        net = self.model.backbone
        resolution = net.image_size if arch == "vit" else net.resolution
        if self.data.channels != net.in_channels or net.out_channels != net.in_channels:
            raise ValueError(
                f"data.channels={self.data.channels} must equal model.{arch}.in_channels={net.in_channels} "
                f"and model.{arch}.out_channels={net.out_channels}"
            )
        if self.data.image_size != resolution:
            name = "image_size" if arch == "vit" else "resolution"
            raise ValueError(
                f"data.image_size={self.data.image_size} differs from model.{arch}.{name}={resolution}; set both"
            )


def load_run_config(preset: str | Path | None, overrides: Iterable[str] = ()) -> TokenizerRunConfig:
    """A tokenizer run configuration from a preset name (see `vqar presets`) or YAML path, plus overrides."""
    return compose(TokenizerRunConfig, "tokenizer", preset, list(overrides), TokenizerRunConfig.ALIASES)


class TokenizerTask(TrainTask):
    best_metric = ("psnr", "max")

    def __init__(self, cfg: TokenizerRunConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.model = Tokenizer(cfg.model).to(device)
        self.objective = TokenizerObjective(cfg.loss, cfg.model.backbone.in_channels, cfg.data.image_size).to(device)
        self.optimizer = adamw(self.model, cfg.train)
        self.disc_optimizer = None
        if self.objective.discriminator is not None:
            disc_cfg = dataclasses.replace(cfg.train, lr=cfg.loss.disc_lr or cfg.train.lr)
            self.disc_optimizer = adamw(self.objective.discriminator, disc_cfg)
        self._grid_images: torch.Tensor | None = None
        self.flip_generator = torch.Generator().manual_seed(cfg.train.seed + 1)

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
        return {"flip_generator": self.flip_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.flip_generator.set_state(state["flip_generator"])

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        images = batch.images
        if self.cfg.data.random_flip:
            images = random_hflip(images, self.flip_generator)
        images = images.to(self.device)
        precision = self.cfg.train.precision
        self.model.train()
        with autocast(self.device, precision):
            out = self.model(images)
            loss, metrics = self.objective.generator_loss(images, out, self.model.last_layer(), step)
        grad_clip = self.cfg.train.grad_clip
        if not guarded_step(loss, self.optimizer, list(self.model.parameters()), grad_clip):
            return {"skipped": 1.0}
        if self.disc_optimizer is not None and self.objective.gan_active(step):
            with autocast(self.device, precision):
                d_loss, d_metrics = self.objective.discriminator_step_loss(images, out.recon)
            disc_params = list(self.objective.discriminator.parameters())
            if guarded_step(d_loss, self.disc_optimizer, disc_params, grad_clip):
                metrics.update(d_metrics)
        metrics.update(
            psnr=psnr(images, out.recon.detach()).mean(),
            usage=out.quant.usage.float().mean(),
            perplexity=out.quant.perplexity.float().mean(),
            commitment=out.quant.commitment.detach(),
        )
        return {k: float(v) for k, v in metrics.items()}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        self.model.eval()
        size, depth = self.model.codebook_size, self.model.depth
        seen = torch.zeros(depth, size, dtype=torch.bool, device=self.device)
        total_psnr = total_mse = 0.0
        count = 0
        grid = _GridPicker(GRID_IMAGES)
        for batch in batches:
            images = batch.images.to(self.device)
            with autocast(self.device, self.cfg.train.precision):
                out = self.model(images)
            recon = out.recon.float()
            total_psnr += float(psnr(images, recon).sum())
            total_mse += float((recon - images).pow(2).flatten(1).mean(1).sum())
            count += len(images)
            codes = out.quant.codes.reshape(-1, depth)
            for d in range(depth):
                seen[d, codes[:, d]] = True
            grid.offer(batch)
        if count == 0:
            raise ValueError("the validation split is empty; raise data.val_fraction")
        self._grid_images = grid.images()
        usage = seen.float().mean(1) * 100
        metrics = {"psnr": total_psnr / count, "mse": total_mse / count, "usage": float(usage.mean())}
        if depth > 1:
            metrics.update({f"usage_d{d}": float(u) for d, u in enumerate(usage)})
        return metrics

    @torch.no_grad()
    def write_artifacts(self, run_dir: Path, step: int) -> None:
        """recon_grid.png: originals on top, then reconstructions (one row per depth for a residual tokenizer)."""
        if self._grid_images is None:
            return
        self.model.eval()
        images = self._grid_images.to(self.device)
        codes = self.model.encode(images)
        depths = range(1, self.model.depth + 1) if self.model.is_residual else [None]
        rows = [images] + [self.model.decode(codes, depth=d) for d in depths]
        save_image(make_grid([r.float().cpu() for r in rows]), Path(run_dir) / "recon_grid.png")

    def export(self, out_dir: Path) -> None:
        save_pretrained(self.model, out_dir)


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
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    train_set, val_set = build_datasets(cfg.data)
    task = TokenizerTask(cfg, device)
    log.info(
        "training a %s tokenizer (codes %s, K=%d) on %d images (%d for validation) on %s",
        cfg.model.quantizer.kind.upper(),
        "x".join(map(str, task.model.code_shape())),
        cfg.model.quantizer.codebook_size,
        len(train_set),
        len(val_set),
        device,
    )
    run_yaml = to_yaml(cfg)
    atomic_write_text(run_dir / "run.yaml", run_yaml)
    trainer = Trainer(task, train_set, val_set, cfg.data, cfg.train, run_dir, run_yaml)
    return trainer.fit(resume=resume)
