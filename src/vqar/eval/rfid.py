"""Tokenizer evaluation: rFID, PSNR, SSIM and codebook usage on a validation set.

Images are center-cropped to a square and resized to the evaluation size (the tokenizer's resolution by default)
as they are read, so a set may mix sizes; they are encoded, decoded and rounded to uint8 (a PNG round trip); rFID
compares the reconstructions with the cropped originals in the same Inception, as the RQ-VAE and LlamaGen papers
measure it. Each batch is reconstructed and passed through the Inception at once, so under torchrun a rank reads
and runs only its share of the batches (`vqar.eval.shards`) and nothing but per-image rows is kept.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from vqar.data import convert_channels
from vqar.eval.inception import Inception
from vqar.eval.metrics import GaussianStats, frechet_distance
from vqar.eval.shards import gather_rows, read_share, share
from vqar.eval.sources import ImageSource, batches, check_enough_images, open_source
from vqar.parallel import Parallel
from vqar.quantize import code_statistics
from vqar.utils.memory import check_memory

log = logging.getLogger("vqar.eval")

# What `_reconstruct` returns per image; a rank without images sends empty rows of these dtypes.
ROW_DTYPES = {"psnr": torch.float32, "ssim": torch.float32, "codes": torch.long, "real": torch.float64,
              "fake": torch.float64}  # fmt: skip


def center_crop_resize(images: np.ndarray, size: int) -> np.ndarray:
    """Square center crop, then a bicubic resize to size x size (uint8 (N, H, W, C) in and out)."""
    n, h, w, c = images.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    cropped = images[:, top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(cropped)
    mode = "L" if c == 1 else "RGB"
    out = [
        np.asarray(Image.fromarray(img.squeeze(-1) if c == 1 else img, mode).resize((size, size), Image.BICUBIC))
        for img in cropped
    ]
    return np.stack(out).reshape(n, size, size, c)


SSIM_WINDOW = 11


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al., 2004) of images in [0, 1], (B, C, H, W): Gaussian window, C1=0.01^2, C2=0.03^2,
    averaged over channels and valid positions."""
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).to(a.dtype)
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, window, window).contiguous()

    def blur(x):
        return F.conv2d(x, kernel, groups=a.shape[1])

    if min(a.shape[2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels")
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    score = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return score.flatten(1).mean(1)


def _in_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (N, H, W, C) images with the tokenizer's channels, converted as training converts them (Pillow's luma
    for grey: a plain channel mean gave pure red, green and blue the same grey, and other PSNRs than `vqar
    reconstruct`)."""
    if images.shape[3] == channels:
        return images
    converted = np.stack([convert_channels(image, channels) for image in images])
    return converted[..., None] if converted.ndim == 3 else converted


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(-1, 1) * 127.5 + 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer,
    source: str | Path | ImageSource,
    inception: Inception | None = None,
    image_size: int | None = None,
    batch_size: int = 32,
    max_images: int | None = None,
    device: str | torch.device = "cpu",
    par: Parallel | None = None,
) -> dict | None:
    """rFID (with `inception`), PSNR, SSIM, codebook usage and perplexity per depth (per scale for VAR) of `source`
    at `image_size`: `max_images` of it, spread over it (a source already opened is taken as it is). Under torchrun
    every rank reconstructs its share of the batches and rank 0 returns the result; the other ranks get None."""
    par = par or Parallel()
    size = tokenizer.image_size if image_size is None else image_size
    check_evaluation_size(tokenizer, size)
    images = source if isinstance(source, ImageSource) else open_source(source, max_images)
    if inception is not None:
        check_enough_images(images)
    part = share(len(images), batch_size, par)
    _check_memory(tokenizer, size, max(0, part.stop - part.start), batch_size)
    if par.is_main and not tokenizer.image_size / 4 <= size <= tokenizer.image_size * 4:
        log.warning("rFID at %d px, far from the %d px this tokenizer was built for: its reconstructions at that "
                    "size say little about it, and compare with no published numbers", size, tokenizer.image_size)
    # Cropped as they are read: only the evaluation-size images are held, and sets of mixed sizes (ImageNet's
    # validation images) need no resizing first.
    originals, count = read_share(images, batch_size, par,
                                  transform=lambda image: center_crop_resize(image[None], size)[0])  # fmt: skip
    tokenizer = tokenizer.to(device).eval()
    rows = gather_rows(_reconstruct(tokenizer, originals, inception, batch_size, device, par.is_main), par)
    if rows is None:
        return None
    result = {"images": count, "image_size": size, **_reconstruction_metrics(rows, tokenizer)}
    if inception is not None:
        real, fake = GaussianStats.of(rows["real"].numpy()), GaussianStats.of(rows["fake"].numpy())
        result["rfid"] = frechet_distance(fake, real)
        result["inception"] = str(inception.path)
    return result


def check_evaluation_size(tokenizer, size: int) -> None:
    """`Tokenizer.check_image_size`, and a size SSIM can score: 8 px passed for a tokenizer that downsamples by 8,
    and failed once every image was reconstructed."""
    tokenizer.check_image_size(size, "--image-size")
    if size < SSIM_WINDOW:
        raise ValueError(f"--image-size {size}: SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels")


def _check_memory(tokenizer, size: int, images: int, batch_size: int) -> None:
    """Refuses up front a size whose images cannot be held: every image of this process's share is kept at the
    evaluation size (uint8), and a batch passes as float32 through the tokenizer and the PSNR / SSIM. A lower bound
    (one channel per original, four float copies of a batch), so only what surely cannot fit is refused."""
    pixels = size * size
    batch = min(batch_size, images)
    need = images * pixels + 4 * batch * tokenizer.in_channels * pixels * 4
    check_memory(need, f"--image-size {size}: {images} images of {size}x{size} (and batches of {batch} as float32)",
                 f"choose a smaller --image-size (the tokenizer's resolution is {tokenizer.image_size}), fewer "
                 "images or a smaller batch")  # fmt: skip


def _reconstruct(tokenizer, originals: np.ndarray, inception: Inception | None, batch_size: int, device,
                 progress: bool) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per image, in batches: PSNR, SSIM, the codes, and the Inception features of the original and of its
    reconstruction rounded to uint8 ("real", "fake"). No images: empty 1-D rows (see `gather_rows`)."""
    rows: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "codes": [], "real": [], "fake": []}
    total = (len(originals) + batch_size - 1) // batch_size
    for chunk in tqdm(batches(originals, batch_size), total=total, desc="reconstructing", leave=False,
                      disable=not progress):  # fmt: skip
        given = _in_channels(chunk, tokenizer.in_channels)  # what the tokenizer sees is what it is scored against
        x = torch.from_numpy(given).permute(0, 3, 1, 2).float() / 127.5 - 1
        codes = tokenizer.encode(x.to(device))
        recon_u8 = _to_uint8(tokenizer.decode(codes).float().cpu())
        a = torch.from_numpy(given).permute(0, 3, 1, 2).float() / 255
        b = torch.from_numpy(recon_u8).permute(0, 3, 1, 2).float() / 255
        rows["psnr"].append(10 * torch.log10(1 / (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)))
        rows["ssim"].append(ssim(a, b))
        rows["codes"].append(codes.cpu())
        if inception is not None:
            rows["real"].append(torch.from_numpy(inception(given)))
            rows["fake"].append(torch.from_numpy(inception(recon_u8)))
    return {k: torch.cat(v) if v else torch.empty(0, dtype=ROW_DTYPES[k]) for k, v in rows.items()}


def _reconstruction_metrics(rows: dict[str, torch.Tensor], tokenizer) -> dict:
    # Per level as training counts them (`level_codes`): an RQ depth, or a VAR scale (pooled over the scales, a
    # collapse of the coarse ones hid behind the fine ones' usage).
    levels = tokenizer.quantizer.level_codes(rows["codes"])
    usage, perplexity = zip(*(code_statistics(codes, tokenizer.codebook_size) for codes in levels), strict=True)
    return {
        "psnr_db": float(rows["psnr"].mean()),
        "ssim": float(rows["ssim"].mean()),
        "codebook_usage_percent": [float(u) for u in usage],
        "perplexity": [float(p) for p in perplexity],
    }
