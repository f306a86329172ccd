"""The end-to-end demo on the bundled MNIST digits, on a CPU:

1. train the tokenizer (rqvae-mnist: 32x32 -> 4x4x4 codes; with `arch="var"`, var-mnist: scales 1..4)
2. extract the codes of all 5,000 digits into a code store
3. train a class-conditional RQ-Transformer on them (rq-mnist with 3 + 1 layers; or VAR, var-mnist)
4. sample a 10-row grid, one row per digit, and more samples for the accuracy check
5. report tokenizer PSNR and usage, AR validation loss, sampling throughput, and the share of samples a digit
   classifier (trained on the real training digits) recognises as the digit they were asked for
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vqar.bundle import load
from vqar.configs import to_yaml
from vqar.data import DataConfig
from vqar.data.codes import is_code_store
from vqar.data.extraction import extract_codes
from vqar.eval.digits import class_accuracy, digit_classifier, domain_fid, real_digits
from vqar.sampling import SamplingSettings, draw, make_conditions
from vqar.sampling.export import is_sample_folder, write_adm_npz, write_samples
from vqar.train import ar as ar_training
from vqar.train import ar_config
from vqar.train import tokenizer as tokenizer_training
from vqar.utils.device import cpu_kind
from vqar.utils.io import created_folders_removed_on_failure, describe_entries, folder_entries
from vqar.utils.runs import run_kind
from vqar.utils.threads import apply_thread_policy, thread_summary

log = logging.getLogger("vqar")

SAMPLES_PER_DIGIT = 50  # 500 samples for the accuracy check; the grid shows the first 10 of each digit
GRID_PER_DIGIT = 10


@dataclass(frozen=True)
class DemoPipeline:
    """One demo: the tokenizer and AR presets, the overrides of the full and the quick run, and the guidance of
    the samples (the models are trained with class dropout)."""

    tokenizer: str
    ar: str
    cfg_scale: float
    full: dict
    quick: dict


PIPELINES = {
    # The tokenizer: 500 steps at twice the preset's learning rate and a short warmup (25.3 dB over five seeds; 700
    # steps at 1e-3 before; 350 at 2e-3 gave 24.2 dB). The RQ-Transformer: the preset's schedule on 3 spatial + 1
    # depth layers instead of RQ-XS's 4 + 2, 1.6x the steps per second at 97.8-98.6% class accuracy over five seeds;
    # fewer steps fell below the 97.5% bar on some seeds (benchmarks/README.md, "The demo's time").
    "rq": DemoPipeline("rqvae-mnist", "rq-mnist", 2.0,
                       full={"tokenizer": ["steps=500", "lr=2e-3", "train.warmup_steps=50", "train.eval_every=250"],
                             "ar": ["model.n_layer=3", "model.n_depth_layer=1"]},
                       quick={"tokenizer": ["steps=20", "train.eval_every=20", "data.max_images=600"],
                              "ar": ["steps=30", "train.eval_every=30", "sample.n_per_class=2", "size=RQ-XS"]}),
    # VAR's guidance ramps over the scales (none at the first, full at the last): cfg_scale 3 = the official cfg 2.
    "var": DemoPipeline("var-mnist", "var-mnist", 3.0,
                        full={"tokenizer": [], "ar": []},
                        quick={"tokenizer": ["steps=20", "train.eval_every=20", "data.max_images=600"],
                               "ar": ["steps=30", "train.eval_every=30", "sample.n_per_class=2", "size=VAR-XS"]}),
}  # fmt: skip


# What a demo writes into its folder, the work folder of an extraction it was stopped in, and the lock files its
# writers leave beside their folders (a killed writer's lock is taken over: `write_lock`).
DEMO_FOLDERS = ("tokenizer", "codes", "ar", "samples")
DEMO_OUTPUTS = (*DEMO_FOLDERS, "report.json", ".codes.partial", *(f".{name}.lock" for name in DEMO_FOLDERS))


def check_demo_folder(out: Path) -> None:
    """Refuses an `out` the demo would write over unasked, before any training: it replaces what an earlier demo
    (or one that was stopped) wrote there and nothing else, so a folder holding anything more (a training run, a
    model, your files), or whose tokenizer/, ar/, codes/ or samples/ is not what the demo makes, is named."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; choose another --out for the demo")
    others = [name for name in folder_entries(out) if name not in DEMO_OUTPUTS]
    if others:
        raise FileExistsError(f"{out} holds {describe_entries(others)}, which no demo wrote: the demo replaces an "
                              "earlier demo's tokenizer/, codes/, ar/, samples/ and report.json and nothing else; "
                              "choose a new or empty --out")  # fmt: skip
    expected = {"tokenizer": ("the demo's tokenizer run", lambda p: run_kind(p) == "tokenizer"),
                "ar": ("the demo's AR run", lambda p: run_kind(p) == "ar"),
                "codes": ("a code store", is_code_store), "samples": ("a sample folder", is_sample_folder)}
    for name, (kind, is_kind) in expected.items():
        path = out / name
        if folder_entries(path) and not is_kind(path) or path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} is not {kind}, which the demo would write over; choose a new or empty "
                                  "--out")  # fmt: skip
    report = out / "report.json"
    if (report.exists() or report.is_symlink()) and not _is_demo_report(report):
        raise FileExistsError(f"{report} is not a demo's report, which the demo would write over; choose a new or "
                              "empty --out")  # fmt: skip


def _is_demo_report(path: Path) -> bool:
    """Whether `path` is a report.json a demo wrote (a JSON object naming the demo's outputs): a report.json of your
    own is not replaced."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(report, dict) and isinstance(report.get("outputs"), dict) and "ar_model" in report["outputs"]


def run_demo(out: str | Path = "runs/demo", quick: bool = False, classifier_cache: str | Path | None = None,
             arch: str = "rq") -> dict:  # fmt: skip
    """Runs the pipeline of `arch` (see `PIPELINES`) into `out` (replacing an earlier demo there) and returns the
    report."""
    if arch not in PIPELINES:
        raise ValueError(f"the demo runs arch {' or '.join(PIPELINES)}, not {arch!r}")
    if not str(out).strip():
        raise ValueError("--out is empty: name the folder the demo writes into (default runs/demo)")
    check_demo_folder(Path(out))
    apply_thread_policy()  # a no-op after the CLI's; keeps a count the caller set
    out = Path(out)
    pipeline = PIPELINES[arch]
    plan = pipeline.quick if quick else pipeline.full
    timings = {}

    start = time.perf_counter()
    log.info("1/4 training the tokenizer (%s)", pipeline.tokenizer)
    tok_cfg = tokenizer_training.load_run_config(pipeline.tokenizer, plan["tokenizer"])
    stopped = not (out / "report.json").exists()  # an earlier demo that did not finish: its runs are continued
    say_what_is_replaced(out, stopped, tok_cfg)
    tok_metrics = _train_stage(tokenizer_training.train_tokenizer, tok_cfg, out / "tokenizer", stopped)
    timings["tokenizer"] = time.perf_counter() - start

    start = time.perf_counter()
    log.info("2/4 extracting codes")
    tokenizer = load(out / "tokenizer")
    data = DataConfig(source="mnist", image_size=tokenizer.image_size, channels=tokenizer.in_channels)
    extract_codes(tokenizer, data, out / "codes", overwrite=True, tokenizer_dir=out / "tokenizer")
    timings["codes"] = time.perf_counter() - start

    start = time.perf_counter()
    log.info("3/4 training the class-conditional AR model (%s)", pipeline.ar)
    ar_cfg = ar_config.load_run_config(pipeline.ar, [f"codes={out / 'codes'}", *plan["ar"]])
    ar_metrics = _train_stage(ar_training.train_ar, ar_cfg, out / "ar", stopped)
    timings["ar"] = time.perf_counter() - start

    start = time.perf_counter()
    log.info("4/4 sampling and checking the digits")
    model = load(out / "ar")
    per_digit = 4 if quick else SAMPLES_PER_DIGIT
    conditions = make_conditions(model, classes=list(range(10)), n_per_condition=per_digit)
    result = draw(model, conditions, SamplingSettings(cfg_scale=pipeline.cfg_scale), batch_size=250)
    unguided = draw(model, conditions, SamplingSettings(), batch_size=250)
    first_of_each = (torch.arange(len(result.labels)) % per_digit) < GRID_PER_DIGIT
    paths = write_samples(result.subset(first_of_each), out / "samples", min(per_digit, GRID_PER_DIGIT))
    write_adm_npz(result, paths["npz"])  # every sample, for `vqar eval fid`
    classifier = digit_classifier(classifier_cache)
    accuracy = class_accuracy(result.images, result.labels, classifier)
    unguided_accuracy = class_accuracy(unguided.images, unguided.labels, classifier)
    real_images, _ = real_digits("val")
    fid_domain = domain_fid(result.images, real_images, classifier)
    timings["sampling"] = time.perf_counter() - start

    report = {
        "arch": arch,
        "quick": quick,
        "ar_model_class": type(model).__name__,
        "tokenizer_psnr_db": tok_metrics["psnr"],
        "tokenizer_usage_percent": tok_metrics["usage"],
        "ar_val_nll_per_code": ar_metrics["nll"],
        "ar_val_code_accuracy": ar_metrics["accuracy"],
        "samples": len(result.images),
        "sampling_images_per_second": len(result.images) / result.seconds,
        "cfg_scale": pipeline.cfg_scale,
        "class_accuracy": accuracy,
        "class_accuracy_without_guidance": unguided_accuracy,
        "domain_fid": fid_domain,
        "domain_fid_reference": f"{len(real_images)} held-out real digits",
        "seconds": timings,
        "cpu": cpu_kind(),
        "threads": thread_summary(),
        "outputs": {
            "tokenizer": str(out / "tokenizer"),
            "reconstructions": str(out / "tokenizer" / "recon_grid.png"),
            "codes": str(out / "codes"),
            "ar_model": str(out / "ar"),
            "sample_grid": str(paths["grid"]),
            "samples_npz": str(paths["npz"]),
        },
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(format_report(report))
    return report


def say_what_is_replaced(out: Path, stopped: bool, tok_cfg) -> None:
    """A warning before the demo replaces what an earlier one left in `out`: a finished demo (its report, samples and
    models: a full run's half hour, replaced by a --quick smoke test unsaid), or a stopped one whose tokenizer run
    has other settings than this run's, which is then trained anew rather than continued."""
    if not stopped:
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))  # a demo's: check_demo_folder read it
        kind = "--quick" if report.get("quick") else "full"
        accuracy = report.get("class_accuracy")
        said = f", class accuracy {100 * accuracy:.1f}%" if isinstance(accuracy, (int, float)) else ""
        log.warning("%s holds a finished %s demo (arch %s%s), which this run replaces; give another --out to keep it",
                    out, kind, report.get("arch", "rq"), said)  # fmt: skip
        return
    run_yaml = out / "tokenizer" / "run.yaml"
    if run_yaml.is_file() and run_yaml.read_text(encoding="utf-8") != to_yaml(tok_cfg):
        log.warning("%s holds a stopped demo of other settings (another --arch, or with or without --quick), which "
                    "this run replaces rather than continues; give another --out to keep it", out)  # fmt: skip


def _train_stage(train: Callable[..., dict], cfg, folder: Path, stopped: bool) -> dict:
    """A stage's training run: continued where a stopped demo left a run of the same settings in `folder` (Ctrl-C
    wrote a checkpoint, and the demo said a rerun goes on from it), else trained anew over what is there. A demo
    that finished is trained anew, so that its times are a whole demo's. A run stopped before it wrote anything
    leaves no empty folder."""
    run_yaml = folder / "run.yaml"
    resume = stopped and run_yaml.is_file() and run_yaml.read_text(encoding="utf-8") == to_yaml(cfg)
    if resume:
        log.info("continuing the stopped demo's run in %s", folder)
    with created_folders_removed_on_failure(folder):
        return train(cfg, folder, resume=resume, overwrite=not resume)


def format_report(report: dict) -> str:
    t = report["seconds"]
    o = report["outputs"]
    # A --quick run trains for seconds: its figures say the pipeline runs, not how good it gets, so the targets
    # are named as the full run's rather than set beside figures that cannot reach them.
    quick = report.get("quick", False)
    target = "the full run's target: >= 80%" if quick else "target >= 80%"
    return "\n".join(
        [
            "",
            "vqar demo report (--quick: a smoke test of a few steps; run without --quick for the real figures)"
            if quick
            else "vqar demo report",
            f"  tokenizer      PSNR {report['tokenizer_psnr_db']:.2f} dB, codebook usage "
            f"{report['tokenizer_usage_percent']:.1f}% (validation digits)   [{t['tokenizer']:.0f} s]",
            f"  code store     {o['codes']}   [{t['codes']:.0f} s]",
            f"  {report['ar_model_class']:<14} validation NLL {report['ar_val_nll_per_code']:.3f} nats/code, "
            f"next-code accuracy {100 * report['ar_val_code_accuracy']:.1f}%   [{t['ar']:.0f} s]",
            f"  sampling       {report['samples']} images at {report['sampling_images_per_second']:.1f} images/s "
            f"(CFG scale {report['cfg_scale']})",
            f"  class accuracy {100 * report['class_accuracy']:.1f}% of samples recognised as the digit asked for "
            f"({target}; {100 * report['class_accuracy_without_guidance']:.1f}% without guidance)   "
            f"[{t['sampling']:.0f} s]",
            f"  domain FID     {report['domain_fid']:.2f} vs {report['domain_fid_reference']} (digit-classifier "
            "features; not comparable with Inception FID)",
            f"  total          {sum(t.values()) / 60:.1f} min on {report['cpu']}, {report['threads']}",
            "",
            f"  sample grid (one row per digit): {o['sample_grid']}",
            f"  reconstructions:                 {o['reconstructions']}",
            f"  models:                          {o['tokenizer']}, {o['ar_model']}",
            f"  report:                          {Path(o['ar_model']).parent / 'report.json'}",
        ]
    )
