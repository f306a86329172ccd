"""`draw`: images from a model, generated and decoded in batches. The command line, `vqar serve`, the training
grids, the throughput bench and distributed sampling all come through here, so the same settings give the same
images whichever entry point asks (image j of a run depends on (seed, j) alone; see `vqar.sampling.settings`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vqar.ar import ARModel, Conditioning, check_tokenizer
from vqar.parallel import Parallel
from vqar.sampling.compiled import bucket_for
from vqar.sampling.conditions import Conditions
from vqar.sampling.generate import check_cfg_interval, check_smooth, generate, image_noise
from vqar.sampling.settings import SamplingSettings, settings_or_default
from vqar.sampling.speculative import DecodeStats, window_of
from vqar.utils.device import autocast, evaluating


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1], on the CPU
    labels: torch.Tensor  # (N,) class ids, or prompt numbers with `prompts`; -1 when unconditional
    codes: torch.Tensor  # (N, *code_shape)
    index: torch.Tensor  # (N,) position of each image in the whole run (a shard holds some of them)
    prompts: list[str] | None = None
    seconds_sampling: float = 0.0
    seconds_decoding: float = 0.0
    batches: int = 0  # model runs
    decode_stats: DecodeStats = field(default_factory=DecodeStats)  # model calls per image, drafts accepted

    @property
    def seconds(self) -> float:
        return self.seconds_sampling + self.seconds_decoding

    def subset(self, keep: torch.Tensor) -> SampleResult:
        return SampleResult(self.images[keep], self.labels[keep], self.codes[keep], self.index[keep], self.prompts,
                            self.seconds_sampling, self.seconds_decoding, self.batches, self.decode_stats)  # fmt: skip


class DrawStopped(Exception):
    """`draw` was told to stop (its `stop` returned True) before it drew every batch."""


def check_settings_fit(model: ARModel, settings: SamplingSettings) -> None:
    """ValueError for settings the kind of model cannot take, which its configuration alone tells (a model on the
    meta device will do): values per depth of the wrong length, speculative decoding, smooth sampling or a
    cfg_interval where the model does not draw that way."""
    settings.per_depth(model.depth)
    if settings.speculative:
        window_of(model, settings)  # raises for a model that does not decode position by position
    if settings.smooth:
        check_smooth(model)
    check_cfg_interval(model, settings)


def check_drawable(model: ARModel, settings: SamplingSettings, tokenizer=None):
    """Everything that can be checked before any work: the settings, guidance, the tokenizer. Returns the
    tokenizer (by default the model's own)."""
    check_settings_fit(model, settings)
    if settings.guided and not model.has_null_condition:
        model.cond_embedding.null_ids(1)  # raises with the reason
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise ValueError("this model has no tokenizer to decode its codes; pass one (--tokenizer)")
    check_tokenizer(model, tokenizer)
    return tokenizer


@torch.no_grad()  # sampling never needs gradients; without this, decoding would keep the tokenizer's graph
def draw(
    model: ARModel,
    conditions: Conditions,
    settings: SamplingSettings | None = None,
    *,
    tokenizer=None,
    batch_size: int = 64,
    precision: str = "fp32",
    shard: tuple[int, int] = (0, 1),
    seeds: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    compile: bool = False,
    progress: bool = False,
    stop: Callable[[], bool] | None = None,
) -> SampleResult:
    """The images of `conditions`, in batches of `batch_size`. Image i draws from the stream (seeds[i], index[i]),
    by default (settings.seed, i). `shard=(rank, world_size)` draws only batches rank, rank + world_size, ...
    `compile` runs compiled decode steps, on batches padded to `batch_buckets(batch_size)` (the same images).
    `stop` is asked before each batch; once it returns True, draw raises `DrawStopped`."""
    if not isinstance(conditions, Conditions):  # a list of class ids, say: an AttributeError deep in the loop else
        raise TypeError(f"conditions must be Conditions (from make_conditions(model, classes=..., prompts=...)), got "
                        f"{type(conditions).__name__}")  # fmt: skip
    settings = settings_or_default(settings)
    tokenizer = check_drawable(model, settings, tokenizer)
    if isinstance(batch_size, np.integer):
        batch_size = int(batch_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    total = len(conditions)
    default_seeds = torch.full((total,), settings.seed, dtype=torch.long)
    seeds = default_seeds if seeds is None else _per_image(seeds, "seeds", total)
    index = torch.arange(total) if index is None else _per_image(index, "index", total)
    device = next(model.parameters()).device
    rank, world_size = _check_shard(shard)
    mine = [chunk for i, chunk in enumerate(torch.arange(total).split(batch_size)) if i % world_size == rank]
    images, codes, sample_s, decode_s = [], [], 0.0, 0.0
    stats = DecodeStats()
    bar = tqdm(mine, desc="sampling", disable=not progress)
    for chunk in bar:
        if stop is not None and stop():
            raise DrawStopped(f"stopped after {len(images)} of {len(mine)} batches")
        rows = conditions.select(chunk)
        noise = None if settings.greedy else image_noise(model, seeds[chunk], index[chunk], settings)
        size = bucket_for(len(chunk), batch_size) if compile else len(chunk)
        rows, noise = _pad(rows, size), _pad(noise, size)  # rows of their own: the padding changes no image
        padded = DecodeStats()
        with autocast(device, precision):
            start = _synced(device)
            drawn = generate(model, None if rows is None else rows.to(device), settings, batch_size=size,
                             noise=noise, compile=compile, stats=padded,
                             images=(_pad(seeds[chunk], size), _pad(index[chunk], size)))[: len(chunk)]  # fmt: skip
            middle = _synced(device)
            with evaluating(tokenizer):
                images.append(tokenizer.decode(drawn).float().clamp(-1, 1).cpu())
            end = _synced(device)
        codes.append(drawn.cpu())
        stats.add(padded.of(slice(0, len(chunk))))  # the padding's rows are no images
        sample_s, decode_s = sample_s + middle - start, decode_s + end - middle
        if settings.speculative:
            bar.set_postfix_str(stats.describe())
    taken = torch.cat(mine) if mine else torch.arange(0)
    return SampleResult(
        images=torch.cat(images) if images else torch.empty(0),
        labels=conditions.labels[taken],
        codes=torch.cat(codes) if codes else torch.empty(0, *model.code_shape, dtype=torch.long),
        index=index[taken],
        prompts=conditions.prompts,
        seconds_sampling=sample_s,
        seconds_decoding=decode_s,
        batches=len(mine),
        decode_stats=stats,
    )


def draw_distributed(model: ARModel, conditions: Conditions, settings: SamplingSettings, par: Parallel,
                     scratch: Path, **options) -> SampleResult | None:  # fmt: skip
    """`draw` under torchrun: each rank draws its share of the batches, rank 0 gets every image in run order
    (the other ranks get None). `scratch` is a folder the ranks can all write (the output folder)."""
    result = draw(model, conditions, settings, shard=(par.rank, par.world_size), progress=par.is_main, **options)
    if not par.distributed:
        return result
    parts = {"images": result.images, "labels": result.labels, "codes": result.codes, "index": result.index,
             "decode_stats": result.decode_stats.per_image}  # fmt: skip
    merged = par.gather_to_main(parts, Path(scratch))
    if merged is None:
        return None
    order = merged["index"].argsort()
    return SampleResult(merged["images"][order], merged["labels"][order], merged["codes"][order],
                        merged["index"][order], result.prompts, result.seconds_sampling, result.seconds_decoding,
                        result.batches, DecodeStats(merged["decode_stats"][order]))  # fmt: skip (times: rank 0's)


def warm_up(model: ARModel, sizes: Iterable[int], *, guided: bool | None = None, precision: str = "fp32",
            progress: bool = True, like: SamplingSettings | None = None) -> float:  # fmt: skip
    """Compiles the decode steps for batches of `sizes` images, with guidance or without (None: both, where the
    model can be guided), for generations `like` the given settings (by default the default settings); returns
    the seconds it took. `vqar sample --compile` calls it before the timed sampling, a server at start, so its
    first request is not the one that waits for the compiler."""
    device = next(model.parameters()).device
    like = settings_or_default(like)
    # The graphs are specialised on the settings (greedy or drawn codes, each filter, guidance, the speculative
    # window), and a generation of other settings compiles anew: the warm-up runs `like` itself, changing only
    # whether it is guided (with its own scale where it is).
    variants = []
    if guided is not True:
        variants.append(replace(like, cfg_scale=1.0))
    if guided is not False and model.has_null_condition:
        variants.append(like if like.guided else replace(like, cfg_scale=2.0))
    start = time.perf_counter()
    runs = [(size, settings) for size in sorted(set(sizes)) for settings in variants]
    for size, settings in tqdm(runs, desc="compiling (warm-up)", disable=not progress):
        with autocast(device, precision):
            generate(model, _placeholder_conditions(model, size, device), settings, batch_size=size, compile=True)
    return time.perf_counter() - start


def batch_sizes_of(total: int, batch_size: int, compile: bool) -> set[int]:
    """The batch sizes `draw` runs for `total` images (padded to buckets when compiling)."""
    sizes = {min(batch_size, total - start) for start in range(0, total, batch_size)}
    return {bucket_for(size, batch_size) for size in sizes} if compile else sizes


def for_sampling(model: ARModel, precision: str) -> ARModel:
    """The model as sampling should run it: on CUDA with bf16, its weights (and its tokenizer's) in bf16, so a
    decode step reads half the bytes; elsewhere unchanged (a CPU runs bf16 under autocast, with float32 weights
    and caches). Logits are sampled in float32 either way."""
    if precision == "bf16" and next(model.parameters()).device.type == "cuda":
        model.to(torch.bfloat16)
        if model.tokenizer is not None:
            model.attach(model.tokenizer.to(torch.bfloat16))
    return model


def _placeholder_conditions(model: ARModel, size: int, device: torch.device) -> torch.Tensor | None:
    """Conditions of the right shape for compiling: class 0, the empty caption, or none."""
    if model.conditioning is Conditioning.TEXT:
        return torch.full((size, model.cfg.text_length), model.cfg.text_pad_id, dtype=torch.long, device=device)
    if model.conditioning is Conditioning.CLASS:
        return torch.zeros(size, dtype=torch.long, device=device)
    return None


def _per_image(values, name: str, total: int) -> torch.Tensor:
    """`values` (a tensor, array or list) as a tensor of one value per image. Too few ended in an IndexError in
    the batch that ran out, and extras were ignored without a word."""
    values = torch.as_tensor(values)
    if values.dtype in (torch.uint16, torch.uint32, torch.uint64):  # NumPy's SeedSequence gives uint32; torch
        wide = values.cpu().numpy().astype(np.uint64)  # reduces none of these (min() is NotImplementedError)
        if wide.size and int(wide.max()) >= 2**63:
            raise ValueError(f"{name} must be integers in [0, 2^63), got {int(wide.max())}")
        values = torch.from_numpy(wide.astype(np.int64))
    if values.dim() != 1:
        raise ValueError(f"{name} must hold one value per image ({total}), got shape {tuple(values.shape)}")
    if len(values) != total:
        raise ValueError(f"{name} holds {len(values)} values for {total} images: give one per image")
    # else NumPy's "expected non-negative integer" or "seed must be integer", naming neither argument
    if values.dtype == torch.bool or values.is_floating_point() or values.is_complex():
        raise ValueError(f"{name} must be integers, got {values.dtype}")
    if len(values) and int(values.min()) < 0:
        raise ValueError(f"{name} must be integers >= 0, got {int(values.min())}")
    return values


def _check_shard(shard) -> tuple[int, int]:
    """`shard` as (rank, world_size) ints; ValueError unless 0 <= rank < world_size. A rank past the last shard
    matches no batch, so it drew nothing without a word, and a count of 0 was a ZeroDivisionError."""
    parts = [int(v) if isinstance(v, np.integer) else v for v in shard] if isinstance(shard, (tuple, list)) else []
    whole = len(parts) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in parts)
    if not whole or not (parts[1] >= 1 and 0 <= parts[0] < parts[1]):
        raise ValueError(f"shard={shard!r} names no shard: give (index, count) with count >= 1 and index in "
                         f"[0, count)")  # fmt: skip
    return parts[0], parts[1]


def _pad(rows: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """`rows` repeated at the end to `size` rows."""
    if rows is None or len(rows) == size:
        return rows
    return torch.cat([rows, rows[-1:].expand(size - len(rows), *rows.shape[1:])])


def _synced(device: torch.device) -> float:
    """The time, after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
