"""Next Patch Prediction's cost saving, measured: the same small GPT trained twice on the bundled digits' VQ codes
with the same number of steps, token by token and with NPP (level 2, rate 0.5: 2x2 patches for the first half).

Prints, for each: wall time of training, token positions processed, validation NLL per token (always measured
token by token, p = 1) and the class accuracy of samples (the digit classifier's verdict). The paper's target:
NPP costs at most 0.65x the wall time and reaches equal or better NLL and accuracy.

    python benchmarks/npp.py                        # tokenizer + 2 GPT-XS runs, ~35 minutes on 2 CPU cores
    python benchmarks/npp.py --size GPT-S --steps 2000   # a larger GPT (~2.7 s/step on 2 cores: hours)

The tokenizer (vq-mnist, 8x8 codes) and the code store are made once and reused from --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from vqar.data import DataConfig
from vqar.data.codes import extract_codes
from vqar.eval.digits import class_accuracy, digit_classifier
from vqar.pretrained import load
from vqar.sampling.export import sample_images
from vqar.train.ar import load_run_config, train_ar
from vqar.train.npp import relative_cost
from vqar.train.tokenizer import load_run_config as tokenizer_config
from vqar.train.tokenizer import train_tokenizer


def prepare_codes(out: Path, tokenizer_steps: int) -> Path:
    codes = out / "codes"
    if (codes / "manifest.json").is_file():
        return codes
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "config.json").is_file():
        train_tokenizer(tokenizer_config("vq-mnist", [f"steps={tokenizer_steps}"]), tokenizer_dir, overwrite=True)
    extract_codes(load(tokenizer_dir), DataConfig(), codes, views="flip", tokenizer_dir=tokenizer_dir)
    return codes


def positions_processed(run_dir: Path, log_every: int) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(r["positions"] * log_every for r in records if r["split"] == "train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps of each GPT run")
    parser.add_argument("--tokenizer-steps", type=int, default=1000)
    parser.add_argument("--size", default="GPT-XS")
    parser.add_argument("--per-class", type=int, default=50, help="samples per digit for the class accuracy")
    parser.add_argument("--out", default="runs/bench/npp")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = Path(args.out)
    codes = prepare_codes(out, args.tokenizer_steps)
    classifier = digit_classifier()
    log_every = 10
    runs = {"token-level": [], "NPP (level 2, rate 0.5)": ["npp.level=2", "npp.rate=0.5"]}
    rows = []
    for name, extra in runs.items():
        overrides = [f"codes={codes}", f"size={args.size}", f"steps={args.steps}", f"train.log_every={log_every}",
                     f"train.eval_every={args.steps}", f"train.ckpt_every={args.steps}", *extra]  # fmt: skip
        run_dir = out / name.split(" ")[0]
        start = time.perf_counter()
        metrics = train_ar(load_run_config("gpt-mnist", overrides), run_dir, overwrite=True)
        seconds = time.perf_counter() - start
        model = load(run_dir)
        samples = sample_images(model, model.tokenizer, list(range(10)), args.per_class, seed=0, progress=False,
                                cfg_scale=1.5)  # fmt: skip
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
    base, npp = rows
    print(f"\n{args.size}, {args.steps} steps each, codes 8x8 (K=256), 4,500 training digits (+ mirrored views)\n")
    print("| training | wall time (s) | token positions | val NLL / token | next-token acc. | class accuracy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['seconds']:.0f} | {r['positions']:.3g} | {r['val_nll']:.4f} | "
              f"{100 * r['val_accuracy']:.1f}% | {100 * r['class_accuracy']:.1f}% |")  # fmt: skip
    time_ratio = npp["seconds"] / base["seconds"]
    position_ratio = npp["positions"] / base["positions"]
    print(f"\nwall time NPP / token-level = {time_ratio:.3f} (target <= 0.65); positions {position_ratio:.3f} "
          f"(schedule: {relative_cost(args.steps, 2, 0.5):.3f})")  # fmt: skip
    print(f"val NLL NPP - token-level = {npp['val_nll'] - base['val_nll']:+.4f} (target <= 0); class accuracy "
          f"{100 * (npp['class_accuracy'] - base['class_accuracy']):+.1f} points (target >= 0)")  # fmt: skip
    (out / "results.json").write_text(json.dumps({"steps": args.steps, "size": args.size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
