"""Sampling speed: LlamaGen-style GPT on VQ codes vs RQ-Transformer on RQ codes, side by side in one run.

As in the RQ-Transformer paper's throughput experiment (Figure 4; the official `measure_throughput`), both models
have random weights and (nearly) equal parameter counts, K=16384 codes, and generate the same images:

    small grid:  GPT over 8x8x1 codes    vs  RQ-Transformer over 4x4x4 codes
    large grid:  GPT over 16x16x1 codes  vs  RQ-Transformer over 8x8x4 codes

at batch sizes 16, 64 and 256, in fp32 and with bf16 autocast, with the KV cache, and without it at the smallest
setting (the reference of `vqar.testing`, which reruns the teacher-forced forward pass before every code). It
prints images per second, the RQ/GPT speed ratio, and the achieved decode FLOP/s against this machine's matmul peak
measured in the same run.

    python benchmarks/sampling.py                  # the full table (~10 minutes on 2 CPU cores)
    python benchmarks/sampling.py --quick          # batch 16 only
    python benchmarks/sampling_vs.py REV           # this table beside the one of git revision REV, interleaved
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import positive_int_list
from vqar.ar import GPT, GPTConfig, RQTransformer, RQTransformerConfig
from vqar.sampling import SamplingSettings, generate
from vqar.testing import generate_uncached

K = 16384
WIDTH, HEADS = 512, 8
GPT_LAYERS = 13
RQ_BODY, RQ_HEAD = 14, 3  # about the split of the paper's 1.4B model (42 spatial + 6 depth layers)
CODE_DIM = 64


def build_gpt(grid: int) -> GPT:
    cfg = GPTConfig(vocab_size=K, code_shape=[grid, grid], dim=WIDTH, n_layer=GPT_LAYERS, n_head=HEADS,
                    num_classes=1000)  # fmt: skip
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)
    return model


def build_rq(grid: int, depth: int) -> RQTransformer:
    cfg = RQTransformerConfig(
        vocab_size=K,
        code_shape=[grid, grid, depth],
        code_dim=CODE_DIM,
        dim=WIDTH,
        n_head=HEADS,
        n_layer=RQ_BODY,
        n_depth_layer=RQ_HEAD,
        num_classes=1000,
        class_dropout_prob=0.1,
    )
    return RQTransformer(cfg, code_embeddings=torch.randn(K, CODE_DIM)).eval()


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def gpt_flops_per_image(model: GPT) -> float:
    """Matmul FLOPs of one generated image: per step, every layer's weights (12 d^2 MACs), attention over the
    cached prefix (2 d MACs per cached token), and the output projection (d K)."""
    d, layers, steps = model.cfg.dim, model.cfg.n_layer, model.cfg.num_positions
    per_layer = sum(2 * (12 * d * d + 2 * d * (t + 1)) for t in range(steps))
    return layers * per_layer + steps * 2 * d * K


def rq_flops_per_image(model: RQTransformer) -> float:
    e, (h, w, depth) = model.cfg.dim, model.cfg.code_shape
    positions = h * w
    body = model.cfg.n_layer * sum(2 * (12 * e * e + 2 * e * (t + 1)) for t in range(positions))
    head = positions * model.cfg.n_depth_layer * sum(2 * (12 * e * e + 2 * e * (t + 1)) for t in range(depth))
    return body + head + positions * depth * 2 * e * K


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def images_per_second(model, batch: int, precision: str, use_cache: bool = True) -> float:
    cond = torch.randint(0, 1000, (batch,))
    sample = generate if use_cache else generate_uncached
    settings = SamplingSettings(top_k=1024)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.no_grad()
    with context:
        sample(model, cond[:2], settings)  # warm-up
        start = time.perf_counter()
        sample(model, cond, settings)
        return batch / (time.perf_counter() - start)


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX); without it bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.cuda.is_available()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch size 16 only")
    parser.add_argument("--batch-sizes", default="16,64,256", type=positive_int_list, help="comma-separated")
    parser.add_argument("--bf16", action="store_true", help="measure bf16 even where the CPU emulates it")
    args = parser.parse_args()
    torch.manual_seed(0)
    batches = [16] if args.quick else args.batch_sizes
    precisions = ("fp32", "bf16") if native_bf16() or args.bf16 else ("fp32",)
    peaks = {p: matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16) for p in precisions}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "bf16" not in precisions:
        print("this CPU has no native bf16 (avx512_bf16 / amx_bf16): bf16 rows skipped (--bf16 forces them)")
    print("matmul peak (2048^3): " + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()))
    print()
    header = (
        "| codes | batch | precision | GPT images/s | RQ images/s | RQ / GPT | GPT GFLOP/s (% peak) | "
        "RQ GFLOP/s (% peak) |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    grids = [(8, 4), (16, 8)]
    for gpt_grid, rq_grid in grids:
        gpt, rq = build_gpt(gpt_grid), build_rq(rq_grid, 4)
        gpt_flops, rq_flops = gpt_flops_per_image(gpt), rq_flops_per_image(rq)
        label = f"{gpt_grid}x{gpt_grid}x1 vs {rq_grid}x{rq_grid}x4"
        for batch in batches:
            for precision in precisions:
                a = images_per_second(gpt, batch, precision)
                b = images_per_second(rq, batch, precision)
                peak = peaks[precision]
                print(
                    f"| {label} | {batch} | {precision} | {a:.2f} | {b:.2f} | {b / a:.2f}x | "
                    f"{a * gpt_flops / 1e9:.0f} ({100 * a * gpt_flops / peak:.0f}%) | "
                    f"{b * rq_flops / 1e9:.0f} ({100 * b * rq_flops / peak:.0f}%) |",
                    flush=True,
                )
        print(
            f"|   | parameters: GPT {params(gpt) / 1e6:.1f}M, RQ {params(rq) / 1e6:.1f}M; "
            f"decode GFLOP/image: GPT {gpt_flops / 1e9:.2f}, RQ {rq_flops / 1e9:.2f} |  |  |  |  |  |  |"
        )
    print()
    gpt, rq = build_gpt(8), build_rq(4, 4)
    print("KV cache (8x8x1 vs 4x4x4, batch 16, fp32): images/s with / without the cache")
    for name, model in (("GPT", gpt), ("RQ", rq)):
        cached = images_per_second(model, 16, "fp32")
        uncached = images_per_second(model, 16, "fp32", use_cache=False)
        print(f"  {name}: {cached:.2f} / {uncached:.2f} = {cached / uncached:.1f}x")


if __name__ == "__main__":
    main()
