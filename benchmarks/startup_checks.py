"""What the up-front checks cost before any work starts, at the scale they run at:

- `vqar eval fid` reads the header of every image of both sets (`check_one_size`) so that a reference folder of
  mixed sizes is refused before the samples' Inception pass, not after it: the time per image, against decoding
  it, and for 50,000 images;
- `vqar extract-codes` digests every item's captions into its plan (`_captions_digest`) so that a resumed
  extraction with other captions starts again instead of mixing them: the time for CC-3M's 3.3M captions.

    python benchmarks/startup_checks.py [--images 2000] [--captions 3300000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vqar.commands.common import positive_int
from vqar.data.extraction import _captions_digest
from vqar.eval.sources import open_source
from vqar.utils.device import cpu_kind


def best_seconds(run, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def header_scan(count: int, size: int) -> tuple[float, float]:
    """Seconds per image of the header scan and of a full decode, over `count` PNGs of `size` x `size` RGB noise."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(Path(folder) / f"{i:06d}.png")
        source = open_source(folder)
        files = sorted(Path(folder).iterdir())

        def decode_all() -> None:
            for path in files:
                with Image.open(path) as image:
                    image.load()

        return best_seconds(source.check_one_size) / count, best_seconds(decode_all) / count


def caption_digest(count: int) -> float:
    """Seconds to digest `count` items of one caption each, of CC-3M's typical length (~10 words)."""
    words = ["a", "photo", "of", "the", "small", "red", "house", "by", "the", "lake", "at", "dusk"]
    captions = [[" ".join(words[(i % 7):] + [str(i)])] for i in range(count)]
    return best_seconds(lambda: _captions_digest(captions), repeats=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=positive_int, default=2000, help="PNG files for the header scan")
    parser.add_argument("--size", type=positive_int, default=256, help="their side in pixels")
    parser.add_argument("--captions", type=positive_int, default=3_300_000, help="items for the caption digest")
    args = parser.parse_args()
    print(f"CPU: {cpu_kind()}")
    header, decode = header_scan(args.images, args.size)
    print(f"eval fid's header scan: {1e6 * header:.0f} us per image, decoding one {1e6 * decode:.0f} us "
          f"({args.images} PNGs of {args.size}x{args.size}); 50,000 images: {50_000 * header:.1f} s of scan, "
          f"{50_000 * decode:.0f} s of decoding")  # fmt: skip
    digest = caption_digest(args.captions)
    print(f"extraction plan's caption digest: {digest:.1f} s for {args.captions:,} captions "
          f"({1e6 * digest / args.captions:.2f} us each)")  # fmt: skip


if __name__ == "__main__":
    main()
