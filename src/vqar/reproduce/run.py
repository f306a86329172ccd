"""`vqar reproduce NAME`: a release's reported numbers measured again, by its protocol, from its released weights.

download (once, checked) -> load with `vqar.load_pretrained` -> draw the protocol's samples into resumable shards
(every process of a torchrun launch its share) -> pack `samples.npz` -> the ADM evaluator's metrics against the
protocol's reference batch -> a table of paper vs measured vs difference (`results.md`, `results.json`) with the
settings, deviations from the protocol, environment and time.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from vqar.ar import ARModel
from vqar.eval.adm import AdmFeatures, ReferenceBatch, adm_metrics, adm_outputs, read_reference
from vqar.eval.inception import Inception, cache_dir
from vqar.interop import load_pretrained
from vqar.interop.load import OptionDoesNotApply
from vqar.parallel import Parallel
from vqar.reproduce.download import fetch, find_inside, unchecked_download, unpack
from vqar.reproduce.report import write_report
from vqar.reproduce.samples import (
    PLAN_FILE,
    SamplePlan,
    draw_shards,
    make_run_conditions,
    pack_samples,
    sampling_seconds,
)
from vqar.reproduce.table import Release, ReleaseTable, load_table
from vqar.sampling import SamplingSettings, for_sampling
from vqar.utils.io import (
    atomic_path,
    check_folder_writable,
    created_folders_removed_on_failure,
    describe_entries,
    folder_entries,
    sha256_file,
)
from vqar.utils.memory import human_bytes

# The sampling settings of a protocol, each taken from the release table or the command line.
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "cfg_scale", "cfg_schedule", "cfg_interval", "smooth")
# The release families whose models draw several codes per position (RQ's depth) and so take a value per depth.
PER_DEPTH_FAMILIES = ("rq",)
# What a reproduction writes in its --out: a folder that holds anything else is not written into.
REPRODUCTION_ENTRIES = frozenset({"shards", "samples.npz", "results.md", "results.json"})


@dataclass
class Options:
    name: str
    out: Path
    n: int | None = None
    cache: Path | None = None  # downloads and reference features; default $VQAR_CACHE/releases
    mirror: str | None = None
    releases: list[str] = field(default_factory=list)  # extra release tables
    batch_size: int = 32
    shard_size: int = 1000
    eval_batch_size: int = 50
    precision: str = "fp32"
    compile: bool = False
    seed: int = 0
    overrides: dict = field(default_factory=dict)  # temperature / top_k / top_p / cfg_scale given on the command line
    prompts: list[str] | None = None
    inception: str | None = None
    reference: str | None = None  # a local reference batch instead of the table's
    fp16_distances: bool = True
    download_only: bool = False


def _shared(par: Parallel, work):
    """`work()` on rank 0 while the others wait; its error is raised on every rank (no rank left waiting)."""
    value, error = None, None
    if par.is_main:
        try:
            value = work()
        except (OSError, ValueError) as err:
            error = f"{type(err).__name__}|{err}"
    got = par.gather((value, error))[0]
    if got[1] is not None:
        error_type, message = got[1].split("|", 1)
        raise {"FileNotFoundError": FileNotFoundError, "OSError": OSError}.get(error_type, ValueError)(message)
    return got[0]


def fetch_release(release: Release, table: ReleaseTable, options: Options) -> dict[str, str]:
    """Downloads (or finds) every file of the release and its reference; returns their local paths by role."""
    folder = _cache(options) / release.name
    paths = {}
    # a download that fails leaves no empty folders (a partial file, to be continued, keeps its own)
    with created_folders_removed_on_failure(folder), created_folders_removed_on_failure(folder.parent / "references"):
        for role, remote in release.files.items():
            path = fetch(remote, folder, options.mirror)
            paths[role] = str(unpack(path) if remote.unpack else path)
        if release.category == "generator" and options.reference is None:
            remote, member = table.reference(release)
            path = fetch(remote, folder.parent / "references", options.mirror)
            if remote.unpack:
                path = find_inside(unpack(path), member) if member else unpack(path)
            paths["reference"] = str(path)
    if options.reference is not None and release.category == "generator":
        paths["reference"] = options.reference
    return paths


@contextlib.contextmanager
def _refetch_hint(path: str) -> Iterator[None]:
    """A file that cannot be read, fetched with no digest to check it by (a damaged copy at its source), is kept in
    the cache for every later run: its error says how to fetch it anew."""
    try:
        yield
    except (ValueError, OSError) as err:
        if not unchecked_download(path):
            raise
        hint = "fetched with no digest to check it by: remove it and its .sha256 to fetch it again"
        raise (OSError if isinstance(err, OSError) else ValueError)(f"{err} ({hint})") from None


def _cache(options: Options) -> Path:
    return Path(options.cache) if options.cache else cache_dir() / "releases"


def load_release_model(release: Release, paths: dict[str, str], device) -> ARModel:
    """The AR model (with its tokenizer) of a release, through `vqar.load_pretrained` as the table's `load` says."""
    load = release.load
    tokenizer = paths.get("tokenizer")
    if tokenizer is not None and "tokenizer_config" in load:
        tokenizer = load_pretrained(tokenizer, config=load["tokenizer_config"])
    source = paths.get("model") or _release_folder(Path(paths["release"]))
    try:
        model = load_pretrained(source, config=load.get("config"), tokenizer=tokenizer, device=device)
    except OptionDoesNotApply as err:  # the option came from the release table, not from the user
        raise ValueError(f"{release.name}: the release table's {err.option} does not apply to its file {source}: "
                         f"{err.why}") from None  # fmt: skip
    if not isinstance(model, ARModel):
        raise ValueError(f"{release.name}: {source} holds a {type(model).__name__}, not an AR model")
    return model


def _release_folder(unpacked: Path) -> Path:
    """The folder of an unpacked RQ release: the one whose stage2/ holds the model."""
    found = sorted(p.parent.parent for p in unpacked.rglob("stage2/model.pt"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one stage2/model.pt under {unpacked}, found {len(found)}")
    return found[0]


def resolve_settings(release: Release, paths: dict[str, str], options: Options) -> tuple[SamplingSettings, list]:
    """The protocol's sampling settings, with what the command line changed listed as deviations. A setting the
    sources do not state must come from the command line."""
    check_stated(release, options)
    values, deviations = {}, []
    release_config = None
    for key in SAMPLING_KEYS:
        setting = release.setting(key)
        if key in options.overrides and options.overrides[key] is not None:
            values[key] = options.overrides[key]
            if not setting.stated or setting.value != values[key]:
                deviations.append(f"{key} {values[key]!r} given on the command line (the protocol: "
                                  f"{setting.describe()})")  # fmt: skip
            continue
        if key == "smooth" and key not in release.protocol:
            values[key] = False
            continue
        value = setting.value
        if value == "release-config":
            release_config = release_config or _release_sampling(paths)
            upstream = {"temperature": "temp"}.get(key, key)
            if release_config.get(upstream) is None:
                raise ValueError(f"{release.name}: the release's config.yaml has no sampling.{upstream}; give it "
                                 f"with --{key.replace('_', '-')}")  # fmt: skip
            value = release_config[upstream]
        values[key] = value
    settings = SamplingSettings(
        temperature=values["temperature"],
        top_k=values["top_k"],
        top_p=values["top_p"],
        cfg_scale=float(values["cfg_scale"]),
        cfg_interval=values["cfg_interval"],
        cfg_schedule=values["cfg_schedule"],
        smooth=bool(values["smooth"]),
        seed=options.seed,
    )
    settings.validate()
    return settings, deviations


def check_stated(release: Release, options: Options) -> None:
    """ValueError naming a sampling setting that no source states and the command line does not give."""
    for key in SAMPLING_KEYS:
        setting = release.setting(key)
        given = options.overrides.get(key) is not None
        if given or setting.stated or (key == "smooth" and key not in release.protocol):  # smooth: off unless stated
            continue
        flag = "--" + key.replace("_scale", "").replace("_", "-")
        raise ValueError(f"{release.name}: the sources do not state {key} ({setting.note}); give it with {flag}")


def _release_sampling(paths: dict[str, str]) -> dict:
    """The `sampling` section (temp, top_k, top_p) of an RQ release's stage2/config.yaml."""
    config = _release_folder(Path(paths["release"])) / "stage2" / "config.yaml"
    raw = yaml.safe_load(config.read_text()) or {}
    return dict(raw.get("sampling") or {})


def reference_rows(reference: ReferenceBatch, features: AdmFeatures, options: Options, par: Parallel) -> dict | None:
    """Pool and spatial features of the reference's images (cached beside the downloads, keyed by the reference's
    and the Inception's sha256 and the resize); None where the reference has no images."""
    if not reference.has_images:
        return None
    key = _shared(par, lambda: f"{sha256_file(reference.path)[:16]}-{sha256_file(features.inception.path)[:12]}")
    cached = _cache(options) / "reference-features" / f"{key}-{features.inception.resize}.npz"
    if cached.is_file():  # every rank sees the same file: rank 0 wrote it before a barrier of an earlier run
        if not par.is_main:
            return None
        with np.load(cached) as data:
            return {"pool": data["pool"], "spatial": data["spatial"], "count": int(data["count"])}
    rows = adm_outputs(reference.path, features, options.eval_batch_size, desc="reference", par=par)
    if rows is not None:
        with atomic_path(cached) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, pool=rows["pool"], spatial=rows["spatial"], count=rows["count"])
    return rows


def reproduce(options: Options, par: Parallel | None = None) -> dict | None:
    """Runs the whole reproduction; rank 0 returns the report (the other ranks None)."""
    par = par or Parallel()
    started = time.perf_counter()
    table = load_table(options.releases)
    release = table.get(options.name)
    if release.category != "generator" and not options.download_only:
        raise ValueError(
            f"{release.name} is a tokenizer: its rFID is measured with `vqar eval rfid VALIDATION_IMAGES "
            f"--tokenizer FILE` (`vqar reproduce {release.name} --download-only` fetches the file)"
        )
    if options.download_only:  # no sampling: its settings need not be given
        _check_cache(options)
    else:
        check_options(release, options)  # before a download of gigabytes, not after
        n = _sample_count(release, options)
        check_room(release, Path(options.out), n)
    paths = _shared(par, lambda: fetch_release(release, table, options))
    downloaded = time.perf_counter()
    if options.download_only:
        return {"release": release.name, "files": paths} if par.is_main else None
    with _refetch_hint(paths["reference"]):  # a bad reference is refused before any sampling
        reference = read_reference(paths["reference"])
    with _refetch_hint(paths.get("model") or paths.get("release", "")):
        model = for_sampling(load_release_model(release, paths, par.device), options.precision)
    settings, deviations = resolve_settings(release, paths, options)
    conditions = make_run_conditions(model, release.setting("conditions").value, n, options.seed, options.prompts)
    image_size = int(release.setting("image_size").value)
    eval_size = release.setting("eval_size")
    plan = SamplePlan(
        release=release.name, n=len(conditions), shard_size=options.shard_size, batch_size=options.batch_size,
        conditions=release.setting("conditions").value, settings=_plain(settings), image_size=image_size,
        eval_size=int(eval_size.value) if eval_size.stated else image_size,
    )  # fmt: skip
    folder = Path(options.out) / "shards"
    counts = draw_shards(model, conditions, settings, folder, plan, par, precision=options.precision,
                         compile=options.compile)  # fmt: skip
    sampled = time.perf_counter()
    del model
    samples = Path(options.out) / "samples.npz"
    _shared(par, lambda: str(pack_samples(folder, plan, samples)))
    inception = Inception(options.inception, device=str(par.device))
    features = AdmFeatures(inception)
    rows = adm_outputs(samples, features, options.eval_batch_size, probabilities=inception.has_classifier,
                       desc="samples", par=par)  # fmt: skip
    ref_rows = reference_rows(reference, features, options, par)
    if not par.is_main:
        return None
    metrics = adm_metrics(rows, reference, ref_rows, fp16=options.fp16_distances, device=par.device)
    finished = time.perf_counter()
    times = {"download_s": downloaded - started, "sampling_s": sampled - downloaded,
             "sampling_device_s": sampling_seconds(folder, plan), "evaluation_s": finished - sampled,
             "total_s": finished - started}  # fmt: skip
    return write_report(
        Path(options.out),
        release,
        plan,
        settings,
        metrics,
        deviations=deviations,
        counts=counts,
        times=times,
        paths={**paths, "samples": str(samples)},
        inception=inception,
        par=par,
    )


def check_options(release: Release, options: Options) -> None:
    """ValueError for what the command line got wrong that needs no download to see: sampling values out of range
    (--top-p 5, --cfg 0.5) or missing (a setting no source states), --prompts for a release that does not draw
    prompts, an --out that is a file, an --inception file that does not exist, a --reference that is no reference
    batch, a --cache that is a file or lies under one, a value per depth for a model of depth 1."""
    _check_cache(options)
    given = {key: value for key, value in options.overrides.items() if value is not None}
    _check_one_value_each(release, given)
    SamplingSettings(**given, seed=options.seed).validate()
    check_stated(release, options)  # a setting that must be given (llamagen-b-256's --cfg), before the download
    conditions = release.setting("conditions")
    if options.prompts is not None and conditions.value != "prompts":
        raise ValueError(f"--prompts is for text-to-image releases; the conditions {release.name}'s protocol draws: "
                         f"{conditions.describe()}")  # fmt: skip
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (a rerun continues the shards in it)")
    check_reproduction_folder(out)
    if options.inception is not None and not Path(options.inception).is_file():  # else found after the sampling
        raise FileNotFoundError(f"--inception {options.inception} is not a file; give the TorchScript Inception "
                                "network to evaluate with, or leave it out for the default")  # fmt: skip
    if options.reference is not None:  # its headers, not the release's gigabytes, say whether it is one
        read_reference(options.reference)


def _check_cache(options: Options) -> None:
    """ValueError for a --cache that is a file or lies under one: else "[Errno 20] Not a directory" from the first
    download into it."""
    if options.cache is None:
        return
    cache = Path(options.cache)
    in_the_way = next((path for path in (cache, *cache.parents) if path.exists() and not path.is_dir()), None)
    if in_the_way is not None:
        where = "is a file" if in_the_way == cache else f"cannot be made: {in_the_way} is a file"
        raise ValueError(f"--cache {cache} {where}; give a folder for the downloads and reference features")
    existing = next(path for path in (cache.absolute(), *cache.absolute().parents) if path.exists())
    try:  # a read-only one failed at its first download; probed where it is (or would be) made, leaving nothing
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise ValueError(f"--cache {cache} cannot be written: {err.strerror or err} ({existing})") from None


def check_reproduction_folder(out: Path) -> None:
    """ValueError for an --out that holds anything but a reproduction's own files (a `vqar sample` folder, a
    training run, the user's pictures): its samples.npz and results would be written over them."""
    entries = folder_entries(out)
    if not entries:
        return
    shards = out / "shards"
    ours = (set(entries) <= REPRODUCTION_ENTRIES and shards.is_dir()
            and (not folder_entries(shards) or (shards / PLAN_FILE).is_file()))  # fmt: skip
    if not ours:
        raise ValueError(f"--out {out} holds {describe_entries(entries)}, which no `vqar reproduce` wrote; give a "
                         "new or empty folder (a reproduction's own --out continues its shards)")


def check_room(release: Release, out: Path, n: int) -> None:
    """Makes --out and checks that it is writable and that its disk holds the n images twice (the shards, then
    samples.npz), less the shards already drawn: `--n 1000000000` was taken, and filled the memory."""
    size = release.setting("eval_size")
    side = int(size.value if size.stated else release.setting("image_size").value)
    drawn = sum(path.stat().st_size for path in (out / "shards").glob("shard-*.npz")) if out.is_dir() else 0
    need = 2 * n * side * side * 3 - drawn
    existing = next(path for path in (out, *out.parents) if path.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise ValueError(f"{n} samples at {side}x{side} px need about {human_bytes(need)} of disk under {out} (the "
                         f"shards, then samples.npz), and {human_bytes(free)} is free there: give a smaller "
                         "--num-samples, or an --out on a larger disk")  # fmt: skip
    check_folder_writable(out)


def _check_one_value_each(release: Release, given: dict) -> None:
    """ValueError naming the option given a list of values (one per depth) for a release whose model has depth 1, or
    a list whose length is not the depth the table records: the model would refuse it only once loaded, after the
    download."""
    if release.family in PER_DEPTH_FAMILIES:
        depth = release.setting("code_depth")
        for key, value in given.items():
            if depth.stated and isinstance(value, list) and len(value) != int(depth.value):
                flag = "--" + key.replace("_", "-")
                raise ValueError(f"{flag} takes one value, or {depth.value} separated by commas (one per code depth), "
                                 f"for {release.name}, whose model draws {depth.value} codes per position; got "
                                 f"{len(value)}: {','.join(map(str, value))}")  # fmt: skip
        return
    for key, value in given.items():
        if isinstance(value, list):
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{flag} takes one value for {release.name}, whose {release.family} model draws one code "
                             f"per position (values per depth are for RQ-Transformer releases), got "
                             f"{','.join(map(str, value))}")  # fmt: skip


def _sample_count(release: Release, options: Options) -> int:
    if release.setting("conditions").value == "prompts":
        if options.n is not None:
            raise ValueError(f"--num-samples does not apply to {release.name}, a text-to-image release: it draws one "
                             "sample per prompt of --prompts (give fewer prompts for fewer samples)")  # fmt: skip
        if not options.prompts:
            raise ValueError(f"{release.name} is text-to-image: give its evaluation captions with --prompts FILE "
                             f"({release.setting('conditions').source})")  # fmt: skip
        return len(options.prompts)
    if options.n is not None:
        if options.n < 1:
            raise ValueError(f"--n must be positive, got {options.n}")
        return options.n
    stated = release.setting("n_samples")
    if not stated.stated:
        raise ValueError(f"{release.name}: the number of samples is not stated ({stated.note}); give --n")
    return int(stated.value)


def _plain(settings: SamplingSettings) -> dict:
    keys = ("temperature", "top_k", "top_p", "cfg_scale", "cfg_interval", "cfg_schedule", "smooth", "seed")
    return {key: getattr(settings, key) for key in keys}
