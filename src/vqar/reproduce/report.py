"""The table a reproduction ends with: the paper's numbers against the measured ones, their differences, and
everything needed to judge them (settings, deviations from the protocol, environment, time, files)."""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from vqar.bundle import vqar_version
from vqar.eval.inception import Inception
from vqar.parallel import Parallel
from vqar.reproduce.samples import SamplePlan
from vqar.reproduce.table import Release
from vqar.sampling import SamplingSettings
from vqar.utils.io import atomic_write_text

QUICK_LIMIT = 5000  # at most this many samples: a quick check, never a comparison with the paper
ROWS = (("fid", "FID"), ("sfid", "sFID"), ("inception_score", "IS"), ("precision", "precision"), ("recall", "recall"))


def comparability(release: Release, n: int, deviations: list[str]) -> str:
    """One line: whether the measured numbers can be set against the paper's."""
    protocol_n = release.setting("n_samples")
    if n <= QUICK_LIMIT:
        return f"quick mode, not comparable with the paper: {n} samples (the protocol draws {protocol_n.value})"
    if protocol_n.stated and n != protocol_n.value:
        return f"not comparable with the paper: {n} samples (the protocol draws {protocol_n.value})"
    if deviations:
        return "not comparable with the paper: the settings differ from its protocol (see deviations)"
    return "comparable with the paper: the protocol's sample count and settings"


def environment(par: Parallel) -> dict:
    device = par.device
    env = {
        "vqar": vqar_version(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processes": par.world_size,
        "device": str(device),
        "cpu": _cpu_model(),
    }
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _rows(release: Release, metrics: dict) -> list[dict]:
    missing = metrics.get("not_measured", {})
    rows = []
    for key, label in ROWS:
        paper = release.reported.get(key)
        measured = metrics.get(key)
        source = paper.source if paper else "not recorded in the release table"
        row = {"metric": label, "paper": paper.value if paper and paper.stated else None, "source": source,
               "measured": measured}  # fmt: skip
        row["difference"] = measured - row["paper"] if measured is not None and row["paper"] is not None else None
        if measured is None:
            row["why_not_measured"] = missing.get(key, "")
        rows.append(row)
    return rows


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def render(report: dict) -> str:
    lines = [f"# Reproduction of {report['release']}: {report['description']}", "", f"**{report['comparability']}**",
             "", "| metric | paper | measured | difference | paper's source |", "|---|---|---|---|---|"]  # fmt: skip
    for row in report["table"]:
        measured = _number(row["measured"])
        if row["measured"] is None:
            measured = f"not measured ({row['why_not_measured']})"
        difference = "-" if row["difference"] is None else f"{row['difference']:+.4f}"
        lines.append(f"| {row['metric']} | {_number(row['paper'])} | {measured} | {difference} | {row['source']} |")
    lines += ["", f"samples: {report['samples']} ({report['conditions']}), drawn at {report['image_size']} px, "
              f"evaluated at {report['eval_size']} px; shards drawn in this run: {report['shards_drawn']}, reused: "
              f"{report['shards_reused']}", f"settings: {json.dumps(report['settings'])}"]  # fmt: skip
    lines += [f"deviation: {item}" for item in report["deviations"]] or ["deviations: none"]
    times = report["time"]
    lines.append("time: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    lines.append("environment: " + ", ".join(f"{k} {v}" for k, v in report["environment"].items()))
    lines.append(f"evaluator: {report['evaluator']}")
    return "\n".join(lines) + "\n"


def write_report(out: Path, release: Release, plan: SamplePlan, settings: SamplingSettings, metrics: dict, *,
                 deviations: list[str], counts: dict, times: dict, paths: dict, inception: Inception,
                 par: Parallel) -> dict:  # fmt: skip
    """Writes `results.json` and `results.md` in `out` (atomically), prints the table, returns the report."""
    deviations = list(deviations)
    evaluator = release.setting("evaluator")
    if evaluator.stated and evaluator.value == "pytorch-fid":
        deviations.append("measured with the ADM evaluator's preparation (uint8 images, TensorFlow's bilinear resize) "
                          "on the same Inception weights; the release's numbers came from pytorch-fid's pipeline "
                          f"({evaluator.source})")  # fmt: skip
    precision = release.setting("precision")
    if precision.stated and precision.value not in (None, "fp32") and settings is not None:
        deviations.append(f"the upstream sampler ran in {precision.value} ({precision.source}); this run sampled "
                          f"as --precision says")  # fmt: skip
    report = {
        "release": release.name,
        "description": release.description,
        "comparability": comparability(release, plan.n, [d for d in deviations if "command line" in d]),
        "table": _rows(release, metrics),
        "metrics": metrics,
        "samples": plan.n,
        "conditions": plan.conditions,
        "image_size": plan.image_size,
        "eval_size": plan.eval_size,
        "settings": plan.settings,
        "plan": asdict(plan),
        "protocol": {key: setting.describe() for key, setting in release.protocol.items()},
        "deviations": deviations,
        "evaluator": f"ADM metrics (vqar.eval.adm) with {inception.path.name}, resize {inception.resize}",
        "shards_drawn": counts["shards_drawn"],
        "shards_reused": counts["shards_reused"],
        "time": times,
        "environment": environment(par),
        "files": paths,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(report, indent=1, default=str) + "\n")
    text = render(report)
    atomic_write_text(out / "results.md", text)
    print(text, end="")
    return report
