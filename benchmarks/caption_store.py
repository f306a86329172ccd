"""Caption stores at CC-3M scale: caption shards (`vqar.data.caption_store`) vs the old single captions.json.

Three synthetic code stores share the same codes and labels (`--items` items, 2x2 uint16 codes, shards of
`--shard-size` items as extraction makes them): one without captions (the baseline), one with caption shards and
one with the old captions.json. Captions are CC-3M-like: one per image, 4 to 20 words from a 5,000-word vocabulary
(about 85 characters, longer than CC-3M's on average).

Each measurement is a fresh process that opens the store as training does (`CodeDataset(path)`, checksums
verified) and reads `--batches` training batches of `--batch-size` random items (a full epoch by default) through
`vqar.data.training_loader` with `--workers` forked loader workers. This process watches it and its workers every
20 ms and reports:
- open: seconds to open the store (in the measured process);
- peak RSS: the highest sum of the resident sets of the process and its workers (pages shared between them, such
  as those a forked worker inherits, count once per process, as `top` shows them);
- peak PSS: the same with shared pages divided among the processes sharing them (the memory really used);
- items/s: loader throughput.
Rounds alternate the stores; the best open time and the highest peaks over the rounds are kept.

    flock /tmp/vqar-bench.lock python benchmarks/caption_store.py                  # 3.3M captions, ~15 min
    python benchmarks/caption_store.py --items 200000 --batches 100                # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, run_script  # noqa: E402
from vqar.commands.common import non_negative_int, positive_int  # noqa: E402

STORES = ("empty", "shards", "captions.json")


# ---------------------------------------------------------------- synthetic stores
def synthetic_captions(count: int, seed: int = 0):
    """CC-3M-like captions in chunks: one per item, 4 to 20 words of a Zipf-weighted 5,000-word vocabulary."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 10)))
                           for _ in range(5000)])  # fmt: skip
    weights = 1.0 / np.arange(1, 5001)
    weights /= weights.sum()
    for start in range(0, count, 100_000):
        n = min(100_000, count - start)
        lengths = rng.integers(4, 21, size=n)
        words = vocabulary[rng.choice(5000, size=int(lengths.sum()), p=weights)]
        cuts = np.cumsum(lengths)[:-1]
        yield [[" ".join(item)] for item in np.split(words, cuts)]


def make_stores(root: Path, items: int, shard_size: int) -> dict[str, Path]:
    """The three stores under `root` (kept for later runs: made only when missing)."""
    from vqar.data.caption_store import LAYOUT, shard_names, write_caption_shard
    from vqar.data.codes import FORMAT
    from vqar.utils.io import sha256_file

    paths = {name: root / name.replace(".", "-") for name in STORES}
    marker = root / "made.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"items": items, "shard_size": shard_size}:
        return paths
    shutil.rmtree(root, ignore_errors=True)
    for path in paths.values():
        path.mkdir(parents=True)
    base = {"format": FORMAT, "version": 1, "code_shape": [2, 2], "codebook_size": 1024, "image_size": 32,
            "channels": 3, "views": ["image"], "num_items": items, "num_classes": 0, "class_names": []}  # fmt: skip
    rng = np.random.default_rng(1)
    shards, every_caption = [], []
    bar = tqdm(total=items, desc="writing synthetic stores", unit="item", dynamic_ncols=True)
    pending: list[list[str]] = []
    chunks = synthetic_captions(items)
    for u, start in enumerate(range(0, items, shard_size)):
        count = min(shard_size, items - start)
        while len(pending) < count:
            pending.extend(next(chunks))
        captions, pending = pending[:count], pending[count:]
        names = {"codes": f"codes-{u:05d}.npy", "labels": f"labels-{u:05d}.npy"}
        np.save(paths["empty"] / names["codes"], rng.integers(0, 1024, size=(count, 1, 2, 2), dtype=np.uint16))
        np.save(paths["empty"] / names["labels"], np.full(count, -1, dtype=np.int64))
        sha = {k: sha256_file(paths["empty"] / f) for k, f in names.items()}
        for other in ("shards", "captions.json"):  # the same codes and labels, without a copy
            for file in names.values():
                os.link(paths["empty"] / file, paths[other] / file)
        write_caption_shard(paths["shards"], shard_names(u), captions)
        sha.update({k: sha256_file(paths["shards"] / f) for k, f in shard_names(u).items()})
        shards.append({**names, **shard_names(u), "count": count, "sha256": sha})
        every_caption.extend(captions)
        bar.update(count)
    bar.close()
    plain = [{"codes": s["codes"], "labels": s["labels"], "count": s["count"],
              "sha256": {k: s["sha256"][k] for k in ("codes", "labels")}} for s in shards]  # fmt: skip
    (paths["empty"] / "manifest.json").write_text(json.dumps({**base, "shards": plain}))
    (paths["shards"] / "manifest.json").write_text(
        json.dumps({**base, "shards": shards, "captions": {"layout": LAYOUT}})
    )
    legacy = paths["captions.json"] / "captions.json"  # as extraction wrote it before caption shards
    legacy.write_text(json.dumps(every_caption, ensure_ascii=False), encoding="utf-8")
    captions_entry = {"file": legacy.name, "sha256": sha256_file(legacy)}
    (paths["captions.json"] / "manifest.json").write_text(
        json.dumps({**base, "shards": plain, "captions": captions_entry})
    )
    marker.write_text(json.dumps({"items": items, "shard_size": shard_size}))
    return paths


# ---------------------------------------------------------------- the measured process
def measured(store: str, batches: int, batch_size: int, workers: int) -> None:
    """Opens `store` and reads its training batches; prints one JSON line."""
    import torch

    from vqar.data import training_loader
    from vqar.data.codes import CodeDataset, collate_codes

    torch.set_num_threads(1)
    start = time.perf_counter()
    dataset = CodeDataset(store)
    opened = time.perf_counter() - start
    batches = min(batches, len(dataset) // batch_size)
    loader = training_loader(dataset, epoch=0, start=0, batches=batches, batch_size=batch_size, seed=0,
                             num_workers=workers, collate_fn=collate_codes)  # fmt: skip
    start, items, letters = time.perf_counter(), 0, 0
    for number, batch in enumerate(loader):
        if number == batches:  # the loader runs to the end of the epoch (training stops it at its step count)
            break
        items += len(batch)
        letters += sum(len(c[0]) for c in batch.captions) if batch.captions is not None else 0
    print(json.dumps({"open_s": opened, "items": items, "items_per_s": items / (time.perf_counter() - start),
                      "caption_chars": letters}))  # fmt: skip


def _kib(pid: int, path: str, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (the loader workers), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(parents.get(found[-1], []))
    return found


def run_measured(store: Path, args) -> dict:
    command = [sys.executable, __file__, "--measure", str(store), "--batches", str(args.batches),
               "--batch-size", str(args.batch_size), "--workers", str(args.workers)]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak_rss = peak_pss = 0
    most_processes = 1
    while child.poll() is None:
        pids = _tree(child.pid)
        rss = sum(_kib(p, "status", "VmRSS:") for p in pids)
        pss = sum(_kib(p, "smaps_rollup", "Pss:") for p in pids)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        most_processes = max(most_processes, len(pids))
        time.sleep(0.02)
    out, _ = child.communicate()
    if child.returncode:
        raise SystemExit(f"measuring {store} failed (exit {child.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_rss_mb": peak_rss / 1024, "peak_pss_mb": peak_pss / 1024, "processes": most_processes}


def cpu_kind() -> str:
    from vqar.utils import device

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{device.cpu_kind()}, {os.cpu_count()} cores, load average {load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=positive_int, default=3_300_000,
                        help="captions (items) per store (CC-3M: 3.3M)")  # fmt: skip
    parser.add_argument("--shard-size", type=positive_int, default=10_000,
                        help="items per shard (extraction's default)")  # fmt: skip
    parser.add_argument("--batches", type=positive_int, default=10**9,
                        help="training batches to read (default: an epoch)")  # fmt: skip
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--workers", type=non_negative_int, default=2, help="loader workers")
    parser.add_argument("--rounds", type=positive_int, default=2, help="measurements of each store (alternating)")
    parser.add_argument("--out", type=Path, default=None, help="keep the stores here for later runs (else a temp dir)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measured(args.measure, args.batches, args.batch_size, args.workers)
        return
    temp = None if args.out else tempfile.TemporaryDirectory(prefix="vqar-captions-")
    root = args.out or Path(temp.name)
    try:
        paths = make_stores(root, args.items, args.shard_size)
        sizes = {"shards": sum(f.stat().st_size for f in paths["shards"].glob("captions-*")),
                 "captions.json": (paths["captions.json"] / "captions.json").stat().st_size}  # fmt: skip
        results: dict[str, list[dict]] = {name: [] for name in STORES}
        for _ in range(args.rounds):
            for name in STORES:
                results[name].append(run_measured(paths[name], args))
        print(f"{date.today()}, {cpu_kind()}; {args.items:,} items in shards of {args.shard_size:,}, "
              f"{args.workers} loader workers, batch {args.batch_size}, {results['empty'][0]['items']:,} items read "
              f"per measurement, best open / highest peaks of {args.rounds} rounds")  # fmt: skip
        summary = {}
        for name in STORES:
            runs = results[name]
            summary[name] = {"open_s": min(r["open_s"] for r in runs),
                             "rss": max(r["peak_rss_mb"] for r in runs), "pss": max(r["peak_pss_mb"] for r in runs),
                             "rate": max(r["items_per_s"] for r in runs)}  # fmt: skip
        base = summary["empty"]
        rows = []
        for name in STORES:
            s = summary[name]
            rows.append([name, f"{sizes[name] / 2**20:.0f}" if name in sizes else "-", f"{s['open_s']:.2f}",
                         f"{s['rss']:.0f}", f"{s['rss'] - base['rss']:+.0f}", f"{s['pss']:.0f}",
                         f"{s['pss'] - base['pss']:+.0f}", f"{s['rate']:,.0f}"])  # fmt: skip
        print_table(["store", "caption files (MiB)", "open (s)", "peak RSS (MiB)", "vs empty", "peak PSS (MiB)",
                     "vs empty", "items/s"], rows)  # fmt: skip
        new = summary["shards"]
        meets = new["open_s"] < 2 and new["rss"] - base["rss"] < 300
        print(
            f"goal (caption shards: open < 2 s, peak RSS < 300 MB above the empty store's): "
            f"{'met' if meets else 'NOT met'} (open {new['open_s']:.2f} s, {new['rss'] - base['rss']:+.0f} MB)"
        )
    finally:
        if temp is not None:
            temp.cleanup()


if __name__ == "__main__":
    run_script(main)
