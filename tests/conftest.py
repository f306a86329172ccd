"""Shared test fixtures: the parity-fixture folder and small, fast configurations."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def fixtures_root() -> Path:
    return Path(os.environ.get("VQAR_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """The golden parity fixtures (made by running the official code); skipped where they are absent."""
    root = fixtures_root()
    if not root.is_dir():
        pytest.skip(f"parity fixtures not found at {root} (set VQAR_FIXTURES to the shared/fixtures folder)")
    return root


# Fixture folders by kind, recognised by their files, so a new folder in a known format is tested without code changes.
FIXTURE_KINDS = {
    "rq_release": ("stage1/model.pt", "stage1/config.yaml", "rqvae_io.safetensors"),
    "rq_transformer_release": ("stage2/model.pt", "stage2/config.yaml", "rqtransformer_io.safetensors"),
    "llamagen_vq": ("vq_ckpt.pt", "vq_config.json", "vq_io.safetensors"),
    "llamagen_gpt": ("gpt_ckpt.pt", "gpt_config.json", "gpt_io.safetensors"),
    "npp": ("gpt_ckpt.pt", "gpt_config.json", "npp_io.safetensors"),
}


def fixture_folders(kind: str) -> list[Path]:
    root = fixtures_root()
    if not root.is_dir():
        return []
    needed = FIXTURE_KINDS[kind]
    return sorted({p.parent for p in root.rglob(needed[-1]) if all((p.parent / f).is_file() for f in needed)})


def pytest_generate_tests(metafunc):
    """A test taking `<kind>_folder` runs once per fixture folder of that kind (skipped when there is none)."""
    for kind in FIXTURE_KINDS:
        name = f"{kind}_folder"
        if name in metafunc.fixturenames:
            folders = fixture_folders(kind)
            if folders:
                metafunc.parametrize(name, folders, ids=[str(f.relative_to(fixtures_root())) for f in folders])
            else:
                reason = f"no {kind} parity fixtures under {fixtures_root()} (set VQAR_FIXTURES)"
                metafunc.parametrize(name, [pytest.param(None, marks=pytest.mark.skip(reason=reason))])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A small, fast RQ tokenizer run on a slice of the bundled digits (a few seconds on 2 CPU cores).
TINY_RUN = [
    "model.conv.ch=16",
    "model.conv.ch_mult=[1,2,4,4]",
    "model.conv.norm_groups=8",
    "model.conv.z_channels=32",
    "c=64",
    "data.max_images=600",
    "data.batch_size=32",
    "data.eval_batch_size=128",
    "train.warmup_steps=5",
    "train.log_every=5",
]


def overridden(base: list[str], *changes: str) -> list[str]:
    """`base` key=value overrides with `changes` applied: a key already in `base` takes its new value in place, others
    are appended (vqar warns when a command line gives one setting twice)."""
    keys = {item.partition("=")[0]: i for i, item in enumerate(base)}
    result = list(base)
    for item in changes:
        key = item.partition("=")[0]
        if key in keys:
            result[keys[key]] = item
        else:
            keys[key] = len(result)
            result.append(item)
    return result


# A tiny AR run on top of it.
TINY_AR = ["size=RQ-XS", "bs=32", "train.log_every=5", "train.warmup_steps=5", "sample.n_per_class=2"]


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A briefly trained tiny RQ tokenizer and the code store of 600 digits (2 views: as is and mirrored)."""
    from vqar.bundle import load
    from vqar.data import DataConfig
    from vqar.data.extraction import extract_codes
    from vqar.train.tokenizer import load_run_config, train_tokenizer

    root = tmp_path_factory.mktemp("pipeline")
    cfg = load_run_config("rqvae-mnist", [*TINY_RUN, "steps=30", "train.eval_every=30"])
    train_tokenizer(cfg, root / "tokenizer")
    tokenizer = load(root / "tokenizer")
    data = DataConfig(source="mnist", max_images=600)
    extract_codes(tokenizer, data, root / "codes", views="flip", tokenizer_dir=root / "tokenizer")
    return root


@pytest.fixture(scope="session")
def class_run(tiny_pipeline, tmp_path_factory):
    """A class-conditional RQ-Transformer run briefly trained on the tiny pipeline's codes (read only: tests that
    sample or serve it write elsewhere)."""
    from vqar.train.ar import train_ar
    from vqar.train.ar_config import load_run_config

    run = tmp_path_factory.mktemp("class-run") / "ar"
    overrides = [f"codes={tiny_pipeline / 'codes'}", *TINY_AR, "steps=10", "train.eval_every=10",
                 "sample.n_per_class=0"]  # fmt: skip
    train_ar(load_run_config("rq-mnist", overrides), run)
    return run


# `vqar serve` (tests/test_serve*.py): the class run's model, a sampling engine over it and a client of its HTTP API,
# made anew for each test module.
@pytest.fixture(scope="module")
def class_model(class_run):
    import vqar

    return vqar.load_pretrained(class_run)


@pytest.fixture(scope="module")
def engine(class_model):
    from vqar.serve.engine import SamplingEngine

    engine = SamplingEngine(class_model, class_model.tokenizer, max_images=6, max_queue=64, max_batch=16)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    from vqar.serve.app import build_app

    return TestClient(build_app(engine, ui=False))


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory):
    """A folder holding the digit classifier, trained once per test session."""
    from vqar.eval.digits import digit_classifier

    folder = tmp_path_factory.mktemp("classifier")
    digit_classifier(folder)
    return folder


def binomial_range(n: int, p: float, failure: float = 1e-7) -> tuple[int, int]:
    """The counts [lo, hi] that n Bernoulli(p) draws land in except with probability below `failure` (exact
    binomial tails: P(X < lo) + P(X > hi) <= failure), so a test checking a rate fails by chance that rarely."""
    from scipy.stats import binom

    return int(binom.ppf(failure / 2, n, p)), int(binom.isf(failure / 2, n, p))


def torchrun(procs: int) -> list[str]:
    """The launcher of `procs` local processes. `--standalone` lets the rendezvous store bind a free port itself: a
    port probed free beforehand can be taken (by another launch's connections) before torchrun binds it."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """vqar's exit status and what it wrote to stderr (argument errors exit from argparse, the rest return)."""
    from vqar.cli import main

    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def file_contents(folder) -> dict:
    """Every file under `folder` and its bytes: what a command must leave as it found it."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def tokenizer_folder(tmp_path_factory):
    """A saved tiny rqvae-mnist tokenizer (random weights)."""
    import vqar
    from vqar.train.tokenizer import load_run_config

    folder = tmp_path_factory.mktemp("tokenizer") / "tok"
    vqar.save_pretrained(vqar.Tokenizer(load_run_config("rqvae-mnist", TINY_RUN).model), folder)
    return folder


def random_tokenizer(arch: str = "conv", quantizer: str = "vq"):
    """An untrained 16 px gray tokenizer (downsampling factor 4), for checks that need no trained weights."""
    from vqar.quantize import QuantizerConfig
    from vqar.tokenizers import ConvConfig, Tokenizer, TokenizerConfig
    from vqar.tokenizers.vit import ViTConfig

    conv = ConvConfig(in_channels=1, out_channels=1, resolution=16, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1,
                      attn_resolutions=[], z_channels=8, norm_groups=4)  # fmt: skip
    vit = ViTConfig(image_size=16, in_channels=1, out_channels=1, patch_size=4, encoder="S", decoder="S")
    fields = {"patch_nums": [1, 2, 4], "ema": False} if quantizer == "multiscale" else {}
    return Tokenizer(TokenizerConfig(arch=arch, conv=conv, vit=vit, quantizer=QuantizerConfig(
        kind=quantizer, codebook_size=16, dim=4, **fields))).eval()  # fmt: skip


@contextlib.contextmanager
def locked_by_another_process(out: Path):
    """A separate process holding vqar's write lock on `out` (the lock is vqar's own, and the error names its pid);
    it lets go, and must exit cleanly, when the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from vqar.utils.io import write_lock\n"
                               f"with write_lock({str(out)!r}):\n print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
