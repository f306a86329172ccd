"""A small, repeatable mutation check of the core: named mutations of real lines, each applied alone to a copy of
`src/`, and the test files that should notice.

Each mutation names a file under src/vqar, an exact snippet that must occur there exactly once (the script stops
before running anything when one does not: the list must not rot silently), its replacement, and the test files
that should kill it. The core modules it covers: the quantizers (quantize/vector.py, residual.py, codebook.py),
the sampling filters, loop and settings (sampling/filters.py, generate.py, settings.py: guidance and cfg_interval
included), the stage-1 loss (tokenizers/losses.py), the AR losses (train/ar.py, train/text.py, the
RQ-Transformer's soft targets) and the weight EMA that a run exports in place of its raw weights (train/ema.py).
The first four are the deliberate bugs of the issue that asked for this check.

How it runs: `src/` is copied once to a temporary folder; each mutation is written into the copy, the tests run as
`python -m pytest -x -q -p no:cacheprovider <tests>` from the repository root with PYTHONPATH=<copy>/src (ahead of
the editable install's path entry) and without writing bytecode (a mutation and its restore can share a size and
an mtime second, which would let a stale .pyc survive), then the file is restored. A small pytest plugin in the
copy checks in every run that `vqar` is imported from the copy, so a mutation can never be "survived" by testing
the untouched tree. An unmutated baseline over the union of the tests runs first and must pass. The working tree is
never modified.

    python benchmarks/mutation.py                  # every mutation (`make mutation`; ~8 minutes on 2 cores)
    python benchmarks/mutation.py --list           # names, files and tests
    python benchmarks/mutation.py --only NAME ...  # some mutations (repeatable), after a baseline of their tests
    python benchmarks/mutation.py --json out.json  # also write the results
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GUARD_EXIT = 97  # the plugin's exit status when vqar does not come from the mutated copy
TIMEOUT_S = 300  # a mutation that makes the tests run this long counts as killed (a hang is noticed)

SAMPLING = ("tests/test_sampling.py", "tests/test_sampling_inputs.py")
QUANTIZE = ("tests/test_quantize.py",)
LOSSES = ("tests/test_losses.py",)
SPECULATIVE = ("tests/test_speculative.py::test_one_check_of_a_draft_gives_exactly_the_model_distribution",
               "tests/test_speculative.py::test_gpt_samples_follow_the_exact_distribution")


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # under src/vqar
    find: str  # must occur exactly once in the file
    replace: str
    tests: tuple[str, ...]  # test files (or node ids) that should kill it, cheapest first


MUTATIONS = [
    # ---------------------------------------------------------------- the deliberate bugs
    Mutation("top_p_sample_keeps_one_fewer", "sampling/filters.py",
             "logits.masked_fill(before > top_p,", "logits.masked_fill(cumulative > top_p,", SAMPLING),
    Mutation("rq_residual_wrong_sign", "quantize/residual.py",
             "residual = residual - q\n", "residual = residual + q\n", QUANTIZE),
    Mutation("rq_loss_last_depth_only", "quantize/residual.py",
             "loss = self.beta * commitment", "loss = self.beta * commitments[-1]", QUANTIZE + LOSSES),
    Mutation("cfg_interval_off_by_one", "sampling/settings.py",
             "position - 1 <= interval", "position <= interval", SAMPLING),
    # ---------------------------------------------------------------- sampling filters and guidance
    Mutation("guide_wrong_base", "sampling/filters.py",
             "return uncond + scale * (cond - uncond)", "return cond + scale * (cond - uncond)", SAMPLING),
    Mutation("guide_halves_swapped", "sampling/filters.py",
             "cond, uncond = logits.float().chunk(2, dim=0)", "uncond, cond = logits.float().chunk(2, dim=0)",
             SAMPLING),
    Mutation("filter_top_k_drops_the_kth", "sampling/filters.py",
             "logits.masked_fill(logits < kth,", "logits.masked_fill(logits <= kth,", SAMPLING),
    Mutation("filter_top_p_drops_the_crossing_code", "sampling/filters.py",
             "remove[..., 1:] = remove[..., :-1].clone()", "remove[..., 1:] = remove[..., 1:].clone()", SAMPLING),
    Mutation("filter_top_p_may_drop_every_code", "sampling/filters.py",
             "remove[..., 0] = False", "remove[..., 0] = remove[..., 0]", SAMPLING),
    Mutation("sample_temperature_multiplies", "sampling/filters.py",
             "logits = logits.float() / max(temperature, 1e-5)", "logits = logits.float() * max(temperature, 1e-5)",
             SAMPLING),
    Mutation("sample_kth_off_by_one", "sampling/filters.py",
             "kth = values[..., k - 1 : k]", "kth = values[..., k : k + 1]", SAMPLING),
    Mutation("sample_tie_fallback_needs_every_row", "sampling/filters.py",
             "bool((values[..., -1:] == kth).any())", "bool((values[..., -1:] == kth).all())", SAMPLING),
    Mutation("sample_compiled_kth_off_by_one", "sampling/filters.py",
             "kth = values.narrow(-1, k - 1, 1)", "kth = values.narrow(-1, k, 1)", SAMPLING),
    Mutation("sample_tied_column_draws_its_first_code", "sampling/filters.py",
             "(left_out.cumsum(-1) == n + 1)", "(left_out.cumsum(-1) == 1)", SAMPLING),
    Mutation("sample_top_p_keeps_every_tied_code", "sampling/filters.py",
             "tied = torch.minimum(tied, reach.clamp_min(0).to(tied.dtype))", "tied = tied", SAMPLING),
    Mutation("sample_cdf_search_left", "sampling/filters.py",
             "torch.searchsorted(cdf, u, right=True)", "torch.searchsorted(cdf, u, right=False)", SAMPLING),
    # ---------------------------------------------------------------- the generation loop and its settings
    Mutation("generate_guided_at_next_position", "sampling/generate.py",
             "if settings.guided_at(start) else 1.0", "if settings.guided_at(start + 1) else 1.0", SAMPLING),
    Mutation("generate_unguided_reads_null_half", "sampling/generate.py",
             "else logits[:n]", "else logits[-n:]", SAMPLING),
    Mutation("generate_depth0_filters_everywhere", "sampling/generate.py",
             "codes[:, block.positions, d] = pick(logits, f,",
             "codes[:, block.positions, d] = pick(logits, run.filters[0],", SAMPLING),
    Mutation("image_noise_ignores_the_index", "sampling/generate.py",
             "torch.rand(count, generator=image_stream(seed, i))", "torch.rand(count, generator=image_stream(seed, 0))",
             SAMPLING),
    Mutation("cfg_interval_one_more", "sampling/settings.py",
             "position - 1 <= interval", "position - 2 <= interval", SAMPLING),
    Mutation("guided_at_first_code_clause_dropped", "sampling/settings.py",
             "position == 0 or interval", "position < 0 or interval", SAMPLING),
    Mutation("guidance_on_at_scale_one", "sampling/settings.py",
             "return self.cfg_scale > 1.0", "return self.cfg_scale >= 1.0", SAMPLING),
    # ---------------------------------------------------------------- blocks of codes per call (VAR, windows)
    Mutation("var_cfg_ramp_shifted_by_one_scale", "sampling/settings.py",
             "(block / (blocks - 1) if blocks > 1 else 1.0)", "((block + 1) / blocks if blocks > 1 else 1.0)",
             ("tests/test_var_model.py", "tests/test_var_model_random.py")),
    Mutation("block_attention_hides_a_query_from_itself", "ar/layers.py",
             "<= query_at  # (L, keys)", "< query_at  # (L, keys)",
             ("tests/test_compiled.py::test_a_block_of_positions_decodes_as_one_position_at_a_time",)),
    # ---------------------------------------------------------------- speculative decoding
    Mutation("speculative_accepts_every_draft", "sampling/speculative.py",
             "    return uniform * q < p\n", "    return torch.ones_like(p, dtype=torch.bool)\n", SPECULATIVE),
    Mutation("speculative_replaces_from_p_not_the_residual", "sampling/speculative.py",
             "replacement = residual_draw(p_r, q[window.rows[:, 0], slot],",
             "replacement = residual_draw(p_r, 0 * q[window.rows[:, 0], slot],", SPECULATIVE),
    Mutation("window_mask_takes_the_first_row_start", "ar/layers.py",
             "query_at = start.view(-1, 1, 1, 1) + offsets", "query_at = start[:1].view(-1, 1, 1, 1) + offsets",
             ("tests/test_speculative.py::test_rows_at_different_positions_decode_as_each_row_alone",)),
    Mutation("written_prefix_ends_at_the_first_row", "ar/layers.py",
             "end = min(int(start.max())", "end = min(int(start[0])",
             ("tests/test_compiled.py::test_attention_over_a_static_cache_sees_each_querys_prefix_only",)),
    Mutation("per_depth_first_value_everywhere", "sampling/settings.py",
             "        return list(value)\n", "        return [value[0]] * depth\n", SAMPLING),
    # ---------------------------------------------------------------- vector quantizer
    Mutation("vq_commitment_not_detached", "quantize/vector.py",
             "commitment = F.mse_loss(h, q.detach())", "commitment = F.mse_loss(h, q)", QUANTIZE),
    Mutation("vq_beta_ignored", "quantize/vector.py",
             "loss = self.beta * commitment", "loss = commitment", QUANTIZE),
    Mutation("vq_codebook_loss_for_ema", "quantize/vector.py",
             "if not self.codebook.ema:", "if self.codebook.ema:", QUANTIZE),
    Mutation("entropy_penalty_sign", "quantize/vector.py",
             "return sample_entropy - codebook_entropy", "return sample_entropy + codebook_entropy", QUANTIZE),
    # ---------------------------------------------------------------- residual quantizer
    Mutation("rq_commitment_against_own_code", "quantize/residual.py",
             "commitments.append(F.mse_loss(flat, partial_sum))", "commitments.append(F.mse_loss(flat, q))",
             QUANTIZE),
    Mutation("rq_codebook_loss_summed", "quantize/residual.py",
             "loss = loss + torch.stack(codebook_losses).mean()", "loss = loss + torch.stack(codebook_losses).sum()",
             QUANTIZE),
    Mutation("rq_no_straight_through", "quantize/residual.py",
             "quantized = flat + (partial_sum - flat).detach()", "quantized = partial_sum", QUANTIZE),
    Mutation("rq_soft_codes_sign", "quantize/residual.py",
             "probs.append((-distances / temperature).softmax(-1))",
             "probs.append((distances / temperature).softmax(-1))", QUANTIZE),
    Mutation("rq_soft_codes_wrong_residual", "quantize/residual.py",
             "lookup(distances.argmin(-1))", "lookup(distances.argmax(-1))", QUANTIZE),
    # ---------------------------------------------------------------- codebook
    Mutation("ema_count_weight_swapped", "quantize/codebook.py",
             "add_(counts, alpha=1 - self.decay)", "add_(counts, alpha=self.decay)", QUANTIZE),
    Mutation("laplace_smoothing_sign", "quantize/codebook.py",
             "(self.cluster_size_ema + self.eps)", "(self.cluster_size_ema - self.eps)", QUANTIZE),
    Mutation("dead_codes_inverted", "quantize/codebook.py",
             "dead = self.cluster_size_ema < self.dead_threshold", "dead = self.cluster_size_ema > self.dead_threshold",
             QUANTIZE),
    Mutation("nearest_is_farthest", "quantize/codebook.py",
             "return _squared_distances(x, vectors).argmin(1)", "return _squared_distances(x, vectors).argmax(1)",
             QUANTIZE),
    Mutation("kmeans_init_counts_codes_dead", "quantize/codebook.py",
             "self.cluster_size_ema.fill_(1.0)", "self.cluster_size_ema.fill_(0.0)", QUANTIZE),
    Mutation("usage_counts_repeated_codes_only", "quantize/codebook.py",
             "usage = (counts > 0)", "usage = (counts > 1)", QUANTIZE),
    # ---------------------------------------------------------------- stage-1 loss
    Mutation("quantizer_weight_ignored", "tokenizers/losses.py",
             "loss = nll + cfg.quantizer_weight * out.quant.loss", "loss = nll + out.quant.loss", LOSSES),
    Mutation("recon_l1_l2_swapped", "tokenizers/losses.py",
             'F.mse_loss(recon, images) if cfg.recon == "l2" else F.l1_loss(recon, images)',
             'F.l1_loss(recon, images) if cfg.recon == "l2" else F.mse_loss(recon, images)', LOSSES),
    Mutation("recon_weight_ignored", "tokenizers/losses.py", "nll = cfg.recon_weight * rec", "nll = rec", LOSSES),
    Mutation("disc_start_off_by_one", "tokenizers/losses.py",
             "step >= self.cfg.disc_start", "step > self.cfg.disc_start", LOSSES),
    Mutation("r1_penalty_not_halved", "tokenizers/losses.py",
             "self.cfg.r1_weight / 2 * penalty", "self.cfg.r1_weight * penalty",
             LOSSES),
    # ---------------------------------------------------------------- AR losses
    Mutation("ar_loss_weights_swapped", "train/ar.py",
             "c.img_weight * image + c.txt_weight * caption", "c.txt_weight * image + c.img_weight * caption",
             LOSSES),
    Mutation("ar_soft_targets_averaged_over_codes", "ar/losses.py",
             "log_softmax(flat.float(), dim=-1)).sum(-1).mean()", "log_softmax(flat.float(), dim=-1)).mean()",
             LOSSES),
    Mutation("text_loss_unshifted", "train/text.py",
             "ids[:, 1:].reshape(-1)", "ids[:, :-1].reshape(-1)",
             LOSSES + ("tests/test_text.py::test_rq_text_head_loss_and_soft_targets",)),
    Mutation("soft_targets_residual_wrong_direction", "ar/rq_transformer.py",
             "residuals = vectors.flip(-2).cumsum(-2).flip(-2)", "residuals = vectors.cumsum(-2)", LOSSES),
    # ---------------------------------------------------------------- the weight EMA a run exports
    Mutation("ema_decay_and_its_complement_swapped", "train/ema.py",
             "torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)",
             "torch._foreach_lerp_(ema_params, params, self.decay)",
             ("tests/test_train.py::test_ema_step_matches_a_hand_computed_average",)),
]  # fmt: skip

GUARD_PLUGIN = '''"""Stops the run unless vqar comes from the mutated copy (written by benchmarks/mutation.py)."""
import os

import pytest


def pytest_configure(config):
    import vqar

    expected = os.path.realpath(os.environ["VQAR_MUTATION_SRC"])
    found = os.path.realpath(vqar.__file__)
    if not found.startswith(expected + os.sep):
        pytest.exit(f"vqar was imported from {found}, not from the mutated copy under {expected}", {code})
'''


@dataclass
class Result:
    name: str
    file: str
    killed: bool
    seconds: float
    detail: str  # the first failing test, "timeout", "collection error", or "" for a survivor


def check_snippets(src: Path, mutations: list[Mutation]) -> None:
    """Every snippet occurs exactly once and differs from its replacement; names are unique. Raises listing all."""
    problems, names = [], set()
    for m in mutations:
        if m.name in names:
            problems.append(f"{m.name}: duplicate name")
        names.add(m.name)
        path = src / "vqar" / m.file
        if not path.is_file():
            problems.append(f"{m.name}: no file src/vqar/{m.file}")
            continue
        count = path.read_text().count(m.find)
        if count != 1:
            problems.append(f"{m.name}: snippet {m.find!r} occurs {count} times in src/vqar/{m.file} (must be once)")
        if m.find == m.replace:
            problems.append(f"{m.name}: replacement equals the snippet")
        for test in m.tests:
            if not (REPO / test.split("::")[0]).is_file():
                problems.append(f"{m.name}: no test file {test}")
    if problems:
        raise SystemExit("the mutation list does not fit the code:\n  " + "\n  ".join(problems))


def run_tests(tests: tuple[str, ...] | list[str], env: dict[str, str]) -> tuple[int, str, float]:
    """(exit status, output, seconds) of one pytest run; status 124 when it ran past TIMEOUT_S."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "vqar_mutation_guard"]
    start = time.perf_counter()
    try:
        done = subprocess.run([*command, *tests], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)  # fmt: skip
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        status, output = 124, str(err.stdout or "")
    seconds = time.perf_counter() - start
    if status == GUARD_EXIT:
        raise SystemExit(f"the tests did not import the mutated copy:\n{output[-2000:]}")
    if status not in (0, 1, 2, 124):  # 2: interrupted (a collection error); 3-5: pytest itself failed
        raise SystemExit(f"pytest exited with status {status} (tests {' '.join(tests)}):\n{output[-3000:]}")
    return status, output, seconds


def first_failure(status: int, output: str) -> str:
    if status == 124:
        return "timeout"
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    if found:
        return found.group(1).split("/")[-1]
    return "collection error" if status == 2 else "failed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()

    check_snippets(REPO / "src", MUTATIONS)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:40s} {m.file:24s} {' '.join(m.tests)}")
        return 0
    unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
    if unknown:
        raise SystemExit(f"unknown mutation(s): {', '.join(unknown)} (see --list)")
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]

    with tempfile.TemporaryDirectory(prefix="vqar-mutation-") as tmp:
        copy = Path(tmp) / "src"
        shutil.copytree(REPO / "src", copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        check_snippets(copy, chosen)  # the copy is what gets mutated (the tree may have moved meanwhile)
        plugin = Path(tmp) / "plugin"
        plugin.mkdir()
        (plugin / "vqar_mutation_guard.py").write_text(GUARD_PLUGIN.replace("{code}", str(GUARD_EXIT)))
        env = {**os.environ, "PYTHONPATH": f"{copy}{os.pathsep}{plugin}", "PYTHONDONTWRITEBYTECODE": "1",
               "VQAR_MUTATION_SRC": str(copy)}  # fmt: skip

        baseline = list(dict.fromkeys(t for m in chosen for t in m.tests))
        status, output, seconds = run_tests(baseline, env)
        if status != 0:
            raise SystemExit(f"the unmutated baseline fails ({' '.join(baseline)}):\n{output[-3000:]}")
        print(f"baseline: {' '.join(baseline)} pass on the copy in {copy} ({seconds:.0f} s)", flush=True)

        results = []
        total_start = time.perf_counter()
        for i, m in enumerate(chosen, 1):
            path = copy / "vqar" / m.file
            original = path.read_text()
            path.write_text(original.replace(m.find, m.replace, 1))
            try:
                status, output, seconds = run_tests(m.tests, env)
            finally:
                path.write_text(original)
            killed = status != 0
            results.append(Result(m.name, m.file, killed, seconds, first_failure(status, output) if killed else ""))
            print(f"[{i}/{len(chosen)}] {m.name}: {'killed' if killed else 'SURVIVED'} ({seconds:.0f} s)", flush=True)
        wall = time.perf_counter() - total_start

    print()
    print("| mutation | file | killed? | seconds | first failing test |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r.name} | {r.file} | {'yes' if r.killed else '**no**'} | {r.seconds:.0f} | {r.detail} |")
    survivors = [r.name for r in results if not r.killed]
    rate = len(survivors) / len(results)
    print(f"\n{len(results)} mutations, {len(results) - len(survivors)} killed, {len(survivors)} survived: "
          f"survival rate {100 * rate:.1f}% ({wall:.0f} s)")  # fmt: skip
    if survivors:
        print("survivors: " + ", ".join(survivors))
    if args.json:
        summary = {"mutations": len(results), "survived": survivors, "survival_rate": rate, "seconds": wall}
        args.json.write_text(json.dumps({"summary": summary, "results": [asdict(r) for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
