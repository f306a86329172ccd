"""Writing drawn images to files: a grid (one row per class or prompt), individual PNGs and an ADM `samples.npz`
(for prompts, `prompts.txt` too: label i is prompt line i + 1; samples.npz keeps them as well, which is how
`--overwrite` tells the run's prompts.txt from one of yours).

`samples.npz` follows the layout of the ADM evaluator that LlamaGen and others use: `arr_0` uint8 (N, H, W, 3)
(grey images are repeated to RGB, as the Inception network expects 3 channels) and `arr_1` int64 labels.
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np

from vqar.sampling.draw import SampleResult
from vqar.utils.images import make_grid, save_image, to_uint8
from vqar.utils.io import atomic_write, folder_entries, remove_leftovers, replace_directory

# What `write_samples` writes, and the files a torchrun launch gathers the images through (`Parallel.gather_to_main`).
SAMPLE_OUTPUTS = ("grid.png", "images", "samples.npz", "prompts.txt")
GATHER_PREFIX = ".gather-rank"


# The names `_write_images` gives the pictures of images/.
IMAGE_NAME = re.compile(r"(class|prompt)\d{4,}_\d{6,}\.png|sample_\d{6,}\.png")


def is_sample_folder(path: Path) -> bool:
    """Whether everything in `path` is the output of a sample run (what `vqar sample --overwrite` replaces): its
    grid.png or samples.npz, and images/ holding only pictures named as a run names them. A folder with anything
    else in it (your files, a training run, an images/ folder of your photos, a prompts.txt of your own) is not."""
    path = Path(path)
    entries = folder_entries(path)
    if not all(name in SAMPLE_OUTPUTS or name.startswith(GATHER_PREFIX) for name in entries):
        return False
    if entries and not {"grid.png", "samples.npz"} & set(entries):
        return False
    files = [path / name for name in ("grid.png", "samples.npz", "prompts.txt")]
    if any(file.exists() and not file.is_file() for file in files):
        return False
    if (path / "prompts.txt").exists() and not _prompts_of_the_run(path):
        return False
    images = path / "images"
    return not images.exists() or (images.is_dir() and not _foreign_pictures(images))


def foreign_in_images(path: Path) -> str | None:
    """What in `path`/images/ a sample run does not write, in words (None where there is nothing such): the reason
    a folder whose top level looks like a run's is not one, which the refusal names."""
    images = Path(path) / "images"
    foreign = _foreign_pictures(images) if images.is_dir() else []
    if not foreign:
        return None
    more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
    return f"its images/ holds {foreign[0]}{more}, which a sample run does not write"


def _foreign_pictures(images: Path) -> list[str]:
    return sorted(name for name in folder_entries(images) if not IMAGE_NAME.fullmatch(name))


def _prompts_of_the_run(path: Path) -> bool:
    """Whether prompts.txt is the one the run wrote beside its samples.npz (which keeps the prompts too): a
    prompts.txt of your own beside class-conditional samples is not, and --overwrite would delete it."""
    try:
        with np.load(path / "samples.npz", allow_pickle=False) as npz:
            if "prompts" not in npz.files:
                return False
            prompts = npz["prompts"].tolist()
        text = (path / "prompts.txt").read_text(encoding="utf-8")
    except (OSError, ValueError, zipfile.BadZipFile):  # a damaged or foreign file is not known to be the run's
        return False
    return text == "\n".join(prompts) + "\n"


def write_samples(result: SampleResult, out_dir: str | Path, n_per_class: int, individual: bool = True) -> dict:
    """grid.png (one row per class), images/*.png and samples.npz; returns the paths written. Each replaces the one
    a previous run left, images/ as a whole (none is left when `individual` is off), so the files always describe
    the same samples: all are written to a work folder first and then moved in place, a few renames (written in
    place one after another, a run killed while writing its images left a new grid beside the old samples)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out_dir)  # the work folder of a run killed while writing
    work = out_dir / f".tmp-samples-{os.getpid()}"  # a name `remove_leftovers` recognises
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        save_image(make_grid(list(result.images.split(n_per_class))), work / "grid.png")
        if individual:
            _write_images(result, work / "images")
        write_adm_npz(result, work / "samples.npz")
        if result.prompts is not None:
            (work / "prompts.txt").write_text("\n".join(result.prompts) + "\n", encoding="utf-8")
        # Every file in place before the old images are removed (seconds for a large set): a Ctrl-C while they
        # were left new images beside the old samples.npz and grid.
        old_images = out_dir / "images" if (out_dir / "images").exists() else None
        if individual:
            old_images = replace_directory(work / "images", out_dir / "images", remove_old=False)
        elif old_images is not None:
            os.replace(old_images, work / "old-images")
            old_images = work / "old-images"
        for name in ("samples.npz", "grid.png", "prompts.txt"):
            if (work / name).is_file():
                os.replace(work / name, out_dir / name)
            else:
                (out_dir / name).unlink(missing_ok=True)
        if old_images is not None:
            shutil.rmtree(old_images, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"grid": out_dir / "grid.png", "npz": out_dir / "samples.npz", "images": out_dir / "images"}


def _write_images(result: SampleResult, folder: Path) -> None:
    """One PNG per sample in `folder`."""
    folder.mkdir()
    kind = "prompt" if result.prompts is not None else "class"
    for i, (picture, label) in enumerate(zip(to_uint8(result.images), result.labels.tolist(), strict=True)):
        name = f"{kind}{label:04d}_{i:06d}.png" if label >= 0 else f"sample_{i:06d}.png"
        save_image(picture, folder / name)


def write_adm_npz(result: SampleResult, path: str | Path) -> None:
    """`arr_0` uint8 (N, H, W, 3) (grey repeated to RGB), `arr_1` labels and, for prompts, `prompts` (line i + 1 of
    prompts.txt is label i's; ADM's evaluator reads only the first two), atomically."""
    pixels = to_uint8(result.images)
    rgb = np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.savez would append ".npz" to the temporary name
            prompts = {} if result.prompts is None else {"prompts": np.array(result.prompts, dtype=np.str_)}
            np.savez(handle, arr_0=rgb, arr_1=result.labels.numpy(), **prompts)

    atomic_write(path, write_npz)
