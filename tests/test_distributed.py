"""Multi-process training and sampling under torchrun with the gloo backend (CPU).

A run on 2 processes with the same global batch and seed must give the weights of a 1-process run (to float
tolerance: only the order of the gradient sums differs), for the tokenizer and for the AR model under DDP, FSDP
full shard and FSDP hybrid shard. Each launch starts real processes, so these tests are marked slow (CI runs them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_AR, TINY_RUN, overridden, torchrun

pytestmark = pytest.mark.slow

# Equal updates on any number of processes need randomness that does not depend on the split of the batch:
# no random flips, no dropout, one view per item. Dead-code restarts draw from the whole global batch as one
# process does (`test_dead_codes_restart_from_the_global_batch`), but they copy batch vectors into the codebook,
# many of them equal (blank digit corners), so the rounding of two processes' gradient sums flips assignments
# between such twins and the codebooks part ways within a few steps: the runs here turn restarts off.
# 250 images hold 25 for validation: two processes' shares are 13 and 12 + 1 of padding
TOKENIZER_RUN = overridden(TINY_RUN, "data.max_images=250", "data.random_flip=false",
                           "model.quantizer.restart_dead=false", "steps=6", "train.eval_every=6", "train.ckpt_every=3",
                           "train.log_every=3")  # fmt: skip
AR_RUN = overridden(
    TINY_AR,
    "model.resid_dropout_p=0",
    "model.class_dropout_prob=0",
    "steps=6",
    "train.eval_every=6",
    "train.ckpt_every=3",
    "train.log_every=3",
    "sample.n_per_class=1",
)


def _vqar(args: list[str], procs: int, cwd) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if procs == 1 else torchrun(procs)
    command = [*launcher, "-m", "vqar.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _weights(run_dir, name="model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / name))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _flat(weights: dict) -> torch.Tensor:
    return torch.cat([weights[k].double().flatten() for k in sorted(weights) if weights[k].is_floating_point()])


def _assert_same_training(one, two, step: int = 6, since: int = 3) -> None:
    """Runs `one` and `two` took the same updates: their weights after `step` differ by far less than training
    moved them between checkpoints `since` and `step`, and their logged losses agree.

    Exact equality is not expected: two processes sum the gradient in another order, and Adam divides by the
    root of the second moment, which magnifies that rounding for parameters whose gradients are near zero.
    A real fault (a rank training on its half batch alone, gradients summed instead of averaged, another data
    order) moves the weights by an amount comparable to the training step itself."""
    ckpt = f"checkpoints/step-{step:07d}/model.safetensors"
    a, b = _weights(one, ckpt), _weights(two, ckpt)
    assert a.keys() == b.keys()
    moved = (_flat(a) - _flat(_weights(one, f"checkpoints/step-{since:07d}/model.safetensors"))).norm()
    apart = (_flat(a) - _flat(b)).norm()
    assert moved > 0 and apart / moved < 1e-3, f"runs differ by {apart / moved:.2e} of a training step"

    def rows(run, split):
        return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]

    np.testing.assert_allclose([r["loss"] for r in rows(two, "train")], [r["loss"] for r in rows(one, "train")],
                               rtol=1e-5)  # fmt: skip
    # validation scores every image once, whatever the processes: an odd split pads one rank's share, not the sums
    validated = [{row["step"]: row for row in rows(run, "val")} for run in (one, two)]
    both = validated[0].keys() & validated[1].keys()
    assert both, validated  # a run stopped and resumed validates where it stopped too
    for a, b in ((validated[0][step], validated[1][step]) for step in sorted(both)):
        assert a.keys() == b.keys()
        scores = [k for k in a if k != "split"]
        np.testing.assert_allclose([b[k] for k in scores], [a[k] for k in scores], rtol=1e-4, err_msg=f"{a} vs {b}")


def _assert_trained(start: dict, end: dict) -> None:
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], end[k])]
    assert len(moved) > len(start) // 2, "training did not change the weights"


@pytest.fixture(scope="module")
def single_view_codes(tiny_pipeline):
    from vqar.bundle import load
    from vqar.data import DataConfig
    from vqar.data.extraction import extract_codes

    out = tiny_pipeline / "codes-1view"
    if not out.exists():
        data = DataConfig(source="mnist", max_images=300)
        tokenizer = load(tiny_pipeline / "tokenizer")
        extract_codes(tokenizer, data, out, views="none", tokenizer_dir=tiny_pipeline / "tokenizer")
    return out


def test_two_process_ddp_tokenizer_matches_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _vqar(["train", "tokenizer", "rqvae-mnist", "--out", str(one), *TOKENIZER_RUN], 1, tmp_path)
    done = _vqar(["train", "tokenizer", "rqvae-mnist", "--out", str(two), *TOKENIZER_RUN], 2, tmp_path)
    assert "x 2 processes" in done.stderr
    assert "Warning" not in done.stderr, done.stderr  # e.g. DDP's stride notice for the 1x1 convolutions, per rank
    _assert_same_training(one, two)
    # Rank 0 alone writes: one metric log with one line per logging step, one set of checkpoints.
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if '"train"' in line]) == 2
    assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.startswith("step-")) == [
        "step-0000003",
        "step-0000006",
    ]


def test_the_training_codebook_usage_is_the_global_batch_s(tmp_path):
    """Each process counted the codes of its share of the batch, and the rows averaged those: the usage and
    perplexity fell as processes were added, though the weights trained alike (0.68 against 0.78 on 2)."""
    small = overridden(TOKENIZER_RUN, "c=512", "data.batch_size=8", "steps=2", "train.log_every=1",
                       "train.eval_every=2", "train.ckpt_every=2")  # fmt: skip (a codebook far from used up by a batch)
    one, two = tmp_path / "one", tmp_path / "two"
    for run, processes in ((one, 1), (two, 2)):
        _vqar(["train", "tokenizer", "rqvae-mnist", "--out", str(run), *small], processes, tmp_path)
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
            for run in (one, two)]  # fmt: skip
    assert len(rows[0]) == 2 and rows[0][0]["usage"] < 50  # far from every code: a share uses fewer
    for alone, shared in zip(*rows, strict=True):
        for key in [key for key in alone if key.startswith(("usage", "perplexity"))]:
            assert shared[key] == pytest.approx(alone[key], rel=1e-5), (key, alone[key], shared[key])


CODEBOOK_STEP = """
import sys, torch, torch.distributed as dist
from vqar.quantize.codebook import Codebook
distributed = len(sys.argv) > 2
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
batch = torch.randn(8, 4, 6, generator=torch.Generator().manual_seed(1))  # 8 images x 4 positions
local = batch[rank::world]  # the training sampler's split: rank r takes items r, r + W, ...
torch.manual_seed(0)  # the codebook, and the random stream of rank 0 (seed + rank) and of one process
book = Codebook(64, 6, ema=True, restart_dead=True)
for _ in range(3):  # every code dead at first: all restart from 32 batch vectors, tiled with noise
    rows = local.reshape(-1, 6)
    book.update(rows, book.nearest(rows), items=len(local))
if rank == 0:
    torch.save(book.state_dict(), sys.argv[1])
if distributed:  # left to the interpreter's teardown, gloo's threads abort a finished process (3 in 16 launches)
    dist.destroy_process_group()
"""


def test_dead_codes_restart_from_the_global_batch(tmp_path):
    """The restart candidates came from rank 0's share of the batch alone: with W processes, 1/W of the vectors
    one process draws from (at scale, a local batch too small to fill a codebook, tiled with noise)."""
    script = tmp_path / "codebook_step.py"
    script.write_text(CODEBOOK_STEP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], env=env, check=True, timeout=300)
    launch = [*torchrun(2), str(script), str(tmp_path / "two.pt"), "distributed"]
    done = subprocess.run(launch, env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(launch)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    apart = {key: (one[key].float() - two[key].float()).abs().max() for key in one}
    assert all(torch.equal(one[key], two[key]) for key in one), apart


@pytest.mark.parametrize(
    "strategy",
    [["dist.strategy=ddp"], ["dist.strategy=fsdp"], ["dist.strategy=fsdp", "dist.fsdp_mode=hybrid"]],
    ids=["ddp", "fsdp-full", "fsdp-hybrid"],
)
def test_two_process_ar_training_matches_one_process(tmp_path, single_view_codes, strategy):
    run = ["train", "ar", "rq-mnist", f"codes={single_view_codes}", *AR_RUN]
    one, two = tmp_path / "one", tmp_path / "two"
    first = _vqar([*run, "--out", str(one)], 1, tmp_path)
    second = _vqar([*run, *strategy, "--out", str(two)], 2, tmp_path)
    _assert_same_training(one, two)
    _assert_same_weights(_weights(two), _weights(two, "checkpoints/step-0000006/model.safetensors"))
    # FSDP said "training a FSDPRQTransformer" with twice the parameters: a sharded parameter's size is the whole
    said = [re.search(r"training a (\w+) \(([\d.]+M) parameters\)", done.stderr).groups() for done in (first, second)]
    assert said[0] == said[1] and said[0][0] == "RQTransformer", said


def test_fsdp_checkpoint_loads_and_resumes_in_one_process(tmp_path, single_view_codes):
    """The consolidated FSDP checkpoint is an ordinary one: a single process loads the model and continues the
    run from it (optimizer state included) to the weights of an uninterrupted 1-process run."""
    from vqar.bundle import load

    run = ["train", "ar", "rq-mnist", f"codes={single_view_codes}", *AR_RUN]
    sharded, plain = tmp_path / "sharded", tmp_path / "plain"
    _vqar([*run, "steps=3", "dist.strategy=fsdp", "--out", str(sharded)], 2, tmp_path)
    model = load(sharded)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    assert start.keys() == _weights(sharded).keys()
    done = _vqar([*run, "--out", str(sharded), "--resume"], 1, tmp_path)
    assert done.stderr.count("the checkpoint was written by 2 processes and is resumed by 1: random streams") == 1
    _vqar([*run, "--out", str(plain)], 1, tmp_path)
    resumed = _weights(sharded)
    _assert_trained(start, resumed)
    _assert_same_training(plain, sharded)
    # said once, not by every rank, and of one process in the singular
    again = _vqar([*run, "steps=7", "--out", str(plain), "--resume"], 2, tmp_path)
    assert again.stderr.count("vqar: the checkpoint was written by 1 process and is resumed by 2") == 1, again.stderr


def test_one_process_checkpoint_resumes_under_fsdp(tmp_path, single_view_codes):
    """A checkpoint of one process (or DDP) holds the optimizer state keyed by position, which FSDP refused ("written
    without FSDP; resume it with dist.strategy=ddp"): it now resumes sharded to the weights of an uninterrupted run."""
    run = ["train", "ar", "rq-mnist", f"codes={single_view_codes}", *AR_RUN]
    resumed, plain = tmp_path / "resumed", tmp_path / "plain"
    _vqar([*run, "steps=3", "--out", str(resumed)], 1, tmp_path)
    start = _weights(resumed)
    done = _vqar([*run, "dist.strategy=fsdp", "--out", str(resumed), "--resume"], 2, tmp_path)
    assert "resumed from" in done.stderr
    _vqar([*run, "--out", str(plain)], 1, tmp_path)
    _assert_trained(start, _weights(resumed))
    _assert_same_training(plain, resumed)


def test_distributed_sampling_writes_one_npz_with_the_exact_count(tmp_path, tiny_pipeline):
    from vqar.train.ar import train_ar
    from vqar.train.ar_config import load_run_config

    run_dir = tmp_path / "ar"
    cfg = load_run_config("rq-mnist", [f"codes={tiny_pipeline / 'codes'}", *TINY_AR, "steps=2", "sample.n_per_class=0"])
    train_ar(cfg, run_dir)
    args = ["sample", "--model", str(run_dir), "--n-per-class", "1", "--batch-size", "3", "--seed", "3",
            "--speculative", "--window", "3"]  # fmt: skip
    said = [_vqar([*args, "--out", str(tmp_path / name)], procs, tmp_path).stdout for name, procs in (("two", 2),
                                                                                                    ("one", 1))]
    # the whole run's figures (they were rank 0's share's)
    figures = [re.search(r"[\d.]+ model calls per image, \d+% of drafts accepted", text) for text in said]
    assert figures[0] and figures[1] and figures[0][0] == figures[1][0], said
    two = np.load(tmp_path / "two" / "samples.npz")
    one = np.load(tmp_path / "one" / "samples.npz")
    assert two["arr_0"].shape == one["arr_0"].shape == (10, 32, 32, 3)  # 10 digits x 1, batches of 3 over 2 ranks
    assert two["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(two["arr_1"], np.arange(10))  # the class labels, in order
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])  # batch i's noise depends on (seed, i) only
    assert not list((tmp_path / "two").glob(".gather-*")), "temporary shards are removed"


def test_two_process_tokenizer_trains_its_discriminator(tmp_path):
    """The GAN terms under DDP: the StyleGAN discriminator with R1 (a double backward through DDP) and the
    generator's adaptive weight both run and are logged."""
    run = tmp_path / "gan"
    gan = ["loss.disc_start=0", "loss.disc_weight=0.1", "loss.disc_arch=stylegan", "loss.r1_weight=1.0"]
    args = ["train", "tokenizer", "vitvqgan-mnist", "--out", str(run), "steps=4", "data.max_images=256", "bs=16"]
    done = _vqar([*args, *gan, "train.eval_every=4", "train.log_every=2"], 2, tmp_path)
    assert done.stdout.count("done:") == 1  # rank 0 reports
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 2 and all(np.isfinite(r["d_loss"]) and r["r1"] >= 0 for r in train)
    disc = _weights(run, "checkpoints/step-0000004/discriminator.safetensors")
    assert disc and all(torch.isfinite(v).all() for v in disc.values())


@pytest.mark.distributed
@pytest.mark.parametrize("source", ["folder", "shards"])
def test_two_process_extraction_writes_the_one_process_store(tmp_path, tiny_pipeline, source):
    from vqar.data.codes import CodeDataset
    from vqar.data.pack import pack_shards
    from vqar.data.transforms import to_uint8_nhwc

    if source == "shards":  # 5 tar shards of uneven size: ranks get 3 and 2 of them
        pack_shards("mnist", tmp_path / "shards", shard_size=70, max_images=300, captions="digits")
        data, sizes = str(tmp_path / "shards" / "shards.json"), []
    else:  # a class folder of 230 files, one of them damaged, cut into 4 units of 64
        from vqar.data import MnistDataset

        digits = MnistDataset(32, 1, max_images=230)
        for i in range(len(digits)):
            folder = tmp_path / "digits" / str(int(digits.labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_uint8_nhwc(digits.images[i : i + 1])[0, ..., 0]).save(folder / f"{i:04d}.png")
        sorted((tmp_path / "digits" / "3").iterdir())[0].write_bytes(b"damaged")
        data, sizes = str(tmp_path / "digits"), ["--shard-size", "64"]
    common = ["extract-codes", "--tokenizer", str(tiny_pipeline / "tokenizer"), "--data", data, "--flip",
              "--batch-size", "16", *sizes]  # fmt: skip
    _vqar([*common, "--out", str(tmp_path / "one")], 1, tmp_path)
    done = _vqar([*common, "--out", str(tmp_path / "two")], 2, tmp_path)
    assert done.stdout.count("wrote ") == 1  # rank 0 reports
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert one == two  # same shards, counts and checksums
    assert len(one["shards"]) == (5 if source == "shards" else 4)
    if source == "folder":
        assert one["skipped_files"] == 1 and one["num_items"] == 229
    else:
        # each rank wrote the caption shards of its tar shards; the manifests' equality covers their checksums
        assert all(s["sha256"]["captions"] for s in one["shards"]) and one["num_items"] == 300
    a, b = CodeDataset(tmp_path / "one"), CodeDataset(tmp_path / "two")
    assert all(torch.equal(a[i].codes, b[i].codes) and a[i].label == b[i].label for i in range(len(a)))
    assert all(a[i].captions == b[i].captions for i in range(len(a)))
    assert not list(tmp_path.glob(".*.partial"))


@pytest.mark.distributed
def test_two_process_tokenizer_training_streams_tar_shards(tmp_path):
    from vqar.data.pack import pack_shards

    # 6 shards: 5 for training (ranks x 1 worker read 3 and 2 of them per epoch), 1 held out for validation
    pack_shards("mnist", tmp_path / "shards", shard_size=50, max_images=300)
    run = tmp_path / "run"
    source = f"data.source={tmp_path / 'shards' / 'shards.json'}"
    args = ["train", "tokenizer", "rqvae-mnist", "--out", str(run), *TINY_RUN, "steps=6", "train.eval_every=6",
            source, "data.val_fraction=0.1", "data.num_workers=1"]  # fmt: skip
    done = _vqar(args, 2, tmp_path)
    assert "x 2 processes" in done.stderr and "250 images (50 for validation)" in done.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "val"] == [6]
    assert (run / "model.safetensors").is_file()


SAYING = """
import json, os
from vqar.parallel.runtime import first_to_say
mine = f"vqar: error: rank {os.environ['RANK']} alone"
print(json.dumps([first_to_say("vqar: error: on every rank"), first_to_say(mine), first_to_say(mine)]))
"""


def test_an_error_every_rank_meets_is_said_once_and_one_rank_meets_alone_is_said(tmp_path):
    """Every rank printed its `vqar: error:` line, so a missing file or a bad setting was said once per process;
    deduplicated in torchrun's agent store, an error of one rank alone is still said."""
    from vqar.parallel.runtime import first_to_say

    script = tmp_path / "saying.py"
    script.write_text(SAYING)
    done = subprocess.run([*torchrun(2), str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    said = sorted(json.loads(line) for line in done.stdout.splitlines() if line.startswith("["))
    assert said == [[False, True, False], [True, True, False]]
    assert first_to_say("vqar: error: x") and first_to_say("vqar: error: x")  # one process: always its own

    missing = ["sample", "--model", str(tmp_path / "nosuch"), "--classes", "1", "--out", str(tmp_path / "samples")]
    done = subprocess.run([*torchrun(2), "-m", "vqar.cli", *missing], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode != 0 and done.stderr.count("vqar: error: no model at") == 1, done.stderr[-3000:]


PREPARING = """
import contextlib, json, os, sys
from vqar.parallel import joined
from vqar.utils.io import write_lock
out, fail, said_to = sys.argv[1], sys.argv[2] == "fail", sys.argv[3]
ran = []
with joined() as par, contextlib.ExitStack() as held:
    def prepare():
        held.enter_context(write_lock(out))
        ran.append(os.path.exists(os.path.join(os.path.dirname(out), ".out.lock")))
        if fail:
            raise FileExistsError(f"{out} is not empty")
    try:
        par.main_prepares(prepare, f"the folder {out}")
        said = "prepared"
    except Exception as err:
        said = f"{type(err).__name__}: {err}"
    with open(os.path.join(said_to, f"rank{par.rank}.json"), "w") as handle:  # two ranks' prints may share a line
        json.dump([par.rank, ran, said], handle)
"""


def test_rank_0_prepares_an_output_for_every_rank_and_its_error_reaches_every_rank(tmp_path):
    """`Parallel.main_prepares`: the lock and the check run on rank 0 alone (the lock held while the body runs);
    an error there is rank 0's own on rank 0 and a PeerFailed naming the output on the others, so no rank goes on
    into the work alone."""
    script = tmp_path / "preparing.py"
    script.write_text(PREPARING)
    out = tmp_path / "out"
    refused = [f"FileExistsError: {out} is not empty",
               f"PeerFailed: rank 0 could not prepare the folder {out}; see its error"]  # fmt: skip
    for mode, said in (("ok", ["prepared", "prepared"]), ("fail", refused)):
        said_to = tmp_path / mode
        said_to.mkdir()
        done = subprocess.run([*torchrun(2), str(script), str(out), mode, str(said_to)], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        ranks = [json.loads((said_to / f"rank{rank}.json").read_text()) for rank in range(2)]
        assert ranks == [[0, [True], said[0]], [1, [], said[1]]], (mode, ranks)
        assert not (tmp_path / ".out.lock").exists()  # released with the stack


WARNING = """
import logging, os
from vqar.parallel.runtime import say_warnings_once_per_machine
logging.basicConfig(format="vqar: %(message)s")
say_warnings_once_per_machine()
log = logging.getLogger("vqar.train")
log.warning("on every rank")
log.warning("on every rank")
log.warning("rank %s alone", os.environ["RANK"])
logging.getLogger("elsewhere").warning("not vqar's")
"""


def test_a_warning_every_rank_meets_is_said_once_and_one_rank_meets_alone_is_said(tmp_path):
    """The other ranks' info lines were off, but each rank printed every warning (a setting, a checkpoint: all
    ranks meet it alike), so it was said once per process. A warning of one rank alone is still said, and one a
    process gives twice is said twice; other libraries' warnings are theirs to handle."""
    script = tmp_path / "warning.py"
    script.write_text(WARNING)
    done = subprocess.run([*torchrun(2), str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stderr
    assert said.count("vqar: on every rank") == 2, said
    assert said.count("vqar: rank 0 alone") == 1 and said.count("vqar: rank 1 alone") == 1, said
    assert said.count("vqar: not vqar's") == 2, said


def test_the_warnings_of_a_two_process_run_are_said_once(tmp_path, single_view_codes):
    """A resume that adds an EMA was told by both processes that the checkpoint holds no EMA weights."""
    run = ["train", "ar", "rq-mnist", f"codes={single_view_codes}", *AR_RUN]
    _vqar([*run, "steps=3", "--out", str(tmp_path / "run")], 2, tmp_path)
    done = _vqar([*run, "steps=4", "train.ema_decay=0.9", "--out", str(tmp_path / "run"), "--resume"], 2, tmp_path)
    assert done.stderr.count("holds no EMA weights") == 1, done.stderr


RANK_1_FAILS_FIRST = """
import os, time
import vqar.commands.sample as sample
import vqar.utils.io as io
from vqar.cli import entry
made = io.check_folder_writable
def made_then_slow(*args, **kwargs):  # rank 0 makes --out, then is still at work when rank 1 fails
    made(*args, **kwargs)
    time.sleep(120)
def fails(args):
    raise ValueError("rank 1 fails")
if os.environ["RANK"] == "0":
    io.check_folder_writable = made_then_slow
else:
    sample.settings_from = fails
entry()  # as the installed `vqar`: a torchrun worker skips the interpreter's teardown (see vqar.cli.entry)
"""


RANK_0_STILL_STARTING = """
import os, time
from vqar.cli import entry
if os.environ["RANK"] == "0":
    time.sleep(120)  # still starting when rank 1 finds the mistake: the launcher stops it
entry()
"""


@pytest.mark.parametrize(("mistake", "said"), [
    (["train", "ar", "rq-mnist", "codes=/no/such/store"], "vqar: error: data.codes: no code store at /no/such/store"),
    (["train", "ar", "rq-mnist", "--bogus"], "vqar train: error: unrecognized arguments: --bogus"),
])  # fmt: skip
def test_a_mistake_in_the_command_is_said_by_the_first_rank_to_find_it(tmp_path, mistake, said):
    """Said by LOCAL_RANK 0 alone, it was lost whenever another rank found it first: torchrun stopped rank 0 before
    it printed (4 of 8 launches with a missing code store said nothing but torchrun's 'exitcode: 2')."""
    script = tmp_path / "rank_0_still_starting.py"
    script.write_text(RANK_0_STILL_STARTING)
    command = [*torchrun(2), str(script), *mistake, "--out", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=110,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode != 0 and done.stderr.count(said) == 1, done.stderr[-3000:]


RANK_1_KILLED_AT_STEP_3 = """
import os, signal
from vqar.cli import entry
from vqar.train.loop import Trainer
step = Trainer._train_step
def killed_at_step_3(self, batch):  # as the OOM killer would: no handler runs, no word is said
    if self.step == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, batch)
Trainer._train_step = killed_at_step_3
entry()
"""


def test_a_rank_killed_outright_is_one_line_from_the_others_naming_the_checkpoint(tmp_path):
    """Rank 0 printed a 46-line traceback of gloo's 'Connection closed by peer' from whichever collective it was in."""
    script = tmp_path / "rank_1_killed.py"
    script.write_text(RANK_1_KILLED_AT_STEP_3)
    run = ["train", "tokenizer", "rqvae-mnist", *TOKENIZER_RUN, "train.ckpt_every=2", "--out", str(tmp_path / "run")]
    done = subprocess.run([*torchrun(2), str(script), *run], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode != 0 and "[rank0]:" not in done.stderr, done.stderr[-3000:]  # (torchrun's own follows)
    said = [line for line in done.stderr.splitlines() if line.startswith("vqar: error:")]
    assert len(said) == 1 and said[0].startswith("vqar: error: another process of this torchrun launch is gone ("), said
    assert said[0].endswith("; the newest checkpoint (step 2) is intact (resume with --resume)"), said


def test_rank_0_stopped_by_the_launcher_removes_the_folders_it_made(tmp_path):
    """A rank that fails first ends the launch: torchrun's SIGTERM killed rank 0 outright, and the empty --out
    folders rank 0 had made stayed (2 of 6 launches of a sample with an unknown class)."""
    script = tmp_path / "rank_1_fails_first.py"
    script.write_text(RANK_1_FAILS_FIRST)
    out = tmp_path / "made" / "samples"
    command = [*torchrun(2), str(script), "sample", "--model", str(tmp_path / "model"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=110, env=env)
    assert done.returncode != 0 and done.stderr.count("vqar: error: rank 1 fails") == 1, done.stderr[-3000:]
    assert not (tmp_path / "made").exists()


def test_a_launcher_killed_outright_stops_its_workers_with_a_checkpoint(tmp_path):
    """torchrun starts each worker in a session of its own: with the launcher killed outright (`kill -9`, the OOM
    killer), its workers trained on in the background, orphaned, holding the run's lock."""
    run_dir = tmp_path / "run"
    command = [*torchrun(2), "-m", "vqar.cli", "train", "tokenizer", "rqvae-mnist", *TOKENIZER_RUN, "steps=100000",
               "train.log_every=1", "train.eval_every=100000", "--out", str(run_dir)]  # fmt: skip
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        for _ in range(600):  # up to 5 minutes for the launch on a busy host
            if '"train"' in ((run_dir / "metrics.jsonl").read_text() if (run_dir / "metrics.jsonl").exists() else ""):
                break
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            time.sleep(0.5)
        launcher.kill()
        # the workers hold the launcher's stderr: it ends when they have
        _, stderr = launcher.communicate(timeout=120)
    finally:
        for pid in _processes_naming(str(run_dir)):  # without the fix: the orphans, which would train on
            os.kill(pid, signal.SIGKILL)
    # One SIGTERM, which training answers with a checkpoint: Linux sends its notice again as each thread of the dying
    # launcher ends, and a second SIGTERM stopped the workers at once, as a second Ctrl-C does (2 launches in 4)
    assert re.search(r"SIGTERM received: writing a checkpoint at step \d+ and stopping", stderr), stderr[-3000:]
    assert any(path.name.startswith("step-") for path in (run_dir / "checkpoints").iterdir())


def _processes_naming(text: str) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):  # ended meanwhile
            if text in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry))
    return found
