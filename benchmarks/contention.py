"""Throughput on a busy machine: idle vs beside a competing process, torch's thread defaults vs vqar's policy.

Each measurement runs in a fresh process, so the thread policy (`vqar.utils.threads`) is applied as at the start of
`vqar`: the policy `torch` sets `VQAR_THREADS=torch` (torch's defaults: one spinning OpenMP thread per core), the
policy `vqar` leaves the environment alone. The workloads are the demo's own sizes, random weights (the work of a
step does not depend on the weights):

- `sample`: the rq-mnist RQ-Transformer (RQ-XS, 4x4x4 codes, K=256, 10 classes; the demo's until 2026-12-05,
  which now trains 3 + 1 of its layers, a lighter load: the recorded figures are RQ-XS's) drawing batches of 100
  digits with CFG 2 and decoding them with the demo tokenizer (rqvae-mnist); images/s;
- `train-tokenizer`: training steps of the demo tokenizer on batches of 64 bundled digits; steps/s;
- `train-ar`: training steps of that RQ-Transformer on batches of 64 code stacks; steps/s.

Competitors, started before the measurement and stopped after it: `torch` is another PyTorch process doing
1024x1024 matmuls with torch's default threads and wait policy (the issue's case), `busy` a Python busy loop that
keeps one core busy. The goal: contended throughput >= 40% of idle.

    python benchmarks/contention.py [--seconds 10] [--workloads sample,train-tokenizer,train-ar]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import positive_float
from vqar.utils.device import cpu_kind

WORKLOADS = ("sample", "train-tokenizer", "train-ar")
POLICIES = {"torch": {"VQAR_THREADS": "torch"}, "vqar": {}}
COMPETITORS = {
    "torch": "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a",
    "busy": "while True:\n    pass",
}
# The variables any policy sets: stripped from the environment first, so each run starts from the same one.
POLICY_VARIABLES = ("VQAR_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                    "KMP_BLOCKTIME")  # fmt: skip


def _rate(step, items: int, seconds: float) -> float:
    """Items per second of `step` (which handles `items` items) over at least `seconds`, after one warm-up call."""
    step()
    done, start = 0, time.perf_counter()
    while True:
        step()
        done += items
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def _demo_models():
    import torch

    from vqar.ar import get_architecture
    from vqar.ar.registry import RQ_SIZES
    from vqar.ar.rq_transformer import RQTransformerConfig
    from vqar.tokenizers import Tokenizer
    from vqar.train import tokenizer as tokenizer_training

    torch.manual_seed(0)
    tok_cfg = tokenizer_training.load_run_config("rqvae-mnist")
    tokenizer = Tokenizer(tok_cfg.model).eval()
    cfg = RQTransformerConfig(vocab_size=256, code_shape=[4, 4, 4], code_dim=32, num_classes=10,
                              class_dropout_prob=0.1, resid_dropout_p=0.1, **RQ_SIZES["RQ-XS"])  # fmt: skip
    return tok_cfg, tokenizer, get_architecture("rq").build(cfg, tokenizer)


def worker(workload: str, seconds: float) -> dict:
    import vqar  # noqa: F401 - first, as `vqar` does: it sets the OpenMP wait policy before torch loads
    from vqar.utils.threads import apply_thread_policy, thread_summary

    apply_thread_policy()
    import torch

    from vqar.ar import get_architecture
    from vqar.sampling import SamplingSettings, draw, make_conditions
    from vqar.train.ar_config import LossConfig
    from vqar.train.config import TrainConfig
    from vqar.train.optim import StepGuard, adamw
    from vqar.train.tokenizer import TokenizerTask

    tok_cfg, tokenizer, model = _demo_models()
    if workload == "sample":
        model.eval()
        conditions = make_conditions(model, classes=list(range(10)), n_per_condition=10)
        settings = SamplingSettings(cfg_scale=2.0)

        def step():
            draw(model, conditions, settings, tokenizer=tokenizer, batch_size=100)

        items, unit = 100, "images/s"
    elif workload == "train-tokenizer":
        from vqar.data import build_datasets, collate_samples

        train_set, _ = build_datasets(tok_cfg.data)
        batch = collate_samples([train_set[i] for i in range(64)])
        task = TokenizerTask(tok_cfg, torch.device("cpu"))

        def step():
            task.train_step(batch, 1000)

        items, unit = 1, "steps/s"
    else:
        model.train()
        optimizer, guard = adamw(model, TrainConfig(lr=1e-3)), StepGuard()
        codes = torch.randint(256, (64, 4, 4, 4))
        labels = torch.randint(10, (64,))
        arch = get_architecture("rq")

        def step():
            loss, _ = arch.loss(model, model(codes, labels), codes, LossConfig())
            guard.step(loss, optimizer, 1.0)

        items, unit = 1, "steps/s"
    return {"rate": _rate(step, items, seconds), "unit": unit, "threads": thread_summary()}


def measure(workload: str, policy: str, competitor: str | None, seconds: float) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in POLICY_VARIABLES}
    rival = None
    if competitor is not None:
        # The competitor keeps torch's defaults (no vqar import): the other job on the machine is not ours.
        rival = subprocess.Popen([sys.executable, "-c", COMPETITORS[competitor]], env=base)
        time.sleep(2.0)  # past its start-up
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", workload, "--seconds", str(seconds)],
                              env={**base, **POLICIES[policy]}, capture_output=True, text=True, check=True)  # fmt: skip
    finally:
        if rival is not None:
            rival.terminate()
            rival.wait()
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=positive_float, default=10.0, help="measuring time per cell (default 10)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, of " + ", ".join(WORKLOADS))
    parser.add_argument("--competitors", default=",".join(COMPETITORS), help="comma-separated: torch, busy")
    parser.add_argument("--worker", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.seconds)))
        return
    workloads = [w for w in args.workloads.split(",") if w]
    competitors = [c for c in args.competitors.split(",") if c]
    for name in workloads + competitors:
        if name not in WORKLOADS and name not in COMPETITORS:
            parser.error(f"unknown workload or competitor {name!r}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"CPU: {cpu_kind()}, {os.cpu_count()} CPUs; load average before: {load}")
    header = ["workload", "policy", "threads", "idle"] + [f"beside {c}" for c in competitors]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for workload in workloads:
        for policy in POLICIES:
            idle = measure(workload, policy, None, args.seconds)
            cells = [f"{idle['rate']:.2f} {idle['unit']}"]
            for competitor in competitors:
                busy = measure(workload, policy, competitor, args.seconds)
                cells.append(f"{busy['rate']:.2f} ({100 * busy['rate'] / idle['rate']:.0f}%)")
            print(f"| {workload} | {policy} | {idle['threads']} | " + " | ".join(cells) + " |", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
