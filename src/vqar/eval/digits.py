"""A small digit classifier for the bundled MNIST digits: the domain metric of the demo (does a sample of class c
look like the digit c?).

Trained on the training split of the real digits (the same deterministic split the tokenizer uses) and cached
as safetensors, so it is trained once per cache folder. About 98-99% accurate on the held-out digits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vqar.data import DataConfig, build_datasets

log = logging.getLogger("vqar.eval")

CACHE_NAME = "digit_classifier_v1.safetensors"


class DigitClassifier(nn.Module):
    """Two conv blocks and a linear head on 32x32 grey images in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )  # fmt: skip
        self.head = nn.Linear(64 * 4, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 256): the space of the demo's domain FID."""
        if images.shape[1] == 3:
            images = images.mean(1, keepdim=True)
        return self.features(images).flatten(1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        self.eval()
        return torch.cat([self(chunk).argmax(-1) for chunk in images.split(batch_size)])


def real_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits of the default split ("train" or "val") as images in [-1, 1] and labels."""
    train, val = build_datasets(DataConfig())
    subset = train if split == "train" else val
    images = torch.stack([subset[i].image for i in range(len(subset))])
    labels = torch.tensor([subset[i].label for i in range(len(subset))])
    return images, labels


def train_digit_classifier(epochs: int = 6, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Trains on the training split (with small random shifts) and returns (model, validation accuracy)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images, labels = real_digits("train")
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(64):
            x = images[batch]
            dx, dy = torch.randint(-2, 3, (2,), generator=generator).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    val_images, val_labels = real_digits("val")
    accuracy = float((model.predict(val_images) == val_labels).float().mean())
    return model.eval(), accuracy


def digit_classifier(cache_dir: str | Path | None = None) -> DigitClassifier:
    """The cached classifier, trained first if the cache (default ~/.cache/vqar) does not hold it."""
    cache = Path(cache_dir or Path.home() / ".cache" / "vqar") / CACHE_NAME
    model = DigitClassifier()
    if cache.is_file():
        try:
            model.load_state_dict(load_file(str(cache)))
            return model.eval()
        except Exception as err:  # a damaged cache file is retrained, not trusted
            log.warning("digit classifier cache %s is unreadable (%s); training it again", cache, err)
    model, accuracy = train_digit_classifier()
    log.info("trained the digit classifier: %.2f%% accuracy on the held-out digits", 100 * accuracy)
    cache.parent.mkdir(parents=True, exist_ok=True)
    from vqar.utils.io import atomic_write

    atomic_write(cache, lambda p: save_file(model.state_dict(), str(p)))
    return model


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: DigitClassifier) -> float:
    """Fraction of `images` the classifier recognises as their intended digit `labels`."""
    return float((classifier.predict(images.float()) == labels).float().mean())


@torch.no_grad()
def domain_fid(fake: torch.Tensor, real: torch.Tensor, classifier: DigitClassifier, batch_size: int = 512) -> float:
    """Fréchet distance between digit-classifier features of `fake` and `real` images in [-1, 1]. A domain metric
    for small data: NOT comparable with Inception FID."""
    from vqar.eval.metrics import GaussianStats, frechet_distance

    classifier.eval()

    def features(images: torch.Tensor):
        return torch.cat([classifier.embed(c.float()) for c in images.split(batch_size)]).double().numpy()

    return frechet_distance(GaussianStats.of(features(fake)), GaussianStats.of(features(real)))
