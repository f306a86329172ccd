"""The benchmark scripts refuse a bad argument at once: argparse's exit status 2 and its one-line `error:` naming the
option, with no traceback and before any training, download or folder (a probe found several that trained for
minutes, or built a 5.6 GB venv, before dying on an argument)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUT = "{out}"  # replaced by a folder under tmp_path that the script must not make

# (script, arguments, what the error names)
CASES = [
    ("fid_crosscheck", ["--n", "0", "--work", OUT], "--n"),
    ("fid_crosscheck", ["--n", "99999", "--work", OUT], "--n"),
    ("fid_crosscheck", ["--batch-size", "0", "--noise", "1", "--work", OUT], "--batch-size"),
    ("npp", ["--size", "NOPE", "--out", OUT], "--size"),
    ("npp", ["--device", "tpu", "--out", OUT], "--device"),
    ("npp", ["--steps", "-1", "--out", OUT], "--steps"),
    ("text_to_image", ["--cfg", "0.5", "--out", OUT], "--cfg"),
    ("text_to_image", ["--per-prompt", "0", "--out", OUT], "--per-prompt"),
    ("text_to_image", ["--reuse", "--out", OUT], "--reuse"),
    ("data_scale", ["--images", "0", "--out", OUT], "--images"),
    ("data_scale", ["--rounds", "-1", "--out", OUT], "--rounds"),
    ("speculative", ["--window", "0", "--work", OUT], "--window"),
    ("speculative", ["--repeats", "-1", "--work", OUT], "--repeats"),
    ("fid_sqrt", ["--dim", "0"], "--dim"),
    ("fid_sqrt", ["--repeats", "-1"], "--repeats"),
    ("gpu", ["--sections", "nosuch", "--out", OUT + "/gpu.json"], "--sections"),
    ("sampling", ["--batch-sizes", "abc"], "--batch-sizes"),
    ("sampling", ["--batch-sizes", "0"], "--batch-sizes"),
    ("sampling_vs", ["no-such-revision-of-vqar"], "no-such-revision-of-vqar"),
    ("topk_compiled", ["no-such-revision-of-vqar"], "no-such-revision-of-vqar"),
    ("scaling", ["--preset", "nosuch", "--out", OUT], "--preset"),
    ("scaling", ["--steps", "-3", "--out", OUT], "--steps"),
    ("caption_store", ["--items", "0", "--out", OUT], "--items"),
    ("caption_store", ["--workers", "-1", "--out", OUT], "--workers"),
    ("codebook_usage", ["--steps", "-1", "--out", OUT], "--steps"),
    ("codebook_usage", ["--codebook", "0", "--out", OUT], "--codebook"),
    ("rate_distortion", ["--steps", "0", "--out", OUT], "--steps"),
    ("rate_distortion", ["--codebook", "1", "--out", OUT], "--codebook"),
    ("demo_eval", ["--run", "/nonexistent", "--work", OUT], "--run"),
    ("demo_eval", ["--per-class", "0", "--work", OUT], "--per-class"),
    ("startup_checks", ["--images", "-1"], "--images"),
    ("startup_checks", ["--size", "0"], "--size"),
    ("contention", ["--seconds", "-1"], "--seconds"),
]


def _benchmark(script: str, args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize(
    ("script", "args", "option"), CASES, ids=[f"{script}:{' '.join(args[:2])}" for script, args, _ in CASES]
)
def test_bad_argument_is_refused_at_once(script: str, args: list[str], option: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    start = time.perf_counter()
    done = _benchmark(script, [a.replace(OUT, str(out)) for a in args])
    seconds = time.perf_counter() - start
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert f"{script}.py: error:" in last and option in last, last
    assert seconds < 60, f"took {seconds:.0f} s: work ran before the argument was checked"
    assert not out.exists(), f"{out} was made before the argument was refused"
    assert not done.stdout.strip(), done.stdout


def test_reuse_without_results_is_refused(tmp_path: Path) -> None:
    """--reuse with a trained OUT/ar but no results.json (the run that trained it stopped before the end): refused,
    not a FileNotFoundError after the tokenizer's code store is made."""
    (tmp_path / "ar").mkdir()
    (tmp_path / "ar" / "config.json").write_text("{}")
    done = _benchmark("text_to_image", ["--reuse", "--out", str(tmp_path)])
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "error: --reuse:" in last and "results.json" in last, last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ar"]


def test_a_benchmark_stopped_by_ctrl_c_says_so_in_one_line(tmp_path: Path) -> None:
    """Ctrl-C ended in a traceback and TrainingInterrupted's advice to --resume, which no benchmark script takes."""
    import signal

    command = [sys.executable, str(ROOT / "benchmarks" / "npp.py"), "--out", str(tmp_path / "out")]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "out").rglob("run.yaml")):  # training has begun
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("npp.py: stopped; the benchmark did not finish and recorded nothing"), last
    assert "Traceback" not in err and "--resume" not in err, err[-2000:]
