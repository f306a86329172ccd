"""The `vqar` command line: parses, dispatches to the command (see `vqar.commands`) and turns the errors a user can
fix into one line.

vqar train tokenizer|ar PRESET [key=value ...] --out RUN_DIR [--resume | --overwrite]
vqar reconstruct --tokenizer RUN_DIR IMAGE [IMAGE ...] --out DIR
vqar extract-codes --tokenizer RUN_DIR --data SOURCE --out CODES_DIR [--flip | --ten-crop]
vqar sample --model RUN_DIR --classes 0,1,... --n-per-class N --out DIR
vqar serve --model RUN_DIR
vqar demo --out DIR
vqar presets [GROUP]
vqar config GROUP PRESET [key=value ...]
vqar convert SRC OUT_DIR, vqar eval ..., vqar bench sample ...
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

from vqar.bundle import vqar_version
from vqar.commands import MODULES
from vqar.configs import ConfigError
from vqar.parallel.runtime import (
    PeerFailed,
    Terminated,
    end_with_the_launcher,
    first_to_say,
    launch_main,
    launched_by_torchrun,
    lost_a_peer,
    say_warnings_once_per_machine,
)
from vqar.train.errors import NonFiniteLossError, TrackerUnavailable, TrainingInterrupted
from vqar.utils.io import created_folders_removed_on_failure
from vqar.utils.startup import started
from vqar.utils.threads import apply_thread_policy

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


class Parser(argparse.ArgumentParser):
    """Argument errors in one line, naming the option (argparse would print the whole usage first)."""

    def error(self, message: str):
        said = f"{self.prog}: error: {message} (see {self.prog} --help)\n"
        self.exit(2, said if first_to_say(said, per_machine=True) else None)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vqar",
        description="Autoregressive image generation over discrete image tokens.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vqar {vqar_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`--resume steps=8`), which argparse's nargs="*" does not collect.
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Only the commands with a list of key=value overrides (`args.overrides`, which checks its own items) take
        # words after their options; anything else left over is a stray word, refused in one line.
        takes_overrides = isinstance(getattr(args, "overrides", None), list)
        stray = [item for item in extra if item.startswith("-") or not takes_overrides]
        if stray:  # said by the command's own parser, so the hint names its --help, where its options are
            _parser_of(parser, _command_words(args)).error(f"unrecognized arguments: {' '.join(stray)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="vqar: %(message)s", stream=sys.stderr
    )
    say_warnings_once_per_machine()
    with _stopped_by_sigterm():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """The command of `args`, and the errors a user can fix as one line (exit status 2)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    started()  # Ctrl-C is the command's to handle from here on
    try:
        apply_thread_policy()  # once, before any work (see vqar.utils.threads)
        _quiet_pillow_size_warning()
        with logging_redirect_tqdm(), created_folders_removed_on_failure(*_out_of(args)) as tidy:
            code = args.func(args)
            if code:  # failed without raising (`vqar reconstruct` of files that are all missing)
                tidy()
            return code
    except BrokenPipeError:  # `vqar releases | head -1`: the reader has all it wants; end quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would fail again
        return 128 + signal.SIGPIPE
    except (ConfigError, OSError, ValueError, NonFiniteLossError, TrackerUnavailable) as err:
        if args.verbose:
            raise
        said = f"vqar: error: {err}"
        if first_to_say(said, per_machine=isinstance(err, ConfigError)):
            print(said, file=sys.stderr)
        return 2
    except (PeerFailed, StoppedByTheLauncher):  # the rank that failed printed the reason
        if args.verbose:
            raise
        return 2
    except RuntimeError as err:  # torch.OutOfMemoryError is one; the CPU allocator raises a plain RuntimeError
        if not args.verbose and lost_a_peer(err):
            if first_to_say(_peer_lost(args, err)):
                print(_peer_lost(args, err), file=sys.stderr)
            return 2
        if args.verbose or not _out_of_memory(err):
            raise
        said = (f"vqar: error: out of memory: {str(err).splitlines()[0]} (smaller settings: a model size, a batch, "
                "an image size)")  # fmt: skip
        if first_to_say(said):
            print(said, file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        if _reports() and args.command == "demo":  # it has no --resume: the same command goes on
            print(f"vqar: {err.stopped}; the checkpoint of that step is written, and the same `vqar demo` command "
                  "continues from it", file=sys.stderr)  # fmt: skip
        elif _reports():  # under torchrun every rank stops at the same step; rank 0 says so once
            print(f"vqar: {err}; the checkpoint of that step is written", file=sys.stderr)
        return 128 + err.signal_number
    except (KeyboardInterrupt, Terminated) as stop:
        if _reports():  # Ctrl-C reaches every process of a torchrun launch: rank 0 says so once
            print(f"vqar: {_interrupted(args)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)


def _quiet_pillow_size_warning() -> None:
    """Pillow's warning of a large image is a raw Python warning line that names no file; `open_image` says it in
    vqar's words, naming the file."""
    import warnings

    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class StoppedByTheLauncher(BaseException):
    """torchrun's SIGTERM to the ranks still running once one has failed (raised like KeyboardInterrupt, past
    `except Exception`)."""


@contextlib.contextmanager
def _stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM raises while the command runs, so the command still tidies up as on Ctrl-C: killed outright, it
    left the empty --out folders it had made (and under torchrun, rank 0 left them whenever another rank failed
    first: the launcher then stops the rest with SIGTERM, and StoppedByTheLauncher ends them without a word). While an
    error is being handled SIGTERM is ignored, so a rank's last words (an error line it was first to claim) are not
    cut off; torchrun's agent kills what outstays its grace period anyway. Training's own handler (a checkpoint on
    SIGTERM) takes over while it trains, and serve's while it serves."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set a handler
        yield
        return
    stopped = StoppedByTheLauncher if launched_by_torchrun() else Terminated

    def stop(signum, frame):
        if sys.exc_info()[0] is None:
            raise stopped

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _out_of(args: argparse.Namespace) -> tuple[str, bool]:
    """The output path of the command (to tidy up after a failure) and whether this process may tidy it: under
    torchrun only rank 0, which alone writes the outputs, so another rank never removes a folder rank 0 fills."""
    out = getattr(args, "out", None) or getattr(args, "out_dir", None)
    if not isinstance(out, str):  # no output, or one the command derives itself (`vqar reproduce NAME`)
        return "", False
    return out, _reports()


def _reports() -> bool:
    """Whether this process speaks for the command: the only one, or rank 0 of a torchrun launch."""
    return launch_main()


def _out_of_memory(err: RuntimeError) -> bool:
    """Whether `err` is an allocation that failed (absurd settings such as `c=10000000000`), on any device."""
    text = str(err)
    return type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in text or "out of memory" in text


def _interrupted(args: argparse.Namespace) -> str:
    """What a Ctrl-C leaves: for a training run, the checkpoint it resumes from, if it wrote one yet; the other
    commands have nothing to resume from (their files are written at the end, or a rerun continues them)."""
    if args.command == "demo" and _demo_checkpointed(args):  # its training stages go on from there, the rest redone
        return "interrupted; the same `vqar demo` command goes on from the checkpoints its training wrote"
    if args.command != "train":
        return "interrupted"
    step = _newest_checkpoint(args)
    if step is None:
        return "interrupted before the first checkpoint was written"
    return f"interrupted; the newest checkpoint (step {step}) is intact (resume with --resume)"


def _peer_lost(args: argparse.Namespace, err: RuntimeError) -> str:
    """The line for a collective that failed because another process of the launch is gone (SIGKILLed, by the OOM
    killer say): torch's error is a traceback from whatever collective this process was in."""
    detail = str(err).splitlines()[0].split("] ", 1)[-1].split(". ")[0]  # "Connection closed by peer [host]:port"
    said = (f"vqar: error: another process of this torchrun launch is gone ({detail}): it was killed or failed, "
            "and torchrun's report names it")  # fmt: skip
    if args.command != "train":
        return said
    step = _newest_checkpoint(args)
    return said + ("; no checkpoint was written yet" if step is None else
                   f"; the newest checkpoint (step {step}) is intact (resume with --resume)")  # fmt: skip


def _demo_checkpointed(args: argparse.Namespace) -> bool:
    """Whether the demo's tokenizer or AR run in --out has a checkpoint (to continue from)."""
    from pathlib import Path

    from vqar.train.checkpoint import list_checkpoints

    return any(list_checkpoints(Path(args.out) / stage) for stage in ("tokenizer", "ar"))


def _newest_checkpoint(args: argparse.Namespace) -> int | None:
    """The step of a training run's newest checkpoint, None before its first."""
    from pathlib import Path

    from vqar.train.checkpoint import list_checkpoints

    # Not verified: each checkpoint is renamed into place whole, and hashing a large one would keep a user waiting.
    found = list_checkpoints(Path(args.out))
    return found[-1].step if found else None


def _parser_of(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The sub-parser of a command's `words` (["eval", "fid"] -> `vqar eval fid`)."""
    for word in words:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers or word not in subparsers[0].choices:
            break
        parser = subparsers[0].choices[word]
    return parser


def _command_words(args: argparse.Namespace) -> list[str]:
    """The command (and sub-command) the arguments were parsed for, e.g. ["eval", "fid"]."""
    words = [args.command]
    for key in ("eval_command", "bench_command"):
        if isinstance(getattr(args, key, None), str):
            words.append(getattr(args, key))
    return words


def entry() -> None:
    """The installed `vqar` program and `python -m vqar.cli`: `main`, then the process ends with its status."""
    end_with_the_launcher()
    code = main()
    if launched_by_torchrun():
        # A torchrun worker skips the interpreter's shutdown: once a module was wrapped in DDP or FSDP, torch keeps
        # the gloo backend and its worker threads alive past destroy_process_group (measured with torch 2.13), and
        # a worker thread that reaches into Python while the interpreter is torn down can abort the process
        # ("terminate called without an active exception": twice in CI, each time on a rank that had finished and
        # written everything). The exit handlers still run (logging's flush among them); only the teardown is
        # skipped.
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
