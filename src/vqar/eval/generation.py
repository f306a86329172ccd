"""Generation metrics over image sets: FID against reference statistics, Inception Score and precision/recall.

Reference statistics are read and written in the ADM evaluator's layout: an `.npz` with `mu` and `sigma` (and
optionally `arr_0`, the reference images, which precision/recall needs), so the standard reference batches such as
`VIRTUAL_imagenet256_labeled.npz` work unchanged. vqar also stores the pool features it computed (`features`), so a
reference made by `vqar eval stats` needs no second pass for precision/recall.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vqar.eval.inception import Inception
from vqar.eval.metrics import GaussianStats, frechet_distance, inception_score, precision_recall
from vqar.eval.sources import batches, describe_source, load_images
from vqar.utils.io import atomic_write


def inception_outputs(
    images: np.ndarray, inception: Inception, batch_size: int = 50, probabilities: bool = False, desc: str = ""
) -> np.ndarray:
    total = (len(images) + batch_size - 1) // batch_size
    parts = [
        inception(chunk, probabilities=probabilities)
        for chunk in tqdm(batches(images, batch_size), total=total, desc=desc or "inception", leave=False)
    ]
    return np.concatenate(parts)


def save_stats(path: str | Path, stats: GaussianStats, images: np.ndarray | None = None) -> None:
    arrays = {"mu": stats.mu, "sigma": stats.sigma}
    if stats.features is not None:
        arrays["features"] = stats.features
    if images is not None:
        arrays["arr_0"] = images
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"reference statistics are written as .npz, got {path}")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def reference_stats(
    source: str | Path, inception: Inception, batch_size: int = 50, need_features: bool = False
) -> tuple[GaussianStats, np.ndarray | None]:
    """Statistics of a reference: an `.npz` holding `mu`/`sigma` (ADM or vqar), or any image source. Returns the
    stats and, when asked and available, the reference features for precision/recall."""
    path = Path(source)
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as data:
            if "mu" in data and "sigma" in data:
                stats = GaussianStats(mu=data["mu"], sigma=data["sigma"], count=-1)
                features = data.get("features")
                if need_features and features is None and "arr_0" in data:
                    features = inception_outputs(data["arr_0"], inception, batch_size, desc="reference")
                return stats, features
    images = load_images(source)
    features = inception_outputs(images, inception, batch_size, desc="reference")
    return GaussianStats.of(features), features


def evaluate_samples(
    fake: str | Path,
    ref: str | Path | None,
    inception: Inception,
    batch_size: int = 50,
    num_samples: int | None = None,
    with_is: bool = True,
    with_pr: bool = True,
) -> dict:
    """FID (with `ref`), IS (when the network has its classifier head) and precision/recall (when reference
    features are available) of the images in `fake`."""
    images = load_images(fake, num_samples)
    if num_samples is not None and len(images) < num_samples:
        raise ValueError(f"{fake} holds {len(images)} images, fewer than the {num_samples} asked for")
    result: dict = {
        "samples": len(images),
        "source": describe_source(fake),
        "inception": str(inception.path),
        "resize": inception.resize,
    }
    features = inception_outputs(images, inception, batch_size, desc="samples")
    if ref is not None:
        ref_stats, ref_features = reference_stats(ref, inception, batch_size, need_features=with_pr)
        result["reference"] = describe_source(ref)
        result["fid"] = frechet_distance(GaussianStats.of(features), ref_stats)
        if with_pr and ref_features is not None:
            result["precision"], result["recall"] = precision_recall(ref_features, features)
    if with_is and inception.has_classifier:
        probs = inception_outputs(images, inception, batch_size, probabilities=True, desc="IS")
        result["inception_score"], result["inception_score_std"] = inception_score(probs)
    return result
