"""The web page of `vqar serve` (Gradio): pick a class or type a prompt, set the sampling knobs, Generate.

The page calls the same `SamplingEngine` as the HTTP API, so its requests wait in the same queue and share
batches with API calls. For RQ models a second gallery shows each image decoded with 1, 2, ..., D codes per
position, for VAR models after 1, 2, ..., K scales (coarse to fine).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import gradio as gr
from PIL import Image

from vqar.sampling import SamplingSettings
from vqar.sampling.settings import check_settings_apply
from vqar.serve.api import png_bytes
from vqar.serve.engine import GenerateRequest, RequestError, SamplingEngine
from vqar.utils.images import to_uint8

# The page's names of the settings that an error names.
LABELS = {"cfg_scale": "CFG scale", "cfg_interval": "CFG interval", "speculative": "Speculative"}
KEEP_ZIPS = 32
YIELD_EVERY = 0.5  # seconds between the updates that let Gradio notice a closed page while a request is drawn


def parse_setting(text: str | float | None, kind, depth: int, name: str):
    """A knob typed as one value ("0.95"), one per depth ("0.9,0.9,1,1"), or nothing (off)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if not isinstance(text, str):
        return kind(text)
    try:
        values = [None if item.strip().lower() in ("", "none") else _number(item, kind) for item in text.split(",")]
    except ValueError:
        number = "an integer" if kind is int else "a number"
        raise RequestError(f"{name}: {text!r} is not {number} (or one per depth, comma-separated)") from None
    if len(values) == 1:
        return values[0]
    if depth == 1:
        raise RequestError(f"{name}: this model has one code per position; give one value")
    return values


def parse_seed(text: str | int | None) -> int:
    """The seed box's text as an exact integer (empty: 0); the range is checked with the other settings."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return 0
    try:
        return _number(str(text), int)
    except ValueError:
        raise RequestError(f"seed: {text!r} is not an integer") from None


def _number(text: str, kind):
    """`kind(text)`, without the digit separators Python's int() and float() take: "1_000" is a typo on a page."""
    if "_" in text:
        raise ValueError(text)
    return kind(text.strip())


def parse_interval(value) -> int | None:
    """The CFG interval box: -1 (or empty) is every code; a fraction is refused rather than cut (2.5 ran as 2)."""
    if value is None or value == -1:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise RequestError(f"CFG interval: {value!r} is not an integer")
    return int(value)


def _or_default(value, default):
    return default if value is None else value  # an explicit 0 must reach validation, not become the default


def _pictures(images) -> list[Image.Image]:
    pixels = to_uint8(images)
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]


def build_ui(engine: SamplingEngine, work_dir: str | Path | None = None) -> gr.Blocks:
    info = engine.describe()
    depth, levels, names = engine.depth, engine.levels, info["class_names"]
    if work_dir is None:
        work_dir = tempfile.mkdtemp(prefix="vqar-serve-")
        atexit.register(shutil.rmtree, work_dir, True)
    work = Path(work_dir)

    def per_depth_hint(example: str) -> str:
        return f" (one value, or one per depth: {example})" if depth > 1 else ""

    # Gradio's copies of the downloads are deleted an hour after they were made (checked every 10 minutes).
    with gr.Blocks(title="vqar", delete_cache=(600, 3600)) as page:
        conditioning = {"text": "prompt", "class": "class", "none": "unconditional"}[info["conditioning"]]
        gr.Markdown(
            f"## vqar: {info['architecture']} ({info['parameters'] / 1e6:.1f}M parameters, codes "
            f"{'x'.join(map(str, info['code_shape']))}, {conditioning})"
        )
        with gr.Row():
            with gr.Column(scale=1):
                prompt = class_id = None
                if info["conditioning"] == "text":
                    prompt = gr.Textbox(label="Prompt", placeholder="a painting of a cat", elem_id="prompt")
                elif info["conditioning"] == "class":
                    choices = [(f"{i}: {name}" if name != str(i) else str(i), i) for i, name in enumerate(names)]
                    class_id = gr.Dropdown(choices=choices, value=0, label="Class", elem_id="class")
                n = gr.Slider(1, engine.max_images, value=min(4, engine.max_images), step=1,
                              label="Number of images", elem_id="n")  # fmt: skip
                # Text, not a number box: the page's numbers are JavaScript floats, which round a seed above 2^53
                # (and the API takes seeds up to 2^63).
                seed = gr.Textbox("0", label="Seed", elem_id="seed")
                temperature = gr.Textbox(
                    "1.0", label="Temperature" + per_depth_hint("1,1,0.9,0.9"), elem_id="temperature"
                )
                top_k = gr.Textbox("", label="Top-k, empty for off" + per_depth_hint("512,256,128,64"), elem_id="top_k")
                top_p = gr.Textbox("", label="Top-p, empty for off" + per_depth_hint("0.9,0.9,1,1"), elem_id="top_p")
                guidance = engine.has_null
                cfg_scale = gr.Slider(1.0, 10.0, value=2.0 if guidance else 1.0, step=0.1, interactive=guidance,
                                      label="CFG scale" + ("" if guidance else " (not trained for guidance)"),
                                      elem_id="cfg_scale")  # fmt: skip
                cfg_interval = gr.Number(value=-1, precision=0, label="CFG interval (-1: guide every code)",
                                         interactive=guidance, elem_id="cfg_interval")  # fmt: skip
                speculative = None
                if info["speculative"]:
                    speculative = gr.Checkbox(False, label="Speculative decoding (the same distribution, fewer "
                                              "model calls)", elem_id="speculative")  # fmt: skip
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Samples", columns=4, format="png", elem_id="gallery")
                status = gr.Markdown(elem_id="status")
                download = gr.File(label="Download all (zip)", elem_id="download")
                steps = "scales" if info["code_layout"] == "scales" else "codes per position"
                ladder = gr.Gallery(label=f"Coarse to fine: each image with 1..{levels} {steps}", columns=levels,
                                    format="png", visible=levels > 1, elem_id="coarse")  # fmt: skip

        def run(runs: int, *values, progress=gr.Progress()):  # noqa: B008 (Gradio's way of asking for a progress bar)
            settings = dict(zip(keys, values, strict=True))
            try:
                sampling = SamplingSettings(
                    temperature=_or_default(parse_setting(settings["temperature"], float, depth, "temperature"), 1.0),
                    top_k=parse_setting(settings["top_k"], int, depth, "top-k"),
                    top_p=parse_setting(settings["top_p"], float, depth, "top-p"),
                    cfg_scale=float(settings["cfg_scale"]),
                    cfg_interval=parse_interval(settings["cfg_interval"]),
                    seed=parse_seed(settings["seed"]),
                    speculative=bool(settings.get("speculative") or False),
                )
                given = {"cfg_scale": sampling.cfg_scale, "cfg_interval": sampling.cfg_interval,
                         "speculative": sampling.speculative}  # fmt: skip
                try:  # as the API and `vqar sample` refuse them: a setting the others leave without effect
                    check_settings_apply(given, name=lambda field: LABELS.get(field, field))
                except ValueError as err:
                    raise RequestError(str(err)) from None
                request = GenerateRequest(
                    class_id=int(settings["class_id"]) if settings.get("class_id") is not None else None,
                    prompt=settings.get("prompt"),
                    n=int(settings["n"]),
                    settings=sampling,
                    coarse_to_fine=levels > 1,
                )
                progress(0.0, desc="waiting in the queue")
                future = engine.submit(request)
            except RequestError as err:  # shown on the page; the server's log needs no traceback of it
                raise gr.Error(str(err), print_exception=False) from None
            # A generator, so that Gradio stops it when the page closes (it stops iterators of a client that is
            # gone); the request is then given up, and not drawn on for nobody.
            try:
                last_yield = time.monotonic()
                while not future.done():
                    progress(0.5, desc="sampling")
                    if time.monotonic() - last_yield > YIELD_EVERY:
                        last_yield = time.monotonic()
                        yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                    time.sleep(0.05)
            finally:
                if not future.done():
                    engine.abandon(future)
            result = future.result()
            progress(1.0, desc="done")
            archive = work / f"samples-{time.time_ns()}.zip"
            with zipfile.ZipFile(archive, "w") as handle:
                for i, image in enumerate(result.images):
                    handle.writestr(f"image_{i:03d}.png", png_bytes(image))
            for old in sorted(work.glob("samples-*.zip"))[:-KEEP_ZIPS]:  # a long-running server keeps a few
                old.unlink(missing_ok=True)
            rows = []
            if result.coarse_to_fine is not None:
                pictures = [_pictures(level) for level in result.coarse_to_fine]
                unit = "scale(s)" if info["code_layout"] == "scales" else "code(s)"
                for i in range(len(result.images)):
                    rows += [(pictures[d][i], f"image {i + 1}, {d + 1} {unit}") for d in range(len(pictures))]
            runs += 1  # this page's runs: each visitor's page counts its own
            note = f"Run {runs}: {len(result.images)} images in {result.seconds:.2f} s (seed {sampling.seed}; " \
                   f"{result.calls_per_image:.1f} model calls per image" + \
                   ("" if result.acceptance_rate is None else f", {100 * result.acceptance_rate:.0f}% of drafts "
                    "accepted") + ")" + "".join(f"\n\n{said}" for said in result.warnings)  # fmt: skip
            yield _pictures(result.images), note, str(archive), rows, runs

        controls = {"class_id": class_id, "prompt": prompt, "n": n, "seed": seed, "temperature": temperature,
                    "top_k": top_k, "top_p": top_p, "cfg_scale": cfg_scale, "cfg_interval": cfg_interval,
                    "speculative": speculative}  # fmt: skip
        keys = [k for k, v in controls.items() if v is not None]
        inputs = [controls[k] for k in keys]
        runs = gr.State(0)
        # No limit of Gradio's own (its default is one event at a time): the page's requests go to the engine's
        # queue as they come, where they share batches with each other and the API's and --max-queue bounds them.
        button.click(run, inputs=[runs, *inputs], outputs=[gallery, status, download, ladder, runs], api_name=False,
                     concurrency_limit=None)  # fmt: skip
    return page
