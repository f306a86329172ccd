"""Stage-2 training: any architecture of `vqar.ar.ARCHITECTURES` on a code store, through the shared loop.

What differs between families (the fields they read from the store, what they need of the tokenizer, their loss,
the options they take) is their registry entry's; nothing here asks which family it trains. The run configuration
(`ARRunConfig`, `load_run_config`) is `vqar.train.ar_config`'s.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vqar.ar import ARModel, Conditioning, get_architecture
from vqar.ar.next_patch import next_patch_loss
from vqar.bundle import load, save_pretrained
from vqar.configs import to_yaml
from vqar.data import split_dataset
from vqar.data.codes import CodeBatch, CodeDataset, check_labelled, collate_codes
from vqar.data.extraction import tokenizer_fingerprint
from vqar.parallel import Parallel, sync
from vqar.parallel.runtime import launch_main
from vqar.sampling import SamplingSettings, draw, make_conditions
from vqar.sampling.draw import check_drawable
from vqar.text import TextTokenizer
from vqar.train.ar_config import ARRunConfig
from vqar.train.checkpoint import (
    DamagedCheckpointsError,
    has_run,
    latest_checkpoint,
    refuse_changed_model,
    trained_settings,
)
from vqar.train.ema import ModelEMA
from vqar.train.launch import distributed_run
from vqar.train.loop import Trainer
from vqar.train.npp import (
    NPPConfig,
    check_resumed_schedule,
    patch_side_at,
    segment_ends,
    segment_lr,
)
from vqar.train.optim import StepGuard, adamw
from vqar.train.task import TrainTask
from vqar.train.text import caption_ids, prepare_text_tokenizer, text_loss
from vqar.utils.device import autocast
from vqar.utils.images import make_grid, save_image

log = logging.getLogger("vqar.train")


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
            codes = codes[:, self.store.evaluation_view]
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
            loss = next_patch_loss(out.logits, codes, side, self.cfg.loss.label_smoothing)
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
    def evaluate(self, batches: Iterable[tuple[CodeBatch, int]]) -> dict[str, float]:
        model = self.eval_model.eval()
        total_nll = total_correct = count = 0.0
        for batch, counted in batches:
            codes, cond = self._inputs(batch, random_view=False)
            with autocast(self.device, self.cfg.train.precision):
                logits = model(codes, cond).logits[:counted].float()
            codes = codes[:counted]
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
            get_architecture(cfg.arch).model.__name__,  # FSDP's wrapper class is named FSDPRQTransformer
            params / 1e6,  # whole: a sharded parameter (FSDP2's DTensor) counts every rank's share
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
        ckpt = latest_checkpoint(run_dir, report=False)  # restoring reports a damaged one
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
