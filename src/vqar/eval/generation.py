"""Generation metrics over image sets: FID against reference statistics, Inception Score and precision/recall.

Reference statistics are read and written in the ADM evaluator's layout: an `.npz` with `mu` and `sigma` (and
optionally `arr_0`, the reference images, which precision/recall needs), so the standard reference batches such as
`VIRTUAL_imagenet256_labeled.npz` work unchanged. vqar also stores the pool features it computed (`features`), so a
reference made by `vqar eval stats` needs no second pass for precision/recall.

Image sets are any source of `vqar.eval.sources` (folders, `.npz`, sample runs, tar shards, `mnist`). Under
torchrun (`par`) every image set is split over the processes by `vqar.eval.shards`: each reads only its block of
whole batches and runs the Inception on it, rank 0 gets all the rows in image order and computes the metrics; the
other ranks get None.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vqar.eval.array_sources import npz_array_shape
from vqar.eval.inception import Inception
from vqar.eval.metrics import (
    IS_SPLITS,
    PR_NEIGHBOURS,
    GaussianStats,
    frechet_distance,
    inception_score,
    precision_recall,
)
from vqar.eval.shards import gather_rows, read_share, share
from vqar.eval.sources import ImageSource, batches, check_enough_images, describe_source, open_source
from vqar.parallel import Parallel
from vqar.utils.io import atomic_write, check_folder_writable


def _own_outputs(images: np.ndarray, inception: Inception, batch_size: int, probabilities: bool, desc: str,
                 progress: bool) -> np.ndarray:  # fmt: skip
    """One rank's pass: its images in batches of `batch_size`; an empty 1-D array when it has none."""
    total = (len(images) + batch_size - 1) // batch_size
    bar = dict(total=total, desc=desc or "inception", leave=False, disable=not progress)
    parts = [inception(chunk, probabilities=probabilities) for chunk in tqdm(batches(images, batch_size), **bar)]
    return np.concatenate(parts) if parts else np.empty(0)


def inception_outputs(
    images: np.ndarray,
    inception: Inception,
    batch_size: int = 50,
    probabilities: bool = False,
    desc: str = "",
    par: Parallel | None = None,
) -> np.ndarray | None:
    """Pool features (or class probabilities) of `images`, in batches of `batch_size`. Under torchrun each rank
    runs its share of the batches and rank 0 gets every row in image order; the other ranks get None."""
    par = par or Parallel()
    mine = images[share(len(images), batch_size, par)]
    rows = _own_outputs(mine, inception, batch_size, probabilities, desc, par.is_main)
    gathered = gather_rows({"rows": torch.from_numpy(rows)}, par)
    return None if gathered is None else gathered["rows"].numpy()


@dataclass
class SourceOutputs:
    """What `source_outputs` computed for a whole image set (on rank 0)."""

    count: int  # images read (unreadable files or shard samples are skipped)
    features: np.ndarray  # (count, 2048) pool features
    probabilities: np.ndarray | None = None  # (count, classes), when asked
    images: np.ndarray | None = None  # the images themselves, when asked


def source_outputs(
    source: str | Path | ImageSource,
    inception: Inception,
    batch_size: int = 50,
    *,
    max_images: int | None = None,
    at_least: int | None = None,
    probabilities: bool = False,
    keep_images: bool = False,
    desc: str = "",
    par: Parallel | None = None,
) -> SourceOutputs | None:
    """Inception features (and class probabilities) of the images of `source` (`vqar.eval.sources`): its first
    `max_images` (a source already opened is taken as it is), an error when fewer than `at_least` can be read. Under
    torchrun each rank reads and runs only its share of the batches, and rank 0 gets every row in image order; the
    other ranks get None. With `keep_images` rank 0 also gets the images (all of them in memory, as in one
    process)."""
    par = par or Parallel()
    opened = source if isinstance(source, ImageSource) else open_source(source, max_images)
    images, count = read_share(opened, batch_size, par)
    if at_least is not None and count < at_least:
        raise ValueError(f"{opened.where} holds {count} images, fewer than the {at_least} asked for")
    if count < 2:  # the files were counted before they were read: said here, not by numpy after the pass
        raise ValueError(f"only {count} of the {len(opened)} {opened.unit} in {opened.where} could be read; FID "
                         "statistics need at least 2")  # fmt: skip
    rows = {"features": _own_outputs(images, inception, batch_size, False, desc, par.is_main)}
    if probabilities:
        rows["probabilities"] = _own_outputs(images, inception, batch_size, True, desc and f"{desc} (IS)", par.is_main)
    if keep_images:
        rows["images"] = images
    gathered = gather_rows({key: torch.from_numpy(value) for key, value in rows.items()}, par)
    if gathered is None:
        return None
    arrays = {key: value.numpy() for key, value in gathered.items()}
    return SourceOutputs(count, arrays["features"], arrays.get("probabilities"), arrays.get("images"))


def check_stats_path(path: str | Path, overwrite: bool = False) -> None:
    """Refuses a path that `save_stats` should not write, before the images are read (the slow part): not a .npz,
    a folder, an existing file (a sample run's samples.npz, say) unless `overwrite`, or one in a folder that cannot
    be made or written (a file in the way, no permission)."""
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{path} is a folder; --out names the .npz file to write")
    if path.suffix != ".npz":
        raise ValueError(f"reference statistics are written as .npz, got {path}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it or choose another --out")
    check_folder_writable(path.parent, out=path)


def save_stats(path: str | Path, stats: GaussianStats, images: np.ndarray | None = None,
               inception: Inception | None = None) -> None:  # fmt: skip
    """`mu`, `sigma` and, where given, the pool `features`, the images (`arr_0`) and how the features were made
    (`resize`, and the `inception` file's name): an FID against them with another resize is refused, since it
    moves the score by more than most differences between models."""
    arrays = {"mu": stats.mu, "sigma": stats.sigma}
    if inception is not None:
        arrays["resize"], arrays["inception"] = np.array(inception.resize), np.array(inception.path.name)
    if stats.features is not None:
        arrays["features"] = stats.features
    if images is not None:  # ADM's layout, which its evaluator and `read_reference` read, is RGB: grey repeated
        arrays["arr_0"] = np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"reference statistics are written as .npz, got {path}")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


@dataclass
class StoredReference:
    """An `.npz` of reference statistics as `read_stored_reference` read it."""

    stats: GaussianStats
    features: np.ndarray | None  # the pool features stored with them (vqar's), on rank 0 when asked
    images_only: bool  # the reference images (ADM's arr_0) without stored features: precision/recall runs them
    feature_count: int | None = None  # rows of the stored features, known on every rank (None: none stored)
    resize: str | None = None  # the resize the statistics were made with (None: not recorded, as in ADM's files)


def read_stored_reference(
    source: str | Path, need_features: bool = False, par: Parallel | None = None
) -> StoredReference | None:
    """The statistics of `source` where it is an `.npz` holding `mu` and `sigma` (ADM or vqar), None for any other
    source. ValueError naming it where its mu or sigma is not finite (an FID against it would be NaN) or not a mean
    (D,) with its covariance (D, D), or where it holds neither the statistics nor the images (arr_0) to compute them
    from."""
    path = Path(source)
    # np.load reads a file that is not a zip archive as a pickle: left to open_source, which says what it is
    if not (path.is_file() and path.suffix == ".npz" and zipfile.is_zipfile(path)):
        return None
    par = par or Parallel()
    try:
        return _read_stored_reference(path, need_features, par)
    except (zipfile.BadZipFile, EOFError, OSError) as err:  # a damaged member: its CRC, a cut-off array
        raise ValueError(f"{path} is damaged: {err}; make its statistics again with `vqar eval stats`") from None


def _read_stored_reference(path: Path, need_features: bool, par: Parallel) -> StoredReference | None:
    with np.load(path) as data:
        arrays = {key: _numbers(data, key, path) for key in ("mu", "sigma") if key in data}
        for key, value in arrays.items():
            if not np.isfinite(value).all():
                raise ValueError(f"{path}: its reference statistics hold NaN or infinite values in {key!r}; make "
                                 "them again with `vqar eval stats`")  # fmt: skip
        if len(arrays) < 2 and "arr_0" not in data:
            raise ValueError(f"{path} holds neither reference statistics (mu and sigma) nor reference images "
                             f"(arr_0), only {sorted(data.files)}")  # fmt: skip
        if len(arrays) < 2:
            return None
        features_shape = npz_array_shape(path, "features") if "features" in data else None
        _check_shapes(path, arrays["mu"], arrays["sigma"], features_shape)
        # read on rank 0 alone: stored features are as large as the ones computed
        features = _numbers(data, "features", path) if need_features and "features" in data and par.is_main else None
        if features is not None and not np.isfinite(features).all():  # precision and recall would read 0
            raise ValueError(f"{path}: its features hold NaN or infinite values; make them again with `vqar eval "
                             "stats`")  # fmt: skip
        images_only = "features" not in data and "arr_0" in data
        feature_count = features_shape[0] if features_shape is not None else None
        resize = _recorded_text(data, "resize")
    stats = GaussianStats(mu=arrays["mu"], sigma=arrays["sigma"], count=-1)
    return StoredReference(stats, features, images_only, feature_count, resize)


def _recorded_text(data, key: str) -> str | None:
    """The text stored under `key` (a 0-d string array), None where there is none (an object array, which would
    need a pickle, is none)."""
    try:
        value = data[key] if key in data.files else None
    except ValueError:
        return None
    return str(value) if value is not None and value.ndim == 0 and np.issubdtype(value.dtype, np.str_) else None


def _numbers(data, key: str, path: Path) -> np.ndarray:
    """Array `key` of an open `.npz`, as real numbers: an array of text or Python objects is named, not left to
    numpy's words (which name no file, and one of which suggests an unsafe load)."""
    try:
        value = data[key]
    except ValueError:  # an object array: it would need a pickle
        raise ValueError(f"{path}: its {key!r} holds Python objects, not numbers; make its statistics again with "
                         "`vqar eval stats`") from None  # fmt: skip
    if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
        raise ValueError(f"{path}: its {key!r} holds {value.dtype} values, not real numbers; make its statistics "
                         "again with `vqar eval stats`")  # fmt: skip
    return value


def _check_shapes(path: Path, mu: np.ndarray, sigma: np.ndarray, features_shape: tuple | None) -> None:
    # Else found after the samples' Inception pass, by numpy or torch, in words that name neither the file nor the
    # array.
    dim = mu.shape[0] if mu.ndim == 1 else None
    if dim is None or sigma.shape != (dim, dim):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not reference statistics, a mean (D,) "
                         "and its covariance (D, D); make them again with `vqar eval stats`")  # fmt: skip
    if (np.diagonal(sigma) < 0).any():  # negative variances: the FID came out negative and was read as 0
        raise ValueError(f"{path}: its sigma is no covariance (it has negative variances on its diagonal); make the "
                         "statistics again with `vqar eval stats`")  # fmt: skip
    if features_shape is not None and (len(features_shape) != 2 or features_shape[1] != dim):
        raise ValueError(f"{path}: its features {tuple(features_shape)} are not the ({dim}-wide) features its "
                         f"statistics were made from, one row (N, {dim}) per image; make them again with `vqar eval "
                         "stats`")  # fmt: skip


def _reference_images(source: str | Path, stored: StoredReference | None, need_features: bool) -> ImageSource | None:
    """The reference's images, opened (listed, not read), where an Inception pass over them is needed: it is not an
    .npz of statistics, or precision/recall needs the features of ADM's arr_0."""
    if stored is None or (need_features and stored.images_only):
        return open_source(source)
    return None


def _reference_outputs(
    images: ImageSource | None,
    stored: StoredReference | None,
    inception: Inception,
    batch_size: int,
    par: Parallel,
) -> tuple[GaussianStats | None, np.ndarray | None]:
    out = None if images is None else source_outputs(images, inception, batch_size, desc="reference", par=par)
    if stored is None:
        return (None, None) if out is None else (GaussianStats.of(out.features), out.features)
    features = stored.features if out is None else out.features
    return (stored.stats, features) if par.is_main else (None, None)


@dataclass
class EvalSets:
    """The image sets of an FID evaluation, opened by `open_eval_sets` before any Inception pass."""

    fake: str | Path
    samples: ImageSource
    num_samples: int | None
    with_pr: bool
    ref: str | Path | None = None
    stored: StoredReference | None = None  # the reference's statistics, where it is an .npz of them
    reference: ImageSource | None = None  # the reference's images, where they are to be run


def open_eval_sets(
    fake: str | Path,
    ref: str | Path | None,
    num_samples: int | None = None,
    with_pr: bool = True,
    par: Parallel | None = None,
    with_is: bool = True,
) -> EvalSets:
    """Opens the samples and the reference of `evaluate_samples` (files listed, headers read, an .npz of statistics
    read): a reference or samples path that names no image set fails here, in a moment, not after the samples'
    Inception pass, and before the network is loaded."""
    par = par or Parallel()
    stored = reference = None
    if ref is not None:
        # An .npz of statistics is read (and NaN refused) once, here, not after the samples' Inception pass.
        stored = read_stored_reference(ref, with_pr, par)
        reference = _reference_images(ref, stored, with_pr)
    samples = open_source(fake, num_samples)
    if num_samples is not None and len(samples) < num_samples:
        raise ValueError(f"{samples.where} holds {len(samples)} images, fewer than the {num_samples} asked for")
    for images in (samples, reference):
        check_enough_images(images, limit_option="--num-samples")
        if images is not None:  # the reference's pixels are read after the samples' whole pass
            images.check_one_size()
    if with_pr and ref is not None:
        check_enough_for_pr(samples, reference, stored, ref)
    if with_is and ref is None and len(samples) < IS_SPLITS:  # the score is all there is to measure: refused now
        raise ValueError(f"{samples.where} holds {len(samples)} images; the Inception Score is a mean over "
                         f"{IS_SPLITS} splits and needs at least {IS_SPLITS}, and without --ref it is all vqar eval "
                         "fid measures: give more images, or --ref for FID")  # fmt: skip
    return EvalSets(fake, samples, num_samples, with_pr, ref, stored, reference)


def check_enough_for_pr(samples: ImageSource, reference: ImageSource | None, stored: StoredReference | None,
                        ref: str | Path) -> None:  # fmt: skip
    """ValueError naming a set too small for the k-NN manifolds of precision/recall, said before the Inception is
    loaded rather than by the metric after both passes."""
    counts = [(samples.where, len(samples))]
    if reference is not None:
        counts.append((reference.where, len(reference)))
    elif stored is not None and stored.feature_count is not None:
        counts.append((f"{ref} (its stored features)", stored.feature_count))
    for where, count in counts:
        if count <= PR_NEIGHBOURS:
            raise ValueError(f"{where} holds {count} image{'s' * (count != 1)}; precision/recall (k={PR_NEIGHBOURS} "
                             f"nearest neighbours) need more than {PR_NEIGHBOURS} in each set: pass --no-pr, or "
                             "more images")  # fmt: skip


def check_something_to_measure(ref: str | Path | None, with_is: bool, inception: Inception | None = None) -> None:
    """ValueError where an evaluation without a reference would measure nothing (it ran the samples' pass and exited
    0 with counts alone): the Inception Score is all it can give, and --no-is, or a network without a classifier head
    (`inception`, once loaded), rules that out."""
    if ref is not None:
        return
    ask = "give --ref (reference statistics .npz or an image set) for FID and precision/recall"
    if not with_is:
        raise ValueError(f"without --ref, vqar eval fid measures only the Inception Score, which --no-is skips: {ask}")
    if inception is not None and not inception.has_classifier:
        raise ValueError(f"without --ref, vqar eval fid measures only the Inception Score, which "
                         f"{inception.path.name} cannot (it has no classifier head): {ask}, or --inception with "
                         "StyleGAN3's network")  # fmt: skip


def check_feature_width(ref: str | Path, stored: StoredReference, inception: Inception) -> None:
    """ValueError naming reference statistics made with another network (their width is not the Inception's), said
    before the samples' pass rather than by the Fréchet distance after it."""
    width = len(stored.stats.mu)
    if width != inception.feature_width:
        raise ValueError(f"{ref}: its statistics are of {width} features, but {inception.path.name} gives "
                         f"{inception.feature_width}: they were made with another network; pass the --inception they "
                         "were made with, or make them again with `vqar eval stats`")  # fmt: skip


def check_same_resize(ref: str | Path, stored: StoredReference, inception: Inception) -> None:
    """ValueError naming reference statistics made with another resize than the samples', said before the samples'
    pass: the two resizes move FID by more than most differences between models, so the score would compare the
    resizes."""
    if stored.resize is not None and stored.resize != inception.resize:
        raise ValueError(f"{ref}: its statistics were made with --resize {stored.resize}, the samples would be "
                         f"resized with {inception.resize}: pass --resize {stored.resize}, or make them again with "
                         f"`vqar eval stats --resize {inception.resize}`")  # fmt: skip


def evaluate_samples(
    fake: str | Path,
    ref: str | Path | None,
    inception: Inception,
    batch_size: int = 50,
    num_samples: int | None = None,
    with_is: bool = True,
    with_pr: bool = True,
    par: Parallel | None = None,
) -> dict | None:
    """FID (with `ref`), IS (when the network has its classifier head; otherwise the reason is under
    "not_measured") and precision/recall (when reference features are available) of the images in `fake`. Under
    torchrun every rank reads and runs its share of each image set and rank 0 returns the result; the other ranks
    get None."""
    sets = open_eval_sets(fake, ref, num_samples, with_pr, par, with_is)
    return evaluate_sets(sets, inception, batch_size, with_is, par)


def evaluate_sets(
    sets: EvalSets, inception: Inception, batch_size: int = 50, with_is: bool = True, par: Parallel | None = None
) -> dict | None:
    """`evaluate_samples` on the sets `open_eval_sets` opened."""
    par = par or Parallel()
    check_something_to_measure(sets.ref, with_is, inception)  # before the samples' pass
    if sets.stored is not None:
        check_feature_width(sets.ref, sets.stored, inception)
        check_same_resize(sets.ref, sets.stored, inception)
    is_unavailable = with_is and not inception.has_classifier
    too_few_for_is = with_is and len(sets.samples) < IS_SPLITS  # with --ref: FID is measured, the score said missing
    with_is = with_is and inception.has_classifier and not too_few_for_is
    # The samples' images are read once for both passes and let go before the reference's images are read.
    samples = source_outputs(sets.samples, inception, batch_size, at_least=sets.num_samples, probabilities=with_is,
                             desc="samples", par=par)  # fmt: skip
    ref_stats, ref_features = (None, None)
    if sets.ref is not None:
        ref_stats, ref_features = _reference_outputs(sets.reference, sets.stored, inception, batch_size, par)
    if samples is None:
        return None
    result: dict = {
        "samples": samples.count,
        "source": describe_source(sets.fake),
        "inception": str(inception.path),
        "resize": inception.resize,
    }
    not_measured = {}
    if sets.ref is None:  # the Inception Score alone was measured: what else was not is said
        wanting = "FID and precision/recall need" if sets.with_pr else "FID needs"
        not_measured["fid"] = f"no --ref given; {wanting} reference statistics (.npz) or reference images"
    else:
        result["reference"] = describe_source(sets.ref)
        result["fid"] = frechet_distance(GaussianStats.of(samples.features), ref_stats)
        if sets.with_pr and ref_features is not None:
            result["precision"], result["recall"] = precision_recall(ref_features, samples.features)
        elif sets.with_pr:  # asked for (the default) and left out: said, not dropped without a word
            not_measured["precision_recall"] = (f"{sets.ref} holds only mu and sigma; precision/recall need the "
                                                "reference's features or images (arr_0), which `vqar eval stats` "
                                                "stores; --no-pr skips them")  # fmt: skip
    if samples.probabilities is not None:
        result["inception_score"], result["inception_score_std"] = inception_score(samples.probabilities)
    if is_unavailable:  # said, as the ADM evaluator says it, rather than left out without a word
        not_measured["inception_score"] = (f"{inception.path.name} has no classifier head (pass StyleGAN3's with "
                                           "--inception)")  # fmt: skip
    elif too_few_for_is:
        not_measured["inception_score"] = (f"{samples.count} samples; the score is a mean over {IS_SPLITS} splits "
                                           f"and needs at least {IS_SPLITS} (--no-is skips it)")  # fmt: skip
    if not_measured:
        result["not_measured"] = not_measured
    return result
