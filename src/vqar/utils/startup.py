"""A Ctrl-C while the `vqar` program is still starting (importing torch takes one to several seconds) ends it with
the one line a Ctrl-C during its work gives, instead of a traceback through torch's import.

Importing this module (`vqar/__init__.py` does it first thing) installs the handler, only when this process is the
`vqar` program (its script, or `python -m vqar` / `torchrun ... -m vqar`): a program or notebook that imports vqar
keeps its own Ctrl-C. The program puts Python's handler back once it runs a command (`started`), and its commands
then handle KeyboardInterrupt themselves (a checkpoint, tidying an output folder).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

PROGRAM = "vqar"


def started_as_the_program(argv: list[str] | None = None, orig_argv: list[str] | None = None) -> bool:
    """Whether this process runs the `vqar` program: its installed script, or `python -m vqar` (while a package
    imports under `-m`, `sys.argv[0]` is only "-m"; `sys.orig_argv` keeps the module's name)."""
    argv = sys.argv if argv is None else argv
    orig_argv = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    if argv and Path(argv[0]).name == PROGRAM:
        return True
    modules = (PROGRAM, f"{PROGRAM}.cli")
    return any(flag == "-m" and module in modules for flag, module in zip(orig_argv, orig_argv[1:], strict=False))


_interrupted_by: int | None = None


def _interrupted_while_starting(signum, frame) -> None:
    global _interrupted_by
    if _interrupted_by is None and os.environ.get("RANK", "0") == "0":  # every process of a torchrun launch gets
        print(f"{PROGRAM}: interrupted while starting; nothing was done", file=sys.stderr, flush=True)  # Ctrl-C
    _interrupted_by = signum
    raise SystemExit(128 + signum)


def quiet_interrupt_while_starting() -> None:
    """Ends the program with one line on Ctrl-C until `started` (see the module docstring)."""
    if (started_as_the_program() and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):  # fmt: skip
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def started() -> None:
    """The program is up: Ctrl-C raises KeyboardInterrupt again, for the commands to handle. A Ctrl-C that came
    while starting ends the program here if its exit was swallowed: torch's C extension imports numpy and carries
    on past any exception of that import."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _interrupted_by is not None:
        raise SystemExit(128 + _interrupted_by)


quiet_interrupt_while_starting()
