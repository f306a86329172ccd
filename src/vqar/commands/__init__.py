"""The commands of the `vqar` command line, one module each (or a family of them); each registers its own parser
and the function that runs it (`register(subparsers)`), so `vqar.cli` only dispatches."""

from vqar.commands import convert, demo, evaluate, reproduce, sample, serve, shards, stage1, train

# The order of `vqar --help`: the pipeline first, then the tools around it.
MODULES = (shards, train, stage1, sample, serve, demo, convert, evaluate, reproduce)

__all__ = ["MODULES"]
