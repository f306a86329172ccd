"""Rate-distortion of VQ vs RQ tokenizers on the bundled MNIST digits (the RQ-VAE paper's claim, at small scale).

Trains four tokenizers with the same codebook size K and the same number of steps, then reports validation
PSNR, codebook usage and sequence length:

    VQ 4x4x1   vq-mnist-4x4          16 positions, 1 code each
    VQ 8x8x1   vq-mnist              64 positions, 1 code each
    RQ 4x4x2   rqvae-mnist d=2       16 positions, 2 codes each
    RQ 4x4x4   rqvae-mnist           16 positions, 4 codes each

The claim: RQ 4x4x4 beats VQ 4x4x1 by a wide margin and comes close to VQ 8x8x1 with a 4x shorter sequence
for the autoregressive model (16 positions instead of 64).

    python benchmarks/rate_distortion.py                 # K=64, 1000 steps each: ~20 minutes on 2 CPU cores
    python benchmarks/rate_distortion.py --codebook 256  # a larger codebook
    python benchmarks/rate_distortion.py --steps 200     # a quick look

At equal K, VQ 8x8x1 and RQ 4x4x4 spend the same bits per image (64 codes); the question is whether a coarser
grid with a stack of codes per position reconstructs as well as a finer grid. A small K keeps quantization, not
the autoencoder's capacity, the limiting factor, which is the regime of the paper (K=16384 for 256px ImageNet).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from common import equal_budget, int_range, print_table, run_script, train_each
from vqar.commands.common import positive_int

CONFIGS = [
    ("VQ 4x4x1", "vq-mnist-4x4", []),
    ("VQ 8x8x1", "vq-mnist", []),
    ("RQ 4x4x2", "rqvae-mnist", ["d=2"]),
    ("RQ 4x4x4", "rqvae-mnist", ["d=4"]),
]

# "Beats by a wide margin": at least 2 dB, i.e. 37% less squared error. "Comes close": within 1 dB (21% more).
WIDE_MARGIN_DB = 2.0
CLOSE_DB = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=1000, help="training steps per tokenizer (default 1000)")
    parser.add_argument("--codebook", type=int_range(2), default=64,
                        help="codebook size K shared by all four (default 64)")  # fmt: skip
    parser.add_argument("--out", default="runs/bench/rate_distortion", help="where the runs and results go")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = Path(args.out) / f"K{args.codebook}"

    rows = []
    for name, preset, extra, cfg, metrics, seconds in train_each(CONFIGS, out, equal_budget(args.codebook, args.steps,
                                                                                          args.seed)):  # fmt: skip
        side = cfg.data.image_size // cfg.model.conv.downsample_factor
        depth = cfg.model.quantizer.depth
        rows.append(
            {
                "tokenizer": name,
                "preset": " ".join([preset, *extra]),
                "positions": side * side,
                "codes_per_image": side * side * depth,
                "bits_per_image": side * side * depth * math.log2(args.codebook),
                "psnr": metrics["psnr"],
                "usage": metrics["usage"],
                "seconds": seconds,
            }
        )
        print(f"{name}: PSNR {metrics['psnr']:.2f} dB, usage {metrics['usage']:.1f}% ({seconds:.0f} s)", flush=True)

    print(f"\nK = {args.codebook}, {args.steps} steps each, validation = 500 held-out digits\n")
    # Wall times are in results.json only: the budget that is equal here is the number of steps.
    print_table(["tokenizer", "preset", "AR positions", "codes / image", "bits / image", "val PSNR (dB)", "usage (%)"],
                [[r["tokenizer"], f"`{r['preset']}`", r["positions"], r["codes_per_image"],
                  f"{r['bits_per_image']:.0f}", f"{r['psnr']:.2f}", f"{r['usage']:.1f}"] for r in rows])  # fmt: skip
    by_name = {r["tokenizer"]: r for r in rows}
    gain = by_name["RQ 4x4x4"]["psnr"] - by_name["VQ 4x4x1"]["psnr"]
    gap = by_name["VQ 8x8x1"]["psnr"] - by_name["RQ 4x4x4"]["psnr"]
    print()
    wide = _verdict(gain >= WIDE_MARGIN_DB)
    print(f"RQ 4x4x4 - VQ 4x4x1 = {gain:+.2f} dB (wide margin: >= {WIDE_MARGIN_DB} dB): {wide}")
    print(
        f"VQ 8x8x1 - RQ 4x4x4 = {gap:+.2f} dB with a 4x longer sequence (close: <= {CLOSE_DB} dB): "
        f"{_verdict(gap <= CLOSE_DB)}"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"steps": args.steps, "codebook": args.codebook, "rows": rows}, indent=1)
    )


def _verdict(ok: bool) -> str:
    return "holds" if ok else "DOES NOT HOLD"


if __name__ == "__main__":
    run_script(main)
