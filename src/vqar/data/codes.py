"""The code store: a dataset encoded once by a tokenizer, so AR training reads integer codes, not images.

    CODES_DIR/
        manifest.json           code shape, codebook size, views, classes, shard list with sha256
        tokenizer/              the tokenizer that made the codes (config.json + model.safetensors)
        codes-00000.npy         (n, V, h, w[, D]) uint16 (int32 for codebooks over 65,536 codes)
        labels-00000.npy        (n,) int64, -1 for unlabeled images
        ...
        captions.json           [[caption, ...] per item], for text-to-image stores (images without one are left out)

Each item holds V views of one image: 1 (as is), 2 (with its mirror image, `flip`) or 10 (LlamaGen's ten-crop).
The store is assembled in a temporary folder and renamed into place when complete, so a crash never leaves a
half-written store behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vqar.data.config import DataConfig
from vqar.data.datasets import open_dataset
from vqar.data.loading import BadFileReport, Batch, EpochSampler, make_loader
from vqar.data.transforms import ten_crop
from vqar.utils.io import fsync_dir, remove_leftovers, sha256_file

log = logging.getLogger("vqar.data")

FORMAT = "vqar-codes"
MANIFEST = "manifest.json"
VIEWS = {"none": ["image"], "flip": ["image", "mirror"], "ten-crop": [f"crop{i}" for i in range(10)]}


@dataclass
class CodeSample:
    codes: torch.Tensor  # (V, h, w[, D]) int64
    label: int
    index: int
    captions: list[str] | None = None


@dataclass
class CodeBatch:
    codes: torch.Tensor  # (B, V, h, w[, D]) int64
    labels: torch.Tensor  # (B,)
    indices: torch.Tensor
    captions: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.labels)


def collate_codes(items: list[CodeSample]) -> CodeBatch:
    return CodeBatch(
        codes=torch.stack([item.codes for item in items]),
        labels=torch.tensor([item.label for item in items], dtype=torch.long),
        indices=torch.tensor([item.index for item in items], dtype=torch.long),
        captions=[item.captions for item in items] if items and items[0].captions is not None else None,
    )


def read_manifest(path: str | Path) -> dict:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} is not a code store (no {MANIFEST}); make one with `vqar extract-codes`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path} is not a vqar code store manifest")
    return manifest


class CodeDataset(Dataset):
    """All items of a code store, memory-mapped. `verify=True` checks every shard against its checksum."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        codes, labels = [], []
        for shard in self.manifest["shards"]:
            for key in ("codes", "labels"):
                file = self.path / shard[key]
                if not file.is_file():
                    raise FileNotFoundError(f"code store {self.path} is missing {shard[key]}")
                if verify and sha256_file(file) != shard["sha256"][key]:
                    raise ValueError(f"code store shard {file} is damaged (checksum mismatch); extract the codes again")
            codes.append(np.load(self.path / shard["codes"], mmap_mode="r"))
            labels.append(np.load(self.path / shard["labels"]))
        self.shard_codes = codes
        self.labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        self.offsets = np.cumsum([0] + [len(c) for c in codes])
        if len(self.labels) == 0:
            raise ValueError(f"code store {self.path} holds no items")
        self.captions: list[list[str]] | None = None
        if self.manifest.get("captions"):
            entry = self.manifest["captions"]
            file = self.path / entry["file"]
            if not file.is_file() or (verify and sha256_file(file) != entry["sha256"]):
                raise ValueError(f"code store {self.path}: {entry['file']} is missing or damaged; extract again")
            self.captions = json.loads(file.read_text(encoding="utf-8"))
            if len(self.captions) != len(self.labels):
                raise ValueError(f"code store {self.path}: {len(self.captions)} caption lists for {len(self)} items")

    @property
    def has_captions(self) -> bool:
        return self.captions is not None

    @property
    def code_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["code_shape"])

    @property
    def codebook_size(self) -> int:
        return int(self.manifest["codebook_size"])

    @property
    def num_views(self) -> int:
        return len(self.manifest["views"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> CodeSample:
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        row = np.asarray(self.shard_codes[shard][index - self.offsets[shard]], dtype=np.int64)
        captions = self.captions[index] if self.captions is not None else None
        return CodeSample(codes=torch.from_numpy(row), label=int(self.labels[index]), index=index, captions=captions)


def _views(images: torch.Tensor, views: str, size: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, V, C, size, size)."""
    if views == "ten-crop":
        return ten_crop(images, size)
    if views == "flip":
        return torch.stack([images, images.flip(-1)], dim=1)
    return images[:, None]


def _encode(tokenizer, images: torch.Tensor, views: str, size: int) -> np.ndarray:
    """(B, C, S, S) images -> (B, V, h, w[, D]) codes of their views."""
    stack = _views(images, views, size)
    codes = tokenizer.encode(stack.flatten(0, 1)).view(len(stack), stack.shape[1], *tokenizer.code_shape(size))
    return codes.cpu().numpy()


def _save_tokenizer(tokenizer, tokenizer_dir: str | Path | None, dest: Path) -> None:
    """Copies `tokenizer_dir` without its training leftovers when given, else saves `tokenizer`."""
    from vqar.bundle import save_pretrained

    if tokenizer_dir is not None:
        skip = shutil.ignore_patterns("checkpoints", "*.png", "*.jsonl", "*.yaml")
        shutil.copytree(tokenizer_dir, dest, ignore=skip)
    else:
        save_pretrained(tokenizer, dest)


class _StoreWriter:
    """Assembles a code store in a temporary folder beside `out_dir`, in shards of `shard_size` items or more.
    `publish` renames the complete store into place; leaving the `with` block removes whatever is left, so a crash
    never leaves a half-written store.

    `source_captions` (a caption list per dataset index) makes a text-to-image store: it keeps only the images
    with a caption."""

    def __init__(self, out_dir: Path, codebook_size: int, shard_size: int, source_captions: Sequence[list[str]] | None):
        self.out_dir, self.shard_size, self.source_captions = out_dir, shard_size, source_captions
        self.folder = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.folder, ignore_errors=True)  # left by a killed extraction that had the same process id
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        for leftover in remove_leftovers(out_dir.parent, prefix=f".{out_dir.name}.tmp-"):
            log.info("removed %s, left by an extraction that was killed", leftover)
        self.folder.mkdir()
        self.dtype = np.uint16 if codebook_size <= 65536 else np.int32
        self.shards: list[dict] = []
        self.captions: list[list[str]] = []
        self.uncaptioned = 0
        self._codes: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._pending = 0

    def __enter__(self) -> _StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def keep_captioned(self, batch: Batch) -> None:
        """In a text-to-image store, drops the images of `batch` without a caption (in place) and keeps the captions
        of the others."""
        if self.source_captions is None or len(batch) == 0:
            return
        keep = torch.tensor([bool(self.source_captions[i]) for i in batch.indices.tolist()])
        self.uncaptioned += int((~keep).sum())
        batch.images, batch.labels, batch.indices = batch.images[keep], batch.labels[keep], batch.indices[keep]
        self.captions.extend(self.source_captions[i] for i in batch.indices.tolist())

    def add(self, codes: np.ndarray, labels: np.ndarray) -> None:
        self._codes.append(codes)
        self._labels.append(labels)
        self._pending += len(codes)
        if self._pending >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Writes the buffered items as the next shard, with the checksums `CodeDataset` verifies."""
        if not self._codes:
            return
        name = f"{len(self.shards):05d}"
        codes = np.concatenate(self._codes)
        files = {"codes": f"codes-{name}.npy", "labels": f"labels-{name}.npy"}
        np.save(self.folder / files["codes"], codes.astype(self.dtype))
        np.save(self.folder / files["labels"], np.concatenate(self._labels).astype(np.int64))
        sha256 = {key: sha256_file(self.folder / file) for key, file in files.items()}
        self.shards.append({**files, "count": len(codes), "sha256": sha256})
        self._codes.clear()
        self._labels.clear()
        self._pending = 0

    def publish(self, manifest: dict) -> None:
        """Writes the captions, if any (adding their entries to `manifest`), and the manifest, then renames the store
        to `out_dir`, replacing an existing one."""
        if self.source_captions is not None:
            file = self.folder / "captions.json"
            file.write_text(json.dumps(self.captions, ensure_ascii=False), encoding="utf-8")
            manifest["captions"] = {"file": file.name, "sha256": sha256_file(file)}
            manifest["uncaptioned_images"] = self.uncaptioned
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
        fsync_dir(self.folder)
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        os.replace(self.folder, self.out_dir)
        fsync_dir(self.out_dir.parent)
        return manifest


@torch.no_grad()
def extract_codes(
    tokenizer,
    data: DataConfig,
    out_dir: str | Path,
    *,
    views: str = "none",
    crop_range: float = 1.1,
    device: torch.device | str = "cpu",
    shard_size: int = 100_000,
    overwrite: bool = False,
    tokenizer_dir: str | Path | None = None,
) -> dict:
    """Encodes every image of `data.source` with `tokenizer` into a code store at `out_dir`; returns the manifest.

    `data.image_size` and `data.channels` are the tokenizer's input; with `views="ten-crop"` images are first fitted
    to round(image_size * crop_range). `tokenizer_dir`, when given, is copied into the store (else the tokenizer is
    saved there)."""
    if views not in VIEWS:
        raise ValueError(f"views must be one of {sorted(VIEWS)}, got {views!r}")
    if crop_range < 1.0:
        raise ValueError(f"crop_range must be >= 1, got {crop_range}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it or choose another --out")
    size = data.image_size
    fit = round(size * crop_range) if views == "ten-crop" else size
    dataset = open_dataset(DataConfig(**{**data.__dict__, "image_size": fit, "val_fraction": 0.0}))
    tokenizer = tokenizer.to(device).eval()
    bad = BadFileReport()
    source_captions = getattr(dataset, "captions", None)
    with _StoreWriter(out_dir, tokenizer.codebook_size, shard_size, source_captions) as store:
        sampler = EpochSampler(len(dataset), seed=0, shuffle=False)
        loader = make_loader(dataset, data.eval_batch_size, sampler=sampler, num_workers=data.num_workers)
        for batch in tqdm(loader, desc="extracting codes", leave=False):
            bad.add(batch.bad)
            store.keep_captioned(batch)
            if len(batch):
                store.add(_encode(tokenizer, batch.images.to(device), views, size), batch.labels.numpy())
        store.flush()
        if not store.shards:
            raise ValueError(f"no readable images in {data.source}")
        _save_tokenizer(tokenizer, tokenizer_dir, store.folder / "tokenizer")
        manifest = {
            "format": FORMAT,
            "version": 1,
            "code_shape": list(tokenizer.code_shape(size)),
            "codebook_size": tokenizer.codebook_size,
            "image_size": size,
            "channels": data.channels,
            "source": str(data.source),
            "views": VIEWS[views],
            "crop_range": crop_range if views == "ten-crop" else None,
            "num_items": int(sum(s["count"] for s in store.shards)),
            "num_classes": int(getattr(dataset, "num_classes", 0)),
            "class_names": list(getattr(dataset, "class_names", [])),
            "skipped_files": bad.count,
            "shards": store.shards,
        }
        store.publish(manifest)
    if bad.summary():
        log.warning(bad.summary())
    return manifest
