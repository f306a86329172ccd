"""Next Patch Prediction's cost saving, measured: the same small GPT trained twice on the bundled digits' VQ codes
with the same number of steps, token by token and with NPP (level 2, rate 0.5: 2x2 patches for the first half).

Prints, for each: wall time of training, token positions processed, validation NLL per token (always measured
token by token, p = 1) and the class accuracy of samples (the digit classifier's verdict). The paper's target:
NPP costs at most 0.65x the wall time and reaches equal or better NLL and accuracy.

    python benchmarks/npp.py                        # tokenizer + 2 GPT-XS runs, ~35 minutes on 2 CPU cores
    python benchmarks/npp.py --size GPT-S --steps 2000   # a larger GPT (~2.7 s/step on 2 cores: hours)
    python benchmarks/npp.py --steps 6000 --device cuda --precision bf16 --seed 1   # converged, on a GPU

The tokenizer (vq-mnist, 8x8 codes) and the code store are made once and reused from --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from common import cached_code_store, run_script
from vqar.ar import GPT_SIZES
from vqar.bundle import load
from vqar.commands.common import non_negative_int, positive_int
from vqar.eval.digits import class_accuracy, digit_classifier
from vqar.sampling import SamplingSettings, draw, make_conditions
from vqar.train.ar import train_ar
from vqar.train.ar_config import load_run_config
from vqar.train.npp import relative_cost
from vqar.utils.device import resolve_device


def positions_processed(run_dir: Path, log_every: int) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(r["positions"] * log_every for r in records if r["split"] == "train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps of each GPT run")
    parser.add_argument("--tokenizer-steps", type=positive_int, default=1000)
    parser.add_argument("--size", default="GPT-XS", choices=list(GPT_SIZES), metavar="SIZE",
                        help=f"the GPT's size, one of {', '.join(GPT_SIZES)} (default GPT-XS)")  # fmt: skip
    parser.add_argument("--per-class", type=positive_int, default=50, help="samples per digit for the class accuracy")
    parser.add_argument("--out", default="runs/bench/npp")
    parser.add_argument("--device", default="auto", help="train.device of both runs (auto: CUDA when present)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--eval-every", type=non_negative_int, default=0,
                        help="validation every N steps (default: at the end)")  # fmt: skip
    one_lr_help = "also train NPP with the run's one warmup + cosine instead of a restart per segment"
    parser.add_argument("--one-lr-schedule", action="store_true", help=one_lr_help)
    parser.add_argument("--seed", type=int, default=0, help="train.seed of every run (initial weights, batches)")
    args = parser.parse_args()
    try:
        resolve_device(args.device)  # an unknown or absent device, refused before the tokenizer trains
    except ValueError as err:
        parser.error(f"argument --device: {err}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = Path(args.out)
    codes = cached_code_store(out, "vq-mnist", args.tokenizer_steps, views="flip")
    classifier = digit_classifier()
    log_every = 10
    npp = ["npp.level=2", "npp.rate=0.5"]
    runs = {"token-level": ("token-level", [])}
    runs["NPP (level 2, rate 0.5)"] = ("NPP", npp)  # the default: a learning-rate restart per segment
    if args.one_lr_schedule:
        runs["NPP (level 2, rate 0.5, one lr schedule)"] = ("NPP-one-lr", [*npp, "npp.segment_lr=false"])
    rows = []
    for name, (folder, extra) in runs.items():
        overrides = [f"codes={codes}", f"size={args.size}", f"steps={args.steps}", f"train.log_every={log_every}",
                     f"train.eval_every={args.eval_every or args.steps}", f"train.ckpt_every={args.steps}",
                     f"train.device={args.device}", f"train.precision={args.precision}",
                     f"train.seed={args.seed}", *extra]  # fmt: skip
        run_dir = out / folder
        start = time.perf_counter()
        metrics = train_ar(load_run_config("gpt-mnist", overrides), run_dir, overwrite=True)
        seconds = time.perf_counter() - start
        model = load(run_dir)
        conditions = make_conditions(model, classes=list(range(10)), n_per_condition=args.per_class)
        samples = draw(model, conditions, SamplingSettings(cfg_scale=1.5, seed=args.seed))
        rows.append({
            "run": name,
            "seconds": seconds,
            "positions": positions_processed(run_dir, log_every),
            "val_nll": metrics["nll"],
            "val_accuracy": metrics["accuracy"],
            "class_accuracy": class_accuracy(samples.images, samples.labels, classifier),
        })  # fmt: skip
        print(f"{name}: {seconds:.0f} s, val NLL {metrics['nll']:.4f}, class accuracy {rows[-1]['class_accuracy']:.3f}",
              flush=True)  # fmt: skip
        summary = {"steps": args.steps, "size": args.size, "device": args.device, "precision": args.precision,
                   "seed": args.seed}  # fmt: skip
        (out / "results.json").write_text(json.dumps({**summary, "rows": rows}, indent=1))
    base = rows[0]
    print(f"\n{args.size}, {args.steps} steps each, codes 8x8 (K=256), 4,500 training digits (+ mirrored views)\n")
    print("| training | wall time (s) | token positions | val NLL / token | next-token acc. | class accuracy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['seconds']:.0f} | {r['positions']:.3g} | {r['val_nll']:.4f} | "
              f"{100 * r['val_accuracy']:.1f}% | {100 * r['class_accuracy']:.1f}% |")  # fmt: skip
    print(f"\nschedule: NPP processes {relative_cost(args.steps, 2, 0.5):.3f} of the token positions")
    for npp_row in rows[1:]:
        time_ratio = npp_row["seconds"] / base["seconds"]
        position_ratio = npp_row["positions"] / base["positions"]
        nll_gap = npp_row["val_nll"] - base["val_nll"]
        accuracy_gap = 100 * (npp_row["class_accuracy"] - base["class_accuracy"])
        print(f"{npp_row['run']}: wall time / token-level = {time_ratio:.3f} (target <= 0.65), positions "
              f"{position_ratio:.3f}; val NLL {nll_gap:+.4f} (target <= 0); class accuracy {accuracy_gap:+.1f} "
              "points (target >= 0)")  # fmt: skip


if __name__ == "__main__":
    run_script(main)
