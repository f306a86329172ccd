"""`benchmarks/sampling.py` of this tree beside the one of another git revision, measured in one run.

These machines are noisy, so the two trees take turns: for each batch size, REV's script runs, then this tree's,
each in a process of its own (in a temporary `git worktree` of REV, importing REV's `vqar`). Every row of the two
tables is printed side by side with the ratio this / REV; a ratio below 1 is a slowdown.

    python benchmarks/sampling_vs.py HEAD~1                    # every batch size (~20 minutes on 2 CPU cores)
    python benchmarks/sampling_vs.py HEAD~1 --batch-sizes 16
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import git_commit, positive_int_list

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (\d+x\d+x\d+ vs \d+x\d+x\d+) \| (\d+) \| (\w+) \| ([\d.]+) \| ([\d.]+) \|")


def table(tree: Path, batch: int) -> dict[tuple[str, int, str], tuple[float, float]]:
    """(codes, batch, precision) -> (GPT images/s, RQ images/s) of `tree`'s benchmark at one batch size."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    command = [sys.executable, str(tree / "benchmarks" / "sampling.py"), "--batch-sizes", str(batch)]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed in {tree}:\n{done.stderr[-3000:]}")
    rows = {}
    for line in done.stdout.splitlines():
        match = ROW.match(line)
        if match:
            rows[(match[1], int(match[2]), match[3])] = (float(match[4]), float(match[5]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", type=git_commit, help="the git revision to compare with (a commit, tag or branch)")
    parser.add_argument("--batch-sizes", default="16,64,256", type=positive_int_list, help="comma-separated")
    args = parser.parse_args()
    sha = subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="vqar-vs-") as scratch:
        base = Path(scratch) / sha
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), sha], cwd=REPO, check=True)
        try:
            rows = []
            for batch in args.batch_sizes:
                before, after = table(base, batch), table(REPO, batch)
                rows += [(key, before[key], after[key]) for key in after if key in before]
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
    print(f"images/s: {sha} (before) and this tree (after), interleaved per batch size\n")
    print("| codes | batch | precision | GPT before | GPT after | GPT after/before | RQ before | RQ after | "
          "RQ after/before |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for (codes, batch, precision), (gpt0, rq0), (gpt1, rq1) in rows:
        print(f"| {codes} | {batch} | {precision} | {gpt0:.2f} | {gpt1:.2f} | {gpt1 / gpt0:.2f}x | {rq0:.2f} | "
              f"{rq1:.2f} | {rq1 / rq0:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
