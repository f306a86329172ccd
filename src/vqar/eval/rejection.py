"""Classifier rejection sampling, as the RQ-Transformer and ViT-VQGAN papers use for their "with rejection"
numbers (an acceptance rate of 5% with a ResNet-101 gives RQ-Transformer's FID 3.80): draw 1 / rate times the
samples wanted per class, score each by the classifier's probability of the class it was asked for, and keep the
best-scoring ones of each class. None of the official repositories ships it.

A classifier is any callable from images in [-1, 1] (B, C, H, W) to logits (B, classes): a TorchScript file, or
`digits` for the bundled digit classifier.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vqar.ar import ARModel
from vqar.eval.digits import digit_classifier
from vqar.sampling import SampleResult, SamplingSettings, draw, make_conditions
from vqar.utils.memory import check_memory, human_bytes, sample_bytes


def load_classifier(spec: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    if str(spec) == "digits":
        return digit_classifier().eval()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"no classifier at {path} (a TorchScript file, or 'digits')")
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{path} is not a TorchScript classifier: {err}") from None


@torch.no_grad()
def class_scores(classifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """p(label | image) for each image."""
    probs = []
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        logits = classifier(x.float())
        if logits.dim() != 2 or int(y.max()) >= logits.shape[1]:
            raise ValueError(f"the classifier returns {tuple(logits.shape)} logits, which do not cover the class ids")
        probs.append(logits.float().softmax(-1).gather(1, y[:, None]).squeeze(1))
    return torch.cat(probs)


def _check_memory(model: ARModel, images: int, accept_rate: float) -> None:
    """Every image drawn is held until the best are kept: refuse up front what cannot be held."""
    each = sample_bytes(model)
    check_memory(images * each, f"rejection sampling at an acceptance rate of {accept_rate:g} draws {images} images "
                 f"({human_bytes(each)} each), which", "raise the acceptance rate or ask for fewer images")  # fmt: skip


def rejection_sample(
    model: ARModel,
    classes: Sequence[int],
    n_per_class: int,
    accept_rate: float,
    classifier,
    settings: SamplingSettings | None = None,
    **options,
) -> tuple[SampleResult, dict]:
    """`n_per_class` accepted images per class (`options` go to `vqar.sampling.draw`); returns them and a report
    (drawn, kept, rate, mean scores)."""
    if not 0.0 < accept_rate <= 1.0:
        raise ValueError(f"accept_rate must be in (0, 1], got {accept_rate}")
    if not classes:
        raise ValueError("rejection sampling needs class-conditional sampling (the classifier scores classes)")
    # n / rate rounded up; the quotient is rounded to 9 decimals first, or floating point would add a draw
    # where it lands just above an integer (21 / 0.7 = 30.000000000000004)
    drawn_per_class = math.ceil(round(n_per_class / accept_rate, 9))
    _check_memory(model, drawn_per_class * len(classes), accept_rate)
    conditions = make_conditions(model, classes=classes, n_per_condition=drawn_per_class)
    drawn = draw(model, conditions, settings, **options)
    scores = class_scores(classifier, drawn.images, drawn.labels)
    keep = []
    for i in range(len(classes)):
        block = torch.arange(i * drawn_per_class, (i + 1) * drawn_per_class)
        keep.append(block[scores[block].topk(n_per_class).indices.sort().values])
    keep = torch.cat(keep)
    report = {
        "accept_rate": n_per_class / drawn_per_class,
        "drawn": len(drawn.images),
        "kept": len(keep),
        "mean_score_all": float(scores.mean()),
        "mean_score_kept": float(scores[keep].mean()),
    }
    return drawn.subset(keep), report
