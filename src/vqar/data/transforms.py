"""Pure image helpers shared by the datasets, the trainer and code extraction.

Resizing always goes through Pillow's BICUBIC filter. Pillow widens the filter support by the reduction
factor when it shrinks an image, so downscaling is properly antialiased (unlike plain bicubic interpolation
as in `torch.nn.functional.interpolate` without `antialias=True`). ADM's `center_crop_arr`, which LlamaGen
reuses, first halves large images with a BOX filter and then applies BICUBIC; the two give visually identical
results, and a single resize is simpler to reason about.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("vqar.data")
_SAID_GUESSED_RANGE = set()  # the image modes whose guessed range was warned about, once per process

_MODE_FOR_CHANNELS = {1: "L", 3: "RGB"}


def to_tensor(image: np.ndarray | Image.Image) -> torch.Tensor:
    """uint8 (H, W) or (H, W, C) image -> float32 (C, H, W) tensor in [-1, 1] via x / 127.5 - 1.

    [-1, 1] is the pixel range VQGAN-style tokenizers (and their published checkpoints) are trained on.
    """
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"to_tensor expects a uint8 image, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"to_tensor expects an (H, W) or (H, W, C) image, got shape {array.shape}")
    # np.array copies, so read-only inputs (the cached MNIST digits) never reach torch.from_numpy.
    tensor = torch.from_numpy(np.array(array.transpose(2, 0, 1), dtype=np.float32))
    return tensor / 127.5 - 1.0


def to_uint8_nhwc(images: np.ndarray) -> np.ndarray:
    """Bring (N, H, W), (N, H, W, C) or (N, C, H, W) images to uint8 (N, H, W, C).

    A 4-d array whose axes 1 and -1 both have 1, 3 or 4 entries is read as NCHW. Float images are quantised
    to 8 bits: that is what every image file holds, Pillow resizes 8-bit images, it takes a quarter of the
    memory, and it makes an array pixel-identical to the same images read from disk. Floats with no negative
    value are taken as [0, 1], so a [-1, 1] array that happens to be all non-negative is misread.
    """
    images = np.asarray(images)
    if images.ndim == 3 and images.shape[-1] in (3, 4) and images.shape[1] > 4:
        # (N, H, W) grey images 3 or 4 pixels wide are never meant: this is one colour image without its N axis
        raise ValueError(f"an array of shape {images.shape} would be {images.shape[0]} grey images "
                         f"{images.shape[-1]} pixels wide; one colour image is (1, H, W, C): add the first axis "
                         "(array[None])")  # fmt: skip
    if images.ndim == 3:
        images = images[..., None]
    elif images.ndim == 4:
        channels_last = images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4)
        if not channels_last:
            if images.shape[1] not in (1, 3, 4):
                raise ValueError(f"cannot find a channel axis of size 1, 3 or 4 in shape {images.shape}")
            images = images.transpose(0, 2, 3, 1)
    else:
        raise ValueError(f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError("the image array is empty")
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.integer):
        # Wider integer types turn up when arrays were built with plain numpy defaults; accept them if 8-bit.
        if images.min() < 0 or images.max() > 255:
            raise ValueError(f"integer images must lie in 0..255, got [{images.min()}, {images.max()}]")
        return images.astype(np.uint8)
    if not np.issubdtype(images.dtype, np.floating):  # bool, complex, strings: no pixel values (one-line error)
        raise ValueError(f"images must be uint8, integers in 0..255 or floating point, got {images.dtype}")
    low, high = float(images.min()), float(images.max())
    if low < -1.0 or high > 1.0 or not np.isfinite([low, high]).all():
        raise ValueError(f"float images must lie in [0, 1] or [-1, 1], got values in [{low}, {high}]")
    scaled = images * 255.0 if low >= 0.0 else (images + 1.0) * 127.5
    return np.round(scaled).astype(np.uint8)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    # Floor division puts the odd leftover pixel on the right/bottom, as ADM's center_crop_arr does.
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    # max(size, ...) guards against the longer side rounding below `size` for extreme aspect ratios.
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size == image.size:
        return image
    return image.resize(new_size, resample=Image.Resampling.BICUBIC)


def fit_image(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (Pillow BICUBIC, antialiased when shrinking), then center-crop to
    `size` x `size`. Scaling before cropping keeps as much of the picture as possible without distortion."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if image.size == (size, size):
        return image
    return _center_crop(_resize_shorter_side(image, size), size)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Map 16/32-bit integer and float grey images to "L" by scaling rather than clipping.

    Pillow's own convert("L") clips such images at 255, which turns a 16-bit photograph almost entirely
    white. "I;16*" is 16-bit by definition; for "I" and "F" the true bit depth is unknown, so values above 255
    are taken as 16-bit data and anything within 0..255 as already 8-bit, except a float ("F") image whose values
    all lie in [0, 1]: that is the float convention (as for float arrays, `to_uint8_nhwc`), and read as 8-bit
    it would be black (0 and 1 out of 255).
    """
    values = np.asarray(image, dtype=np.float64)
    if not image.mode.startswith("I;16") and image.mode not in _SAID_GUESSED_RANGE:
        _SAID_GUESSED_RANGE.add(image.mode)  # two images of one source may be scaled 255x apart: said, once
        log.warning("reading %s images (32-bit %s), whose files do not say their range: each is scaled by its own "
                    "values ([0, 1] floats, 0..255, or 16-bit); save them as 8- or 16-bit PNGs for one fixed scale",
                    image.mode, "floats" if image.mode == "F" else "integers")  # fmt: skip
    if image.mode == "F" and values.size and values.min() >= 0 and values.max() <= 1:
        values = values * 255.0
    elif image.mode.startswith("I;16") or values.max(initial=0.0) > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")


def _convert_image(image: Image.Image, mode: str) -> Image.Image:
    if image.mode == mode:
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    elif image.mode in ("P", "PA"):
        # Going through RGBA resolves palette transparency explicitly; converting a "P" image with
        # transparency straight to RGB makes Pillow warn.
        image = image.convert("RGBA")
    if image.mode == mode:
        return image
    try:
        return image.convert(mode)
    except ValueError:
        # Modes Pillow cannot convert directly (e.g. LAB, HSV) usually convert through RGB.
        return image.convert("RGB").convert(mode)


def convert_channels(image: Image.Image | np.ndarray, channels: int) -> Image.Image | np.ndarray:
    """Convert to 1 channel ("L") or 3 channels ("RGB"), returning the same kind of object that was given.

    Any Pillow mode works (RGBA, LA, P, 1, I;16, CMYK, YCbCr, ...). Alpha is dropped rather than composited,
    as torchvision's and ADM's loaders do, so preprocessing matches the reference pipelines. RGB -> grey uses
    Pillow's "L" conversion (ITU-R 601-2 luma); grey -> RGB repeats the channel. Arrays must be uint8 (H, W)
    or (H, W, C) with C in {1, 3, 4}.
    """
    if channels not in _MODE_FOR_CHANNELS:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    mode = _MODE_FOR_CHANNELS[channels]
    if isinstance(image, Image.Image):
        return _convert_image(image, mode)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"convert_channels expects a uint8 array, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W) or (H, W, 1|3|4) array, got shape {array.shape}")
    if array.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {array.shape}")
    current = {2: 1, 3: array.shape[-1]}[array.ndim]
    if current == channels:
        return array
    if current == 1 and channels == 3:
        return np.repeat(array[:, :, None], 3, axis=2)
    return np.asarray(_convert_image(Image.fromarray(array), mode))


def random_hflip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image of a (B, C, H, W) batch left-right with probability 0.5.

    Flipping whole batches on the training process (instead of per item in loader workers) keeps augmentation
    reproducible from one generator whose state can be checkpointed, whatever the number of workers.
    """
    if batch.ndim != 4:
        raise ValueError(f"random_hflip expects a (B, C, H, W) batch, got shape {tuple(batch.shape)}")
    flip = torch.rand(batch.shape[0], generator=generator, device=generator.device) < 0.5
    flip = flip.to(batch.device).view(-1, 1, 1, 1)
    return torch.where(flip, batch.flip(-1), batch)


def ten_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The ten views LlamaGen extracts codes from, for square images (B, C, S, S) with S >= size (made by fitting
    the source to round(size * crop_range), e.g. 1.1): the 4 corner crops and the center crop of `size` x `size`
    (top-left, top-right, bottom-left, bottom-right, center), then the left-right mirrors of those 5.
    Returns (B, 10, C, size, size). Training the AR model on all ten views is a cheap augmentation."""
    big = images.shape[-1]
    if images.ndim != 4 or images.shape[-2] != big or big < size:
        raise ValueError(f"ten_crop needs square (B, C, S, S) images with S >= {size}, got {tuple(images.shape)}")
    offset, middle = big - size, (big - size) // 2
    windows = [(0, 0), (0, offset), (offset, 0), (offset, offset), (middle, middle)]  # (top, left)
    crops = [images[..., top : top + size, left : left + size] for top, left in windows]
    return torch.stack(crops + [crop.flip(-1) for crop in crops], dim=1)
