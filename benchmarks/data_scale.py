"""Scale-out data paths on this machine: code extraction on 1 vs 2 processes, and loading from tar shards vs a folder.

extraction: `vqar extract-codes` of the 5,000 bundled digits (as is + mirrored) with an rqvae-mnist tokenizer: in
one process with OMP threads = cores, in one process with one thread, and under torchrun with 2 gloo processes
(cores / 2 threads each, so the same hardware as the first). images/s is what the command logs (encoding and
writing, process start excluded); the stores' manifests (with every shard's checksum) are compared.

loading: one epoch of training batches (64 images of 256 x 256 RGB, random order) from photo-like JPEGs (about
350 x 300, with texture, so decoding costs what it costs on real photos) read from an image folder and from the
same images packed into tar shards, with 0 and 2 data-loader workers; the rounds alternate and the best of
`--rounds` is kept.

    python benchmarks/data_scale.py                    # both, about 3 minutes on 2 cores
    python benchmarks/data_scale.py --only loading --images 3000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vqar.commands.common import positive_int
from vqar.data import DataConfig, open_dataset, training_loader
from vqar.data.pack import pack_shards

sys.path.insert(0, str(Path(__file__).parent))
from common import int_range, print_table, run_script  # noqa: E402


def photo_folder(folder: Path, count: int, seed: int = 0) -> None:
    """`count` JPEGs in 10 class folders: smooth colour fields plus fine noise, sizes around ImageNet's average."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = rng.integers(260, 380, size=2)
        coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((int(w), int(h)), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(field + rng.integers(-24, 25, size=field.shape), 0, 255).astype(np.uint8)
        target = folder / f"class{i % 10}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target / f"{i:06d}.jpg", quality=90)


def epoch_rate(source: str, workers: int, batch_size: int) -> float:
    dataset = open_dataset(DataConfig(source=source, image_size=256, channels=3, val_fraction=0.0))
    batches = len(dataset) // batch_size
    start, seen = time.perf_counter(), 0
    loader = training_loader(dataset, epoch=0, start=0, batches=batches, batch_size=batch_size, seed=0,
                             num_workers=workers)  # fmt: skip
    for batch in loader:
        seen += len(batch)
    return seen / (time.perf_counter() - start)


def loading(args: argparse.Namespace, root: Path) -> list[list]:
    folder = root / "photos"
    if not folder.is_dir():
        photo_folder(folder, args.images)
    shards = root / "shards"
    if not shards.is_dir():
        pack_shards(str(folder), shards, shard_size=args.images // 8)
    sources = {"image folder": str(folder), "tar shards": str(shards / "shards.json")}
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for workers in (0, 2):
            for name, source in sources.items():
                rate = epoch_rate(source, workers, args.batch_size)
                best[name, workers] = max(best.get((name, workers), 0.0), rate)
    rows = []
    for workers in (0, 2):
        ratio = best["tar shards", workers] / best["image folder", workers]
        rows.append([workers, f"{best['image folder', workers]:.0f}", f"{best['tar shards', workers]:.0f}",
                     f"{ratio:.2f}x"])  # fmt: skip
    return rows


def extract(procs: int, threads: int, tokenizer: Path, out: Path) -> float:
    command = [sys.executable, "-m", "vqar.cli", "extract-codes", "--tokenizer", str(tokenizer), "--data", "mnist",
               "--flip", "--shard-size", "500", "--batch-size", "128", "--out", str(out), "--overwrite"]  # fmt: skip
    if procs > 1:
        command[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "-m"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True,
                          text=True, check=False)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    found = re.search(r"\(([\d.]+) images/s", done.stderr)
    if not found:
        raise SystemExit(f"no images/s in the log of {' '.join(command)}:\n{done.stderr[-2000:]}")
    return float(found.group(1))


def extraction(args: argparse.Namespace, root: Path) -> list[list]:
    from vqar.train.tokenizer import load_run_config, train_tokenizer

    tokenizer = root / "tokenizer"
    if not (tokenizer / "model.safetensors").is_file():
        train_tokenizer(load_run_config("rqvae-mnist", ["steps=20", "train.eval_every=20"]), tokenizer, overwrite=True)
    cores = os.cpu_count() or 1
    # (processes, OMP threads each): one process on every core, one on one core, one process per core
    setups = [(1, cores), (1, 1), (2, max(1, cores // 2))]
    rates: dict[tuple[int, int], float] = {}
    for _ in range(args.rounds):
        for procs, threads in setups:
            rate = extract(procs, threads, tokenizer, root / f"codes-{procs}x{threads}")
            rates[procs, threads] = max(rates.get((procs, threads), 0.0), rate)
    stores = [json.loads((root / f"codes-{p}x{t}" / "manifest.json").read_text()) for p, t in setups]
    base = rates[setups[0]]
    rows = []
    for (procs, threads), manifest in zip(setups, stores, strict=True):
        name = f"{procs} x {threads} thread{'s' if threads > 1 else ''}" + (" (torchrun, gloo)" if procs > 1 else "")
        same = "yes" if manifest == stores[0] else "NO"
        rows.append([name, f"{rates[procs, threads]:.0f}", f"{rates[procs, threads] / base:.2f}x", same])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["loading", "extraction"])
    parser.add_argument("--images", type=int_range(8), default=2000,
                        help="photo-like JPEGs for the loading benchmark (at least 8: they are packed in 8 shards)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="at most --images")
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--out", type=Path, help="keep the data here (default: a temporary folder)")
    args = parser.parse_args()
    if args.only in (None, "loading") and args.batch_size > args.images:
        parser.error(f"argument --batch-size: {args.batch_size} is more than --images {args.images} (no whole batch)")
    root = args.out or Path(tempfile.mkdtemp(prefix="vqar-data-bench-"))
    try:
        if args.only in (None, "extraction"):
            print("\ncode extraction, 5,000 digits x 2 views, rqvae-mnist tokenizer\n")
            print_table(["processes x threads", "images/s", "vs the first row", "same store"], extraction(args, root))
        if args.only in (None, "loading"):
            print(f"\nloading one epoch of {args.images} JPEGs as 256 x 256 batches of {args.batch_size}\n")
            print_table(["workers", "folder images/s", "shards images/s", "shards / folder"], loading(args, root))
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    run_script(main)
