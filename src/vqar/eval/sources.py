"""Image sets for evaluation, as uint8 (N, H, W, C) arrays: a folder of image files, an ADM-layout `.npz`
(`arr_0`, uint8 NHWC), a vqar sample run (its `samples.npz`), or `mnist` (the bundled real digits)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger("vqar.eval")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def describe_source(source: str | Path) -> str:
    return "the bundled MNIST digits" if str(source) == "mnist" else str(source)


def _npz_images(path: Path) -> np.ndarray:
    try:
        with np.load(path) as data:
            if "arr_0" not in data:
                raise ValueError(f"{path} has no arr_0 image array (keys: {sorted(data.files)})")
            images = data["arr_0"]
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read images from {path}: {err}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
    return images


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read_image(path: Path, mode: str) -> np.ndarray | None:
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert(mode))
    except (OSError, UnidentifiedImageError, ValueError) as err:
        log.warning("skipping unreadable image %s: %s", path, err)
        return None


def load_images(source: str | Path, max_images: int | None = None) -> np.ndarray:
    """All images of `source` (see the module docstring), at most `max_images`, as uint8 (N, H, W, C)."""
    if str(source) == "mnist":
        from vqar.data.mnist import load_mnist_digits

        return load_mnist_digits()[0][:max_images, :, :, None].copy()
    path = Path(source)
    if path.is_dir() and (path / "samples.npz").is_file():
        path = path / "samples.npz"
    if path.is_file() and path.suffix == ".npz":
        return _npz_images(path)[:max_images]
    if not path.is_dir():
        raise FileNotFoundError(f"no image folder, .npz file or sample run at {path}")
    files = _folder_files(path)[:max_images]
    if not files:
        raise ValueError(f"{path} contains no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    mode = "L" if all(Image.open(f).mode in ("L", "1") for f in files[:16]) else "RGB"
    images = [img for img in (_read_image(f, mode) for f in files) if img is not None]
    skipped = len(files) - len(images)
    if skipped:
        log.warning("%d of %d files in %s could not be read and were skipped", skipped, len(files), path)
    if not images:
        raise ValueError(f"none of the {len(files)} image files in {path} could be read")
    shapes = {img.shape for img in images}
    if len(shapes) > 1:
        raise ValueError(f"images in {path} have different sizes {sorted(shapes)[:3]}; resize them to one size first")
    stacked = np.stack(images)
    return stacked[..., None] if stacked.ndim == 3 else stacked


def batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]
