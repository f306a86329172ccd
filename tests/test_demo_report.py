"""The demo's report states where its times were measured: the CPU with its SIMD level, and the threads."""

from __future__ import annotations

from vqar.demo import format_report
from vqar.utils.device import cpu_kind, cpu_simd_level

REPORT = {
    "tokenizer_psnr_db": 25.9, "tokenizer_usage_percent": 60.0, "ar_model_class": "RQTransformer",
    "ar_val_nll_per_code": 2.1, "ar_val_code_accuracy": 0.5, "samples": 500, "sampling_images_per_second": 90.0,
    "cfg_scale": 2.0, "class_accuracy": 0.99, "class_accuracy_without_guidance": 0.9, "domain_fid": 3.0,
    "domain_fid_reference": "500 held-out real digits",
    "seconds": {"tokenizer": 120.0, "codes": 6.0, "ar": 100.0, "sampling": 14.0},
    "cpu": "AMD EPYC 7B13 (AVX2)", "threads": "2 threads (2 available cores), OpenMP wait OMP_WAIT_POLICY=PASSIVE",
    "outputs": {"tokenizer": "t", "reconstructions": "r", "codes": "c", "ar_model": "runs/demo/ar",
                "sample_grid": "g", "samples_npz": "n"},
}  # fmt: skip


def test_simd_level_names_the_widest_vector_instructions():
    assert cpu_simd_level({"avx2", "avx512f", "avx512_bf16"}) == "AVX-512 bf16"
    assert cpu_simd_level({"avx2", "avx512f"}) == "AVX-512"
    assert cpu_simd_level({"sse4_2", "avx2", "fma"}) == "AVX2"
    assert cpu_simd_level({"sse4_2"}) == "below AVX2"
    assert cpu_simd_level() in cpu_kind()


def test_report_prints_the_cpu_and_threads_beside_the_total_time():
    total = next(line for line in format_report(REPORT).splitlines() if "total" in line)
    assert "4.0 min on AMD EPYC 7B13 (AVX2), 2 threads" in total


def test_a_quick_report_says_it_is_a_smoke_test_and_the_targets_are_the_full_runs():
    report = {**REPORT, "quick": True, "class_accuracy": 0.1}
    text = format_report(report)
    assert "--quick: a smoke test" in text.splitlines()[1]
    accuracy = next(line for line in text.splitlines() if "class accuracy" in line)
    assert "the full run's target: >= 80%" in accuracy
    full = format_report({**REPORT, "quick": False})
    assert "smoke test" not in full and "(target >= 80%" in full
