"""`vqar reconstruct` and `vqar extract-codes`: using a trained tokenizer on images."""

from __future__ import annotations

import argparse
from pathlib import Path

from vqar.commands.common import (
    add_allow_pipe_option,
    add_command,
    add_device_option,
    non_negative_int,
    output_path,
    positive_int,
)

EXTRACT_DETAILS = """The store holds sharded codes, labels (and captions), a manifest with checksums and a copy of the
tokenizer. Under torchrun (torchrun --nproc_per_node=8 -m vqar.cli extract-codes ...) every process encodes its
share of the shards and rank 0 writes the manifest; the store is the same as one process would write. The work goes
to .OUT.partial beside --out: running an interrupted extraction again with the same arguments encodes only the
shards it lacks."""


def crop_range(text: str) -> float:
    """An argparse type for --crop-range: a finite factor >= 1 (nan and inf would fail, or fit images to an
    endless size, only once the images are read)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    from vqar.data.extraction import MAX_CROP_RANGE

    if not 1.0 <= value <= MAX_CROP_RANGE:  # nan fails this too
        raise argparse.ArgumentTypeError(f"must be a number from 1 to {MAX_CROP_RANGE:g} (LlamaGen's is 1.1), got "
                                         f"{text}")  # fmt: skip
    return value


def run_reconstruct(args: argparse.Namespace) -> int:
    from vqar.eval.reconstruct import reconstruct_files

    failures = reconstruct_files(args.tokenizer, args.images, args.out, size=args.size, depth=args.depth,
                                 device=args.device, config=args.config, overwrite=args.overwrite)  # fmt: skip
    return 1 if failures else 0


def run_extract_codes(args: argparse.Namespace) -> int:
    from vqar.parallel import joined
    from vqar.utils.device import resolve_device

    # Under torchrun every rank encodes its share of the shards; on CUDA each uses cuda:LOCAL_RANK.
    with joined(device=resolve_device(args.device)) as par:
        return _extract_codes(args, par)


def _extract_codes(args: argparse.Namespace, par) -> int:
    from vqar.bundle import CONFIG_FILE
    from vqar.data import DataConfig
    from vqar.data.extraction import extract_codes
    from vqar.tokenizers import Tokenizer

    if args.crop_range is not None and not args.ten_crop:  # refused rather than silently ignored
        raise ValueError("--crop-range has no effect without --ten-crop: add --ten-crop, or leave it out")
    if args.image_size:  # before the tokenizer loads
        from vqar.utils.images import check_resizable

        check_resizable(args.image_size, "--image-size", "the tokenizer's resolution")

    from vqar.interop.load import load_pretrained

    # load_pretrained, not bundle.load: a code store or shard folder given here is named as such, and the releases'
    # own tokenizer files are read too (the store then keeps a vqar copy of them).
    tokenizer = load_pretrained(args.tokenizer, device=par.device)
    saved_folder = args.tokenizer if (Path(args.tokenizer) / CONFIG_FILE).is_file() else None
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError(f"{args.tokenizer} holds a {type(tokenizer).__name__}, not a tokenizer")
    if args.image_size:  # else found at the first batch, naming latents
        tokenizer.check_image_size(args.image_size, "--image-size")
    data = DataConfig(
        source=args.data,
        image_size=args.image_size or tokenizer.image_size,
        channels=tokenizer.in_channels,
        eval_batch_size=args.batch_size,
        num_workers=args.num_workers,
        captions=args.captions,
        allow_pipe=args.allow_pipe,
    )
    views = "ten-crop" if args.ten_crop else "flip" if args.flip else "none"
    crop = {} if args.crop_range is None else {"crop_range": args.crop_range}  # else extract_codes' default
    manifest = extract_codes(tokenizer, data, args.out, views=views, device=par.device, shard_size=args.shard_size,
                             overwrite=args.overwrite, tokenizer_dir=saved_folder, par=par, **crop)  # fmt: skip
    if par.is_main:
        shape = "x".join(map(str, manifest["code_shape"]))
        print(f"wrote {manifest['num_items']} items x {len(manifest['views'])} views of {shape} codes to {args.out}")
        if "captions" in manifest:
            print(f"with captions ({manifest['uncaptioned_images']} images without a caption left out)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    recon = add_command(
        sub,
        "reconstruct",
        run_reconstruct,
        "encode and decode images with a trained tokenizer",
        "Writes original | reconstruction side by side for each image and prints its PSNR.",
    )
    recon.add_argument("--tokenizer", required=True, help="a tokenizer run directory or saved model folder, or a "
                       "release's tokenizer (an RQ-VAE stage1 folder, LlamaGen's vq_ds*.pt, VAR's VQVAE .pth)")
    recon.add_argument("--config", help="architecture of a LlamaGen VQ file (VQ-16, VQ-8, JSON)")
    recon.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads), or "
                       "folders of them (read recursively; the reconstructions keep their relative paths under --out)")
    recon.add_argument("--out", required=True, type=output_path, help="output folder for the side-by-side pictures")
    recon.add_argument("--overwrite", action="store_true",
                       help="replace pictures already at the names the reconstructions take (NAME_recon.png)")
    recon.add_argument("--size", type=positive_int, help="resize to this size (default: the tokenizer's resolution)")
    recon.add_argument("--depth", type=positive_int,
                       help="decode coarse to fine: the first DEPTH codes of a stack, or VAR's first DEPTH scales")
    add_device_option(recon)

    extract = add_command(sub, "extract-codes", run_extract_codes, "encode a dataset once into a code store for AR "
                          "training", EXTRACT_DETAILS)  # fmt: skip
    extract.add_argument("--tokenizer", required=True, help="a tokenizer run directory or saved model folder")
    extract.add_argument(
        "--data",
        required=True,
        help="'mnist', an image folder, a .npz/.npy file, or tar shards "
        "(shards/train-{000000..000127}.tar, a .txt list of shard paths/URLs, or a shards.json)",
    )
    extract.add_argument("--out", required=True, type=output_path, help="the code store folder to create")
    views = extract.add_mutually_exclusive_group()
    views.add_argument("--flip", action="store_true", help="also store the codes of each mirrored image")
    views.add_argument("--ten-crop", action="store_true", help="store LlamaGen's 10 views (5 crops + mirrors)")
    extract.add_argument("--crop-range", type=crop_range,
                         help="--ten-crop: fit images to size*range first (default 1.1)")
    extract.add_argument("--image-size", type=positive_int, help="default: the tokenizer's resolution")
    extract.add_argument(
        "--captions",
        help="text-to-image stores: a captions.jsonl / .tsv (default: the folder's own, if any), 'digits' "
        "(generated captions for the bundled digits) or 'none'",
    )
    extract.add_argument(
        "--shard-size",
        type=positive_int,
        default=10_000,
        help="source images per store shard, "
        "the unit of work that ranks share and a rerun skips when done (default 10000; tar sources: one store "
        "shard per tar shard, and this is not used)",
    )
    extract.add_argument("--batch-size", type=positive_int, default=256,
                         help="images per tokenizer pass (default 256); the codes do not depend on it")  # fmt: skip
    extract.add_argument("--num-workers", type=non_negative_int, default=0,
                         help="image-decoding worker processes (default 0: decoded in this process)")  # fmt: skip
    add_device_option(extract)
    extract.add_argument("--overwrite", action="store_true", help="replace an existing code store (only a code "
                         "store: any other non-empty folder is refused, and nothing is deleted)")  # fmt: skip
    add_allow_pipe_option(extract)
