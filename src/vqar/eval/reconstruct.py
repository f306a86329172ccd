"""Reconstruct image files with a trained tokenizer: original | reconstruction side by side, with PSNR."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from vqar.data import convert_channels, fit_image, to_tensor
from vqar.eval.sources import image_files
from vqar.interop.load import load_pretrained
from vqar.tokenizers import Tokenizer
from vqar.utils.device import resolve_device
from vqar.utils.images import check_resizable, make_grid, open_image, psnr, save_image
from vqar.utils.io import check_folder_writable

log = logging.getLogger("vqar.eval")


def load_image_tensor(path: str | Path, channels: int, size: int) -> torch.Tensor:
    """A file as a (1, C, size, size) tensor in [-1, 1]; unreadable files raise ValueError naming the file."""
    try:
        with open_image(path) as image:
            image.load()
            picture = fit_image(convert_channels(image, channels), size)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    return to_tensor(picture).unsqueeze(0)


def reconstruct_files(
    tokenizer: str | Path | Tokenizer,
    images: Sequence[str | Path],
    out_dir: str | Path,
    *,
    size: int | None = None,
    depth: int | None = None,
    device: str = "auto",
    config=None,
    overwrite: bool = False,
) -> list[str]:
    """Writes `<out_dir>/<name>_recon.png` for each image and prints its PSNR; returns the files that failed.

    A folder in `images` stands for the image files under it, written under the same relative paths. One unreadable
    file does not stop the others; it is reported and listed in the return value. `config`: the architecture of a
    file that does not record it (a LlamaGen VQ checkpoint), as `load_pretrained` takes it. A picture already at
    one of the names is replaced only with `overwrite`: it may be the user's own file."""
    # Folders are listed before the model loads, so an empty one fails at once.
    entries = _images_and_names(images, Path(out_dir))
    if Path(out_dir).exists() and not Path(out_dir).is_dir():  # found before the tokenizer loads, not at mkdir
        raise FileExistsError(f"--out {out_dir} is a file; give a folder for the reconstructions")
    targets = _targets(entries, Path(out_dir))
    taken = [target for target in targets if target.exists() or target.is_symlink()]
    if taken and not overwrite:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise FileExistsError(f"{taken[0]} exists{more}: pass --overwrite to replace the reconstructions there, or "
                              "choose another --out")  # fmt: skip
    if any(target.is_dir() for target in taken):
        raise FileExistsError(f"{next(t for t in taken if t.is_dir())} is a folder; choose another --out")
    if size is not None:
        check_resizable(size, "--size", "the tokenizer's own")
    check_folder_writable(out_dir)  # before the tokenizer loads, not after
    dev = resolve_device(device)
    # vqar folders and the releases' own files alike (an RQ stage1 folder, a LlamaGen .pt, VAR's VQVAE .pth)
    model = tokenizer if isinstance(tokenizer, Tokenizer) else load_pretrained(tokenizer, config=config, device=dev)
    if not isinstance(model, Tokenizer):
        carried = Path(str(tokenizer)) / "tokenizer"
        hint = f": the tokenizer it was trained on is {carried}" if (carried / "config.json").is_file() else ""
        raise ValueError(f"{tokenizer} holds a {type(model).__name__}, not a tokenizer{hint}")
    size = size or model.image_size
    model.check_image_size(size, "--size")
    if not model.image_size / 4 <= size <= model.image_size * 4:  # as eval rfid says it; far larger fills memory
        log.warning("--size %d is far from the %d px this tokenizer was built for: its reconstructions there say "
                    "little about it, and its activations grow with the square of the size", size, model.image_size)
    if depth is not None and not 1 <= depth <= model.levels:
        raise ValueError(f"--depth takes 1 .. {model.levels} (the levels this tokenizer decodes coarse to fine: "
                         f"a residual stack's depths or VAR's scales), got {depth}")  # fmt: skip
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures, values = [], []
    for (path, _), target in zip(entries, targets, strict=True):
        try:
            x = load_image_tensor(path, model.in_channels, size).to(dev)
        except (FileNotFoundError, ValueError) as err:
            log.error("%s", err)
            failures.append(str(path))
            continue
        with torch.no_grad():
            recon = model.decode(model.encode(x), depth=depth).clamp(-1, 1)
        value = float(psnr(x, recon)[0])
        values.append(value)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid([torch.cat([x, recon]).cpu()]), target)
        print(f"{path}: PSNR {value:.2f} dB -> {target}")
    if len(entries) > 1:
        failed = f", {len(failures)} unreadable" if failures else ""
        mean = f": mean PSNR {sum(values) / len(values):.2f} dB" if values else ""
        print(f"{len(values)} of {len(entries)} images reconstructed{failed}{mean}")
    return failures


def _targets(entries: list[tuple[Path, str]], out_dir: Path) -> list[Path]:
    """The file each image's reconstruction goes to: `<name>_recon.png`, a repeated name numbered apart (`a_2`,
    `a_3`, ...) past every name taken, an input's own `a_2` too, and apart from names that differ only in case
    (one file on macOS' and Windows' file systems)."""
    targets, taken = [], set()
    for _, stem in entries:
        name, number = stem, 1
        while name.casefold() in taken:
            number += 1
            name = f"{stem}_{number}"
        taken.add(name.casefold())
        targets.append(out_dir / f"{name}_recon.png")
    return targets


def _images_and_names(images: Sequence[str | Path], out_dir: Path) -> list[tuple[Path, str]]:
    """Each image file with the name its reconstruction takes under --out (a folder's files keep their relative
    paths, so that equal names in two subfolders stay apart). An --out inside a folder given is left out of it: its
    pictures of an earlier run were reconstructed again and counted in the mean PSNR."""
    entries = []
    missing = [str(given) for given in map(Path, images) if not given.exists()]
    if missing:  # a typo: said before the tokenizer loads, as the other bad arguments are
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"no such image: {missing[0]}{more}")
    out = out_dir.resolve()
    for given in map(Path, images):
        if not given.is_dir():
            if not given.is_file():  # a named pipe was read until its writer closed it: forever, with none
                raise ValueError(f"{given} is not a regular file (a named pipe, socket or device); give an image file")
            entries.append((given, given.stem))
            continue
        files = [file for file in image_files(given, required=True) if out not in file.resolve().parents]
        if not files:
            raise ValueError(f"{given} holds no image files besides --out {out_dir}'s")
        entries += [(file, file.relative_to(given).with_suffix("").as_posix()) for file in files]
    return entries
