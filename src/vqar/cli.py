"""The `vqar` command line.

vqar train tokenizer|ar PRESET [key=value ...] --out RUN_DIR [--resume | --overwrite]
vqar reconstruct --tokenizer RUN_DIR IMAGE [IMAGE ...] --out DIR
vqar extract-codes --tokenizer RUN_DIR --data SOURCE --out CODES_DIR [--flip | --ten-crop]
vqar sample --model RUN_DIR --classes 0,1,... --n-per-class N --out DIR
vqar demo --out DIR
vqar presets [GROUP]
vqar config GROUP PRESET [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from vqar.configs import ConfigError, preset_names, to_yaml
from vqar.train.errors import NonFiniteLossError, TrainingInterrupted

log = logging.getLogger("vqar")

GROUPS = ("tokenizer", "ar")

EPILOG = """examples:
  vqar train tokenizer rqvae-mnist --out runs/rq            train the default RQ-VAE on the bundled digits
  vqar train tokenizer rqvae-mnist d=2 c=512 --out runs/rq2 same, 2 codes per position and K=512
  vqar train tokenizer --resume --out runs/rq               continue a run from its newest checkpoint
  vqar reconstruct --tokenizer runs/rq digit.png --out recon
  vqar extract-codes --tokenizer runs/rq --data mnist --out runs/codes
  vqar train ar rq-mnist codes=runs/codes --out runs/ar       train a class-conditional RQ-Transformer
  vqar sample --model runs/ar --classes all --n-per-class 8 --out samples
  vqar demo --out runs/demo                                 the whole pipeline on the bundled digits
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
    if group == "ar":
        from vqar.train.ar import load_run_config

        return load_run_config
    raise ConfigError(f"unknown config group {group!r}; known: {', '.join(GROUPS)}")


def cmd_train(args: argparse.Namespace) -> int:
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
    if args.group == "tokenizer":
        from vqar.train.tokenizer import train_tokenizer as train
    else:
        from vqar.train.ar import train_ar as train
    metrics = train(cfg, run_dir, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(f"done: {run_dir} (validation: {shown})")
    picture = "recon_grid.png" if args.group == "tokenizer" else "samples_grid.png"
    print(f"pictures: {run_dir / picture}")
    return 0


def cmd_extract_codes(args: argparse.Namespace) -> int:
    from vqar.data import DataConfig
    from vqar.data.codes import extract_codes
    from vqar.pretrained import load
    from vqar.tokenizers import Tokenizer
    from vqar.utils.device import resolve_device

    device = resolve_device(args.device)
    tokenizer = load(args.tokenizer, device=device)
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError(f"{args.tokenizer} holds a {type(tokenizer).__name__}, not a tokenizer")
    data = DataConfig(
        source=args.data,
        image_size=args.image_size or tokenizer.image_size,
        channels=tokenizer.in_channels,
        eval_batch_size=args.batch_size,
        num_workers=args.num_workers,
        captions=args.captions,
    )
    views = "ten-crop" if args.ten_crop else "flip" if args.flip else "none"
    manifest = extract_codes(
        tokenizer,
        data,
        args.out,
        views=views,
        crop_range=args.crop_range,
        device=device,
        overwrite=args.overwrite,
        tokenizer_dir=args.tokenizer,
    )
    shape = "x".join(map(str, manifest["code_shape"]))
    print(f"wrote {manifest['num_items']} items x {len(manifest['views'])} views of {shape} codes to {args.out}")
    if "captions" in manifest:
        print(f"with captions ({manifest['uncaptioned_images']} images without a caption left out)")
    return 0


def _per_depth_arg(text: str | None, kind):
    """ "0.9" or "0.9,0.9,0.95,1" (one value per depth); "none" means no filter."""
    if text is None:
        return None
    values = [None if item.strip().lower() == "none" else kind(item) for item in text.split(",")]
    return values[0] if len(values) == 1 else values


def cmd_sample(args: argparse.Namespace) -> int:
    from vqar.parallel import setup, teardown
    from vqar.utils.device import resolve_device

    par = setup(device=resolve_device(args.device))  # under torchrun, each rank draws its share of the batches
    try:
        return _sample(args, par)
    finally:
        teardown(par)


def _sample(args: argparse.Namespace, par) -> int:
    from vqar.interop import load_pretrained
    from vqar.sampling.export import SampleResult, sample_images, write_samples

    if par.distributed and args.accept_rate is not None:
        raise ValueError("--accept-rate ranks all samples together: run it in one process, not under torchrun")
    device = par.device
    model = load_pretrained(args.model, config=args.config, ema=args.ema, tokenizer=args.tokenizer).to(device)
    if not hasattr(model, "generate"):
        raise ValueError(f"{args.model} holds a {type(model).__name__}, not an autoregressive model")
    tokenizer = model.tokenizer.to(device) if model.tokenizer is not None else None
    prompts, text_tokenizer = _prompts(args, model)
    if prompts:
        if args.classes is not None:
            raise ValueError("give either --classes or prompts, not both")
        classes = None
    elif args.classes is None or args.classes == "all":
        classes = list(range(model.num_classes)) if model.num_classes else None
    elif args.classes == "none":
        classes = None
    else:
        classes = [int(c) for c in args.classes.split(",")]
    settings = dict(
        batch_size=args.batch_size,
        seed=args.seed,
        precision=args.precision,
        temperature=1.0 if args.temperature is None else _per_depth_arg(args.temperature, float),
        top_k=_per_depth_arg(args.top_k, int),
        top_p=_per_depth_arg(args.top_p, float),
        cfg_scale=args.cfg,
        cfg_interval=args.cfg_interval,
        greedy=args.greedy,
    )
    if prompts:
        settings.update(prompts=prompts, text_tokenizer=text_tokenizer)
    if args.accept_rate is not None:
        if prompts:
            raise ValueError("--accept-rate ranks samples by class; it does not apply to prompts")
        from vqar.sampling.rejection import load_classifier, rejection_sample

        if args.classifier is None:
            raise ValueError("--accept-rate needs --classifier (a TorchScript classifier file, or 'digits')")
        classifier = load_classifier(args.classifier)
        result, report = rejection_sample(
            model, tokenizer, classes, args.n_per_class, args.accept_rate, classifier, **settings
        )
        print(
            f"rejection sampling: kept {report['kept']} of {report['drawn']} (acceptance rate "
            f"{report['accept_rate']:.3f}); mean classifier score {report['mean_score_all']:.3f} -> "
            f"{report['mean_score_kept']:.3f}"
        )
    else:
        shard = (par.rank, par.world_size)
        result = sample_images(
            model, tokenizer, classes, args.n_per_class, shard=shard, progress=par.is_main, **settings
        )
        if par.distributed:
            parts = {"images": result.images, "labels": result.labels, "index": result.index}
            merged = par.gather_to_main(parts, Path(args.out))
            if merged is None:
                return 0
            order = merged["index"].argsort()
            result = SampleResult(merged["images"][order], merged["labels"][order], result.seconds,
                                  prompts=result.prompts)  # fmt: skip
    paths = write_samples(result, args.out, args.n_per_class, individual=not args.no_images)
    n = len(result.images)
    workers = f" on {par.world_size} processes" if par.distributed else ""
    print(f"{n} samples in {result.seconds:.1f} s{workers} ({n / result.seconds:.2f} images/s)")
    print(f"grid: {paths['grid']}\nADM npz: {paths['npz']}")
    return 0


def _prompts(args: argparse.Namespace, model) -> tuple[list[str] | None, object]:
    """The prompts of --prompt / --prompts FILE (one per line, blank lines skipped) and the caption tokenizer."""
    prompts = list(args.prompt or [])
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    text_tokenizer = None
    if args.text_tokenizer:
        from vqar.text import TextTokenizer

        text_tokenizer = TextTokenizer.load(args.text_tokenizer, length=getattr(model.cfg, "text_length", 0) or None)
    if getattr(model, "is_text_conditioned", False) and not prompts:
        raise ValueError("this model is text-conditioned: give --prompt 'a painting of a cat' or --prompts FILE")
    return prompts or None, text_tokenizer


def cmd_demo(args: argparse.Namespace) -> int:
    from vqar.demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from vqar.eval.reconstruct import reconstruct_files

    failures = reconstruct_files(
        args.tokenizer, args.images, args.out, size=args.size, depth=args.depth, device=args.device
    )
    return 1 if failures else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from vqar.interop import load_pretrained
    from vqar.pretrained import save_pretrained

    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace its model files")
    model = load_pretrained(args.src, config=args.config, ema=args.ema, tokenizer=args.tokenizer)
    save_pretrained(model, out)
    written = [out]
    if getattr(model, "tokenizer", None) is not None:
        save_pretrained(model.tokenizer, out / "tokenizer")
        written.append(out / "tokenizer")
    if getattr(model, "text_tokenizer", None) is not None:
        model.text_tokenizer.save(out / "text_tokenizer")
        written.append(out / "text_tokenizer")
    params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__} ({params / 1e6:.2f}M parameters) written to {', '.join(map(str, written))}")
    print(f"load it with vqar.load({str(out)!r}) or `vqar sample --model {out}`")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from vqar.serve.app import class_names_for, serve
        from vqar.serve.engine import SamplingEngine
    except ImportError as err:
        raise RuntimeError(f"`vqar serve` needs the serve extra: pip install 'vqar[serve]' ({err})") from None
    from vqar.interop import load_pretrained
    from vqar.text import TextTokenizer
    from vqar.utils.device import resolve_device

    device = resolve_device(args.device)
    model = load_pretrained(args.model, config=args.config, ema=args.ema, tokenizer=args.tokenizer).to(device)
    if not hasattr(model, "generate"):
        raise ValueError(f"{args.model} holds a {type(model).__name__}, not an autoregressive model")
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer to decode its codes; pass --tokenizer")
    text_tokenizer = None
    if args.text_tokenizer:
        text_tokenizer = TextTokenizer.load(args.text_tokenizer, length=getattr(model.cfg, "text_length", 0) or None)
    engine = SamplingEngine(
        model,
        model.tokenizer.to(device),
        text_tokenizer=text_tokenizer,
        max_images=args.max_images,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        class_names=class_names_for(args.model, args.class_names),
    )
    serve(engine, host=args.host, port=args.port)
    return 0


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
        "tokenizers: d=<depth> c=<codebook size> steps=<n> lr=<x> bs=<batch size>; AR models: codes=<code store> "
        "size=<GPT-B|RQ-1.4B|...> steps=<n> lr=<x> bs=<batch size>. "
        "See the full configuration with `vqar config tokenizer|ar PRESET`.",
    )
    train.add_argument("group", choices=GROUPS, help="what to train: a tokenizer (stage 1) or an AR model (stage 2)")
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

    extract = sub.add_parser(
        "extract-codes",
        help="encode a dataset once into a code store for AR training",
        description="Encodes every image of a dataset with a tokenizer into a sharded code store (codes, labels, "
        "manifest, and a copy of the tokenizer).",
    )
    extract.add_argument("--tokenizer", required=True, help="a tokenizer run directory or saved model folder")
    extract.add_argument("--data", required=True, help="'mnist', an image folder, or a .npz/.npy file")
    extract.add_argument("--out", required=True, help="the code store folder to create")
    views = extract.add_mutually_exclusive_group()
    views.add_argument("--flip", action="store_true", help="also store the codes of each mirrored image")
    views.add_argument("--ten-crop", action="store_true", help="store LlamaGen's 10 views (5 crops + mirrors)")
    extract.add_argument("--crop-range", type=float, default=1.1, help="ten-crop: fit images to size*range first")
    extract.add_argument("--image-size", type=int, help="default: the tokenizer's resolution")
    extract.add_argument(
        "--captions",
        help="text-to-image stores: a captions.jsonl / .tsv (default: the folder's own, if any), 'digits' "
        "(generated captions for the bundled digits) or 'none'",
    )
    extract.add_argument("--batch-size", type=int, default=256)
    extract.add_argument("--num-workers", type=int, default=0)
    extract.add_argument("--device", default="auto")
    extract.add_argument("--overwrite", action="store_true", help="replace an existing code store")
    extract.set_defaults(func=cmd_extract_codes)

    sample = sub.add_parser(
        "sample",
        help="generate images with a trained AR model",
        description="Writes grid.png (one row per class or prompt), images/*.png and samples.npz (ADM evaluator "
        "layout). For RQ models --top-k/--top-p/--temperature take one value or one per depth (e.g. 0.9,0.9,0.95,1).",
    )
    sample.add_argument(
        "--model", required=True, help="an AR run directory, vqar model folder, RQ release folder or LlamaGen .pt"
    )
    sample.add_argument("--tokenizer", help="default: the tokenizer saved with the model (or an RQ release's stage1)")
    sample.add_argument("--config", help="architecture of a LlamaGen .pt: preset name (GPT-XL) or JSON file")
    sample.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    sample.add_argument("--classes", help="comma-separated class ids, 'all' (default) or 'none' (unconditional)")
    sample.add_argument(
        "--prompt", action="append", help="text-to-image models: a caption to draw (repeat for several prompts)"
    )
    sample.add_argument("--prompts", help="text-to-image models: a file with one prompt per line")
    sample.add_argument(
        "--text-tokenizer",
        help="caption tokenizer: a saved folder or an RQ release's bpe-16k-vocab.json (default: the model's own)",
    )
    sample.add_argument(
        "--n-per-class", type=int, default=8, help="samples per class or prompt (or in all, unconditional)"
    )
    sample.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    sample.add_argument("--cfg-interval", type=int, help="guide only the first N+2 codes (LlamaGen's meaning)")
    sample.add_argument("--temperature", default=None, help="default 1.0")
    sample.add_argument("--top-k", default=None, help="keep the k most likely codes")
    sample.add_argument("--top-p", default=None, help="nucleus sampling threshold in (0, 1]")
    sample.add_argument("--greedy", action="store_true", help="always take the most likely code")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, default=64)
    sample.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    sample.add_argument("--device", default="auto")
    sample.add_argument("--no-images", action="store_true", help="skip the individual PNG files")
    sample.add_argument("--out", required=True, help="output folder")
    sample.add_argument(
        "--accept-rate", type=float, help="rejection sampling: draw n/rate per class, keep the n the classifier likes"
    )
    sample.add_argument("--classifier", help="rejection sampling: a TorchScript classifier file, or 'digits'")
    sample.set_defaults(func=cmd_sample)

    serve = sub.add_parser(
        "serve",
        help="a web page and an HTTP API for sampling a model",
        description="Serves one model: a Gradio page at / (class or prompt, seed, temperature, top-k/top-p, CFG, a "
        "gallery and a zip download; coarse-to-fine decoding for RQ models) and an HTTP API (POST /generate, "
        "GET /model, GET /health). Requests wait in one queue and are batched; the model never runs twice at once.",
    )
    serve.add_argument("--model", required=True, help="an AR run directory, vqar model folder, RQ release or .pt")
    serve.add_argument("--tokenizer", help="default: the tokenizer saved with the model (or an RQ release's stage1)")
    serve.add_argument("--text-tokenizer", help="caption tokenizer of a text model (default: the model's own)")
    serve.add_argument("--config", help="architecture of a LlamaGen .pt: preset name (GPT-XL) or JSON file")
    serve.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    serve.add_argument("--class-names", help="a file with one class name per line (default: the run's code store)")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1; any other address prints a warning")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--device", default="auto")
    serve.add_argument("--max-images", type=int, default=16, help="images per request (more: HTTP 413)")
    serve.add_argument("--max-queue", type=int, default=32, help="requests waiting at once (more: HTTP 429)")
    serve.add_argument("--max-batch", type=int, default=64, help="images drawn in one model run")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline on the bundled digits",
        description="Trains the RQ tokenizer, extracts codes, trains a class-conditional RQ-Transformer, samples "
        "one row per digit and reports PSNR, usage, validation loss, throughput and class accuracy.",
    )
    demo.add_argument("--out", default="runs/demo", help="where everything goes (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a much shorter run, for a smoke test")
    demo.set_defaults(func=cmd_demo)

    convert = sub.add_parser(
        "convert",
        help="convert released weights (RQ release, LlamaGen / NPP .pt) to vqar's format",
        description="Loads SRC with the official format's conventions and writes OUT_DIR/config.json + "
        "model.safetensors (and OUT_DIR/tokenizer/ for AR models that carry one). vqar.load(OUT_DIR) reads it back. "
        "Examples: `vqar convert imagenet_1.4B_rqvae_50e/stage2 out/rq-1.4b`, "
        "`vqar convert vq_ds16_c2i.pt out/vq16 --config VQ-16`, `vqar convert c2i_XL_384.pt out/gpt-xl "
        '--config \'{"preset": "GPT-XL", "block_size": 576}\'`.',
    )
    convert.add_argument("src", help="an RQ release folder (or its stage1/stage2, or model.pt) or a LlamaGen .pt")
    convert.add_argument("out_dir", help="the vqar model folder to write")
    convert.add_argument(
        "--config", help="LlamaGen: a preset (VQ-16, VQ-8, GPT-B ... GPT-3B), a JSON file or an inline JSON object"
    )
    convert.add_argument("--tokenizer", help="the stage-1 model an AR model uses (any format load_pretrained reads)")
    convert.add_argument("--ema", action="store_true", help="convert the EMA weights")
    convert.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    convert.set_defaults(func=cmd_convert)

    from vqar.eval.commands import register as register_eval

    register_eval(sub)

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
    except (ConfigError, OSError, ValueError, NonFiniteLossError) as err:
        if args.verbose:
            raise
        print(f"vqar: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        print(f"vqar: {err}; the checkpoint of that step is written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("vqar: interrupted; the newest checkpoint is intact (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
