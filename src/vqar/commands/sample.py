"""`vqar sample`: images from a trained AR model to files, in one process or under torchrun."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from vqar.commands.common import (
    add_command,
    add_device_option,
    add_model_options,
    add_speed_options,
    class_list,
    load_ar_model,
    non_negative_int,
    output_path,
    per_depth_arg,
    positive_int,
    read_lines,
)

DETAILS = """Writes grid.png (one row per class or prompt), images/*.png and samples.npz (ADM evaluator layout) to a
new or empty --out; --overwrite replaces all of them in a folder of earlier samples. For RQ models
--top-k/--top-p/--temperature take one value or one per depth (e.g. 0.9,0.9,0.95,1)."""


def run(args: argparse.Namespace) -> int:
    from vqar.parallel import joined
    from vqar.utils.device import resolve_device

    with joined(device=resolve_device(args.device)) as par, contextlib.ExitStack() as held:  # under torchrun,
        return _sample(args, par, held)  # each rank draws its share


def settings_from(args: argparse.Namespace):
    from vqar.sampling import SamplingSettings

    settings = SamplingSettings(
        temperature=1.0 if args.temperature is None else per_depth_arg(args.temperature, float, "--temperature"),
        top_k=per_depth_arg(args.top_k, int, "--top-k"),
        top_p=per_depth_arg(args.top_p, float, "--top-p"),
        cfg_scale=args.cfg,
        cfg_interval=args.cfg_interval,
        greedy=args.greedy,
        seed=args.seed,
        cfg_schedule=args.cfg_schedule,
        smooth=args.smooth,
        speculative=args.speculative,
        speculative_window=16 if args.window is None else args.window,
        speculative_drafts=args.drafts or "mc-sjd",
        speculative_max_iterations=args.max_iterations,
    )
    settings.validate()
    return settings


def _sample(args: argparse.Namespace, par, held: contextlib.ExitStack) -> int:
    from vqar.sampling import make_conditions, warm_up
    from vqar.sampling.draw import batch_sizes_of, draw_distributed
    from vqar.sampling.export import write_samples

    if par.distributed and args.accept_rate is not None:
        raise ValueError("--accept-rate ranks all samples together: run it in one process, not under torchrun")
    if args.accept_rate is not None and not 0.0 < args.accept_rate <= 1.0:  # nan too
        raise ValueError(f"--accept-rate must be in (0, 1], got {args.accept_rate}")
    settings = settings_from(args)  # bad settings are refused before the model is loaded
    _check_out(args, par, held)  # and so is an --out that would mix these images with other files
    prompts = (args.prompt or []) + (read_lines(args.prompts, "prompts") if args.prompts else [])
    if prompts:
        from vqar.text.captions import check_one_line

        for prompt in prompts:  # before the model loads: prompt i is line i + 1 of prompts.txt
            check_one_line(prompt)
    if prompts and args.classes is not None:
        raise ValueError("give either --classes or prompts, not both")
    from vqar.sampling import for_sampling
    from vqar.sampling.draw import check_drawable

    model = for_sampling(load_ar_model(args, par.device), args.precision)
    classes = None if prompts else _classes(args.classes, model)
    _check_memory(args, model, len(prompts or classes or [None]))  # before anything of that size is allocated
    check_drawable(model, settings)  # settings the model cannot take (--smooth on a RQ model), before any drawing
    _check_options_apply(args)  # after: its advice (--cfg-interval needs --cfg) must not lead to a setting refused
    conditions = make_conditions(model, classes=classes, prompts=prompts or None, n_per_condition=args.n_per_class)
    options = dict(batch_size=args.batch_size, precision=args.precision, compile=args.compile)
    if args.compile:  # every rank compiles what it runs; the progress bar shows compile time apart from sampling
        sizes = batch_sizes_of(len(conditions), args.batch_size, compile=True)
        seconds = warm_up(model, sizes, guided=settings.guided, precision=args.precision, progress=par.is_main,
                          like=settings)  # fmt: skip
        if par.is_main:
            print(f"compiled the decode steps in {seconds:.0f} s (once per batch size; the same images as without "
                  "--compile)")  # fmt: skip
    if args.accept_rate is not None:
        result = _rejection_sample(args, model, conditions, settings, options)
    else:
        result = draw_distributed(model, conditions, settings, par, Path(args.out), **options)
        if result is None:  # rank 0 writes the files
            return 0
    paths = write_samples(result, args.out, args.n_per_class, individual=not args.no_images)
    n = len(result.images)
    workers = f" on {par.world_size} processes" if par.distributed else ""
    print(f"{n} samples in {result.seconds:.1f} s{workers} ({n / result.seconds:.2f} images/s; "
          f"{result.decode_stats.describe()})")  # fmt: skip
    print(f"grid: {paths['grid']}\nADM npz: {paths['npz']}")
    return 0


# The flags of the sampling settings whose names are not the field's, spelt with dashes.
FLAGS = {"cfg_scale": "--cfg", "speculative_window": "--window", "speculative_drafts": "--drafts",
         "speculative_max_iterations": "--max-iterations"}  # fmt: skip


def _check_options_apply(args: argparse.Namespace) -> None:
    """Options that only shape another option's work are refused without it, rather than silently ignored."""
    from vqar.sampling.settings import check_settings_apply

    if args.classifier is not None and args.accept_rate is None:
        raise ValueError("--classifier has no effect without --accept-rate: add --accept-rate, or leave it out")
    given = {"speculative": args.speculative, "speculative_window": args.window, "speculative_drafts": args.drafts,
             "speculative_max_iterations": args.max_iterations, "cfg_scale": args.cfg,
             "cfg_interval": args.cfg_interval, "cfg_schedule": args.cfg_schedule, "greedy": args.greedy,
             "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}  # fmt: skip
    check_settings_apply(given, lambda field: FLAGS.get(field, "--" + field.replace("_", "-")))


def _check_out(args: argparse.Namespace, par, held: contextlib.ExitStack) -> None:
    """Refuses a non-empty --out unless it is a sample folder and --overwrite is given (which replaces every sample
    output, so grid.png, images/ and samples.npz always show the same run) and one that cannot be written; rank 0
    looks, every rank stops. Rank 0 holds --out's write lock in `held` until the samples are written: two runs
    into one new --out both passed the check, and the second to finish replaced the first one's samples."""
    from vqar.sampling.export import foreign_in_images, is_sample_folder
    from vqar.utils.io import check_folder_writable, check_replaceable, write_lock

    def prepare() -> None:
        held.enter_context(write_lock(args.out))
        check_replaceable(args.out, args.overwrite, "a sample folder", is_sample_folder, why_not=foreign_in_images)
        check_folder_writable(args.out)  # the images are written at the end: found there, they would be lost

    par.main_prepares(prepare, f"the sample folder {args.out}")


def _check_memory(args: argparse.Namespace, model, n_conditions: int) -> None:
    """Refuses (one line, with the memory it would take) a run whose images cannot all be held: every image drawn
    is kept in memory, as float32, until the files are written, and writing them copies them."""
    import math

    from vqar.utils.memory import SAMPLE_COPIES, check_count_holdable, check_memory, human_bytes, sample_bytes

    each = sample_bytes(model, copies=SAMPLE_COPIES)
    per_condition, advice = args.n_per_class, "ask for fewer images, or split the run into several with other --seed"
    kind = "prompts" if args.prompt or args.prompts else "classes"
    what = f"--n-per-class {args.n_per_class} x {n_conditions} {kind}"
    per_condition = check_count_holdable(per_condition, what, advice)
    if args.accept_rate is not None:
        advice = "raise --accept-rate or ask for fewer images"
        drawn = per_condition / args.accept_rate  # inf for a rate of 1e-310
        per_condition = math.ceil(round(check_count_holdable(drawn, f"{what} at --accept-rate {args.accept_rate:g}",
                                                             advice), 9))  # fmt: skip
        what += f" at --accept-rate {args.accept_rate:g} (drawing {per_condition} per class)"
    images = check_count_holdable(per_condition * n_conditions, what, advice)
    check_memory(images * each, f"{what}: {images} images of {human_bytes(each)} each (with the copies writing "
                 "makes)", advice)  # fmt: skip


def _classes(chosen: str | list[int] | None, model) -> list[int] | None:
    """The class ids of --classes: a list, 'all' (the default) or 'none'."""
    if chosen is None or chosen == "all":
        return list(range(model.num_classes)) if model.num_classes else None
    return None if chosen == "none" else chosen


def _rejection_sample(args: argparse.Namespace, model, conditions, settings, options):
    from vqar.eval.rejection import load_classifier, rejection_sample

    if conditions.prompts is not None:
        raise ValueError("--accept-rate ranks samples by class; it does not apply to prompts")
    if not model.num_classes:  # else refused as "classes" the user never gave
        raise ValueError("--accept-rate ranks samples by class, and this model is unconditional (it has no classes): "
                         "leave it out")  # fmt: skip
    if args.classifier is None:
        raise ValueError("--accept-rate needs --classifier (a TorchScript classifier file, or 'digits')")
    classes = conditions.labels[:: args.n_per_class].tolist()  # one per block, a class listed twice included
    result, report = rejection_sample(model, classes, args.n_per_class, args.accept_rate,
                                      load_classifier(args.classifier), settings, **options)  # fmt: skip
    print(
        f"rejection sampling: kept {report['kept']} of {report['drawn']} (acceptance rate "
        f"{report['accept_rate']:.3f}); mean classifier score {report['mean_score_all']:.3f} -> "
        f"{report['mean_score_kept']:.3f}"
    )
    return result


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (semantics: vqar.sampling.settings)")
    group.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off, > 1 = on)")
    group.add_argument("--cfg-interval", type=int, help="guide only the first N+2 codes, -1 every code (LlamaGen's "
                       "meaning; not for VAR, which draws whole scales)")  # fmt: skip
    group.add_argument("--cfg-schedule", choices=["constant", "linear"],
                       help="spread guidance over the blocks: constant, or linear from none at the first to --cfg at "
                            "the last (VAR's default; its cfg c is --cfg 1+c, so its README's 1.5 is --cfg 2.5); "
                            "default: the model's")  # fmt: skip
    group.add_argument("--smooth", action="store_true",
                       help="VAR's more_smooth: feed a Gumbel-softmax mix of code vectors back (pictures, not FID)")
    group.add_argument("--temperature", default=None, help="default 1.0")
    group.add_argument("--top-k", default=None, help="keep the k most likely codes (and any tied with the k-th)")
    group.add_argument("--top-p", default=None, help="nucleus sampling threshold in (0, 1]")
    group.add_argument("--greedy", action="store_true", help="always take the most likely code")
    group.add_argument("--seed", type=non_negative_int, default=0,
                       help="image j of the run depends on (seed, j) only (default 0)")  # fmt: skip
    group.add_argument("--speculative", action="store_true",
                       help="speculative Jacobi decoding: draft a window of positions and check them in one model "
                            "call; the same distribution as without, in fewer calls (GPT, VIM, RQ; not VAR)")
    group.add_argument("--window", type=positive_int, help="--speculative: drafted positions per call (default 16)")
    group.add_argument("--drafts", choices=["mc-sjd", "sjd"],
                       help="--speculative: drafts coupled across calls (mc-sjd, the default: accepted more often) or "
                            "drawn afresh (sjd)")
    group.add_argument("--max-iterations", type=non_negative_int,
                       help="--speculative: at most this many window calls per batch, then one position per call")


def register(sub: argparse._SubParsersAction) -> None:
    sample = add_command(sub, "sample", run, "generate images with a trained AR model", DETAILS)
    add_model_options(sample)
    sample.add_argument("--classes", type=class_list,
                        help="comma-separated class ids, 'all' (default) or 'none' (unconditional)")  # fmt: skip
    sample.add_argument(
        "--prompt", action="append", help="text-to-image models: a caption to draw (repeat for several prompts)"
    )
    sample.add_argument("--prompts", help="text-to-image models: a file with one prompt per line")
    sample.add_argument(
        "--n-per-class", type=positive_int, default=8,
        help="samples per class or prompt (or in all, unconditional; default 8)",
    )
    add_sampling_options(sample)
    sample.add_argument("--batch-size", type=positive_int, default=64,
                        help="images drawn per model run (default 64); the images do not depend on it")  # fmt: skip
    add_speed_options(sample)
    add_device_option(sample)
    sample.add_argument("--no-images", action="store_true", help="skip the individual PNG files")
    sample.add_argument("--out", required=True, type=output_path,
                        help="output folder: new or empty, or one of earlier samples with --overwrite")  # fmt: skip
    sample.add_argument("--overwrite", action="store_true", help="replace the samples in --out (grid.png, images/, "
                        "samples.npz, prompts.txt); a folder holding anything else is refused")  # fmt: skip
    sample.add_argument(
        "--accept-rate", type=float, help="rejection sampling: draw n/rate per class, keep the n the classifier likes"
    )
    sample.add_argument("--classifier", help="rejection sampling: a TorchScript classifier file, or 'digits'")
