"""Codebook statistics under torch.distributed (2 gloo processes on the CPU)."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqar.quantize import MultiScaleQuantizer, ResidualQuantizer, VectorQuantizer

pytestmark = pytest.mark.distributed

WORLD = 2
K, DIM = 16, 4


def _batch(rank: int, n: int) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(100 + rank)) * 2


def _worker(rank: int, scenario: str, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=30),
    )
    torch.manual_seed(0)  # identical initial codebooks on every rank, as DDP would give
    try:
        if scenario == "ema_sync":
            vq = VectorQuantizer(K, DIM, decay=0.8, restart_dead=False).train()
            for _ in range(3):
                vq(_batch(rank, 40))
            state = vq.state_dict()
        elif scenario == "restart_sync":
            rq = ResidualQuantizer(K, DIM, 2, shared_codebook=False, restart_dead=True).train()
            rq(_batch(rank, 40 if rank == 0 else 7))  # every count starts below 1: all codes restart
            state = rq.state_dict()
        elif scenario == "disagreement":
            vq = VectorQuantizer(K, DIM, kmeans_init=True, restart_dead=True).train()
            if rank == 0:
                vq.codebook.initialized.fill_(True)  # e.g. loaded from a checkpoint on one rank only
                vq.codebook.cluster_size_ema.fill_(5.0)  # and no dead codes there
            vq(_batch(rank, 50 if rank == 0 else 3))  # unequal batches, rank 1 smaller than K
            vq(_batch(rank, 0 if rank == 1 else 20))  # an empty batch on one rank
            state = vq.state_dict()
        elif scenario == "multiscale":
            # Every code counts as dead at every step (threshold 100): restarts on both steps, one of them with
            # an empty batch on rank 1.
            ms = MultiScaleQuantizer(K, DIM, (1, 2, 4), kmeans_init=True, dead_threshold=100.0).train()
            for n in ((5, 2), (3, 0)):  # unequal batches, then an empty one on rank 1
                ms(torch.randn(n[rank], 4, 4, DIM, generator=torch.Generator().manual_seed(rank)))
            state = ms.state_dict()
        torch.save({k: v.clone() for k, v in state.items()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(scenario: str, tmp_path: Path) -> list[dict[str, torch.Tensor]]:
    context = mp.start_processes(
        _worker,
        args=(scenario, str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.time() + 120
    while not context.join(timeout=5):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed scenario {scenario!r} hung")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_ema_statistics_are_all_reduced(tmp_path):
    states = _run("ema_sync", tmp_path)
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    # Same as one process seeing both ranks' vectors together.
    torch.manual_seed(0)
    single = VectorQuantizer(K, DIM, decay=0.8, restart_dead=False).train()
    for _ in range(3):
        single(torch.cat([_batch(0, 40), _batch(1, 40)]))
    for key, value in single.state_dict().items():
        assert torch.allclose(states[0][key].float(), value.float(), rtol=1e-5, atol=1e-6), key


def test_restarts_are_broadcast(tmp_path):
    states = _run("restart_sync", tmp_path)
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_ranks_that_disagree_do_not_hang(tmp_path):
    states = _run("disagreement", tmp_path)
    # k-means ran on every rank (one rank asked for it) and its centroids came from rank 0.
    assert all(bool(s["codebook.initialized"]) for s in states)
    assert torch.equal(states[0]["codebook.weight"], states[1]["codebook.weight"])


def test_multiscale_codebook_stays_identical_across_ranks(tmp_path):
    """k-means on the scale pool, one all-reduced update per step over every scale, restarts from rank 0."""
    states = _run("multiscale", tmp_path)
    assert bool(states[0]["codebook.initialized"])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
