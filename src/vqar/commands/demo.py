"""`vqar demo`: the whole pipeline on the bundled digits."""

from __future__ import annotations

import argparse

from vqar.commands.common import add_command, output_path


def run(args: argparse.Namespace) -> int:
    from vqar.configs import ConfigError
    from vqar.demo import run_demo
    from vqar.parallel.runtime import launched_by_torchrun

    if launched_by_torchrun():  # every rank ran every step into the same folder, and the ranks locked each other out
        raise ConfigError("vqar demo runs in one process: start it without torchrun (train, extract-codes, sample "
                          "and eval are the commands that spread over processes)")  # fmt: skip
    run_demo(args.out, quick=args.quick, arch=args.arch)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    demo = add_command(sub, "demo", run, "run the whole pipeline on the bundled digits", "Trains the RQ tokenizer, "
                       "extracts codes, trains a class-conditional RQ-Transformer (with --arch var: the multi-scale "
                       "tokenizer and VAR), samples one row per digit and reports PSNR, usage, validation loss, "
                       "throughput and class accuracy.")  # fmt: skip
    demo.add_argument("--out", default="runs/demo", type=output_path, help="where everything goes (default runs/demo)")
    demo.add_argument("--quick", action="store_true",
                      help="a much shorter run, for a smoke test: its figures are far from the targets, and its "
                           "report says so")  # fmt: skip
    demo.add_argument("--arch", default="rq", choices=["rq", "var"],
                      help="rq (default): RQ tokenizer + RQ-Transformer; var: the multi-scale tokenizer + VAR "
                           "(next-scale prediction)")  # fmt: skip
