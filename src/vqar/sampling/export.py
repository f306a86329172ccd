"""Sample a trained AR model to files: a grid (one row per class or prompt), individual PNGs and an ADM
`samples.npz` (for prompts, `prompts.txt` too: label i is prompt line i + 1).

`samples.npz` follows the layout of the ADM evaluator that LlamaGen and others use: `arr_0` uint8 (N, H, W, 3)
(grey images are repeated to RGB, as the Inception network expects 3 channels) and `arr_1` int64 labels.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vqar.sampling.filters import per_depth_settings
from vqar.utils.device import autocast
from vqar.utils.images import make_grid, save_image, to_uint8
from vqar.utils.io import atomic_write


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    labels: torch.Tensor  # (N,) class ids, or prompt numbers with `prompts`; -1 when unconditional
    seconds: float
    index: torch.Tensor | None = None  # (N,) position of each image in the whole run (when sampled in shards)
    prompts: list[str] | None = None


def batch_generator(device: torch.device, seed: int, batch: int) -> torch.Generator:
    """The random stream of batch number `batch`: a function of (seed, batch) alone, so the samples do not
    depend on how many processes share the batches."""
    state = np.random.SeedSequence([seed, batch]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))


def check_compatible(model, tokenizer) -> None:
    """The tokenizer must decode the AR model's codes: same codebook, same codes per position. A conv tokenizer
    works at any multiple of its downsampling factor, so the grid may differ from the one it was trained at
    (LlamaGen's 384px GPTs use the 256px VQ-16)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; pass one with --tokenizer")
    if getattr(tokenizer, "kind", None) != "tokenizer":
        raise TypeError(f"the tokenizer must be a stage-1 tokenizer, got {type(tokenizer).__name__}")
    depth = model.code_shape[2] if len(model.code_shape) == 3 else 1
    if tokenizer.codebook_size != model.codebook_size or tokenizer.depth != depth:
        raise ValueError(
            f"the tokenizer (codebook {tokenizer.codebook_size}, {tokenizer.depth} code(s) per position) does not fit "
            f"the model (codebook {model.codebook_size}, {depth} code(s) per position)"
        )


def condition_embedding(model):
    """The class or caption embedding of an AR model (GPT / VIM: cls_embedding, RQ-Transformer: cond_emb)."""
    return getattr(model, "cls_embedding", None) or model.cond_emb


def sample_images(
    model,
    tokenizer,
    classes: Sequence[int] | None,
    n_per_class: int,
    *,
    batch_size: int = 64,
    seed: int = 0,
    precision: str = "fp32",
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    prompts: Sequence[str] | None = None,
    text_tokenizer=None,
    **sampling,
) -> SampleResult:
    """`n_per_class` images for each class id in `classes` (or `n_per_class` unconditional images when None), in
    batches of `batch_size`; `sampling` holds temperature, top_k, top_p, cfg_scale, cfg_interval, greedy.
    A text-to-image model takes `prompts` instead of classes (tokenized by `text_tokenizer`, by default the
    model's own). `shard=(rank, world_size)` draws only batches rank, rank + world_size, ... (for `torchrun vqar
    sample`)."""
    check_compatible(model, tokenizer)
    depth = getattr(model, "depth", 1)
    per_depth_settings(depth, sampling.get("temperature", 1.0), sampling.get("top_k"), sampling.get("top_p"),
                       sampling.get("cfg_scale", 1.0), sampling.get("cfg_interval"))  # fmt: skip
    if depth == 1:  # a GPT takes single values
        sampling = {k: (v[0] if isinstance(v, (list, tuple)) else v) for k, v in sampling.items()}
    device = next(model.parameters()).device
    captions = None
    if getattr(model, "is_text_conditioned", False):
        if classes is not None or not prompts:
            raise ValueError("this model is text-conditioned: give prompts (e.g. --prompt 'a painting of a cat')")
        text_tokenizer = text_tokenizer or model.text_tokenizer
        if text_tokenizer is None:
            raise ValueError("this text-to-image model has no caption tokenizer; pass one (--text-tokenizer)")
        captions = text_tokenizer.encode(list(prompts))  # empty prompts raise, long ones are truncated
        length = condition_embedding(model).length
        if captions.shape[1] != length:
            raise ValueError(f"the text tokenizer makes {captions.shape[1]}-token captions; the model takes {length}")
        labels = torch.arange(len(prompts)).repeat_interleave(n_per_class)
        classes = None
    elif prompts:
        raise ValueError("this model is not text-conditioned; sample it with classes, not prompts")
    elif classes is not None:
        bad = [c for c in classes if not 0 <= c < model.num_classes]
        if model.num_classes == 0:
            raise ValueError("this model is unconditional; sample it without classes")
        if bad:
            raise ValueError(f"unknown class id(s) {bad}: this model has classes 0..{model.num_classes - 1}")
        labels = torch.tensor(list(classes), dtype=torch.long).repeat_interleave(n_per_class)
    else:
        if model.num_classes > 0:
            raise ValueError("this model is class-conditional; give the classes to sample")
        labels = torch.full((n_per_class,), -1, dtype=torch.long)
    if sampling.get("cfg_scale", 1.0) != 1.0:
        condition_embedding(model).null_ids(1)  # raises a clear error when the model has no null condition
    rank, world_size = shard
    index = torch.arange(len(labels))
    mine = [(i, chunk) for i, chunk in enumerate(index.split(batch_size)) if i % world_size == rank]
    images = []
    start = time.perf_counter()
    for batch, chunk in tqdm(mine, desc="sampling", disable=not progress):
        generator = batch_generator(device, seed, batch)
        with autocast(device, precision):
            if captions is not None:
                codes = model.generate(captions[labels[chunk]].to(device), generator=generator, **sampling)
            elif classes is not None:
                codes = model.generate(labels[chunk].to(device), generator=generator, **sampling)
            else:
                codes = model.generate(None, batch_size=len(chunk), generator=generator, **sampling)
            images.append(tokenizer.decode(codes).float().clamp(-1, 1).cpu())
    index = torch.cat([chunk for _, chunk in mine]) if mine else index[:0]
    pictures = torch.cat(images) if images else torch.empty(0)
    prompt_list = list(prompts) if captions is not None else None
    return SampleResult(pictures, labels[index], time.perf_counter() - start, index, prompt_list)


def write_samples(result: SampleResult, out_dir: str | Path, n_per_class: int, individual: bool = True) -> dict:
    """grid.png (one row per class), images/*.png and samples.npz; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = list(result.images.split(n_per_class))
    save_image(make_grid(rows), out_dir / "grid.png")
    pixels = to_uint8(result.images)  # (N, H, W, C)
    if individual:
        for i, (picture, label) in enumerate(zip(pixels, result.labels.tolist(), strict=True)):
            kind = "prompt" if result.prompts is not None else "class"
            name = f"{kind}{label:04d}_{i:06d}.png" if label >= 0 else f"sample_{i:06d}.png"
            save_image(picture, out_dir / "images" / name)
    write_adm_npz(result, out_dir / "samples.npz")
    if result.prompts is not None:
        (out_dir / "prompts.txt").write_text("\n".join(result.prompts) + "\n", encoding="utf-8")
    return {"grid": out_dir / "grid.png", "npz": out_dir / "samples.npz", "images": out_dir / "images"}


def write_adm_npz(result: SampleResult, path: str | Path) -> None:
    """`arr_0` uint8 (N, H, W, 3) (grey repeated to RGB) and `arr_1` labels, atomically."""
    pixels = to_uint8(result.images)
    rgb = np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez(handle, arr_0=rgb, arr_1=result.labels.numpy())

    atomic_write(path, write_npz)
