"""`python -m vqar ...` (and `torchrun ... -m vqar ...`): the `vqar` program, for an environment whose scripts
folder is not on PATH."""

from vqar.cli import entry

entry()
