"""The sampling engine behind `vqar serve`: validated requests, a bounded queue, and one worker that batches.

Every request (from the web page or the HTTP API) becomes a `Job` in a bounded queue; a single worker thread runs
the model, so it is never run twice at once on its device. The worker takes every job waiting when it wakes up,
groups those with the same sampling settings, and draws each group in batches of at most `max_batch` images.
Image j of a request draws from its own random stream, a function of (seed, j) alone, so a seed gives the same
images whether the request was batched with others or not.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from vqar.sampling.export import batch_generator, check_compatible, condition_embedding
from vqar.sampling.filters import per_depth_settings

log = logging.getLogger("vqar.serve")


class RequestError(ValueError):
    """A request that cannot be served; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class GenerateRequest:
    """What to draw: `n` images of class `class_id`, of `prompt` (text models), or unconditional (neither)."""

    class_id: int | None = None
    prompt: str | None = None
    n: int = 4
    seed: int = 0
    temperature: float | list[float] = 1.0
    top_k: int | list[int | None] | None = None
    top_p: float | list[float | None] | None = None
    cfg_scale: float = 1.0
    cfg_interval: int | None = None
    coarse_to_fine: bool = False  # RQ models: also decode every image with 1..D codes per position

    def sampling_key(self) -> tuple:
        """Requests with equal keys can share a batch."""
        as_tuple = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
        return (as_tuple(self.temperature), as_tuple(self.top_k), as_tuple(self.top_p), self.cfg_scale,
                self.cfg_interval)  # fmt: skip


@dataclass
class GenerateResult:
    images: torch.Tensor  # (n, C, H, W) in [-1, 1]
    coarse_to_fine: list[torch.Tensor] | None  # per depth d = 1..D: (n, C, H, W), RQ models only
    seconds: float
    batched_with: int  # images drawn in the same model run


@dataclass
class Job:
    request: GenerateRequest
    cond: torch.Tensor | None  # (n,) class ids or (n, text_length) caption ids; None when unconditional
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


class SamplingEngine:
    def __init__(self, model, tokenizer, *, text_tokenizer=None, max_images: int = 16, max_queue: int = 32,
                 max_batch: int = 64, class_names: Sequence[str] | None = None):  # fmt: skip
        check_compatible(model, tokenizer)
        if max_images < 1 or max_queue < 1 or max_batch < 1:
            raise ValueError("max_images, max_queue and max_batch must be positive")
        self.model, self.tokenizer = model.eval(), tokenizer.eval()
        self.text_tokenizer = text_tokenizer or getattr(model, "text_tokenizer", None)
        self.text = bool(getattr(model, "is_text_conditioned", False))
        if self.text and self.text_tokenizer is None:
            raise ValueError("this text-to-image model has no caption tokenizer; pass one (--text-tokenizer)")
        self.depth = getattr(model, "depth", 1)
        self.max_images, self.max_batch = max_images, max_batch
        self.class_names = list(class_names) if class_names else [str(i) for i in range(model.num_classes)]
        self.device = next(model.parameters()).device
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.model_runs = 0  # how many generate calls served the requests (batching makes it fewer)
        self._lock = threading.Lock()  # one model run at a time, also for callers outside the worker
        self.sampling = threading.Event()  # set while the worker holds a round of requests (for /health)
        self._worker = threading.Thread(target=self._work, name="vqar-sampler", daemon=True)
        self._worker.start()

    # ---------------------------------------------------------------- describing and validating
    @property
    def has_null(self) -> bool:
        try:
            condition_embedding(self.model).null_ids(1)
        except ValueError:
            return False
        return True

    def describe(self) -> dict:
        model = self.model
        return {
            "kind": model.kind,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "code_shape": list(model.code_shape),
            "codebook_size": model.codebook_size,
            "depth": self.depth,
            "image_size": getattr(self.tokenizer, "image_size", None),
            "conditioning": "text" if self.text else "class" if model.num_classes else "none",
            "num_classes": model.num_classes,
            "class_names": self.class_names if model.num_classes else [],
            "text_length": self.text_tokenizer.length if self.text else None,
            "classifier_free_guidance": self.has_null,
            "max_images_per_request": self.max_images,
            "max_queue": self.jobs.maxsize,
            "device": str(self.device),
        }

    def validate(self, request: GenerateRequest) -> torch.Tensor | None:
        """The condition rows of a valid request; RequestError (422, or 413 for too many images) otherwise."""
        if not isinstance(request.n, int) or request.n < 1:
            raise RequestError(f"n must be a positive number of images, got {request.n}")
        if request.n > self.max_images:
            raise RequestError(f"n={request.n} is more than this server's {self.max_images} images per request",
                               status=413)  # fmt: skip
        try:
            if self.depth == 1 and any(isinstance(v, list) for v in (request.temperature, request.top_k,
                                                                    request.top_p)):  # fmt: skip
                raise ValueError("this model has one code per position: give single sampling values, not lists")
            per_depth_settings(self.depth, request.temperature, request.top_k, request.top_p, request.cfg_scale,
                               request.cfg_interval)  # fmt: skip
        except (ValueError, TypeError) as err:
            raise RequestError(str(err)) from None
        if request.cfg_scale != 1.0 and not self.has_null:
            raise RequestError("this model was trained without a null condition; classifier-free guidance "
                               "(cfg_scale != 1) is not available")  # fmt: skip
        if request.coarse_to_fine and self.depth == 1:
            raise RequestError("coarse_to_fine needs a residual (RQ) model with several codes per position")
        if self.text:
            if request.class_id is not None:
                raise RequestError("this model is text-conditioned: send a prompt, not a class_id")
            if not isinstance(request.prompt, str) or not request.prompt.strip():
                raise RequestError("this model is text-conditioned: the prompt must be a non-empty text")
            return self.text_tokenizer.encode(request.prompt).repeat(request.n, 1)
        if request.prompt is not None:
            raise RequestError("this model is not text-conditioned: send a class_id, not a prompt")
        if self.model.num_classes:
            last = self.model.num_classes - 1
            if request.class_id is None:
                raise RequestError(f"this model is class-conditional: send a class_id in 0..{last}")
            if not 0 <= request.class_id < self.model.num_classes:
                raise RequestError(f"unknown class_id {request.class_id}: this model has classes "
                                   f"0..{self.model.num_classes - 1}")  # fmt: skip
            return torch.full((request.n,), request.class_id, dtype=torch.long)
        if request.class_id is not None:
            raise RequestError("this model is unconditional: send no class_id")
        return None

    # ---------------------------------------------------------------- queueing
    def submit(self, request: GenerateRequest) -> Future:
        """Validates and queues a request; its future gives a `GenerateResult`. A full queue is a 429."""
        cond = self.validate(request)
        job = Job(request, cond)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(f"the server is busy ({self.jobs.maxsize} requests waiting); try again shortly",
                               status=429) from None  # fmt: skip
        return job.future

    def generate(self, request: GenerateRequest, timeout: float | None = None) -> GenerateResult:
        return self.submit(request).result(timeout=timeout)

    def close(self) -> None:
        self.jobs.put(None)
        self._worker.join(timeout=30)

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
                groups.setdefault(job.request.sampling_key(), []).append(job)
            self.sampling.set()
            try:
                for jobs in groups.values():
                    self._run_group(jobs)
            finally:
                self.sampling.clear()

    def _run_group(self, jobs: list[Job]) -> None:
        """Draws the images of `jobs` (same sampling settings) in batches of at most max_batch rows."""
        rows = [(job, j) for job in jobs for j in range(job.request.n)]
        images: dict[int, list[torch.Tensor]] = {id(job): [] for job in jobs}
        ladders: dict[int, list[list[torch.Tensor]]] = {id(job): [] for job in jobs}
        start = time.perf_counter()
        try:
            for begin in range(0, len(rows), self.max_batch):
                chunk = rows[begin : begin + self.max_batch]
                pictures, ladder = self._draw(chunk)
                for i, (job, _) in enumerate(chunk):
                    images[id(job)].append(pictures[i : i + 1])
                    if ladder is not None:
                        ladders[id(job)].append([level[i : i + 1] for level in ladder])
        except Exception as err:  # every waiting caller gets the error instead of hanging
            log.exception("sampling failed")
            for job in jobs:
                job.future.set_exception(err)
            return
        seconds = time.perf_counter() - start
        for job in jobs:
            steps = ladders[id(job)]
            coarse = [torch.cat([s[d] for s in steps]) for d in range(self.depth)] if steps else None
            job.future.set_result(GenerateResult(torch.cat(images[id(job)]), coarse, seconds, len(rows)))

    @torch.no_grad()
    def _draw(self, chunk: list[tuple[Job, int]]) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        request = chunk[0][0].request
        generators = [batch_generator(self.device, job.request.seed, j) for job, j in chunk]
        sampling = dict(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                        cfg_scale=request.cfg_scale, cfg_interval=request.cfg_interval)  # fmt: skip
        conds = [job.cond[j] for job, j in chunk if job.cond is not None]
        with self._lock:
            self.model_runs += 1
            if conds:
                codes = self.model.generate(torch.stack(conds).to(self.device), generator=generators, **sampling)
            else:
                codes = self.model.generate(None, batch_size=len(chunk), generator=generators, **sampling)
            pictures = self.tokenizer.decode(codes).float().clamp(-1, 1).cpu()
            ladder = None
            if any(job.request.coarse_to_fine for job, _ in chunk):
                ladder = [self.tokenizer.decode(codes, depth=d).float().clamp(-1, 1).cpu()
                          for d in range(1, self.depth + 1)]  # fmt: skip
        return pictures, ladder
