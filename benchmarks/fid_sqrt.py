"""The matrix square root in FID, side by side: vqar's eigendecomposition-based tr sqrt(S1 S2) against
scipy.linalg.sqrtm, on two 2048 x 2048 covariance matrices of the Inception feature size.

    python benchmarks/fid_sqrt.py [--dim 2048] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.linalg

from common import int_range
from vqar.commands.common import positive_int
from vqar.eval.metrics import trace_sqrt_product


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int_range(2), default=2048, help="covariance size (at least 2)")
    parser.add_argument("--repeats", type=positive_int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = args.dim * 2
    a = rng.standard_normal((n, args.dim))
    b = a @ (np.eye(args.dim) + 0.05 * rng.standard_normal((args.dim, args.dim))) + rng.standard_normal((n, args.dim))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    timings = {"eigh (vqar)": [], "scipy sqrtm": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        ours = trace_sqrt_product(s1, s2)
        timings["eigh (vqar)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        reference = float(np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
        timings["scipy sqrtm"].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in timings.items()}
    print(f"dim {args.dim}: tr sqrt(S1 S2) = {ours:.6f} (eigh) vs {reference:.6f} (sqrtm), "
          f"relative difference {abs(ours - reference) / abs(reference):.2e}")  # fmt: skip
    for name, seconds in best.items():
        print(f"  {name:12s} {seconds:6.2f} s (best of {args.repeats})")
    print(f"  speed-up {best['scipy sqrtm'] / best['eigh (vqar)']:.1f}x")


if __name__ == "__main__":
    main()
