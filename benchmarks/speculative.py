"""Speculative Jacobi decoding vs plain sampling on trained models, side by side in one run.

Models (trained, since random weights give near-uniform distributions on which drafts fail):
  * the demo's RQ-Transformer (4x4 positions x 4 depths over rqvae-mnist codes), from `vqar demo`;
  * GPTs trained on digit codes (gpt-mnist): on vq-mnist's 8x8 = 64 positions, and on 16x16 = 256 positions from
    the same tokenizer with one downsampling level fewer (`model.conv.ch_mult=[1,2]`).
All are trained here into --work if not found there (the presets the demo and the README use).

For each model and batch size (1, 8, 64) the script draws the same conditions with plain sampling and with
speculative decoding (MC-SJD drafts, window 16 unless --window), interleaving the two `--repeats` times and keeping
each one's best time, and prints images/s, their ratio, model calls per image and the share of drafts accepted.
Quality: 500 samples (50 per digit) of each, class accuracy by the project's digit classifier and domain FID
against 500 held-out digits; the two should be statistically equal (the sampler is lossless).

    python benchmarks/speculative.py --work runs/bench-speculative        # trains what is missing (~1 hour)
    python benchmarks/speculative.py --work runs/bench-speculative --quick  # batch 1 and 8, fewer images
    python benchmarks/speculative.py --work runs/bench-speculative --quick --compile  # both samplers compiled
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import run_script
from vqar.bundle import load
from vqar.commands.common import positive_int
from vqar.eval.digits import class_accuracy, digit_classifier, domain_fid, real_digits
from vqar.sampling import SamplingSettings, draw, make_conditions
from vqar.sampling.speculative import DecodeStats
from vqar.utils import device

BATCHES = (1, 8, 64)


def rq_demo_model(work: Path):
    folder = work / "demo"
    if not (folder / "ar" / "config.json").is_file():
        from vqar.demo import run_demo

        run_demo(folder)
    return load(folder / "ar")


def gpt_model(folder: Path, tokenizer_overrides: list[str]):
    if not (folder / "ar" / "config.json").is_file():
        from common import cached_code_store  # benchmarks/common.py, beside this script
        from vqar.train.ar import train_ar
        from vqar.train.ar_config import load_run_config

        codes = cached_code_store(folder, "vq-mnist", 1000, tokenizer_overrides=tokenizer_overrides)
        train_ar(load_run_config("gpt-mnist", [f"codes={codes}", "sample.n_per_class=0"]), folder / "ar",
                 overwrite=True)  # fmt: skip
    return load(folder / "ar")


# --only key: (title, the model made or loaded in --work, its guidance scale). The GPTs' tokenizers: vq-mnist (f=4:
# 8x8 codes of the 32x32 digits) and the same with one level fewer (f=2: 16x16, the grid issue 24 asks for where the
# tokenizer allows it).
MODELS = {
    "gpt": ("GPT (8x8)", lambda work: gpt_model(work / "gpt", []), 1.5),
    "gpt16": ("GPT (16x16)", lambda work: gpt_model(work / "gpt16", ["model.conv.ch_mult=[1,2]"]), 1.5),
    "rq": ("RQ demo (4x4x4)", rq_demo_model, 2.0),
}


def cpu_kind() -> str:
    return f"{device.cpu_kind()}, {torch.get_num_threads()} threads"


def timed(model, conditions, settings, batch: int, compile: bool) -> tuple[float, DecodeStats]:
    start = time.perf_counter()
    result = draw(model, conditions, settings, batch_size=batch, compile=compile)
    return time.perf_counter() - start, result.decode_stats


def speed_rows(name: str, model, settings: SamplingSettings, images_at: dict, repeats: int,
               compile: bool) -> list[dict]:  # fmt: skip
    rows = []
    fast = replace(settings, speculative=True)
    for batch, count in images_at.items():
        conditions = make_conditions(model, classes=[i % 10 for i in range(count)], n_per_condition=1)
        for s in (settings, fast):  # warms the allocator, and compiles this batch size's graphs before timing
            timed(model, conditions, s, batch, compile)
        best = {"plain": float("inf"), "speculative": float("inf")}
        stats = {}
        for _ in range(repeats):  # interleaved: the machine's noise hits both
            for label, s in (("plain", settings), ("speculative", fast)):
                seconds, stats[label] = timed(model, conditions, s, batch, compile)
                best[label] = min(best[label], seconds)
        row = {"model": name, "batch": batch, "images": count,
               "plain_images_per_s": count / best["plain"], "speculative_images_per_s": count / best["speculative"],
               "speedup": best["plain"] / best["speculative"],
               "plain_calls_per_image": stats["plain"].calls_per_image,
               "speculative_calls_per_image": stats["speculative"].calls_per_image,
               "acceptance_rate": stats["speculative"].acceptance_rate}  # fmt: skip
        print(f"{name:<16} batch {batch:>3}: plain {row['plain_images_per_s']:7.2f} img/s "
              f"({row['plain_calls_per_image']:.0f} calls/img) | speculative {row['speculative_images_per_s']:7.2f} "
              f"img/s ({row['speculative_calls_per_image']:.1f} calls/img, {100 * row['acceptance_rate']:.0f}% "
              f"accepted) | x{row['speedup']:.2f}", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def quality_rows(name: str, model, settings: SamplingSettings, per_digit: int) -> list[dict]:
    classifier = digit_classifier()
    real, _ = real_digits("val")
    conditions = make_conditions(model, classes=list(range(10)), n_per_condition=per_digit)
    rows = []
    for label, s in (("plain", settings), ("speculative", replace(settings, speculative=True))):
        result = draw(model, conditions, s, batch_size=64)
        rows.append({"model": name, "sampler": label, "samples": len(result.images),
                     "class_accuracy": class_accuracy(result.images, result.labels, classifier),
                     "domain_fid": domain_fid(result.images, real, classifier)})  # fmt: skip
        print(f"{name:<16} {label:<11}: class accuracy {100 * rows[-1]['class_accuracy']:.1f}% of "
              f"{rows[-1]['samples']}, domain FID {rows[-1]['domain_fid']:.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench-speculative", help="where the trained models are (or go)")
    parser.add_argument("--window", type=positive_int, default=16)
    parser.add_argument("--drafts", default="mc-sjd", choices=["mc-sjd", "sjd"])
    parser.add_argument("--repeats", type=positive_int, default=2)
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8 only, fewer images, no quality check")
    parser.add_argument("--compile", action="store_true", help="both samplers with compiled steps (warmed first)")
    parser.add_argument("--only", choices=list(MODELS), help="one of the models")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    images_at = {1: 10, 8: 32} if args.quick else {1: 20, 8: 64, 64: 256}
    models = {title: (load_model(work), cfg) for key, (title, load_model, cfg) in MODELS.items()
              if args.only in (None, key)}  # fmt: skip
    print(f"CPU: {cpu_kind()}; torch {torch.__version__}; window {args.window}, drafts {args.drafts}"
          f"{', compiled steps' if args.compile else ''}", flush=True)  # fmt: skip
    report = {"cpu": cpu_kind(), "torch": torch.__version__, "window": args.window, "drafts": args.drafts,
              "compile": args.compile, "speed": [], "quality": []}  # fmt: skip
    for name, (model, cfg) in models.items():
        settings = SamplingSettings(cfg_scale=cfg, seed=1, speculative_window=args.window,
                                    speculative_drafts=args.drafts)  # fmt: skip
        with torch.no_grad():
            report["speed"] += speed_rows(name, model, settings, images_at, args.repeats, args.compile)
            if not args.quick:
                report["quality"] += quality_rows(name, model, settings, 50)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_script(main)
