"""The code store: a dataset encoded once by a tokenizer, so AR training reads integer codes, not images.

    CODES_DIR/
        manifest.json           code shape, codebook size, views, classes, shard list with sha256
        tokenizer/              the tokenizer that made the codes (config.json + model.safetensors)
        codes-00000.npy         (n, V, h, w[, D]) uint16 (int32 for codebooks over 65,536 codes)
        labels-00000.npy        (n,) int64, -1 for unlabeled images
        captions-00000.jsonl    text-to-image stores only: each item's captions as a JSON list, one line each
        captions-00000.offsets.npy  (n + 1,) int64 byte offsets of those lines (`vqar.data.caption_store`)
        ...

A text-to-image store leaves out images without a caption. Stores made before caption shards hold one
`captions.json` ([[caption, ...] per item]) instead of the caption files of each shard; they are still read.

Each item holds V views of one image: 1 (as is), 2 (with its mirror image, `flip`) or 10 (LlamaGen's ten-crop).
`vqar.data.extraction` writes stores; this module reads them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vqar.data.caption_store import open_captions
from vqar.utils.io import sha256_file

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
    if not Path(path).exists():
        raise FileNotFoundError(f"no code store at {path}: the path does not exist (make one with `vqar "
                                "extract-codes --out`)")  # fmt: skip
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} is not a code store (no {MANIFEST}); make one with `vqar extract-codes`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path} is not a vqar code store manifest")
    return manifest


def is_code_store(path: str | Path) -> bool:
    """Whether `path` holds a code store's manifest (what `vqar extract-codes --overwrite` may replace)."""
    try:
        read_manifest(path)
    except (OSError, ValueError, AttributeError):  # missing, unreadable, not JSON, not a JSON object
        return False
    return True


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
        # Caption shards are read item by item when asked for (a store made before holds one captions.json).
        self.captions: Sequence[list[str]] | None = open_captions(self.path, self.manifest, verify)
        if self.captions is not None and len(self.captions) != len(self.labels):
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
    def evaluation_view(self) -> int:
        """The view validation scores: the image as it is, or for ten-crop its centre crop (crop4, after the four
        corners), not its top-left corner."""
        return 4 if self.manifest["views"] == VIEWS["ten-crop"] else 0

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


def check_labelled(store: CodeDataset, num_classes: int) -> None:
    """ValueError for a class-conditional model on a store with unlabelled items (label -1): the class embedding
    has no row for them, and the run failed at its first evaluation, after training, with nothing saved."""
    unlabelled = int((store.labels < 0).sum()) if num_classes else 0
    if unlabelled:
        why, fix = _why_unlabelled(str(store.manifest.get("source", "")))
        raise ValueError(f"the code store {store.path} holds {unlabelled} of its {len(store)} items without a class "
                         f"(label -1: {why}), which a class-conditional model cannot train on: {fix}, and extract "
                         "the codes again")  # fmt: skip


def _why_unlabelled(source: str) -> tuple[str, str]:
    """How items of a store made from `source` (its manifest's) came to have no class, and the way out."""
    from vqar.data.shards import is_shard_source

    if Path(source).suffix in (".npz", ".npy"):
        return (f"images whose label in {source} is -1, or all of them where it holds no labels",
                "give those images a class id >= 0, or leave them out of the array")
    if is_shard_source(source):
        return "samples of the shards without a cls member", "add a cls member to those samples, or leave them out"
    return ("images that lay directly in the image folder, beside its class folders",
            "move those images into a class folder, or out of the folder")
