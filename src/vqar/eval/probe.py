"""Linear probing of an AR model's features (the ViT-VQGAN / VIM protocol, after iGPT): encode images to codes,
run the frozen model teacher-forced, average-pool the outputs of one transformer block over the image tokens, and
fit a linear (multinomial logistic) classifier on the training split; report accuracy on the held-out split.
Middle blocks usually probe best. The baseline is the same probe on raw pixels resized to the code grid (VAR's
finest scale); the chance level, what a probe that learned nothing scores, is always answering the training split's
most common class.
The classes are the labels present in the data (labels {3, 7} are 2 classes), whatever their range.

Conditional models are probed without their condition (the null class), which would otherwise leak the label.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from vqar.ar import ARModel, Conditioning
from vqar.data import BadSample, DataConfig, ShardDataset, check_readable, collate_samples, open_dataset, split_dataset
from vqar.data.shard_streams import whole_shards_loader

log = logging.getLogger(__name__)

# Every labelled source `open_dataset` reads (`load_array_file` takes the labels of an .npz from these keys); an
# error that listed fewer sent users with labelled .npz files or tar shards to convert them for nothing.
LABELLED_SOURCES = ("give 'mnist', a folder with one sub-folder per class, a .npz with labels (labels, y or arr_1) "
                    "or tar shards with cls members")


@torch.no_grad()
def block_features(model: ARModel, codes: torch.Tensor, layer: int) -> torch.Tensor:
    """Mean over image tokens of block `layer`'s output, (B, dim): the model's `layers` (an RQ-Transformer's
    spatial blocks), run without the condition (the null class or caption, or the start token)."""
    check_probeable(model, layer)
    blocks = model.layers
    captured = {}
    handle = blocks[layer].register_forward_hook(lambda module, args, out: captured.__setitem__("out", out))
    try:
        model(codes, None)
    finally:
        handle.remove()
    return captured["out"][:, model.prefix_length :].float().mean(1)  # the condition tokens come first


def check_probeable(model: ARModel, layer: int) -> None:
    """ValueError unless block `layer` of `model` can be probed: checked before any image is read."""
    blocks = len(model.layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < blocks:
        raise ValueError(f"layer must be in [0, {blocks}) for this model (its blocks are 0..{blocks - 1}), got "
                         f"{layer!r}")  # fmt: skip
    if model.conditioning is not Conditioning.NONE and not model.has_null_condition:
        raise ValueError("probing a conditional model needs its null condition (train with class dropout)")


def _pixel_grid(model: ARModel) -> tuple[int, int]:
    """The grid the pixel baseline is resized to: the model's latent grid (not `code_shape`, which for VAR is the
    1-d run of its scales, (L,), which resizing took for a 1-d size and failed on)."""
    return model.latent_grid


def _split_arrays(split, size: int, channels: int, source: str) -> tuple[torch.Tensor, np.ndarray]:
    """The readable images of a split and their labels. Unreadable files are left out with a warning."""
    items = [split[i] for i in range(len(split))]
    read = [item for item in items if not isinstance(item, BadSample)]
    unread = [item for item in items if isinstance(item, BadSample)]
    if unread:
        log.warning("%d of the %d images of %s could not be read and are left out (first: %s: %s)", len(unread),
                    len(items), source, unread[0].path, unread[0].error)  # fmt: skip
    if not read:
        return torch.empty(0, channels, size, size), np.empty(0, dtype=np.int64)
    return torch.stack([item.image for item in read]), np.array([item.label for item in read], dtype=np.int64)


def _shard_arrays(split: ShardDataset, batch_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """The readable samples of a split of tar shards, decoded once in shard order: a stream has no random access,
    and its labels come with its images. Unreadable samples are left out with a warning."""
    images, labels, unread = [], [], 0
    loader = whole_shards_loader(split, range(len(split.shards)), batch_size=batch_size, num_workers=0,
                                 collate=collate_samples)  # fmt: skip
    for batch in loader:
        unread += sum(bad.count for bad in batch.bad)
        if len(batch.labels):
            images.append(batch.images)
            labels.append(batch.labels.numpy())
    if unread:
        log.warning("%d samples of %s could not be read and are left out", unread, split.source)
    if not images:
        return torch.empty(0, split.channels, split.image_size, split.image_size), np.empty(0, dtype=np.int64)
    return torch.cat(images), np.concatenate(labels)


def _fit(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    scaler = StandardScaler().fit(train_x)
    classifier = LogisticRegression(max_iter=2000, C=1.0)
    classifier.fit(scaler.transform(train_x), train_y)
    return float((classifier.predict(scaler.transform(test_x)) == test_y).mean())


def _chance(train_y: np.ndarray, test_y: np.ndarray) -> float:
    """Held-out accuracy of a probe that learned nothing: always the training split's most common class."""
    values, counts = np.unique(train_y, return_counts=True)
    return float((test_y == values[counts.argmax()]).mean())


def _split_labels(split) -> np.ndarray:
    """The labels of a split, read off its dataset where it keeps them (no image decoded)."""
    labels = getattr(getattr(split, "dataset", None), "labels", None)
    if labels is None:
        return np.array([split[i].label for i in range(len(split))], dtype=np.int64)
    return np.asarray(labels, dtype=np.int64)[np.asarray(split.indices, dtype=np.int64)]


def check_enough_images(train, test, val_fraction: float) -> None:
    """ValueError, before any image is encoded, where the splits cannot give an accuracy worth reporting: fewer
    held-out images than classes (none at all gave NaN or a traceback; a single one, an accuracy of 0 or 1), or a
    training split of one class, on which no classifier can be fitted."""
    check_enough_labels(_split_labels(train), _split_labels(test), val_fraction)


def check_enough_labels(train_y: np.ndarray, test_y: np.ndarray, val_fraction: float) -> None:
    """`check_enough_images` on the splits' labels."""
    if (train_y < 0).any() or (test_y < 0).any():
        raise ValueError(f"linear probing needs labelled data; {LABELLED_SOURCES}")
    labels = np.concatenate([train_y, test_y])
    # the classes present, not the dataset's label range: labels {3, 7} are 2 classes, not 8
    classes = len(np.unique(labels))
    got = f"{len(labels)} image{'s' * (len(labels) != 1)}"
    if classes < 2:
        raise ValueError(f"linear probing got {got} of {classes} class{'es' * (classes != 1)}; it needs images of "
                         "at least 2 classes")  # fmt: skip
    if len(test_y) < classes:
        raise ValueError(f"linear probing got {got} ({len(test_y)} held out): {classes} classes need at least "
                         f"{classes} held-out images, one per class, so about {math.ceil(classes / val_fraction)} "
                         f"images or more ({val_fraction:.0%} are held out)")  # fmt: skip
    if len(np.unique(train_y)) < 2:
        raise ValueError(f"linear probing got a training split of {len(train_y)} images, all of class "
                         f"{int(train_y[0])}; fitting the probe needs images of at least 2 classes")  # fmt: skip


def linear_probe(model: ARModel, data: str, layer: int, batch_size: int = 128, max_images: int | None = None) -> dict:
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer to encode images with; load it from a folder that has one")
    check_probeable(model, layer)  # before the data is opened and read
    cfg = DataConfig(source=data, image_size=tokenizer.image_size, channels=tokenizer.in_channels,
                     max_images=max_images)  # fmt: skip
    dataset = open_dataset(cfg)
    if isinstance(dataset, ShardDataset):
        if len(dataset.shards) < 2:  # split_dataset's advice, data.val_fraction=0, would hold out nothing here
            raise ValueError(f"linear probing holds out whole shards, and {data} is a single shard: pack more "
                             "shards (vqar pack-shards --shard-size)")  # fmt: skip
        check_readable(dataset, data)  # a source of broken files is one line, before the rest is decoded
        train, test = dataset.split(cfg.val_fraction, cfg.split_seed)
        read = {"train": _shard_arrays(train, batch_size), "test": _shard_arrays(test, batch_size)}
    else:
        train, test = split_dataset(dataset, cfg.val_fraction, cfg.split_seed)
        check_enough_images(train, test, cfg.val_fraction)
        check_readable(dataset, data)
        read = {"train": _split_arrays(train, cfg.image_size, cfg.channels, data),
                "test": _split_arrays(test, cfg.image_size, cfg.channels, data)}  # fmt: skip
    # on the images read: those left out as unreadable may leave too few
    check_enough_labels(read["train"][1], read["test"][1], cfg.val_fraction)
    grid = _pixel_grid(model)
    result = {"layer": layer, "train_images": len(read["train"][1]), "test_images": len(read["test"][1])}
    arrays = {}
    device = next(model.parameters()).device  # the images stay on the CPU: only a batch at a time goes over
    for name, (images, labels) in read.items():
        feats = []
        for chunk in tqdm(images.split(batch_size), desc=f"features ({name})", leave=False):
            feats.append(block_features(model, tokenizer.encode(chunk.to(device)), layer).cpu())
        pixels = F.interpolate(images, size=tuple(grid), mode="area").flatten(1)
        arrays[name] = (torch.cat(feats).numpy(), pixels.numpy(), labels)
    (tr_f, tr_p, tr_y), (te_f, te_p, te_y) = arrays["train"], arrays["test"]
    result["classes"] = len(np.unique(np.concatenate([tr_y, te_y])))
    result["chance_accuracy"] = _chance(tr_y, te_y)
    result["accuracy"] = _fit(tr_f, tr_y, te_f, te_y)
    result["pixel_baseline_accuracy"] = _fit(tr_p, tr_y, te_p, te_y)
    result["feature_dim"], result["pixel_dim"] = tr_f.shape[1], tr_p.shape[1]
    return result
