"""Every GPU measurement of issue 18 in one command (about 8 minutes on one H200), written to a JSON file with the
environment and every figure, section by section, so that a run cut short keeps what it measured:

    G1  eager vs compiled sampling: GPT-B (111M) on 16x16 codes, bf16, batch 1, 16, 64, 256 (images/s, ratio).
        Goal: compiled >= 3x eager at batch <= 16.
    G2  the compiled decode step against the memory roofline: the bytes a step must read (bf16 weights and the
        filled KV cache) over the GPU's memory bandwidth (H200: 4.8 TB/s). Goal: >= 60% at batch 1 to 16.
    G3  the RQ-Transformer paper's Figure 4 on one GPU: RQ-1.4B on 8x8x4 codes vs a GPT of equal size (GPT-XXL,
        1.4B) on 16x16 codes, K=16384, batch 100, 200, 500, compiled, bf16 (images/s, ratio; the paper: 4.2x at
        100, 5.6x at 200 on an A100, where the GPT ran out of memory at 500). Goal: >= 5x at batch >= 200.
    T   training throughput for the record: GPT-L (343M), batch 256, 16x16 codes, bf16 autocast: tokens/s and MFU
        (6 * parameters * tokens/s over the GPU's dense bf16 peak, H200: 989 TFLOP/s). Goal: MFU >= 40%.
    G4  speculative Jacobi decoding vs plain sampling (issue 24): GPT-B on 16x16 codes, bf16, compiled, batch 1
        and 16 (images/s, ratio, model calls per image, share of drafts accepted). Random weights make drafts
        fail more often than a trained model's would: the ratio is a floor.
    G5  VAR-d16 (issue 23) at 256 px, 10 scales, K=4096, CFG 2.5 on VAR's linear ramp: batch 1, 16, 64, compiled
        vs vqar's own eager path (images/s of AR sampling, the VQVAE decoding apart).

Random weights throughout (throughput does not depend on them; the logits are made non-uniform so that top-k
has work to do). Without CUDA (or with --tiny) the same sections run tiny models, so a CPU machine checks that
the script does not rot; those figures mean nothing.

    python benchmarks/gpu.py                                   # on the GPU machine: benchmarks/results/gpu-<date>.json
    python benchmarks/gpu.py --tiny --out /tmp/gpu-tiny.json   # the CPU check
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from common import name_list
from vqar.ar import GPT, GPT_SIZES, RQ_SIZES, GPTConfig, RQTransformer, RQTransformerConfig
from vqar.sampling import SamplingSettings, generate
from vqar.sampling.speculative import DecodeStats

K = 16384
HBM_BYTES_PER_S = 4.8e12  # H200
BF16_PEAK_FLOPS = 989e12  # H200, dense


def environment() -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "machine": platform.machine(), "date": datetime.date.today().isoformat()}  # fmt: skip
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cudnn"] = torch.backends.cudnn.version()
        try:
            env["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as err:
            env["nvidia_smi"] = f"unavailable: {err}"
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gpt(size: dict, grid: int, vocab: int, device, dtype) -> GPT:
    model = GPT(GPTConfig(vocab_size=vocab, code_shape=[grid, grid], num_classes=1000, **size))
    torch.nn.init.normal_(model.output.weight, std=0.02)
    return model.to(device, dtype).eval()


def rq(size: dict, grid: int, vocab: int, device, dtype) -> RQTransformer:
    cfg = RQTransformerConfig(vocab_size=vocab, code_shape=[grid, grid, 4], code_dim=256, num_classes=1000,
                              class_dropout_prob=0.1, **size)  # fmt: skip
    return RQTransformer(cfg, code_embeddings=torch.randn(vocab, 256)).to(device, dtype).eval()


def images_per_second(model, batch: int, compile: bool, device, settings: SamplingSettings | None = None,
                      stats: DecodeStats | None = None) -> float:
    """One generation to compile and warm up, then one timed (its model calls added to `stats`)."""
    cond = torch.randint(0, 1000, (batch,), device=device)
    settings = settings or SamplingSettings(top_k=1024, seed=0)
    with torch.no_grad():
        generate(model, cond, settings, compile=compile)
        sync(device)
        start = time.perf_counter()
        generate(model, cond, settings, compile=compile, stats=stats)
        sync(device)
    return batch / (time.perf_counter() - start)


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def g1_g2(plan: dict, device, dtype) -> dict:
    model = gpt(plan["gpt_b"], plan["grid"], plan["vocab"], device, dtype)
    rows = []
    for batch in plan["g1_batches"]:
        eager = images_per_second(model, batch, False, device)
        compiled = images_per_second(model, batch, True, device)
        steps = model.num_positions
        step_s = batch / compiled / steps
        # What a step must read: every weight once (the token embedding only its B rows, left out) and the KV cache
        # filled so far, on average half of it (keys and values, every layer).
        cfg = model.cfg
        kv_per_position = 2 * cfg.n_layer * cfg.dim * torch.finfo(dtype).bits // 8
        average_filled = cfg.prefix_length + steps / 2
        embedding = model.tok_embeddings.weight
        must_read = parameter_bytes(model) - embedding.numel() * embedding.element_size()
        must_read += batch * average_filled * kv_per_position
        rows.append({"batch": batch, "eager_images_per_s": eager, "compiled_images_per_s": compiled,
                     "compiled_over_eager": compiled / eager, "step_ms": 1000 * step_s, "bytes_per_step": must_read,
                     "roofline_fraction": must_read / step_s / HBM_BYTES_PER_S})  # fmt: skip
        print(f"G1/G2 batch {batch}: eager {eager:.2f}, compiled {compiled:.2f} images/s "
              f"({compiled / eager:.2f}x), step {1000 * step_s:.2f} ms, "
              f"{100 * rows[-1]['roofline_fraction']:.0f}% of the roofline", flush=True)  # fmt: skip
    small = [r for r in rows if r["batch"] <= 16]
    return {"rows": rows, "goal_g1_met": all(r["compiled_over_eager"] >= 3 for r in small),
            "goal_g2_met": all(r["roofline_fraction"] >= 0.6 for r in small)}  # fmt: skip


def g3(plan: dict, device, dtype) -> dict:
    rows = []
    models = {"rq": rq(plan["rq_big"], plan["grid"] // 2, plan["vocab"], device, dtype),
              "gpt": gpt(plan["gpt_big"], plan["grid"], plan["vocab"], device, dtype)}  # fmt: skip
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    for batch in plan["g3_batches"]:
        row = {"batch": batch}
        for name, model in models.items():
            try:
                row[f"{name}_images_per_s"] = images_per_second(model, batch, True, device)
            except torch.cuda.OutOfMemoryError:
                row[f"{name}_images_per_s"] = "out of memory"
                torch.cuda.empty_cache()
        if all(isinstance(row[f"{n}_images_per_s"], float) for n in models):
            row["rq_over_gpt"] = row["rq_images_per_s"] / row["gpt_images_per_s"]
        rows.append(row)
        print(f"G3 batch {batch}: {row}", flush=True)
    big = [r for r in rows if r["batch"] >= 200]
    met = all(r.get("rq_over_gpt", float("inf")) >= 5 for r in big)  # a GPT out of memory: RQ wins outright
    return {"parameters": sizes, "rows": rows, "goal_met": met}


def training(plan: dict, device) -> dict:
    model = gpt(plan["gpt_l"], plan["grid"], plan["vocab"], device, torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch, params = plan["train_batch"], sum(p.numel() for p in model.parameters())
    codes = torch.randint(0, plan["vocab"], (batch, plan["grid"], plan["grid"]), device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(codes, labels).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), codes.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(plan["train_warmup"]):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(plan["train_steps"]):
        step()
    sync(device)
    tokens_per_s = plan["train_steps"] * batch * model.num_positions / (time.perf_counter() - start)
    mfu = 6 * params * tokens_per_s / BF16_PEAK_FLOPS
    print(f"T: {tokens_per_s:.0f} tokens/s, MFU {100 * mfu:.1f}%", flush=True)
    return {"parameters": params, "batch": batch, "tokens_per_s": tokens_per_s, "mfu": mfu, "goal_met": mfu >= 0.4}


PLANS = {
    "gpu": {"grid": 16, "vocab": K, "gpt_b": GPT_SIZES["GPT-B"], "gpt_big": GPT_SIZES["GPT-XXL"],
            "rq_big": RQ_SIZES["RQ-1.4B"], "gpt_l": GPT_SIZES["GPT-L"], "g1_batches": [1, 16, 64, 256],
            "g3_batches": [100, 200, 500], "train_batch": 256, "train_warmup": 3, "train_steps": 10,
            "g4_batches": [1, 16], "g4_logit_std": 0.05, "g5_batches": [1, 16, 64], "var": "VAR-d16", "var_ch": 160,
            "var_size": 256},
    "tiny": {"grid": 4, "vocab": 256, "gpt_b": GPT_SIZES["GPT-XS"], "gpt_big": GPT_SIZES["GPT-XS"],
             "rq_big": RQ_SIZES["RQ-XS"], "gpt_l": GPT_SIZES["GPT-XS"], "g1_batches": [1, 2], "g3_batches": [2],
             "train_batch": 4, "train_warmup": 1, "train_steps": 2, "g4_batches": [1, 2], "g4_logit_std": 0.05,
             "g5_batches": [1, 2], "var": "VAR-XS", "var_ch": 32, "var_size": 64},
}  # fmt: skip


def g4(plan: dict, device, dtype) -> dict:
    model = gpt(plan["gpt_b"], plan["grid"], plan["vocab"], device, dtype)
    torch.nn.init.normal_(model.output.weight, std=plan["g4_logit_std"])  # some peaked, some flat distributions
    rows = []
    for batch in plan["g4_batches"]:
        row = {"batch": batch}
        for label, speculative in (("plain", False), ("speculative", True)):
            settings = SamplingSettings(top_k=1024, seed=0, speculative=speculative, speculative_window=16)
            stats = DecodeStats()  # the warm-up compiles the window's shape once
            row[f"{label}_images_per_s"] = images_per_second(model, batch, True, device, settings, stats)
            row[f"{label}_calls_per_image"] = stats.calls_per_image
            row[f"{label}_acceptance_rate"] = stats.acceptance_rate
        row["speculative_over_plain"] = row["speculative_images_per_s"] / row["plain_images_per_s"]
        rows.append(row)
        print(f"G4 batch {batch}: {row}", flush=True)
    return {"rows": rows}


def g5(plan: dict, device) -> dict:
    from vqar.eval.throughput import BenchConfig, build_models

    cfg = BenchConfig(model=plan["var"], f=16, d=1, c=4096, ch=plan["var_ch"], image_size=plan["var_size"],
                      cfg_scale=2.5)  # fmt: skip
    tokenizer, model = build_models(cfg, device)
    model.attach(tokenizer)
    if device.type == "cuda":
        model.to(torch.bfloat16)
        model.attach(tokenizer.to(torch.bfloat16))
    settings = SamplingSettings(cfg_scale=2.5, top_k=900, top_p=0.96, seed=0)  # VAR's README protocol
    rows = []
    for batch in plan["g5_batches"]:
        row = {"batch": batch}
        for label, compile in (("eager", False), ("compiled", True)):
            row[f"{label}_images_per_s"] = images_per_second(model, batch, compile, device, settings)
        row["compiled_over_eager"] = row["compiled_images_per_s"] / row["eager_images_per_s"]
        rows.append(row)
        print(f"G5 batch {batch}: {row}", flush=True)
    return {"parameters": sum(p.numel() for p in model.parameters()), "rows": rows}


SECTIONS = ("g1", "g3", "train", "g4", "g5")  # g1 measures g2 too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models (the default without CUDA)")
    parser.add_argument("--sections", default=",".join(SECTIONS), type=name_list(SECTIONS),
                        help="which of g1 (with g2), g3, train, g4, g5 to run, comma-separated")  # fmt: skip
    parser.add_argument("--out", help="the JSON to write (default benchmarks/results/gpu-<date>.json)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    plan = PLANS["tiny" if tiny else "gpu"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 weights are for CUDA
    out = Path(args.out or Path(__file__).parent / "results" / f"gpu-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "tiny": tiny, "device": str(device), "dtype": str(dtype)}
    torch.manual_seed(0)
    sections = {"g1": lambda: g1_g2(plan, device, dtype), "g3": lambda: g3(plan, device, dtype),
                "train": lambda: training(plan, device), "g4": lambda: g4(plan, device, dtype),
                "g5": lambda: g5(plan, device)}  # fmt: skip
    for name in args.sections:
        start = time.perf_counter()
        report[name] = sections[name]()
        report[name]["seconds"] = time.perf_counter() - start
        out.write_text(json.dumps(report, indent=1))  # after every section: a run cut short keeps its figures
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
