"""Training throughput on 1 vs 2 processes (torchrun, gloo on the CPU): a sanity check of the DDP path.

Both runs train the same tokenizer with the same global batch and read `samples_per_s` from the metric log
(the loop measures it per logging window, evaluation and checkpoints excluded); the first window, which holds
start-up and warm-up, is dropped. The 1-process run may use every core (OMP threads = cores) and each of the 2
processes half of them, so both have the same hardware: the ratio shows what the gradient all-reduce and the
smaller per-process batches cost on this machine. Real scaling figures need GPUs and NCCL.

    python benchmarks/scaling.py                       # the vq-mnist tokenizer, global batch 64, 60 steps
    python benchmarks/scaling.py --preset rqvae-mnist --steps 100 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from common import int_range, run_script
from vqar.commands.common import positive_int
from vqar.configs import preset_names


def train(procs: int, args: argparse.Namespace, out: Path) -> list[float]:
    run = out / f"procs{procs}"
    shutil.rmtree(run, ignore_errors=True)
    command = [sys.executable, "-m", "vqar.cli", "train", "tokenizer", args.preset, "--out", str(run)]
    if procs > 1:
        command[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "-m"]
    overrides = [f"steps={args.steps}", f"bs={args.batch_size}", "train.log_every=10", "train.warmup_steps=5"]
    overrides += [f"train.eval_every={args.steps}", f"train.ckpt_every={args.steps}", "data.max_images=2000"]
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // procs))}
    subprocess.run([*command, *overrides], check=True, env=env, capture_output=not args.verbose)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["samples_per_s"] for r in records if r["split"] == "train"]


def tokenizer_preset(text: str) -> str:
    """An argparse type: a tokenizer preset (`vqar presets` lists them) or a YAML file."""
    if (Path(text).suffix in (".yaml", ".yml") and Path(text).is_file()) or text in preset_names("tokenizer"):
        return text
    raise argparse.ArgumentTypeError(f"no tokenizer preset or YAML file {text!r}; the presets: "
                                     f"{', '.join(preset_names('tokenizer'))}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vq-mnist", type=tokenizer_preset,
                        help="the tokenizer preset (see `vqar presets`) or a YAML file")  # fmt: skip
    parser.add_argument("--steps", type=int_range(11), default=60,
                        help="at least 11: the first 10-step window, start-up and warm-up, is not measured")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="the global batch of both runs")
    parser.add_argument("--out", default="runs/bench/scaling")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="show the training output")
    args = parser.parse_args()
    out = Path(args.out)
    rates = {}
    for procs in (1, 2):
        windows = train(procs, args, out)[1:]  # the first window holds start-up and warm-up
        if not windows:
            raise SystemExit("too few steps for a measurement: raise --steps")
        rates[procs] = sum(windows) / len(windows)
    report = {
        "preset": args.preset,
        "global_batch": args.batch_size,
        "steps": args.steps,
        "cpu_cores": os.cpu_count(),
        "samples_per_s_1proc": round(rates[1], 2),
        "samples_per_s_2proc": round(rates[2], 2),
        "ratio_2_over_1": round(rates[2] / rates[1], 3),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.preset}, global batch {args.batch_size}, {os.cpu_count()} CPU cores, gloo")
    print(f"  1 process : {rates[1]:8.1f} samples/s")
    print(f"  2 processes: {rates[2]:7.1f} samples/s  ({rates[2] / rates[1]:.2f}x)")


if __name__ == "__main__":
    run_script(main)
