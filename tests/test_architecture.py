"""The structure the code promises: the layer contracts of pyproject.toml (docs/architecture.md) hold, and the
modules that may talk to models only through the AR contract do not probe them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vqar"


def test_import_layers_hold(tmp_path):
    pytest.importorskip("importlinter.cli", reason="import-linter is in the dev extra")
    config = Path(__file__).resolve().parents[1] / "pyproject.toml"
    # In a process of its own: import-linter reconfigures logging, which would silence this session's loggers.
    check = f"import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports({str(config)!r}, " \
            f"cache_dir={str(tmp_path)!r}, no_logo=True))"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


def test_no_attribute_probing_of_models_outside_interop():
    """Models are typed against `vqar.ar.ARModel`: nothing outside the checkpoint readers asks a model whether it
    has an attribute."""
    probe = re.compile(r"\b(getattr|hasattr)\((self\.)?model\b")
    offenders = [f"{path.relative_to(SRC)}:{i}" for path in SRC.rglob("*.py") if "interop" not in path.parts
                 for i, line in enumerate(path.read_text().splitlines(), 1) if probe.search(line)]  # fmt: skip
    assert offenders == []
