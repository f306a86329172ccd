"""Standard and domain metrics of the demo's RQ-Transformer, with the sample count: Inception FID and
precision/recall of its samples against the real bundled digits, the Inception Score where the Inception weights
have their classifier head, the digit-classifier domain FID and class accuracy, and the linear probe of its
spatial transformer against raw pixels.

    make demo                                   # trains the models into runs/demo
    python benchmarks/demo_eval.py --run runs/demo [--per-class 50] [--cfg 2.0]

Digits are 32x32 grey images: the Inception sees them repeated to RGB and resized to 299x299 (tf-bilinear), so the
numbers compare runs on these digits with each other, not with ImageNet FIDs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import existing_dir
from vqar.bundle import load
from vqar.commands.common import positive_int
from vqar.eval.digits import class_accuracy, digit_classifier, domain_fid, real_digits
from vqar.eval.generation import evaluate_samples, inception_outputs, save_stats
from vqar.eval.inception import Inception
from vqar.eval.metrics import GaussianStats
from vqar.eval.probe import linear_probe
from vqar.eval.sources import load_images
from vqar.sampling import SamplingSettings, draw, make_conditions
from vqar.sampling.export import write_adm_npz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", type=existing_dir,
                        help="a demo output folder (holds ar/ and tokenizer/)")  # fmt: skip
    parser.add_argument("--per-class", type=positive_int, default=50, help="samples per digit")
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--reference", default="mnist", help="real images for the statistics (default: all 5,000)")
    parser.add_argument("--layer", type=int, help="probed block (default: the middle one)")
    parser.add_argument("--work", default=None, help="where to keep samples and reference stats")
    args = parser.parse_args()
    if not (Path(args.run) / "ar" / "config.json").is_file():
        parser.error(f"argument --run: {args.run} holds no trained model in ar/ (make one with `vqar demo`)")
    work = Path(args.work or tempfile.mkdtemp(prefix="vqar-demo-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    model = load(Path(args.run) / "ar")
    report: dict = {"run": args.run, "cfg_scale": args.cfg}

    start = time.perf_counter()
    conditions = make_conditions(model, classes=list(range(10)), n_per_condition=args.per_class)
    result = draw(model, conditions, SamplingSettings(cfg_scale=args.cfg, seed=1), progress=True)
    write_adm_npz(result, work / "samples.npz")
    report["samples"] = len(result.images)
    classifier = digit_classifier()
    report["class_accuracy"] = class_accuracy(result.images, result.labels, classifier)
    real_val, _ = real_digits("val")
    report["domain_fid_vs_500_held_out"] = domain_fid(result.images, real_val, classifier)

    inception = Inception()
    report["inception"] = inception.path.name
    ref = work / "reference.npz"
    if not ref.is_file():
        images = load_images(args.reference)
        stats = GaussianStats.of(inception_outputs(images, inception, desc="reference"), keep_features=True)
        save_stats(ref, stats)
        report["reference_images"] = len(images)
    report.update(evaluate_samples(work / "samples.npz", ref, inception))

    blocks = model.cfg.n_layer
    layer = blocks // 2 if args.layer is None else args.layer
    probe = linear_probe(model, "mnist", layer)
    report["linear_probe"] = probe
    report["seconds"] = time.perf_counter() - start
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
