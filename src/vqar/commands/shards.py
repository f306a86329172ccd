"""`vqar pack-shards`: an image folder, array file or the bundled digits as WebDataset tar shards."""

from __future__ import annotations

import argparse

from vqar.commands.common import add_command, non_negative_int, output_path, positive_int

DETAILS = """Writes OUT/shard-000000.tar ... and OUT/shards.json (sample counts and class names). Each sample holds
the image (JPEG / PNG / WebP files keep their bytes; other formats and arrays become PNG), its class id (cls) and
its captions (txt, one per line) when the source has them. Point data.source (or --data) at OUT/shards.json,
or at a pattern such as OUT/shard-{000000..000127}.tar. Unreadable files are left out and counted."""


def run(args: argparse.Namespace) -> int:
    from vqar.data.pack import pack_shards

    report = pack_shards(args.source, args.out, shard_size=args.shard_size, captions=args.captions,
                         shuffle=not args.no_shuffle, seed=args.seed, max_images=args.max_images,
                         overwrite=args.overwrite)  # fmt: skip
    shards = len(report.index["shardlist"])
    extra = f", {_counted(len(report.skipped), 'unreadable file')} left out" if report.skipped else ""
    count = len(report.index["class_names"])
    classes = _counted(count, "class", "classes") if count else "no class labels"
    print(f"packed {_counted(report.written, 'image')} into {_counted(shards, 'shard')} in {report.out_dir} "
          f"({classes}{', with captions' if report.index['captions'] else ''}{extra})")  # fmt: skip
    print(f"use it as: data.source={report.out_dir / 'shards.json'}")
    return 0


def _counted(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def register(sub: argparse._SubParsersAction) -> None:
    pack = add_command(sub, "pack-shards", run, "pack an image folder (with labels or captions) into tar shards",
                       DETAILS)  # fmt: skip
    pack.add_argument("source", help="'mnist', an image folder (sub-folders name the classes) or a .npz/.npy file")
    pack.add_argument("--out", required=True, type=output_path, help="the folder of shards to create")
    pack.add_argument(
        "--shard-size",
        type=positive_int,
        default=1000,
        help="samples per shard (default 1000; "
        "aim for shards of 100 MB to 1 GB, and at least as many shards as processes x workers)",
    )
    pack.add_argument("--captions", help="a captions.jsonl / .tsv (default: the folder's own, if any), 'digits' "
                      "(generated captions for the bundled digits) or 'none'")  # fmt: skip
    pack.add_argument("--max-images", type=positive_int, help="pack only this many images (spread over the source)")
    order = pack.add_mutually_exclusive_group()
    order.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random sample order (default 0)")
    order.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    pack.add_argument("--overwrite", action="store_true", help="replace an existing OUT (only a folder of shards "
                      "with its shards.json: any other non-empty folder is refused; nothing is deleted)")  # fmt: skip
