"""The decode steps of a generation, eager or compiled (gpt-fast's compiled `decode_one_token`).

`DecodeSteps` gives the generation loop the model's `code_logits` and `decode_block`. Compiled, each is
`torch.compile`d once per model: a raster model's position goes in as a tensor, so one graph serves every block of
a size (the KV cache then returns its whole length and attention masks the positions not yet written); a model
whose blocks differ in shape (VAR's scales) compiles one graph per block. On CUDA the graphs are
replayed as CUDA graphs (`mode="reduce-overhead"`), which removes the per-op launch cost that bounds a decode step
at the batch sizes of demos and serving; the caches are kept per batch size and reused, so the graphs replay on
the same memory. The prefill runs eagerly, once per batch. An RQ-Transformer's depth steps compile to one graph
per depth. A model of one code per position compiles a whole step of the generation loop instead (`graph`): the
model's calls with the guidance and the draw after them, or a speculative iteration with its check, since
between separate graphs their few dozen small eager ops cost as much as the model call at batch 1. The random
numbers come from per-image streams drawn before the loop, so compiled and eager generations draw the same codes.

New batch sizes compile new graphs: `draw` pads its batches to `batch_buckets` when compiling, and `warm_up`
compiles them ahead of the first request. A compilation error falls back to the eager steps with one warning.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch

from vqar.ar import ARModel

log = logging.getLogger("vqar.sampling")


class DecodeSteps:
    def __init__(self, model: ARModel):
        self.model = model

    @property
    def compiled(self) -> bool:
        return False

    @property
    def whole_steps(self) -> bool:
        """Whether a generation compiles its whole steps (`graph` over the model's calls and the sampling after
        them) rather than calling these steps one by one."""
        return False

    def new_state(self, batch: int) -> Any:
        """The KV caches of a generation of `batch` rows."""
        return self.model.new_decode_state()

    def code_logits(self, context: torch.Tensor, chosen: torch.Tensor, state: Any) -> torch.Tensor:
        return self.model.code_logits(context, chosen, state)

    def decode_block(self, codes: torch.Tensor, start: int, state: Any, smooth=None) -> torch.Tensor:
        return self.model.decode_block(codes, start, state, smooth)

    def graph(self, fn: Callable) -> Callable:
        """`fn`, a step of the generation loop that calls the model (given as an argument) and samples after it, as
        the steps run: here as it is."""
        return fn


class CompiledDecodeSteps(DecodeSteps):
    """The model's steps compiled; see the module docstring."""

    def __init__(self, model: ARModel):
        super().__init__(model)
        cuda = next(model.parameters()).device.type == "cuda"
        options = {"mode": "reduce-overhead" if cuda else "default"}
        self._code_logits = torch.compile(model.code_logits, **options)
        self._decode_block = torch.compile(model.decode_block, **options)
        # One graph per block shape (VAR: one per scale, both halves of guidance apart) and per depth of the codes
        # chosen so far (an RQ stack's, for one position and for a speculative window: 9 graphs at depth 4) must
        # not hit dynamo's recompilation limit, past which it runs the step eagerly under a long warning.
        shapes = 2 * (len(set(model.block_sizes)) + model.depth) + 4
        if torch._dynamo.config.recompile_limit < shapes:
            torch._dynamo.config.recompile_limit = shapes
        self._cuda = cuda
        self._states: dict[int, Any] = {}
        self.graphs: dict[Callable, Callable] = {}  # the functions compiled by `graph`
        self.failed: str | None = None

    @property
    def compiled(self) -> bool:
        return self.failed is None

    @property
    def whole_steps(self) -> bool:
        # On CUDA the model's calls replay as CUDA graphs, which a step that updates Python objects cannot be.
        return self.compiled and not self._cuda

    def new_state(self, batch: int) -> Any:
        """The caches of the last generation of `batch` rows, reused: CUDA graphs replay on the same memory. What
        an earlier generation left beyond the current position is masked, never read."""
        if batch not in self._states:
            self._states[batch] = self.model.new_decode_state()
        return self._states[batch]

    def code_logits(self, context: torch.Tensor, chosen: torch.Tensor, state: Any) -> torch.Tensor:
        return self._call(self._code_logits, self.model.code_logits, context, chosen, state)

    def decode_block(self, codes: torch.Tensor, start: int, state: Any, smooth=None) -> torch.Tensor:
        # An int position becomes data, so one graph serves every block of a size (a speculative window already
        # passes one position per row as a tensor).
        tensor = self.model.raster and not isinstance(start, torch.Tensor)
        position = torch.tensor([start], device=codes.device) if tensor else start
        return self._call(self._decode_block, self.model.decode_block, codes, position, state, smooth)

    def graph(self, fn: Callable) -> Callable:
        """`fn` compiled to one graph (made once per steps), with the steps' fallback to eager. Never replayed as a
        CUDA graph: such a function updates Python objects (speculative decoding's window), which a replay skips."""
        if fn not in self.graphs:
            self.graphs[fn] = torch.compile(fn)
        compiled = self.graphs[fn]
        return lambda *args: self._call(compiled, fn, *args, replayed=False)

    def _call(self, compiled: Callable, eager: Callable, *args, replayed: bool = True) -> Any:
        if self.failed is None:
            cuda_graph = self._cuda and replayed
            try:
                if cuda_graph:  # the outputs of the previous replays are consumed (they are cloned below)
                    torch.compiler.cudagraph_mark_step_begin()
                out = compiled(*args)
                return out.clone() if cuda_graph else out  # CUDA graphs reuse their output memory at the next replay
            except Exception as err:  # compilers fail in many ways; sampling goes on eagerly
                self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                log.warning("compiling the decode step failed (%s); sampling without compilation", self.failed)
        return eager(*args)


_compiled: weakref.WeakKeyDictionary[ARModel, CompiledDecodeSteps] = weakref.WeakKeyDictionary()


def decode_steps(model: ARModel, compile: bool = False) -> DecodeSteps:
    """The steps a generation of `model` calls; compiled ones are made once per model and reused."""
    if not compile:
        return DecodeSteps(model)
    if model not in _compiled:
        _compiled[model] = CompiledDecodeSteps(model)
    return _compiled[model]


def batch_buckets(batch_size: int) -> list[int]:
    """The batch sizes a compiled sampler runs: powers of two below `batch_size`, and `batch_size` itself."""
    sizes, size = [], 1
    while size < batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, batch_size]


def bucket_for(rows: int, batch_size: int) -> int:
    return next(size for size in batch_buckets(batch_size) if size >= rows)
