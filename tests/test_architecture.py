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


FAMILY_CLASSES = {"GPT", "RQTransformer", "VIM", "VAR", "VectorQuantizer", "ResidualQuantizer",
                  "MultiScaleQuantizer", "ConvEncoder", "ViTEncoder"}  # fmt: skip
SWITCH_NAMES = {"arch", "kind", "family"}
REGISTRIES = {"ar/registry.py", "quantize/registry.py", "tokenizers/registry.py"}


def family_switches(source: str) -> list[tuple[int, str]]:
    """(line, what) for every comparison of an `arch` / `kind` name with a string, and every isinstance test on a
    concrete model or quantizer class, in `source`."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            named = any((isinstance(s, ast.Attribute) and s.attr in SWITCH_NAMES)
                        or (isinstance(s, ast.Name) and s.id in SWITCH_NAMES) for s in sides)  # fmt: skip
            literal = any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides)
            literal |= any(isinstance(s, (ast.Tuple, ast.List, ast.Set)) and s.elts
                           and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in s.elts)
                           for s in sides)  # fmt: skip
            if named and literal:
                found.append((node.lineno, ast.unparse(node)))
        is_call = isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        if is_call and node.func.id == "isinstance" and len(node.args) == 2:
            kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            names = {k.id if isinstance(k, ast.Name) else getattr(k, "attr", "") for k in kinds}
            if names & FAMILY_CLASSES:
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_structure_check_finds_family_switches():
    sample = 'if cfg.arch == "vim":\n    pass\nif isinstance(model, RQTransformer):\n    pass\n' \
             'ok = kind in ("vq", "rq")\nfine = name == "x"\n'  # fmt: skip
    assert [line for line, _ in family_switches(sample)] == [1, 3, 5]


def test_no_family_switch_outside_the_registries():
    """A new family (VAR, say) is its own files plus one line per registry: no code outside the registries asks
    which architecture, quantizer or backbone it holds. The checkpoint readers of `interop` tell upstream formats
    apart and are exempt."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        if relative in REGISTRIES or relative.startswith("interop/"):
            continue
        offenders += [f"{relative}:{line}: {what}" for line, what in family_switches(path.read_text())]
    assert offenders == []


def test_the_mutation_list_fits_the_code():
    """Every snippet of benchmarks/mutation.py occurs once in src/: an edit that breaks one fails here, not only the
    next time someone runs the mutation check."""
    script = SRC.parents[1] / "benchmarks" / "mutation.py"
    done = subprocess.run([sys.executable, str(script), "--list"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr or done.stdout
