"""Image tensors <-> files and grids (Pillow only; no torchvision)."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vqar.utils.io import atomic_write

log = logging.getLogger("vqar.images")


def open_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """The image of a file, or of an encoded file's bytes, lazily decoded (as `Image.open`). Problems name `name`
    (default: the path): Pillow names a buffer <_io.BytesIO object at 0x...>, where a report of skipped files showed
    it, and its warning of an image past its decompression-bomb limit names no file at all (the CLI silences that
    one; this says it in its place, once per file)."""
    name = str(source) if name is None else name
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"cannot identify image file {name!r}") from None
    limit, pixels = Image.MAX_IMAGE_PIXELS, image.width * image.height
    if limit and pixels > limit and name not in _SAID_LARGE:  # past 2x the limit Pillow refuses the image instead
        _SAID_LARGE.add(name)
        log.warning("%s is %dx%d, %s pixels: over Pillow's limit of %s for images that may be decompression bombs, "
                    "decoded anyway (PIL.Image.MAX_IMAGE_PIXELS sets the limit)", name, image.width, image.height,
                    f"{pixels:,}", f"{limit:,}")  # fmt: skip
    return image


_SAID_LARGE: set[str] = set()  # the files `open_image` has said are large (once per process)


def check_resizable(size: int, option: str, default: str) -> None:
    """ValueError where images resized to `size` x `size` (the value of `option`) would be past the pixels Pillow
    reads and writes: else every image is resized, takes its memory and time, and is then skipped as a
    "decompression bomb", and the run ends saying the images are unreadable."""
    if Image.MAX_IMAGE_PIXELS and size * size > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"{option} {size} asks for {size}x{size} images, over the {Image.MAX_IMAGE_PIXELS:,} "
                         f"pixels Pillow reads and writes: give a smaller {option} ({default} by default)")  # fmt: skip


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1], (B, C, H, W) or (C, H, W) -> uint8 (B, H, W, C) or (H, W, C), rounded."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def make_grid(rows: Sequence[torch.Tensor], padding: int = 2) -> np.ndarray:
    """Lays out rows of images (each (N, C, H, W) in [-1, 1], equal sizes) as one uint8 HWC picture."""
    if not rows:
        raise ValueError("make_grid needs at least one row")
    n = max(len(r) for r in rows)
    c, h, w = rows[0].shape[1:]
    canvas = np.full((len(rows) * (h + padding) + padding, n * (w + padding) + padding, c), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(to_uint8(row)):
            top, left = padding + i * (h + padding), padding + j * (w + padding)
            canvas[top : top + h, left : left + w] = image
    return canvas


def save_image(array: np.ndarray, path: str | Path) -> None:
    """Writes a uint8 HWC (C in 1, 3) array as an image file, atomically; the suffix picks the format."""
    path = Path(path)
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    atomic_write(path, lambda tmp: picture.save(tmp, format=fmt))


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1], measured on the [0, 1] scale after clamping: (B,)."""
    ref = reference.float().clamp(-1, 1).add(1).div(2)
    est = estimate.float().clamp(-1, 1).add(1).div(2)
    mse = (ref - est).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
