"""The sampling engine behind `vqar serve`: validated requests, a bounded queue, and one worker that batches.

Every request (from the web page or the HTTP API) becomes a `Job` in a bounded queue; a single worker thread runs
the model, so it is never run twice at once on its device. The worker takes every job waiting when it wakes up,
groups those with the same sampling settings, and draws each group in batches of at most `max_batch` images.
Image j of a request draws from its own random stream, a function of (seed, j) alone, so a seed gives the same
images whether the request was batched with others or not.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from vqar.ar import ARModel, Conditioning
from vqar.sampling import Conditions, SamplingSettings, draw, make_conditions, warm_up
from vqar.sampling.compiled import batch_buckets
from vqar.sampling.draw import DrawStopped, check_drawable

log = logging.getLogger("vqar.serve")

SHUTTING_DOWN = "the server is shutting down; send the request again once it is back"


class RequestError(ValueError):
    """A request that cannot be served; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class GenerateRequest:
    """What to draw: `n` images of class `class_id`, of `prompt` (text models), or unconditional (neither), with
    `settings` (image j draws from the stream (settings.seed, j), as `vqar sample` does)."""

    class_id: int | None = None
    prompt: str | None = None
    n: int = 4
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    coarse_to_fine: bool = False  # RQ models: also decode every image with 1..D codes per position


@dataclass
class GenerateResult:
    images: torch.Tensor  # (n, C, H, W) in [-1, 1]
    coarse_to_fine: list[torch.Tensor] | None  # per depth d = 1..D: (n, C, H, W), RQ models only
    seconds: float  # drawing the round it was in, its coarse-to-fine decoding included
    batched_with: int  # images drawn in the same round of model runs
    calls_per_image: float = 0.0  # model calls each image waited for (fewer with speculative decoding)
    acceptance_rate: float | None = None  # speculative decoding: the share of drafted codes accepted
    warnings: list[str] = field(default_factory=list)  # what reading the request changed (a prompt truncated)


@dataclass
class Job:
    request: GenerateRequest
    conditions: Conditions
    warnings: list[str] = field(default_factory=list)
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


class SamplingEngine:
    def __init__(self, model: ARModel, tokenizer=None, *, text_tokenizer=None, max_images: int = 16,
                 max_queue: int = 32, max_batch: int = 64, class_names: Sequence[str] | None = None,
                 compile: bool = False, precision: str = "fp32"):  # fmt: skip
        if max_images < 1 or max_queue < 1 or max_batch < 1:
            raise ValueError("max_images, max_queue and max_batch must be positive")
        self.compile, self.precision = compile, precision
        self.model = model.eval()
        self.tokenizer = check_drawable(model, SamplingSettings(), tokenizer).eval()
        self.text_tokenizer = text_tokenizer or model.text_tokenizer
        self.text = model.conditioning is Conditioning.TEXT
        if self.text and self.text_tokenizer is None:
            raise ValueError("this text-to-image model has no caption tokenizer; pass one (--text-tokenizer)")
        self.depth = model.depth
        # Coarse-to-fine steps the tokenizer decodes: an RQ stack's depths, VAR's scales (1: nothing to show).
        self.levels = self.tokenizer.levels if self.tokenizer is not None else 1
        self.max_images, self.max_batch = max_images, max_batch
        self.class_names = list(class_names) if class_names else [str(i) for i in range(model.num_classes)]
        self.device = next(model.parameters()).device
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.model_runs = 0  # how many generate calls served the requests (batching makes it fewer)
        self.abandoned = 0  # requests given up (their client hung up or stopped waiting) before they were answered
        self._lock = threading.Lock()  # one model run at a time, also for callers outside the worker
        self.sampling = threading.Event()  # set while the worker holds a round of requests (for /health)
        self.closing = threading.Event()  # set by `shut_down`: no new requests, none waiting drawn
        self.stopping = False  # set by `close`: the round being drawn stops too
        if compile:  # before the first request, so that it is not the one that waits for the compiler
            seconds = warm_up(model, batch_buckets(max_batch), precision=precision)
            if model.raster and model.num_positions > 1:  # and the window of speculative requests
                seconds += warm_up(model, batch_buckets(max_batch), precision=precision,
                                   like=SamplingSettings(speculative=True))  # fmt: skip
            log.info("compiled the decode steps for batches of up to %d images in %.0f s", max_batch, seconds)
        self._worker = threading.Thread(target=self._work, name="vqar-sampler", daemon=True)
        self._worker.start()

    # ---------------------------------------------------------------- describing and validating
    @property
    def has_null(self) -> bool:
        return self.model.has_null_condition

    def describe(self) -> dict:
        model = self.model
        return {
            "kind": model.arch,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "code_shape": list(model.code_shape),
            "codebook_size": model.codebook_size,
            "depth": self.depth,
            "levels": self.levels,
            "code_layout": getattr(self.tokenizer, "layout", "grid"),
            "speculative": model.raster and model.num_positions > 1,  # whether `speculative` requests apply
            "image_size": getattr(self.tokenizer, "image_size", None),
            "conditioning": model.conditioning.value,
            "num_classes": model.num_classes,
            "class_names": self.class_names if model.num_classes else [],
            "text_length": model.cfg.text_length if self.text else None,
            "classifier_free_guidance": self.has_null,
            "max_images_per_request": self.max_images,
            "max_queue": self.jobs.maxsize,
            "device": str(self.device),
        }

    def validate(self, request: GenerateRequest) -> Conditions:
        """The conditions of a valid request; RequestError (422, or 413 for too many images) otherwise."""
        return self.read(request)[0]

    def read(self, request: GenerateRequest) -> tuple[Conditions, list[str]]:
        """`validate`, with the warnings that reading the request gave (a prompt truncated, or with words the
        caption tokenizer lacks): logged once, and returned to be answered, as an API client sees no log."""
        with _warnings_of_this_thread("vqar.text") as said:
            conditions = self._conditions(request)
        return conditions, said

    def _conditions(self, request: GenerateRequest) -> Conditions:
        if isinstance(request.n, bool) or not isinstance(request.n, int) or request.n < 1:
            raise RequestError(f"n must be a positive number of images, got {request.n}")
        if request.n > self.max_images:
            raise RequestError(f"n={request.n} is more than this server's {self.max_images} images per request",
                               status=413)  # fmt: skip
        if request.coarse_to_fine and self.levels == 1:
            raise RequestError("coarse_to_fine needs a tokenizer that decodes coarse to fine: a residual (RQ) stack "
                               "or VAR's scales")  # fmt: skip
        self._check_class_id(request.class_id)
        if self.text and request.prompt is None:  # make_conditions would say "give prompts", a field requests lack
            raise RequestError('prompt is required by this text-conditioned model: give one ("prompt": "a seven")')
        try:
            check_drawable(self.model, request.settings, self.tokenizer)
            classes = None if request.class_id is None else [request.class_id]
            prompts = None if request.prompt is None else [request.prompt]
            return make_conditions(self.model, classes=classes, prompts=prompts, n_per_condition=request.n,
                                   text_tokenizer=self.text_tokenizer)  # fmt: skip
        except (ValueError, TypeError) as err:
            raise RequestError(str(err)) from None

    def _check_class_id(self, class_id) -> None:
        """RequestError naming the class_id field, the value sent and what it takes, as the other fields' errors
        do: make_conditions speaks of `classes`, a list that requests do not have."""
        model = self.model
        if model.conditioning is not Conditioning.CLASS:
            if class_id is not None:
                kind = "a text-conditioned model (give a prompt)" if self.text else "an unconditional model"
                raise RequestError(f"class_id must be left out for {kind}, got {class_id!r}")
            return
        last = model.num_classes - 1
        if class_id is None:
            raise RequestError(f"class_id is required by this class-conditional model: give one in 0..{last}")
        if isinstance(class_id, bool) or not isinstance(class_id, int) or not 0 <= class_id <= last:
            raise RequestError(f"class_id must be an integer in 0..{last}, got {class_id!r}")

    # ---------------------------------------------------------------- queueing
    def submit(self, request: GenerateRequest, read: tuple[Conditions, list[str]] | None = None) -> Future:
        """Validates and queues a request; its future gives a `GenerateResult`. A full queue is a 429, a server
        shutting down a 503. `read`: what `read(request)` gave, for a request read before (not read twice)."""
        job = Job(request, *(read or self.read(request)))
        if self.closing.is_set():
            raise RequestError(SHUTTING_DOWN, status=503)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(f"the server is busy ({self.jobs.maxsize} requests waiting); try again shortly",
                               status=429) from None  # fmt: skip
        return job.future

    def abandon(self, future: Future) -> None:
        """Gives up the request of `future` (a future from `submit`), whose client is gone: it is not drawn if it
        is still queued, and a round of requests that are all given up stops drawing before its next batch."""
        if future.cancel():  # False once answered: there is nothing left to stop
            self.abandoned += 1

    def generate(self, request: GenerateRequest, timeout: float | None = None) -> GenerateResult:
        return self.submit(request).result(timeout=timeout)

    def shut_down(self, grace: float | None = None) -> None:
        """The server is stopping: new requests are refused (503), and the waiting ones are answered 503 at once
        instead of drawn one after another for a server that then exits. The round being drawn goes on for `grace`
        seconds (None: to its end), then stops before its next batch and answers its requests 503, so that a
        stopping server ends in bounded time (a service manager kills it after its own grace period). Idempotent;
        the worker keeps running until `close`."""
        if grace is not None and not self.closing.is_set():
            timer = threading.Timer(grace, self._stop_drawing)
            timer.daemon = True
            timer.start()
        self.closing.set()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is None:  # `close` already asked the worker to end: leave that to it
                self.jobs.put(None)
                return
            _settle(job.future, error=RequestError(SHUTTING_DOWN, status=503))

    def close(self) -> None:
        """Shuts down and ends the worker. A round it is drawing stops before its next batch (its requests are
        answered 503): the process must not exit with the model running in the worker thread, which aborts it."""
        self.shut_down()
        self._stop_drawing()
        self.jobs.put(None)
        self._worker.join()

    def _stop_drawing(self) -> None:
        self.stopping = True

    def _work(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            pending = [first]
            while True:  # everything waiting now is served in this round
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)
                    break
                pending.append(job)
            groups: dict[tuple, list[Job]] = {}
            for job in pending:
                groups.setdefault(job.request.settings.batch_key(), []).append(job)
            self.sampling.set()
            try:
                for jobs in groups.values():
                    self._run_group(jobs)
            finally:
                self.sampling.clear()

    def _run_group(self, jobs: list[Job]) -> None:
        """Draws the images of `jobs` (equal settings but for the seed) in batches of at most max_batch images.
        When drawing them together fails, each job is drawn alone, so a failure answers its own request only."""
        jobs = [job for job in jobs if not job.future.cancelled()]
        if not jobs:
            return
        began = time.perf_counter()
        try:
            result, ladders = self._draw(jobs)
        except DrawStopped:
            if self.stopping:
                for job in jobs:
                    _settle(job.future, error=RequestError(SHUTTING_DOWN, status=503))
                return
            log.info("stopped drawing %d request(s): their clients are gone", len(jobs))
            return
        except Exception as err:
            if len(jobs) > 1:
                log.warning("drawing %d requests together failed (%s); drawing each alone", len(jobs), err)
                for job in jobs:
                    self._run_group([job])
                return
            log.exception("sampling failed")
            _settle(jobs[0].future, error=err)  # the caller gets the error instead of waiting forever
            return
        seconds = time.perf_counter() - began  # the round's drawing, its coarse-to-fine decoding included
        begin = 0
        for job, levels in zip(jobs, ladders, strict=True):
            mine = slice(begin, begin + job.request.n)
            begin = mine.stop
            stats = result.decode_stats.of(mine)  # its own images' (they are drawn in order)
            _settle(job.future, GenerateResult(result.images[mine], levels, seconds, len(result.images),
                                               stats.calls_per_image, stats.acceptance_rate, job.warnings))  # fmt: skip

    @torch.no_grad()
    def _draw(self, jobs: list[Job]):
        """One `draw` over every image of `jobs`: image j of a request takes the stream (its seed, j). Returns the
        result and, per job, its coarse-to-fine decodes: None for a job that did not ask for them, whatever the
        jobs batched with it asked (an answer holds what its own request asked for, and only its codes are
        decoded for it)."""
        rows = [job.conditions.rows for job in jobs]
        conditions = Conditions(None if rows[0] is None else torch.cat(rows),
                                torch.cat([job.conditions.labels for job in jobs]))  # fmt: skip
        seeds = torch.cat([torch.full((job.request.n,), job.request.settings.seed) for job in jobs])
        index = torch.cat([torch.arange(job.request.n) for job in jobs])
        given_up = lambda: self.stopping or all(job.future.cancelled() for job in jobs)  # noqa: E731
        with self._lock:
            result = draw(self.model, conditions, jobs[0].request.settings, tokenizer=self.tokenizer,
                          batch_size=self.max_batch, seeds=seeds, index=index, compile=self.compile,
                          precision=self.precision, stop=given_up)  # fmt: skip
            self.model_runs += result.batches
            ladders, begin = [], 0
            for job in jobs:
                mine = slice(begin, begin + job.request.n)
                begin = mine.stop
                if not job.request.coarse_to_fine:
                    ladders.append(None)
                    continue
                # In batches of max_batch, as `draw` decodes: all of a large request's codes at once took
                # several times the memory of its images, at every level.
                chunks = result.codes[mine].split(self.max_batch)
                ladders.append([torch.cat([self.tokenizer.decode(chunk.to(self.device), depth=d).float().clamp(-1, 1)
                                           .cpu() for chunk in chunks]) for d in range(1, self.levels + 1)])
        return result, ladders


@contextlib.contextmanager
def _warnings_of_this_thread(logger: str):
    """The messages of warnings that `logger` logs from this thread in the body (other threads read other requests
    at the same time); they are logged as ever too."""
    said: list[str] = []
    this_thread = threading.get_ident()

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.thread == this_thread and record.levelno >= logging.WARNING:
                said.append(record.getMessage())

    handler = Collect()
    logging.getLogger(logger).addHandler(handler)
    try:
        yield said
    finally:
        logging.getLogger(logger).removeHandler(handler)


def _settle(future: Future, result: GenerateResult | None = None, error: BaseException | None = None) -> None:
    """Answers `future`, unless its request was given up meanwhile: setting a cancelled future raises, and raised
    in the worker that would end the worker, leaving every later request waiting."""
    with contextlib.suppress(InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
