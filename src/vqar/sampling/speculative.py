"""Lossless speculative Jacobi decoding for raster models (GPT, VIM, the RQ-Transformer).

"Accelerating Auto-regressive Text-to-Image Generation with Training-free Speculative Jacobi Decoding" (SJD, Teng
et al., ICLR 2025), with the coupled drafts of "MC-SJD: Maximal Coupling Speculative Jacobi Decoding" (So et al.,
2025). No draft model: the model drafts for itself.

Every image keeps a window of W positions after its last final code, holding drafted codes. One model call
(`decode_block` over the window, then `code_logits` per depth) gives the distribution p of every code in the
window given the drafts before it: exactly the distribution plain sampling draws from there (guidance, its
interval and schedule, temperature, top-k and top-p per depth) as long as those drafts stand. The drafts are then
checked in (position, depth) order as in speculative sampling: a draft x drawn from q is accepted with
probability min(1, p(x) / q(x)); the first rejected one is replaced by a draw from max(0, p - q), renormalised,
and becomes final too. Each code therefore has exactly the model's distribution, and each call finalises at least
one code. The codes after the rejection are drafted again from the p of this call (the Jacobi step): afresh
("sjd"), or by a maximal coupling with their previous draft ("mc-sjd": keep the previous draft x with probability
min(1, p(x) / q(x)), else draw from max(0, p - q)), so that a draft whose distribution barely moved stays, and is
accepted more often. Positions entering the window are drafted from the distribution of the window's last
position. Greedy decoding is Jacobi decoding: a draft stands when it is the argmax.

Images advance at their own pace: the window starts at each row's own position (`decode_block` with one start per
row), so image j's codes depend on (seed, j) alone, as in plain sampling. Its random numbers are a table drawn
from its own stream (one acceptance and one replacement number per code, two per redraft), so they never depend
on what the other images of the batch do. The window keeps a static shape, so compiled steps serve every call; it
is shifted back at the end of the grid (re-feeding final positions, whose keys are the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from vqar.ar import ARModel
from vqar.sampling.filters import filter_logits
from vqar.sampling.settings import DepthSettings, SamplingSettings, image_stream

ACCEPT, REPLACE, DRAFTS = 0, 1, 2  # columns of a code's random numbers; DRAFTS: two per redraft from there


@dataclass
class DecodeStats:
    """What a generation cost, per image in the order drawn: the model calls it waited for in turn (the prefill
    and each `decode_block`) and the drafts speculative decoding checked and accepted for it. Kept per image so
    that a compiled batch's padding rows are left out and a share of the images (one request of a batch that
    `vqar serve` drew together) is described by its own images (`of`)."""

    # (images, 3) int64: model calls, drafts checked, drafts accepted
    per_image: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))

    def add(self, other: DecodeStats) -> None:
        self.per_image = torch.cat([self.per_image, other.per_image])

    def add_rows(self, calls: torch.Tensor, checked: torch.Tensor, accepted: torch.Tensor) -> None:
        """One generation's rows (each (n,)), in order."""
        self.add(DecodeStats(torch.stack([calls, checked, accepted], 1).long().cpu()))

    def of(self, images: slice) -> DecodeStats:
        """The statistics of a contiguous share of the images."""
        return DecodeStats(self.per_image[images])

    @property
    def images(self) -> int:
        return len(self.per_image)

    @property
    def model_calls(self) -> int:
        return int(self.per_image[:, 0].sum())

    @property
    def drafts_checked(self) -> int:
        return int(self.per_image[:, 1].sum())

    @property
    def drafts_accepted(self) -> int:
        return int(self.per_image[:, 2].sum())

    @property
    def calls_per_image(self) -> float:
        return self.model_calls / max(self.images, 1)

    @property
    def acceptance_rate(self) -> float | None:
        checked = self.drafts_checked
        return self.drafts_accepted / checked if checked else None

    def describe(self) -> str:
        rate = self.acceptance_rate
        text = f"{self.calls_per_image:.1f} model calls per image"
        return text if rate is None else f"{text}, {100 * rate:.0f}% of drafts accepted"


def window_of(model: ARModel, settings: SamplingSettings) -> int:
    """The window a speculative generation of `model` uses: the settings' window, at most every position after
    the first (which the prefill gives); ValueError for a model that does not decode position by position."""
    if not model.raster:
        raise ValueError(f"speculative decoding drafts positions one after another; {type(model).__name__} "
                         "already draws a whole block of codes per call")  # fmt: skip
    return max(1, min(settings.speculative_window, model.num_positions - 1))


def numbers_per_image(model: ARModel, settings: SamplingSettings) -> int:
    """How many uniform numbers one image of a speculative generation takes (see `speculative_noise`)."""
    return model.num_positions * model.depth * columns(model, settings)


def columns(model: ARModel, settings: SamplingSettings) -> int:
    # A code stays in the window, redrafted after every call, until it is final: at most once per code of the
    # window (each call finalises at least one), plus its first draft.
    return DRAFTS + 2 * (window_of(model, settings) * model.depth + 1)


def speculative_noise(model: ARModel, settings: SamplingSettings, seeds, index) -> torch.Tensor:
    """The numbers (B, positions * depth * columns) of the images (seeds[b], index[b]), from a stream of their
    own apart from plain sampling's."""
    count = numbers_per_image(model, settings)
    rows = [torch.rand(count, generator=image_stream(s, i, salt=2)) for s, i in zip(seeds.tolist(), index.tolist(),
                                                                                      strict=True)]  # fmt: skip
    return torch.stack(rows) if rows else torch.empty(0, count)


def probabilities(logits: torch.Tensor, f: DepthSettings) -> torch.Tensor:
    """The distribution plain sampling draws a code from (filtered, tempered softmax), in float32."""
    return filter_logits(logits.float(), *f).softmax(-1)


def draw_from(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One code per row of non-negative `weights` (..., K) by inverting their cumulative sum at `uniform` (...); a
    row of zeros (possible only where a draw is not used) gives code 0."""
    cdf = weights.cumsum(-1)
    u = uniform.to(cdf.dtype)[..., None] * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1).squeeze(-1)


def at(weights: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return weights.gather(-1, codes[..., None]).squeeze(-1)


def accepts(uniform: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Speculative sampling's test: a draft of probability q under its draft distribution and p under the model
    stands with probability min(1, p / q)."""
    return uniform * q < p


def residual_draw(p: torch.Tensor, q: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """A draw from max(0, p - q) renormalised: what speculative sampling takes after a rejection (and a maximal
    coupling after a change of distribution). Where p <= q everywhere up to rounding, p itself."""
    rest = (p - q).clamp_min(0)
    empty = rest.sum(-1, keepdim=True) <= 0
    return draw_from(torch.where(empty, p, rest), uniform)


class Window:
    """The speculative state of a batch of n images: codes (n, N, D) (final before `final`, drafts after), the
    window start `start` (n,) (the window holds positions start + 1 .. start + W, fed from start), the draft
    distributions of the window's codes `q` (n, W, D, K), and how often each code was drafted."""

    def __init__(self, codes: torch.Tensor, width: int, numbers: torch.Tensor | None, greedy: bool, coupled: bool):
        self.codes, self.width, self.greedy, self.coupled = codes, width, greedy, coupled
        n, self.positions, self.depth = codes.shape
        self.numbers = numbers  # (n, N * D, columns), None when greedy
        self.final = torch.full((n,), self.depth, dtype=torch.long, device=codes.device)  # position 0 is drawn
        self.drafted = torch.zeros(n, self.positions * self.depth, dtype=torch.long, device=codes.device)
        self.q: torch.Tensor | None = None
        self.rows = torch.arange(n, device=codes.device)[:, None]
        self.slots = torch.arange(width, device=codes.device)
        self.code_slots = torch.arange(width * self.depth, device=codes.device)  # the codes of the window, in order
        self.start = torch.zeros(n, dtype=torch.long, device=codes.device)

    @property
    def done(self) -> torch.Tensor:
        return self.final >= self.positions * self.depth

    @property
    def start(self) -> torch.Tensor:
        return self._start

    @start.setter
    def start(self, start: torch.Tensor) -> None:
        # What depends on the start is indexed several times per call: computed once per move of the window, as
        # these few-element ops cost more in dispatch than in work.
        self._start = start
        self._positions = start[:, None] + 1 + self.slots
        self._tokens = ((start + 1) * self.depth)[:, None] + self.code_slots
        self._numbers = None if self.numbers is None else self.numbers.gather(
            1, self._tokens[..., None].expand(-1, -1, self.numbers.shape[-1]))  # fmt: skip

    def positions_of_window(self) -> torch.Tensor:
        """The positions of the window, (n, W)."""
        return self._positions

    def tokens_of_window(self) -> torch.Tensor:
        """The flat code index (position * D + depth) of each code of the window, (n, W * D)."""
        return self._tokens

    def numbers_of_window(self) -> torch.Tensor:
        """The random numbers of the window's codes, (n, W * D, columns)."""
        return self._numbers

    def draft(self, p: torch.Tensor, where: torch.Tensor, previous_q: torch.Tensor | None) -> None:
        """Drafts the window's codes at `where` (n, W * D) from p (n, W * D, K): coupled with their previous
        drafts (from `previous_q`) when set, else afresh; p becomes their draft distribution."""
        tokens = self.tokens_of_window()
        flat = self.codes.view(len(self.codes), -1)
        current = flat.gather(1, tokens)
        if self.greedy:
            new = p.argmax(-1)
        else:
            numbers, drafted = self.numbers_of_window(), self.drafted.gather(1, tokens)
            keep_u = numbers.gather(-1, (DRAFTS + 2 * drafted)[..., None]).squeeze(-1)
            draw_u = numbers.gather(-1, (DRAFTS + 2 * drafted + 1)[..., None]).squeeze(-1)
            if previous_q is None:
                new = draw_from(p, draw_u)
            else:
                keep = keep_u * at(previous_q, current) < at(p, current)
                new = torch.where(keep, current, residual_draw(p, previous_q, draw_u))
            self.drafted.scatter_add_(1, tokens, where.long())
        flat.scatter_(1, tokens, torch.where(where, new, current))

    def shift(self, frontier: torch.Tensor) -> None:
        """Moves each row's window to its new final position; the positions that enter the window are drafted
        from `frontier` (n, D, K), the distributions of the old window's last position."""
        start = (self.final // self.depth - 1).clamp(0, self.positions - 1 - self.width)
        moved = start - self.start
        source = self.slots + moved[:, None]  # (n, W): slot s takes the old slot s + moved
        entering = source >= self.width
        self.start = start
        index = source.clamp_max(self.width - 1)[..., None, None].expand_as(self.q)
        self.q = torch.where(entering[..., None, None], frontier[:, None], self.q.gather(1, index))
        d = self.depth
        entering_codes = entering.repeat_interleave(d, dim=1)
        fresh = frontier[:, None].expand(-1, self.width, -1, -1).reshape(len(start), self.width * d, -1)
        self.draft(fresh, entering_codes, None)


def speculative_codes(model: ARModel, steps, ids: torch.Tensor, n: int, settings: SamplingSettings,
                      filters: list[DepthSettings], numbers: torch.Tensor | None, stats: DecodeStats | None,
                      both_halves, guided_logits) -> torch.Tensor:  # fmt: skip
    """Codes (n, N, D) by speculative Jacobi decoding; `generate` prepares the condition rows `ids` (both halves
    of guidance), the `numbers` (n, N * D * columns) and how logits are guided per position (`guided_logits`)."""
    width, depth, positions = window_of(model, settings), model.depth, model.num_positions
    codes = torch.zeros(n, positions, depth, dtype=torch.long, device=ids.device)
    table = None if numbers is None else numbers.view(n, positions * depth, -1)
    state = steps.new_state(len(ids))
    context = model.prefill(ids, state)
    frontier = []
    for d, f in enumerate(filters):  # position 0 from the prefill, a plain draw with each code's replacement number
        logits = guided_logits(steps.code_logits(context, both_halves(codes[:, :1, :d]), state),
                               torch.zeros(n, 1, dtype=torch.long, device=ids.device))
        p = probabilities(logits, f)
        codes[:, 0, d] = p.argmax(-1)[:, 0] if settings.greedy else draw_from(p[:, 0], table[:, d, REPLACE])
        frontier.append(p[:, 0])
    calls = torch.ones(n, dtype=torch.long, device=ids.device)
    if positions == 1:  # nothing after the first position to draft (a window over it indexed past the codes)
        if stats is not None:
            stats.add_rows(calls, torch.zeros_like(calls), torch.zeros_like(calls))
        return codes
    window = Window(codes, width, table, settings.greedy, settings.speculative_drafts == "mc-sjd")
    window.q = torch.stack(frontier, 1)[:, None].expand(-1, width, -1, -1).clone()
    window.draft(window.q.reshape(n, width * depth, -1), torch.ones(n, width * depth, dtype=torch.bool,
                                                                     device=ids.device), None)  # fmt: skip
    # summed without a sync per call (in place, also inside a compiled iteration)
    checked, accepted = (torch.zeros(n, dtype=torch.long, device=ids.device) for _ in range(2))
    # Compiled on a CPU, a model of one code per position runs a whole iteration (the call over the window, the
    # check, the redraft and the move) as one graph; on CUDA the model's call replays as a CUDA graph and the rest
    # compiles apart. An RQ-Transformer's iteration runs its compiled steps one by one.
    whole = depth == 1 and steps.whole_steps
    iterate = steps.graph(_iterate) if whole else _iterate
    calls_to = model if whole else steps
    settle = _settle if whole or depth > 1 else steps.graph(_settle)
    cap = settings.speculative_max_iterations
    iterations = 0
    while not bool(window.done.all()):
        if cap is not None and iterations >= cap:
            _one_position_at_a_time(model, steps, state, window, filters, both_halves, guided_logits, calls)
            break
        iterations += 1
        iterate(calls_to, settle, state, window, filters, both_halves, guided_logits, calls, checked, accepted)
    if stats is not None:
        stats.add_rows(calls, checked, accepted)
    return codes


def _iterate(calls_to, settle, state, window: Window, filters, both_halves, guided_logits, calls: torch.Tensor,
             checked: torch.Tensor, accepted: torch.Tensor) -> None:  # fmt: skip
    """One call of the model over each row's window (`calls_to`: the model or the decode steps), then `settle`
    (`_settle`, or its compiled graph). Adds the call and the drafts checked and accepted of the rows still
    drawing to the counts."""
    n, width, depth = len(window.codes), window.width, window.depth
    active = ~window.done
    calls += active.long()
    positions = window.positions_of_window()
    feed = window.codes[window.rows, positions - 1]  # positions start .. start + W - 1
    # One image (and its guidance half) has one start: the cheaper shared-position path of the cache.
    starts = window.start if n == 1 else both_halves(window.start)
    context = calls_to.decode_block(both_halves(feed), starts, state)
    p = []
    for d, f in enumerate(filters):
        chosen = window.codes[window.rows, positions][..., :d]
        p.append(probabilities(guided_logits(calls_to.code_logits(context, both_halves(chosen), state), positions), f))
    p = torch.stack(p, 2).view(n, width * depth, -1)  # (n, W * D, K) in (position, depth) order
    complete = None
    if depth > 1:
        complete = partial(_complete_positions, calls_to, state, context, window, filters, both_halves,
                           guided_logits)  # fmt: skip
    got, ok = settle(window, p, complete)
    checked += got * active
    accepted += ok * active


def _settle(window: Window, p: torch.Tensor, complete=None) -> tuple[torch.Tensor, torch.Tensor]:
    """What follows a model call: the drafts are checked (`_verify`), the stacks a rejection cut short completed
    (`complete`, an RQ-Transformer's depth steps), the codes left drafted again (`_redraft`), and the window moved
    on (positions entering it are drafted from the distributions of its last position). Returns the drafts
    checked and accepted per row."""
    got, ok = _verify(window, p)
    if complete is not None:
        complete()
    _redraft(window, p)
    window.shift(p.view(len(p), window.width, window.depth, -1)[:, -1])
    return got, ok


def _verify(window: Window, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks the drafts of each row's window in order against p (n, W * D, K) and makes the accepted ones and the
    first replacement final. Returns the drafts checked and accepted per row."""
    n, codes_in_window = p.shape[:2]
    tokens = window.tokens_of_window()
    flat = window.codes.view(n, -1)
    drafts = flat.gather(1, tokens)
    order = window.code_slots
    first = (window.final - tokens[:, 0])[:, None]  # the first code of the window that is not final
    q = window.q.reshape(n, codes_in_window, -1) if window.q is not None else None
    if window.greedy:
        passes = drafts == p.argmax(-1)
    else:
        numbers = window.numbers_of_window()
        passes = accepts(numbers[..., ACCEPT], at(p, drafts), at(q, drafts))
    stands = passes | (order < first)
    rejected = torch.where((~stands).any(1), (~stands).int().argmax(1), codes_in_window)  # (n,)
    has_rejection = rejected < codes_in_window
    slot = rejected.clamp_max(codes_in_window - 1)
    p_r = p[window.rows[:, 0], slot]
    if window.greedy:
        replacement = p_r.argmax(-1)
    else:
        replacement = residual_draw(p_r, q[window.rows[:, 0], slot], numbers[window.rows[:, 0], slot, REPLACE])
    token_r = tokens.gather(1, slot[:, None])[:, 0]
    replace = has_rejection & ~window.done
    flat[window.rows[:, 0], token_r] = torch.where(replace, replacement, flat[window.rows[:, 0], token_r])
    new_final = tokens[:, 0] + rejected + has_rejection.long()
    checked = (rejected - first[:, 0]).clamp_min(0) + has_rejection.long()
    accepted = (rejected - first[:, 0]).clamp_min(0)
    window.final = torch.where(window.done, window.final, new_final)
    return checked, accepted


def _redraft(window: Window, p: torch.Tensor) -> None:
    """The Jacobi step: every code of the window that is not final is drafted again from its p of this call."""
    n, codes_in_window = p.shape[:2]
    tokens = window.tokens_of_window()
    redraft = window.code_slots[None] >= (window.final - tokens[:, 0])[:, None]
    q = window.q.reshape(n, codes_in_window, -1)
    window.draft(p, redraft, q if window.coupled else None)
    window.q = torch.where(redraft[..., None], p, q).view_as(window.q)


def _complete_positions(steps, state, context, window: Window, filters, both_halves, guided_logits) -> None:
    """Draws the depths left of a position whose stack a rejection cut short (an RQ-Transformer), from the depth
    steps of this call, so that every call finalises at least one whole position, as a plain step does. The
    depth steps run over the whole window, as in the check: their cache holds the window's earlier depths."""
    rows, positions = window.rows[:, 0], window.positions_of_window()
    for d in range(1, window.depth):
        needs = (window.final % window.depth == d) & ~window.done
        if not bool(needs.any()):
            continue
        chosen = window.codes[window.rows, positions][..., :d]
        logits = guided_logits(steps.code_logits(context, both_halves(chosen), state), positions)
        slot = (window.final // window.depth - window.start - 1).clamp(0, window.width - 1)
        p = probabilities(logits[rows, slot], filters[d])
        code = p.argmax(-1) if window.greedy else draw_from(p, window.numbers[rows, window.final.clamp_max(
            window.numbers.shape[1] - 1), REPLACE])  # fmt: skip
        position = window.start + 1 + slot
        window.codes[rows, position, d] = torch.where(needs, code, window.codes[rows, position, d])
        window.final = window.final + needs.long()


def _one_position_at_a_time(model, steps, state, window: Window, filters, both_halves, guided_logits, calls) -> None:
    """The rest of a generation past `speculative_max_iterations`: plain draws, one position per call, each code
    with its replacement number."""
    depth, rows = window.depth, window.rows[:, 0]
    while not bool(window.done.all()):
        active = ~window.done
        calls += active.long()
        start = (window.final // depth - 1).clamp_max(window.positions - 2)  # a finished row re-feeds its last
        position = start + 1
        context = steps.decode_block(both_halves(window.codes[rows, start][:, None]), both_halves(start), state)
        for d, f in enumerate(filters):
            chosen = window.codes[rows, position][:, None, :d]
            logits = guided_logits(steps.code_logits(context, both_halves(chosen), state), position[:, None])
            p = probabilities(logits, f)[:, 0]
            token = position * depth + d
            code = p.argmax(-1) if window.greedy else draw_from(p, window.numbers[rows, token, REPLACE])
            todo = active & (token >= window.final)  # a row's partly final position keeps its final codes
            window.codes[rows, position, d] = torch.where(todo, code, window.codes[rows, position, d])
        window.final = torch.where(active, (position + 1) * depth, window.final)

