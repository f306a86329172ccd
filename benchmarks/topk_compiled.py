"""The draw of one step (`sample_logits`) with top-k, eager and compiled, this tree beside another git revision.

Both versions run in one process, in turn, on the same logits (these machines are noisy): REV's
`sampling/filters.py` is loaded from a temporary `git worktree`. A compiled draw whose top-k branches on the
values is a graph break; the table shows what that costs against a draw at static shapes.

    python benchmarks/topk_compiled.py HEAD~1
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from common import git_commit

REPO = Path(__file__).resolve().parents[1]
CASES = [(1, 1024, 16, None), (1, 16384, 1024, None), (16, 16384, 1024, None), (64, 16384, 1024, 0.9),
         (64, 1024, 16, None)]  # fmt: skip


def load_filters(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dynamo looks the module up by name
    spec.loader.exec_module(module)
    return module


def best_microseconds(draw, logits, uniform, calls: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            draw(logits, uniform)
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", type=git_commit, help="the git revision to compare with")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "rev"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.rev], cwd=REPO, check=True,
                       capture_output=True)  # fmt: skip
        try:
            versions = {args.rev: load_filters(tree / "src/vqar/sampling/filters.py", "filters_rev"),
                        "this tree": load_filters(REPO / "src/vqar/sampling/filters.py", "filters_here")}  # fmt: skip
            print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
            print("| rows x vocabulary, top-k (top-p) | " + " | ".join(
                f"{name} eager | {name} compiled" for name in versions) + " |")  # fmt: skip
            for rows, vocabulary, k, p in CASES:
                logits, uniform = torch.randn(rows, vocabulary), torch.rand(rows)
                calls = 200 if rows * vocabulary < 100_000 else 40
                cells = []
                for module in versions.values():
                    eager = lambda x, u, m=module, k=k, p=p: m.sample_logits(x, 1.0, k, p, uniform=u)  # noqa: E731
                    compiled = torch.compile(eager)
                    compiled(logits, uniform)  # the compile, then a warm call
                    compiled(logits, uniform)
                    cells += [best_microseconds(eager, logits, uniform, calls),
                              best_microseconds(compiled, logits, uniform, calls)]  # fmt: skip
                torch._dynamo.reset()
                label = f"{rows} x {vocabulary}, {k}" + (f" ({p})" if p else "")
                print(f"| {label} | " + " | ".join(f"{c:.0f} us" for c in cells) + " |", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)


if __name__ == "__main__":
    main()
