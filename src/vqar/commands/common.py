"""Option groups and argument readers that several commands share, defined once."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

log = logging.getLogger("vqar")

MODEL_HELP = "an AR run directory, vqar model folder, RQ release folder, LlamaGen .pt, VAR .pth or Hub repo id"


def add_command(
    sub: argparse._SubParsersAction, name: str, run, summary: str, details: str = ""
) -> argparse.ArgumentParser:
    """The parser of command `name`, which `run(args)` carries out; `summary` is its line in `vqar --help`."""
    parser = sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}. {details}".strip())
    parser.set_defaults(func=run)
    return parser


def add_model_options(parser: argparse.ArgumentParser, *, text: bool = True) -> None:
    """--model, and what loading it may need: --tokenizer, --config, --ema (and --text-tokenizer)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help=MODEL_HELP)
    group.add_argument("--tokenizer", help="default: the tokenizer saved with the model (or an RQ release's stage1)")
    group.add_argument("--config", help="architecture of a LlamaGen .pt: preset name (GPT-XL) or JSON file")
    group.add_argument("--ema", action="store_true", help="use the EMA weights an RQ release or LlamaGen checkpoint "
                       "carries (refused for vqar folders, Hub repositories and VAR files, which hold one set); the "
                       "tokenizer's too where its checkpoint carries them, else its one set")  # fmt: skip
    if text:
        group.add_argument("--text-tokenizer", help="caption tokenizer of a text-to-image model: a saved folder or "
                           "an RQ release's bpe-16k-vocab.json (default: the model's own)")  # fmt: skip


def add_speed_options(parser: argparse.ArgumentParser, compile_note: str = "") -> None:
    """--precision and --compile, for the commands that sample; `compile_note` ends --compile's help."""
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="default fp32; bf16: bf16 weights and KV cache on CUDA, bf16 autocast on a CPU (logits "
                        "sampled in float32 either way; slow on CPUs without AVX-512 bf16)")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step (torch.compile; CUDA graphs on CUDA): the same images, faster "
                        f"once compiled; falls back to eager with a warning if compilation fails{compile_note}")


PIPE_HELP = ("let tar shard sources run the shell commands of pipe: URLs (in the source, a list file or a "
             "shards.json); each command is printed before it runs. Off by default: an index from elsewhere cannot "
             "run commands")  # fmt: skip


def add_allow_pipe_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-pipe", action="store_true", help=PIPE_HELP)


def add_device_option(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default, help=f"cpu, cuda, cuda:1 ... (default: {default})")


def load_ar_model(args: argparse.Namespace, device):
    """The AR model of --model (with --tokenizer / --config / --ema / --text-tokenizer) on `device`."""
    from vqar.ar import ARModel
    from vqar.interop import load_pretrained

    text_tokenizer = None
    if getattr(args, "text_tokenizer", None):  # read before the model, which may take minutes to load
        from vqar.text import TextTokenizer

        text_tokenizer = TextTokenizer.load(args.text_tokenizer)  # attach() fits it to the model's text length
    model = load_pretrained(args.model, config=args.config, ema=args.ema, tokenizer=args.tokenizer)
    if not isinstance(model, ARModel):
        raise ValueError(_not_an_ar_model(args.model, model))
    model = model.to(device)
    return model.attach(model.tokenizer.to(device) if model.tokenizer is not None else None, text_tokenizer)


def _not_an_ar_model(source, model) -> str:
    """Why --model cannot sample, and for a tokenizer (a stage-1 model, the usual mix-up) what to do with it."""
    from vqar.ar.contract import CodeTokenizer

    if not isinstance(model, CodeTokenizer):
        return f"{source} holds a {type(model).__name__}, not an autoregressive model"
    return (f"{source} holds a tokenizer ({type(model).__name__}), not an autoregressive model: give it as "
            f"--tokenizer beside an AR model's --model, or train an AR model on its codes (`vqar extract-codes "
            f"--tokenizer {source} --data DATA --out CODES`, then `vqar train ar PRESET codes=CODES`)")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of images, a batch size), refused before any work."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (a seed)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def output_path(text: str) -> str:
    """An argparse type for --out: a path that is not empty (`--out ""` would write into the current folder) and
    not under a file (`notes.txt/run`: its folder can never be made; the OS would name only the file)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; name the folder or file to write")
    for parent in Path(text).parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{text} cannot be made: {parent} is a file, not a folder")
            break
    return text


def class_list(text: str) -> str | list[int]:
    """An argparse type for --classes: 'all', 'none' or comma-separated class ids."""
    if text in ("all", "none"):
        return text
    try:
        return [non_negative_int(item.strip()) for item in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"takes 'all', 'none' or comma-separated class ids, got {text!r}") from None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def split_preset(items: list[str]) -> tuple[str | None, list[str]]:
    """The first item without '=' is the preset; the rest are key=value overrides."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def per_depth_arg(text: str | None, kind, name: str):
    """ "0.9" or "0.9,0.9,0.95,1" (one value per depth); "none" means no filter."""
    if text is None:
        return None
    try:
        values = [None if item.strip().lower() == "none" else kind(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"{name} takes a number or one per depth, comma-separated, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def read_lines(path: str, what: str = "lines") -> list[str]:
    """The non-blank lines of a text file (prompts, class names), split at line ends alone ("\\n", "\\r\\n"): a
    `\\u2028` or form feed inside a line is the line's, for the prompt check to name (`str.splitlines` cut there, and
    one line became two prompts without a word). Blank lines are skipped, and said to be. A file without any line
    is an error naming it."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{file} is a folder; give a text file of {what}, one per line")
    if not file.exists():  # not `is_file()`: a pipe is read too (`--prompts <(grep cat captions.txt)`, /dev/stdin)
        raise FileNotFoundError(f"file not found: {file}")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text; give a text file of {what}, one per line") from None
    every = text.removesuffix("\n").split("\n") if text else []
    lines = [line.strip() for line in every if line.strip()]
    if not lines:
        raise ValueError(f"{file} holds no {what} (only blank lines); give one per line")
    if len(lines) < len(every):
        log.warning("%s: skipped %d blank line%s; the %s are its other %d lines, in order", file,
                    len(every) - len(lines), "s" * (len(every) - len(lines) != 1), what, len(lines))  # fmt: skip
    return lines
