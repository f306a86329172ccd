"""VAR sampling speed: vqar against the official `autoregressive_infer_cfg` on the same weights (issue 23).

vqar holds none of the official code, so this needs a clone of FoundationVision/VAR (`--official PATH`, the folder
with `models/` and `dist.py`). Both samplers get the same state dicts: the official `build_vae_var` builds VAR-d16
and its VQVAE (random weights from `--seed`, or the released `vae_ch160v4096z32.pth` and `var_d16.pth` from
`--weights DIR`), and vqar reads those state dicts through `vqar.load_pretrained`, the path a user's files take.

1. Equality first: greedy images (official top_k=1; vqar `greedy`, cfg c = vqar cfg_scale 1 + c) of the same labels
   must agree to `--tolerance` (pixels in [0, 1]); otherwise nothing is timed.
2. Speed at the official README's FID protocol (cfg 1.5, top-k 900, top-p 0.96, more_smooth off): per batch size,
   images/s of each sampler including decoding to pixels, the two alternating, best of `--repeats`.

    python benchmarks/var_vs_official.py --official ~/src/VAR [--weights ~/ckpt] [--batch-sizes 1 16 64]

The issue's goal is vqar >= 1.5x the official images/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from vqar.interop.load import load_pretrained
from vqar.sampling import SamplingSettings, draw, make_conditions
from vqar.utils.device import cpu_kind

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAE_FILE, VAR_FILE = "vae_ch160v4096z32.pth", "var_d{depth}.pth"


def official_models(clone: Path, depth: int, weights: Path | None, device: torch.device, seed: int):
    """The official VQVAE and VAR of `depth`, built by the clone's own `build_vae_var`."""
    if not (clone / "models" / "var.py").is_file() or not (clone / "dist.py").is_file():
        raise SystemExit(f"--official {clone}: not a FoundationVision/VAR clone (no models/var.py and dist.py)")
    sys.path.insert(0, str(clone))  # its modules import `dist` and `models` from the clone's root
    import dist
    from models import build_vae_var

    if device.type == "cpu":  # its generator and buffers go to dist's device, which is not set without a launcher
        setattr(dist, "__device", "cpu")

    torch.manual_seed(seed)
    vae, var = build_vae_var(V=4096, Cvae=32, ch=160, share_quant_resi=4, device=device, patch_nums=PATCH_NUMS,
                             num_classes=1000, depth=depth, shared_aln=False)  # fmt: skip
    if weights is not None:
        for module, name in ((vae, VAE_FILE), (var, VAR_FILE.format(depth=depth))):
            module.load_state_dict(torch.load(weights / name, map_location="cpu", weights_only=True), strict=True)
    return vae.eval(), var.eval()


def vqar_model(vae, var, depth: int, folder: Path, device: torch.device):
    """vqar's model from the official modules' state dicts, written as the release files and read as a user would."""
    torch.save(vae.state_dict(), folder / VAE_FILE)
    torch.save(var.state_dict(), folder / VAR_FILE.format(depth=depth))
    return load_pretrained(folder / VAR_FILE.format(depth=depth), tokenizer=folder / VAE_FILE, device=device)


def official_images(var, labels: torch.Tensor, seed: int, cfg: float, top_k: int, top_p: float) -> torch.Tensor:
    with torch.inference_mode():
        return var.autoregressive_infer_cfg(len(labels), label_B=labels, g_seed=seed, cfg=cfg, top_k=top_k,
                                            top_p=top_p, more_smooth=False).float().cpu()  # fmt: skip


def vqar_images(model, labels: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    conditions = make_conditions(model, classes=labels.tolist())
    result = draw(model, conditions, settings, batch_size=len(labels))
    return (result.images.float() + 1) / 2  # vqar draws in [-1, 1]


def timed(device: torch.device, fn) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="a clone of FoundationVision/VAR")
    parser.add_argument("--weights", type=Path, help="folder with the released vae and var_d<depth> .pth files")
    parser.add_argument("--depth", type=int, default=16, choices=[16, 20, 24, 30])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each sampler per batch size (best)")
    parser.add_argument("--greedy-batch", type=int, default=4, help="images compared in the equality check")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest pixel difference of greedy images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    vae, var = official_models(args.official.expanduser(), args.depth, args.weights, device, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        model = vqar_model(vae, var, args.depth, Path(folder), device)
    print(f"VAR-d{args.depth}, {'released' if args.weights else 'random'} weights, on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_kind()})")  # fmt: skip

    labels = torch.arange(args.greedy_batch, device=device) * 97 % 1000
    theirs = official_images(var, labels, args.seed, cfg=1.5, top_k=1, top_p=0.0)
    ours = vqar_images(model, labels.cpu(), SamplingSettings(greedy=True, cfg_scale=2.5))
    gap = float((theirs - ours).abs().max())
    print(f"greedy images (cfg 1.5, {len(labels)} labels): largest pixel difference {gap:.2e}")
    if gap > args.tolerance:
        print(f"not timed: the samplers disagree beyond --tolerance {args.tolerance}")
        return 1

    print("| batch | official images/s | vqar images/s | vqar / official |")
    print("|---|---|---|---|")
    fid = SamplingSettings(cfg_scale=2.5, top_k=900, top_p=0.96, seed=args.seed)
    for batch in args.batch_sizes:
        labels = torch.arange(batch, device=device) * 7 % 1000
        runs = {"official": lambda b=labels: official_images(var, b, args.seed, cfg=1.5, top_k=900, top_p=0.96),
                "vqar": lambda b=labels: vqar_images(model, b.cpu(), fid)}  # fmt: skip
        best = {name: float("inf") for name in runs}
        for fn in runs.values():  # warm-up, untimed
            fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                best[name] = min(best[name], timed(device, fn))
        rate = {name: batch / seconds for name, seconds in best.items()}
        print(f"| {batch} | {rate['official']:.3f} | {rate['vqar']:.3f} | {rate['vqar'] / rate['official']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
