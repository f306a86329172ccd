"""The `vqar` command line.

vqar train tokenizer PRESET [key=value ...] --out RUN_DIR [--resume | --overwrite]
vqar reconstruct --tokenizer RUN_DIR IMAGE [IMAGE ...] --out DIR
vqar presets [GROUP]
vqar config GROUP PRESET [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vqar.configs import ConfigError, preset_names, to_yaml

log = logging.getLogger("vqar")

GROUPS = ("tokenizer",)

EPILOG = """examples:
  vqar train tokenizer rqvae-mnist --out runs/rq            train the default RQ-VAE on the bundled digits
  vqar train tokenizer rqvae-mnist d=2 c=512 --out runs/rq2 same, 2 codes per position and K=512
  vqar train tokenizer --resume --out runs/rq               continue a run from its newest checkpoint
  vqar reconstruct --tokenizer runs/rq digit.png --out recon
  vqar presets                                              list the shipped configurations
"""


def _split_preset(items: list[str]) -> tuple[str | None, list[str]]:
    """The first item without '=' is the preset; the rest are key=value overrides."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _config_loader(group: str):
    if group == "tokenizer":
        from vqar.train.tokenizer import load_run_config

        return load_run_config
    raise ConfigError(f"unknown config group {group!r}; known: {', '.join(GROUPS)}")


def cmd_train(args: argparse.Namespace) -> int:
    from vqar.train.tokenizer import train_tokenizer

    preset, overrides = _split_preset(args.config)
    run_dir = Path(args.out)
    if args.resume and preset is None:
        saved = run_dir / "run.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume: {saved} not found; give a preset to start a new run")
        preset = str(saved)
    if preset is None:
        raise ConfigError(f"name a preset (one of: {', '.join(preset_names(args.group))}) or a YAML file")
    cfg = _config_loader(args.group)(preset, overrides)
    metrics = train_tokenizer(cfg, run_dir, resume=args.resume, overwrite=args.overwrite)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(f"done: {run_dir} (validation: {shown})")
    print(f"reconstruction grid: {run_dir / 'recon_grid.png'}")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from vqar.eval.reconstruct import reconstruct_files

    failures = reconstruct_files(
        args.tokenizer, args.images, args.out, size=args.size, depth=args.depth, device=args.device
    )
    return 1 if failures else 0


def cmd_presets(args: argparse.Namespace) -> int:
    for group in [args.group] if args.group else GROUPS:
        print(f"{group}:")
        for name in preset_names(group):
            print(f"  {name}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    preset, overrides = _split_preset(args.config)
    print(to_yaml(_config_loader(args.group)(preset, overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqar",
        description="Autoregressive image generation over discrete image tokens.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from vqar import __version__

    parser.add_argument("--version", action="version", version=f"vqar {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a model from a preset",
        description="Train a model. Overrides are key=value pairs on top of the preset; shorthands for "
        "tokenizers: d=<depth> c=<codebook size> steps=<n> lr=<x> bs=<batch size>. "
        "See the full configuration with `vqar config tokenizer PRESET`.",
    )
    train.add_argument("group", choices=GROUPS, help="what to train")
    train.add_argument("config", nargs="*", metavar="PRESET [key=value ...]", help="preset name or YAML file")
    train.add_argument("--out", required=True, help="run directory (checkpoints, metrics, pictures, model)")
    mode = train.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="replace a run that already exists in --out")
    train.set_defaults(func=cmd_train)

    recon = sub.add_parser(
        "reconstruct",
        help="encode and decode images with a trained tokenizer",
        description="Writes original | reconstruction side by side for each image and prints its PSNR.",
    )
    recon.add_argument("--tokenizer", required=True, help="a tokenizer run directory or saved model folder")
    recon.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    recon.add_argument("--out", required=True, help="output folder for the side-by-side pictures")
    recon.add_argument("--size", type=int, help="resize to this size (default: the tokenizer's resolution)")
    recon.add_argument("--depth", type=int, help="residual tokenizers: decode with the first DEPTH codes only")
    recon.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    recon.set_defaults(func=cmd_reconstruct)

    presets = sub.add_parser("presets", help="list shipped configuration presets")
    presets.add_argument("group", nargs="?", choices=GROUPS)
    presets.set_defaults(func=cmd_presets)

    config = sub.add_parser("config", help="print the resolved configuration of a preset with overrides")
    config.add_argument("group", choices=GROUPS)
    config.add_argument("config", nargs="+", metavar="PRESET [key=value ...]")
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`--resume steps=8`), which argparse's nargs="*" does not collect.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "config") or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.config = [*args.config, *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="vqar: %(message)s", stream=sys.stderr
    )
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():
            return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        if args.verbose:
            raise
        print(f"vqar: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vqar: interrupted; the newest checkpoint is intact (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
