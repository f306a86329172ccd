"""`vqar releases` (the release table) and `vqar reproduce NAME` (a paper's numbers measured from its weights)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vqar.commands.common import add_command, add_device_option, non_negative_int, per_depth_arg, positive_int

RELEASES_DETAILS = """Every official checkpoint vqar loads: where its files live (URL, size and sha256 where a source
states them), the sampling protocol behind its reported numbers and the numbers, each with its source; settings the
sources do not state are marked so. The table is src/vqar/reproduce/releases.yaml; $VQAR_RELEASES or --releases add
tables of your own in the same layout."""
REPRODUCE_DETAILS = """Downloads the release once (resumable, checked by sha256; --mirror or $VQAR_RELEASE_MIRROR
points at a local folder or base URL laid out as host/path), draws the protocol's samples into resumable shards
(run it under torchrun to use every GPU: torchrun --nproc_per_node=8 -m vqar.cli reproduce NAME --device cuda; a
killed run continues where it stopped), packs OUT/samples.npz (ADM layout), measures FID, sFID, IS (with StyleGAN3's
Inception), precision and recall as the ADM evaluator does against the protocol's reference batch, and prints and
writes OUT/results.md and OUT/results.json: paper vs measured vs difference, with the settings, the deviations from
the protocol, environment and time. --n 5000 or fewer is a quick mode, labelled not comparable with the paper."""


def cmd_releases(args) -> int:
    from vqar.reproduce.table import load_table

    table = load_table(args.releases)
    chosen = [table.get(args.name)] if args.name else list(table.releases.values())
    if args.json:
        print(json.dumps([_as_dict(r) for r in chosen], indent=1, default=str))
        return 0
    for release in chosen:
        reported = ", ".join(f"{k} {v.value}" for k, v in release.reported.items() if v.stated) or "-"
        if not args.name:
            print(f"{release.name:<28} {release.category:<9} {reported:<18} {release.description}")
            continue
        print(f"{release.name}: {release.description} ({release.category}, {release.family})")
        for role, remote in release.files.items():
            size = "size unknown" if remote.size is None else f"{remote.size} bytes"
            digest = "sha256 unknown" if remote.sha256 is None else f"sha256 {remote.sha256}"
            print(f"  file {role}: {remote.url} ({size}, {digest})")
        for key, setting in release.protocol.items():
            print(f"  protocol {key}: {setting.describe()}")
        if release.repo_config_sampling:
            print(f"  repository config sampling: {release.repo_config_sampling}")
        for key, setting in release.reported.items():
            print(f"  reported {key}: {setting.describe()}")
    return 0


def _as_dict(release) -> dict:
    from dataclasses import asdict

    return asdict(release)


def cmd_reproduce(args) -> int:
    from vqar.parallel import joined
    from vqar.parallel.runtime import launch_main
    from vqar.reproduce.run import Options, reproduce
    from vqar.utils.device import resolve_device
    from vqar.utils.io import created_folders_removed_on_failure

    overrides = {
        "temperature": None if args.temperature is None else per_depth_arg(args.temperature, float, "--temperature"),
        "top_k": None if args.top_k is None else per_depth_arg(args.top_k, int, "--top-k"),
        "top_p": None if args.top_p is None else per_depth_arg(args.top_p, float, "--top-p"),
        "cfg_scale": args.cfg,
    }
    prompts = None
    if args.prompts:
        from vqar.commands.common import read_lines

        prompts = read_lines(args.prompts, "prompts")
    from vqar.reproduce.download import default_mirror

    options = Options(
        name=args.name, out=Path(args.out or f"reproductions/{args.name}"), n=args.n,
        cache=Path(args.cache) if args.cache else None, mirror=args.mirror or default_mirror(),
        releases=args.releases, batch_size=args.batch_size, shard_size=args.shard_size,
        eval_batch_size=args.eval_batch_size, precision=args.precision, compile=args.compile, seed=args.seed,
        overrides=overrides, prompts=prompts, inception=args.inception, reference=args.reference,
        fp16_distances=not args.exact_distances, download_only=args.download_only,
    )  # fmt: skip
    if args.download_only:
        _refuse_unused_with_download_only(args)
    # the default --out, which the command line's own tidying does not know, leaves no empty folders either
    with (created_folders_removed_on_failure(options.out, args.out is None and launch_main()),
          joined(device=resolve_device(args.device)) as par):  # fmt: skip
        report = reproduce(options, par)
    if report is not None and args.download_only:
        for role, path in report["files"].items():
            print(f"{role}: {path}")
    return 0


# The options only a reproduction's sampling and evaluation use, which --download-only would ignore.
REPRODUCTION_ONLY = {"n": "--num-samples", "out": "--out", "prompts": "--prompts", "reference": "--reference",
                     "inception": "--inception", "cfg": "--cfg", "top_k": "--top-k", "top_p": "--top-p",
                     "temperature": "--temperature"}  # fmt: skip


def _refuse_unused_with_download_only(args) -> None:
    given = [flag for key, flag in REPRODUCTION_ONLY.items() if getattr(args, key) is not None]
    if given:
        raise ValueError(f"--download-only fetches and checks the files, then stops: {', '.join(given)} would do "
                         f"nothing; leave {'it' if len(given) == 1 else 'them'} out")  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    releases = add_command(sub, "releases", cmd_releases, "list the official releases, their protocols and "
                           "reported numbers", RELEASES_DETAILS)  # fmt: skip
    releases.add_argument("name", nargs="?", help="one release: every file, setting and number with its source")
    releases.add_argument("--releases", action="append", default=[], help="an extra release table (YAML)")
    releases.add_argument("--json", action="store_true", help="print the table as JSON")

    rep = add_command(sub, "reproduce", cmd_reproduce, "measure a release's reported numbers again from its weights",
                      REPRODUCE_DETAILS)  # fmt: skip
    rep.add_argument("name", help="a release of `vqar releases`")
    rep.add_argument("--num-samples", "--n", dest="n", type=positive_int,
                     help="samples (default: the protocol's, 50000); 5000 or fewer is a quick mode, not "
                     "comparable with the paper. Under torchrun write --num-samples (torchrun claims --n)")  # fmt: skip
    rep.add_argument("--out", help="output folder (default: reproductions/NAME); a rerun continues its shards")
    rep.add_argument("--cache", help="downloads and reference features (default: $VQAR_CACHE/releases)")
    rep.add_argument("--mirror", help="a local folder or base URL holding the files as host/path "
                     "(default: $VQAR_RELEASE_MIRROR)")  # fmt: skip
    rep.add_argument("--releases", action="append", default=[], help="an extra release table (YAML)")
    rep.add_argument("--download-only", action="store_true", help="fetch and check the files, then stop")
    rep.add_argument("--reference", help="a local ADM reference batch instead of the protocol's download")
    rep.add_argument("--prompts", help="text-to-image releases: the evaluation captions, one per line")
    group = rep.add_argument_group("sampling (default: the protocol's; a change is reported as a deviation)")
    group.add_argument("--cfg", type=float, help="CFG scale in vqar's terms (VAR's cfg c is 1 + c)")
    group.add_argument("--top-k", help="top-k (one value, or one per depth for RQ)")
    group.add_argument("--top-p", help="top-p (one value, or one per depth for RQ)")
    group.add_argument("--temperature", help="temperature (one value, or one per depth for RQ)")
    group.add_argument("--seed", type=non_negative_int, default=0, help="image j depends on (seed, j) only")
    group.add_argument("--batch-size", type=positive_int, default=32, help="images per sampling batch, per process")
    group.add_argument("--shard-size", type=positive_int, default=1000, help="images per resumable shard")
    group.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="sampling precision")
    group.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on CUDA)")
    ev = rep.add_argument_group("evaluation")
    ev.add_argument("--inception", help="TorchScript Inception (StyleGAN3's file adds IS; default: fid-helper's)")
    ev.add_argument("--eval-batch-size", type=positive_int, default=50)
    ev.add_argument(
        "--exact-distances",
        action="store_true",
        help="precision/recall on float32 distances (default: ADM's float16 first, float32 fallback)",
    )
    add_device_option(rep)
