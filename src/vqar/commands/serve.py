"""`vqar serve`: a web page and an HTTP API over one model."""

from __future__ import annotations

import argparse
from pathlib import Path

from vqar.commands.common import (
    add_command,
    add_device_option,
    add_model_options,
    add_speed_options,
    load_ar_model,
    non_negative_float,
    positive_int,
)


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 0..65535, got {text!r}")
    return port


DETAILS = """A Gradio page at / (class or prompt, seed, temperature, top-k/top-p, CFG, a gallery and a zip download;
coarse-to-fine decoding for RQ models) and an HTTP API (POST /generate, GET /model, GET /health). Requests wait in
one queue and are batched; the model never runs twice at once."""


def run(args: argparse.Namespace) -> int:
    try:
        from vqar.serve.app import class_names_for, listen, serve
        from vqar.serve.engine import SamplingEngine
    except ImportError as err:
        raise RuntimeError(f"`vqar serve` needs the serve extra: pip install 'vqar[serve]' ({err})") from None
    from vqar.sampling import for_sampling
    from vqar.utils.device import resolve_device

    sock = listen(args.host, args.port)  # a port in use is one line, before the model is loaded
    try:
        names = read_class_names(args.class_names) if args.class_names else None  # so is a bad --class-names file
        model = for_sampling(load_ar_model(args, resolve_device(args.device)), args.precision)
        names = names if args.class_names else class_names_for(args.model)
        if args.class_names and len(names) != model.num_classes:  # fewer would leave classes out of the picker
            raise ValueError(f"{args.class_names} names {len(names)} classes; the model has {model.num_classes} "
                             "(one name per line, in class order)")  # fmt: skip
        _check_memory(args, model)
        engine = SamplingEngine(model, max_images=args.max_images, max_queue=args.max_queue,
                                max_batch=args.max_batch, class_names=names, compile=args.compile,
                                precision=args.precision)  # fmt: skip
        serve(engine, host=args.host, port=args.port, sock=sock, grace=args.shutdown_grace)
    finally:
        sock.close()
    return 0


def read_class_names(path: str) -> list[str]:
    """The names of a --class-names file: line i + 1 names class i (spaces around a name are dropped). A blank or
    whitespace-only line before the last name is refused naming the file and the line: skipped, as blank lines of
    a prompts file are, it would shift every later name to the class before its own, unseen when the count still
    matches. Blank lines after the last name (an editor's trailing newlines) shift nothing and are left out."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{file} is a folder; give a text file of class names, one per line")
    if not file.exists():  # not `is_file()`: a pipe is read too (`--class-names <(cut -f2 classes.tsv)`)
        raise FileNotFoundError(f"file not found: {file}")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text; give a text file of class names, one per line") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"{file} holds no class names (only blank lines); give one per line")
    if "" in lines:
        number = lines.index("") + 1
        raise ValueError(f"{file}, line {number}: a blank line among the class names, where line i + 1 names class "
                         f"i (skipped, it would give every later name to the class before its own): write the "
                         f"name of class {number - 1} there, or remove the line")  # fmt: skip
    return lines


def _check_memory(args: argparse.Namespace, model) -> None:
    """Refuses (one line) a --max-images whose images cannot be held: a request keeps all of them in memory, as
    float32, until its answer is encoded (and, asked coarse to fine, each image once more per level), so one
    request could otherwise take all the machine's memory."""
    from vqar.utils.memory import check_memory, human_bytes, sample_bytes

    levels = model.tokenizer.levels if model.tokenizer is not None else 1
    # A request may ask for each image decoded coarse to fine too: one more image per level.
    each = sample_bytes(model) * (1 + (levels if levels > 1 else 0))
    ladder = f" with their {levels} coarse-to-fine decodes" if levels > 1 else ""
    check_memory(args.max_images * each, f"--max-images {args.max_images}: a request of {args.max_images} images "
                 f"of {human_bytes(each)} each{ladder}", "lower --max-images")  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    serve = add_command(sub, "serve", run, "a web page and an HTTP API for sampling a model", DETAILS)
    add_model_options(serve)
    serve.add_argument("--class-names", help="a file with one class name per line (default: the run's code store)")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1; any other address prints a warning")
    serve.add_argument("--port", type=port_number, default=7860, help="default 7860 (0: any free port)")
    add_device_option(serve)
    serve.add_argument("--max-images", type=positive_int, default=16,
                       help="images per request, default 16 (more: HTTP 413)")  # fmt: skip
    serve.add_argument("--max-queue", type=positive_int, default=32,
                       help="requests waiting at once, default 32 (more: HTTP 429)")  # fmt: skip
    serve.add_argument("--max-batch", type=positive_int, default=64, help="images drawn in one model run, default 64")
    # Docker's stop waits 10 s before it kills: a server that ends within them needs no SIGKILL.
    serve.add_argument("--shutdown-grace", type=non_negative_float, default=10.0, metavar="SECONDS",
                       help="stopped (Ctrl-C, SIGTERM), the server answers the requests still queued 503 at once and "
                       "gives those being drawn this long before they are answered 503 too; default 10")  # fmt: skip
    add_speed_options(serve, ". The server compiles the default settings at start (with and without guidance, "
                      "and the speculative window); a request with a temperature other than 1, top-k, top-p "
                      "or greedy decoding compiles its graphs once, when first asked for")
