"""Stage-2 training: a GPT, an RQ-Transformer or a VIM on a code store, through the shared loop."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from vqar.ar import GPT, VIM, GPTConfig, RQTransformer, RQTransformerConfig, VIMConfig, size_fields
from vqar.ar.next_patch import check_patch_size, next_patch_loss
from vqar.configs import compose, to_yaml
from vqar.data import split_dataset
from vqar.data.codes import CodeBatch, CodeDataset, collate_codes
from vqar.parallel import DistConfig, Parallel
from vqar.pretrained import load, save_pretrained
from vqar.quantize import sync
from vqar.sampling.export import condition_embedding
from vqar.sampling.filters import check_sampling_args
from vqar.text import TextTokenizer
from vqar.train.config import TrainConfig
from vqar.train.ema import ModelEMA
from vqar.train.launch import distributed_run
from vqar.train.loop import Trainer, TrainTask
from vqar.train.npp import NPPConfig, patch_side_at, segment_ends, segment_lr
from vqar.train.optim import StepGuard, adamw
from vqar.train.text import TEXT_TOKENIZER_DIR, TextConfig, caption_ids, prepare_text_tokenizer, text_loss
from vqar.utils.device import autocast
from vqar.utils.images import make_grid, save_image

log = logging.getLogger("vqar.train")

ARCHS = ("gpt", "rq", "vim")


@dataclass
class ARModelConfig:
    """`arch` picks the model; `size` (see `vqar.ar.presets`) fills its width and depth. Vocabulary, code grid,
    classes and code embeddings always come from the code store."""

    arch: str = "rq"
    size: str | None = None
    gpt: GPTConfig = field(default_factory=GPTConfig)
    rq: RQTransformerConfig = field(default_factory=RQTransformerConfig)
    vim: VIMConfig = field(default_factory=VIMConfig)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.size is not None:
            size_fields(self.arch, self.size)
        getattr(self, self.arch).validate()


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
class SampleConfig:
    """The sample grid drawn after each evaluation: `n_per_class` samples for each of the first `max_classes`."""

    n_per_class: int = 8
    max_classes: int = 10
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.cfg_scale)
        if self.n_per_class < 0 or self.max_classes < 1:
            raise ValueError("sample.n_per_class must be >= 0 and sample.max_classes >= 1")


@dataclass
class LossConfig:
    """The RQ-Transformer's training loss, as its releases set it (their `loss:` section): soft image targets
    (`soft_temperature` 0.5 in the release configs; off by default here) and, for text-to-image models,
    `txt_weight * caption CE + img_weight * image CE` (0.1 / 0.9)."""

    soft_targets: bool = False
    soft_temperature: float = 0.5
    txt_weight: float = 0.1
    img_weight: float = 0.9

    def validate(self) -> None:
        if self.txt_weight < 0 or self.img_weight <= 0 or self.soft_temperature <= 0:
            raise ValueError("loss.txt_weight must be >= 0, loss.img_weight and loss.soft_temperature > 0")


@dataclass
class ARRunConfig:
    model: ARModelConfig = field(default_factory=ARModelConfig)
    data: CodeDataConfig = field(default_factory=CodeDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    npp: NPPConfig = field(default_factory=NPPConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    text: TextConfig = field(default_factory=TextConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    ALIASES: ClassVar[dict[str, str]] = {
        "codes": "data.codes",
        "size": "model.size",
        "steps": "train.steps",
        "lr": "train.lr",
        "bs": "data.batch_size",
    }

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.sample.validate()
        self.npp.validate()
        self.dist.validate()
        self.text.validate()
        self.loss.validate()
        if self.loss.soft_targets and self.model.arch != "rq":
            raise ValueError("loss.soft_targets is the RQ-Transformer's training loss (model.arch=rq)")
        if self.dist.strategy == "fsdp" and self.train.ema_decay:
            raise ValueError(
                "train.ema_decay is not available with dist.strategy=fsdp (the average would need sharding too); "
                "use dist.strategy=ddp or train.ema_decay=null"
            )
        if self.npp.level > 1 and self.model.arch != "gpt":
            raise ValueError(f"next patch prediction (npp.level > 1) trains a GPT, not model.arch={self.model.arch}")


def load_run_config(preset: str | Path | None, overrides: Iterable[str] = ()) -> ARRunConfig:
    """An AR run configuration from a preset (see `vqar presets ar`) or YAML path plus overrides. A `model.size`
    sets the architecture first; explicit model fields in the preset or the overrides still win."""
    overrides = list(overrides)
    probe = compose(ARRunConfig, "ar", preset, overrides, ARRunConfig.ALIASES)
    if probe.model.size is None:
        return probe
    base = {"model": {probe.model.arch: size_fields(probe.model.arch, probe.model.size)}}
    return compose(ARRunConfig, "ar", preset, overrides, ARRunConfig.ALIASES, base=base)


def build_model(cfg: ARModelConfig, store: CodeDataset, tokenizer: nn.Module | None = None,
                text_tokenizer: TextTokenizer | None = None) -> nn.Module:  # fmt: skip
    """The configured model with its data-dependent fields taken from the code store (and, for an RQ-Transformer,
    its code embeddings from the store's tokenizer). A store with captions gives a text-conditioned model whose
    caption length and vocabulary are `text_tokenizer`'s."""
    shape, classes = list(store.code_shape), store.num_classes
    text = {}
    if text_tokenizer is not None:
        if cfg.arch == "vim":
            raise ValueError("VIM is class-conditional or unconditional; train a gpt or rq model on captions")
        classes = 0
        text = {"text_length": text_tokenizer.length, "text_vocab_size": text_tokenizer.vocab_size,
                "text_pad_id": text_tokenizer.pad_id}  # fmt: skip
    if cfg.arch == "gpt":
        if len(shape) != 2:
            raise ValueError(f"a GPT models one code per position; this code store has codes of shape {shape}")
        return GPT(
            dataclasses.replace(cfg.gpt, vocab_size=store.codebook_size, grid=shape, num_classes=classes, **text)
        )
    if cfg.arch == "vim":
        if len(shape) != 2:
            raise ValueError(f"VIM models one code per position; this code store has codes of shape {shape}")
        return VIM(dataclasses.replace(cfg.vim, vocab_size=store.codebook_size, grid=shape, num_classes=classes))
    if len(shape) != 3:
        raise ValueError(f"an RQ-Transformer models stacks of codes; this code store has codes of shape {shape}")
    tokenizer = tokenizer if tokenizer is not None else load(store.tokenizer_path)
    books = torch.stack([tokenizer.quantizer.codebook(d).vectors() for d in range(len(tokenizer.quantizer.codebooks))])
    rq_cfg = dataclasses.replace(
        cfg.rq,
        vocab_size=store.codebook_size,
        code_shape=shape,
        num_classes=classes,
        code_dim=books.shape[-1],
        shared_codebook=books.shape[0] == 1,
        **text,
    )
    return RQTransformer(rq_cfg, code_embeddings=books)


class ARTask(TrainTask):
    collate = staticmethod(collate_codes)
    best_metric = ("nll", "min")

    def __init__(self, cfg: ARRunConfig, store: CodeDataset, device: torch.device, par: Parallel | None = None,
                 text_tokenizer: TextTokenizer | None = None):  # fmt: skip
        self.cfg, self.store, self.device, self.par = cfg, store, device, par or Parallel()
        self.tokenizer = load(store.tokenizer_path, device=device)
        self.text_tokenizer = text_tokenizer
        self.model = build_model(cfg.model, store, self.tokenizer, text_tokenizer).to(device)
        # Training forward passes go through `train_model` (DDP's wrapper; under FSDP the model itself, sharded
        # in place before the optimizer sees its parameters).
        self.train_model = self.par.wrap(self.model)
        self.optimizer = adamw(self.model, cfg.train)
        self.guard = StepGuard(cfg.train.precision, device)
        self.ema = ModelEMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.conditional = store.num_classes > 0 or text_tokenizer is not None
        if cfg.npp.level > 1:
            check_patch_size(self.model.code_shape, 2 ** (cfg.npp.level - 1))
            ends = segment_ends(cfg.train.steps, cfg.npp.level, cfg.npp.rate)
            shortest = min(b - a for a, b in zip([0, *ends], ends, strict=False))
            if cfg.npp.segment_lr and cfg.npp.warmup_steps >= shortest:
                log.warning("npp.warmup_steps=%d is not shorter than the shortest NPP segment (%d steps): that "
                            "segment never reaches the full learning rate", cfg.npp.warmup_steps, shortest)  # fmt: skip

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
    def eval_model(self) -> nn.Module:
        return self.ema.shadow if self.ema is not None else self.model

    def modules(self) -> dict[str, nn.Module]:
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
        if self.text_tokenizer is not None:
            drop = self.model.cfg.class_dropout_prob
            cond = caption_ids(self.text_tokenizer, batch.captions, train=random_view, drop_prob=drop,
                               device=self.device)  # fmt: skip
        else:
            cond = batch.labels.to(self.device) if self.conditional else None
        return codes.to(self.device), cond

    def _loss(self, outputs, codes: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """The image loss (soft targets when asked for), plus the weighted text loss of an RQ-Transformer that
        predicts its caption."""
        c = self.cfg.loss
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        if c.soft_targets:
            image = self.model.loss(logits, codes, self.model.soft_targets(codes, c.soft_temperature))
        else:
            image = self.model.loss(logits, codes)
        if not isinstance(outputs, tuple):
            return image, {}
        caption = text_loss(outputs[1], cond)
        return c.img_weight * image + c.txt_weight * caption, {"image_loss": image, "text_loss": caption}

    def train_step(self, batch: CodeBatch, step: int) -> dict[str, float]:
        codes, cond = self._inputs(batch, random_view=True)
        self.model.train()
        side = self.patch_side(step)
        with autocast(self.device, self.cfg.train.precision):
            outputs = self.train_model(codes, cond) if side == 1 else self.train_model(codes, cond, patch_side=side)
        parts = {}
        if side == 1:
            loss, parts = self._loss(outputs, codes, cond)
        else:
            loss = next_patch_loss(outputs, codes, side)
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        if not self.guard.step(loss, self.optimizer, self.cfg.train.grad_clip):
            return {"skipped": 1.0}
        if self.ema is not None:
            self.ema.update(self.model)
        positions = logits.shape[1] * (logits.shape[2] if side == 1 and logits.dim() > 3 else 1)
        metrics = {
            "loss": float(loss.detach()),
            "positions": float(positions * len(codes) * self.par.world_size),
            "patch": float(side),
            **{name: float(value.detach()) for name, value in parts.items()},
        }
        if side == 1:
            metrics["accuracy"] = float((logits.detach().argmax(-1) == codes).float().mean())
        return metrics

    @torch.no_grad()
    def evaluate(self, batches: Iterable[CodeBatch]) -> dict[str, float]:
        model = self.eval_model.eval()
        total_nll = total_correct = count = 0.0
        for batch in batches:
            codes, cond = self._inputs(batch, random_view=False)
            with autocast(self.device, self.cfg.train.precision):
                logits = model(codes, cond)
            logits = (logits[0] if isinstance(logits, tuple) else logits).float()
            total_nll += float(
                torch.nn.functional.cross_entropy(logits.flatten(0, -2), codes.flatten(), reduction="sum")
            )
            total_correct += float((logits.argmax(-1) == codes).sum())
            count += codes.numel()
        totals = torch.tensor([total_nll, total_correct, count], dtype=torch.float64, device=self.device)
        sync.all_reduce_sum_(totals)  # each rank scored its share of the validation split
        total_nll, total_correct, count = totals.tolist()
        return {"nll": total_nll / count, "accuracy": total_correct / count}

    @torch.no_grad()
    def write_artifacts(self, run_dir: Path, step: int) -> None:
        """samples_grid.png: one row per class (or rows of unconditional samples)."""
        s = self.cfg.sample
        if s.n_per_class == 0:
            return
        model = self.eval_model.eval()
        generator = torch.Generator(self.device).manual_seed(s.seed)
        rows = min(self.store.num_classes, s.max_classes) if self.conditional else 2
        if self.text_tokenizer is not None:
            rows = min(len(self.store), s.max_classes)
        kwargs = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, generator=generator)
        prompts = self._sample_prompts(rows) if self.text_tokenizer is not None else None
        with self.par.full_params(model):  # under FSDP every rank runs this same sampling
            if prompts is not None:
                cond = self.text_tokenizer.encode(prompts, strict=False).to(self.device)
                cond = cond.repeat_interleave(s.n_per_class, dim=0)
                codes = model.generate(cond, cfg_scale=s.cfg_scale if model_has_null(model) else 1.0, **kwargs)
            elif self.conditional:
                cond = torch.arange(rows, device=self.device).repeat_interleave(s.n_per_class)
                codes = model.generate(cond, cfg_scale=s.cfg_scale if model_has_null(model) else 1.0, **kwargs)
            else:
                codes = model.generate(None, batch_size=rows * s.n_per_class, **kwargs)
        if not self.par.is_main:
            return
        images = self.tokenizer.decode(codes).float().cpu()
        save_image(make_grid(list(images.split(s.n_per_class))), Path(run_dir) / "samples_grid.png")
        if prompts is not None:
            (Path(run_dir) / "samples_grid_prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")

    def _sample_prompts(self, rows: int) -> list[str]:
        """One caption from each of `rows` items spread over the store: the rows of the sample grid."""
        captions = self.store.captions
        return [captions[i * len(captions) // rows][0] for i in range(rows)]

    def export(self, out_dir: Path, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        save_pretrained(self.eval_model, out_dir, weights["ema" if self.ema is not None else "model"])
        target = Path(out_dir) / "tokenizer"
        if not target.exists():
            shutil.copytree(self.store.tokenizer_path, target)
        if self.text_tokenizer is not None:
            self.text_tokenizer.save(Path(out_dir) / TEXT_TOKENIZER_DIR)


def model_has_null(model: nn.Module) -> bool:
    return condition_embedding(model).has_null


def train_ar(cfg: ARRunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Trains an AR model on `cfg.data.codes` into `run_dir` and returns the final validation metrics."""
    if not cfg.data.codes:
        raise ValueError("set data.codes (or codes=...) to a code store made by `vqar extract-codes`")
    store = CodeDataset(cfg.data.codes)
    with distributed_run(cfg.dist, cfg.train.device, run_dir, resume, overwrite) as (par, run_dir):
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        train_set, val_set = split_dataset(store, cfg.data.val_fraction, cfg.data.split_seed)
        text_tokenizer = None
        if store.has_captions:
            text_tokenizer = prepare_text_tokenizer(cfg.text, store, list(train_set.indices), run_dir, par)
            torch.manual_seed(cfg.train.seed)
        task = ARTask(cfg, store, par.device, par, text_tokenizer)
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
