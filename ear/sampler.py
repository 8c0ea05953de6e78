"""Step-by-step EAR sampling: a generator that yields the canvas after every schedule step.

Each step is one forward pass: the tokens sampled at the previous step are fed once (their K/V go
into the cache) together with mask-token queries for the next group of cells; the logits of those
queries are guided (CFG) and sampled. Everything a consumer sees is a `StepState`; stopping the
iteration at any step leaves nothing behind (the cache lives only inside the generator).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from ear import refine
from ear.draw import RowSettings, cell_streams, check_values, guide, row_keys, vocab_codes
from ear.engine import FFN, Picker, runner_for
from ear.model import EAR, KVCache
from ear.order import Schedule
from ear.refine import Refinement
from ear.refine import refinement as refinement_for

UNKNOWN = -1
Decoded = TypeVar("Decoded", bound=Sequence)


@dataclass
class StepState:
    step: int  # steps completed so far (1..num_steps)
    num_steps: int
    tokens: torch.Tensor  # (B, g, g) int64 on CPU, raster layout, UNKNOWN where not generated yet
    known: torch.Tensor  # (g, g) bool on CPU
    new: torch.Tensor  # (g, g) bool on CPU: the cells this step filled
    elapsed: float  # seconds since sampling started
    # (B, g, g) bool on CPU under refinement (`ear.refine`): the cells whose draw was replaced by
    # the correction so far; None when refinement is off
    corrected: torch.Tensor | None = None
    # dynamic activation: the FFN multiply-adds run so far (experts, routers, gates) over the dense
    # FFN's; 1.0 without activation
    ffn_active: float = 1.0

    @property
    def done(self) -> bool:
        return self.step == self.num_steps

    @property
    def num_known(self) -> int:
        return int(self.known.sum())

    def decoded(self, decode: Callable[[torch.Tensor], Decoded], key: Hashable) -> Decoded:
        """`decode(self.tokens)`: one item per row. `key` names the decode (tokenizer, size), so
        that a state whose rows are part of a larger batch (`ear.serving`) can share one call."""
        return decode(self.tokens)


@dataclass(frozen=True)
class SamplingParams:
    """One set of sampling values (a preset, or what a request asked for)."""

    cfg_scale: float = 1.0
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self) -> None:
        check_values(self.cfg_scale, self.temperature, self.top_k, self.top_p)

    def merged(self, **overrides: Any) -> SamplingParams:
        """These settings with every non-None override applied (and checked again)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def guided(self) -> bool:
        """Official EAR doubles the batch only above 1; we also honour scales below 1 (0 = fully
        unconditional), which the official sampler silently treats as 1."""
        return self.cfg_scale != 1.0


def _as_class_ids(model: EAR, class_ids: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor([class_ids] if isinstance(class_ids, int) else class_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"class ids must be integers, got {ids.dtype}")
    ids = ids.long().reshape(-1) if ids.ndim == 0 else ids.long()
    if ids.numel() == 0:
        raise ValueError("class_ids must name at least one class")
    model.check_class_ids(ids, allow_null=True)
    return ids


def _as_prefix(model: EAR, prefix: torch.Tensor | None, batch: int, schedule: Schedule) -> torch.Tensor:
    if prefix is None:
        return torch.zeros(batch, 0, dtype=torch.long)
    prefix = torch.as_tensor(prefix)
    if prefix.ndim == 1:
        prefix = prefix.expand(batch, -1)
    if prefix.ndim != 2 or prefix.shape[0] != batch:
        raise ValueError(f"prefix must have shape (P,) or ({batch}, P), got {tuple(prefix.shape)}")
    model.check_tokens(prefix)
    steps = schedule.steps_for_prefix(prefix.shape[1])
    if steps == schedule.num_steps:
        raise ValueError(f"prefix must leave at least one step to generate; it covers all "
                         f"{schedule.num_steps} steps")
    return prefix.long()


def _as_known(model: EAR, known: torch.Tensor | None, prefix: torch.Tensor | None, batch: int,
              schedule: Schedule) -> torch.Tensor | None:
    """`known=` (or `prefix=`, its special case) as a checked (batch, g*g) raster grid of tokens,
    UNKNOWN where a cell is drawn; None when no cell is known (plain generation)."""
    n = schedule.num_tokens
    if prefix is not None:
        if known is not None:
            raise ValueError("give either prefix or known, not both (a prefix is a known mask "
                             "covering the first steps)")
        given = _as_prefix(model, prefix, batch, schedule)
        grid = torch.full((batch, n), UNKNOWN, dtype=torch.long)
        grid[:, torch.tensor(schedule.order[: given.shape[1]], dtype=torch.long)] = given
        return grid if given.shape[1] else None
    if known is None:
        return None
    known = torch.as_tensor(known)
    if known.dtype.is_floating_point or known.dtype == torch.bool:
        raise ValueError(f"known must hold integer token ids (UNKNOWN = {UNKNOWN} where a cell is "
                         f"drawn), got {known.dtype}")
    g = schedule.grid
    if known.shape not in ((g, g), (n,), (batch, g, g), (batch, n)):
        raise ValueError(f"known must have shape ({g}, {g}) or ({batch}, {g}, {g}) (UNKNOWN where a "
                         f"cell is drawn), got {tuple(known.shape)}")
    grid = known.long().reshape(-1, n).expand(batch, n).clone()
    given = grid >= 0
    if (grid < UNKNOWN).any():
        raise ValueError(f"known must hold token ids or UNKNOWN ({UNKNOWN}), found {int(grid.min())}")
    model.check_tokens(grid.clamp_min(0))
    if bool(given.all(dim=1).any()):
        raise ValueError("known covers every cell of a row: leave at least one cell to draw")
    return grid if bool(given.any()) else None


def lead_steps(known: torch.Tensor | None, schedule: Schedule) -> int:
    """How many first steps of the order are known in every row: the engine feeds those at once
    as a prefix (exactly what `prefix=` did) and draws from the step after."""
    if known is None:
        return 0
    order = torch.tensor(schedule.order, dtype=torch.long)
    lead = int((known[:, order] >= 0).all(dim=0).long().cumprod(0).sum())
    return max(k for k, b in enumerate(schedule.boundaries) if b <= lead)


def last_drawn_step(known: torch.Tensor | None, schedule: Schedule) -> int:
    """The last step with a cell to draw in some row: after it every cell is known, so sampling
    stops there (a hole near the centre needs only the first steps' forwards)."""
    if known is None:
        return schedule.num_steps - 1
    drawn = (known < 0).any(dim=0)
    return max(k for k, group in enumerate(schedule.groups) if drawn[list(group)].any())


def state_count(known: torch.Tensor | None, schedule: Schedule) -> int:
    """How many StepStates `sample` yields for these known cells (a checked grid or None)."""
    last = last_drawn_step(known, schedule)
    opening = int(known is not None)
    return opening + last + 1 - lead_steps(known, schedule) + int(last < schedule.num_steps - 1)


def _in_order(known: torch.Tensor, schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix (B, P) of the lead steps, known grid (B, N) in generation order) for the engine."""
    ordered = known[:, torch.tensor(schedule.order, dtype=torch.long)]
    return ordered[:, : schedule.boundaries[lead_steps(known, schedule)]], ordered


ENGINES = ("runner", "reference")
Value = float | Sequence[float]


def decode(model: EAR, class_ids: torch.Tensor, pick: Picker, *, cfg_scale: float = 1.0,
           prefix: torch.Tensor | None = None, schedule: Schedule | None = None,
           use_cache: bool = True, engine: str = "runner", activation: FFN | None = None,
           ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The bare decode loop: yields (step index k, guided logits (B, m, V), picked tokens (B, m))
    for every step after the prefix. `pick(k, logits)` chooses the tokens, which lets tests
    teacher-force and samplers sample with the same loop. `engine="runner"` (with the cache) is the
    fast path of `ear.engine`; "reference" runs `EAR.forward_positions` step by step, and
    `use_cache=False` recomputes every step from scratch (the baseline). `activation` (an
    `ear.routed.RoutedFFN`) runs every FFN activated, on the runner."""
    ids = class_ids.long()
    keys = torch.zeros(ids.shape[0], dtype=torch.long)  # unused: `pick` chooses
    rows = RowSettings.build(ids.shape[0], model.config.vocab_size, cfg_scale=cfg_scale, temperature=0.0,
                             top_k=0, top_p=1.0, greedy=True, keys=keys)
    sched = model.layout(schedule).schedule
    known = _as_known(model, None, prefix, ids.shape[0], sched)
    yield from _steps(model, ids, rows, pick, known, sched, use_cache, engine, activation=activation)


def _steps(model: EAR, class_ids: torch.Tensor, rows: RowSettings, pick: Picker | None,
           known: torch.Tensor | None, sched: Schedule, use_cache: bool, engine: str,
           refinement: Refinement | None = None, last: int | None = None, activation: FFN | None = None,
           work: torch.Tensor | None = None) -> Iterator[tuple]:
    """The decode loop on either engine; `known` is a checked raster grid (`_as_known`). With
    `refinement` (up to step `last`) items are (k, logits, tokens, fixes) (`ear.refine.grouped`).
    `activation` runs the FFNs activated (runner only); `work` counts its multiply-adds."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if activation is not None and not (use_cache and engine == "runner"):
        raise ValueError("dynamic activation runs on the cached runner (engine='runner', use_cache=True)")
    batch = class_ids.shape[0]
    prefix, ordered = (torch.zeros(batch, 0, dtype=torch.long), None) if known is None \
        else _in_order(known, sched)
    if use_cache and engine == "runner":
        return runner_for(model).decode(class_ids, rows, prefix=prefix, known=ordered, schedule=sched,
                                        pick=pick, refinement=refinement, last=last, ffn=activation,
                                        work=work)
    first = sched.steps_for_prefix(prefix.shape[1])
    if refinement is None:
        forwards = (refine.plain_span(sched, k, first) for k in range(first, sched.num_steps))
        return ((span.k, logits, tokens) for span, logits, tokens, _ in _reference_steps(
            model, class_ids, rows, pick, prefix, ordered, sched, use_cache, forwards))
    stop = sched.num_steps - 1 if last is None else last
    return refine.grouped(_reference_steps(model, class_ids, rows, pick, prefix, ordered, sched, use_cache,
                                           iter(refine.spans(sched, first, stop)), refinement), stop)


def _reference_steps(model: EAR, class_ids: torch.Tensor, rows: RowSettings, pick: Picker | None,
                     prefix: torch.Tensor, ordered: torch.Tensor | None, sched: Schedule,
                     use_cache: bool, forwards: Iterator[refine.Span],
                     refinement: Refinement | None = None) -> Iterator[refine.Forward]:
    """Forward by forward through the readable model (the path the runner is checked against):
    yields (span, guided query logits, drawn tokens, fix or None)."""
    layout = model.layout(sched)
    device = model.output.weight.device
    rows = rows.to(device)
    batch = class_ids.shape[0]
    tokens = torch.zeros(batch, sched.num_tokens, dtype=torch.long, device=device)  # generation order
    tokens[:, : prefix.shape[1]] = prefix.to(device)
    given = None if ordered is None else ordered.to(device)
    ids = class_ids.to(device)
    if rows.guided:
        ids = torch.cat([ids, torch.full_like(ids, model.null_class)])
    streams = cell_streams(rows.keys, sched.num_tokens)[:, torch.tensor(sched.order, device=device)]
    noise = refine.Noise(streams, refine.redraw_streams(streams), given,
                         vocab_codes(model.config.vocab_size, device))
    with torch.no_grad():
        cond = model.cls_embedding.lookup(ids).unsqueeze(1)
        cache: list[KVCache] | None = model.new_cache(ids.shape[0]) if use_cache else None
    for span in forwards:
        with torch.no_grad():
            restart = cache is None or span.with_class
            lo = 0 if restart else span.fed.start
            fed = tokens[:, lo:span.fed.stop]
            if rows.guided:
                fed = torch.cat([fed, fed])
            x = model.embed_inputs(fed, cond, span.num_queries, with_class=restart)
            out = model.forward_positions(x, cond, 0 if restart else lo + 1, layout, cache)
            logits = out[:, out.shape[1] - span.num_checked - span.num_queries:]
            if rows.guided:
                logits = guide(logits, rows)
            if pick is not None:
                picked = pick(span.k, logits).to(device=device, dtype=torch.long)
                if given is not None:  # known cells take their token, whatever was picked
                    picked = torch.where(given[:, span.out] >= 0, given[:, span.out], picked)
                tokens[:, span.out] = picked
                corrected = None
            else:
                corrected = refine.advance(span, logits, tokens, rows, noise,
                                           0.0 if refinement is None else refinement.threshold)
            fix = None if corrected is None else (span.k - 1, tokens[:, span.checked].cpu(), corrected.cpu())
            drawn = tokens[:, span.out].clone()
        yield span, logits[:, span.num_checked:], drawn, fix


def sample(model: EAR, class_ids: int | Sequence[int] | torch.Tensor, *, cfg_scale: Value = 1.0,
           temperature: Value = 1.0, top_k: int | Sequence[int] = 0, top_p: Value = 1.0,
           seed: int | Sequence[int] | None = None, row_ids: Sequence[int] | torch.Tensor | None = None,
           greedy: bool | Sequence[bool] = False, prefix: torch.Tensor | None = None,
           known: torch.Tensor | None = None, schedule: Schedule | None = None, use_cache: bool = True,
           engine: str = "runner", refine: bool = False, refine_threshold: float | None = None,
           activation: FFN | None = None) -> Iterator[StepState]:
    """Yield a StepState after every step (with a prefix or known cells, a first state shows
    them). Every sampling value is one for all rows or one per row. Row i's randomness comes only from
    (seed_i, row_ids[i]) (row ids default to 0..B-1): same seed and settings -> same image, whatever
    else shares the batch. `schedule` runs another order of the same grid.

    `known` is a (g, g) or (B, g, g) raster grid of tokens, UNKNOWN (-1) where a cell is to be
    drawn: at every step a known cell takes its token (fed as content, never drawn) and the others
    are drawn, so rows may mix masks. `prefix` (the first steps' tokens in generation order) is
    the special case of known cells that form the first steps.

    `refine=True` (a model trained with the correction objective only) turns on nested refinement
    (`ear.refine`): a drawn token whose probability under the next forward's correction is below
    `refine_threshold` is redrawn from it; each state's `corrected` says which cells were.
    `activation` (an `ear.routed.RoutedFFN`) runs the FFNs activated; each state's `ffn_active`
    says how much."""
    if model.training:
        raise ValueError("the model is in training mode (dropout, label drop): call model.eval() first")
    ids = _as_class_ids(model, class_ids)
    g, batch = model.config.grid_size, ids.shape[0]
    rows = RowSettings.build(batch, model.config.vocab_size, cfg_scale=cfg_scale, temperature=temperature,
                             top_k=top_k, top_p=top_p, greedy=greedy, keys=row_keys(seed, row_ids, batch))
    sched = model.layout(schedule).schedule
    refinement = refinement_for(model, refine, refine_threshold)
    given = _as_known(model, known, prefix, batch, sched)
    last = last_drawn_step(given, sched)
    work = torch.zeros(2, dtype=torch.float64)
    steps = _steps(model, ids, rows, None, given, sched, use_cache, engine, refinement, last,
                   activation=activation, work=work)
    grid = torch.full((batch, g * g), UNKNOWN, dtype=torch.long)
    shown = torch.zeros(g * g, dtype=torch.bool)
    corrected = torch.zeros(batch, g * g, dtype=torch.bool) if refinement else None
    started = time.perf_counter()

    def state(step: int, new: torch.Tensor) -> StepState:
        active = float(work[0] / work[1]) if work[1] else 1.0
        return StepState(step, sched.num_steps, grid.view(batch, g, g).clone(), shown.view(g, g).clone(),
                         new.view(g, g), time.perf_counter() - started,
                         None if corrected is None else corrected.view(batch, g, g).clone(), active)

    if given is not None:  # the opening state: the known cells (shown where every row knows them)
        grid.copy_(given)
        shown = (given >= 0).all(dim=0)
        yield state(lead_steps(given, sched), shown.clone())
    try:
        for k, _logits, tokens, *fixes in steps:
            cells = torch.tensor(sched.groups[k])
            grid[:, cells] = tokens.cpu()
            for part, final, changed in fixes[0] if fixes else ():
                assert corrected is not None
                fixed = torch.tensor(sched.groups[part])
                grid[:, fixed] = final.cpu()
                corrected[:, fixed] |= changed.cpu()
            new = torch.zeros(g * g, dtype=torch.bool)
            new[cells] = True
            if given is not None:  # known cells were shown from the start
                new &= ~shown
            shown[cells] = True
            yield state(k + 1, new)
            if k == last and k < sched.num_steps - 1:  # the rest is known: no forward needed
                new, shown = ~shown, torch.ones_like(shown)
                yield state(sched.num_steps, new)
                return
    finally:  # a stream stopped early hands its cache back at once
        steps.close()


def known_log_likelihood(model: EAR, class_ids: int | Sequence[int] | torch.Tensor, tokens: torch.Tensor,
                         known: torch.Tensor, *, cfg_scale: float = 1.0,
                         schedule: Schedule | None = None) -> torch.Tensor:
    """(B,) log-probability (nats) the model gives the known cells of finished (B, g, g) `tokens`,
    each given every cell before it in the order (one teacher-forced pass). A draw of the other
    cells under which the known ones are likely agrees with the known cells that come *after* it
    in the order, which the draw itself could not see: refinement keeps the likeliest draw."""
    ids = _as_class_ids(model, class_ids)
    sched = model.layout(schedule).schedule
    given = _as_known(model, known, None, ids.shape[0], sched)
    order = torch.tensor(sched.order, dtype=torch.long)
    ordered = tokens.reshape(ids.shape[0], -1)[:, order]
    counted = torch.zeros_like(ordered, dtype=torch.bool) if given is None else given[:, order] >= 0
    total = torch.zeros(ids.shape[0], dtype=torch.float64)
    bounds = sched.boundaries

    def pick(k: int, logits: torch.Tensor) -> torch.Tensor:
        nonlocal total
        step = ordered[:, bounds[k]:bounds[k + 1]].to(logits.device)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, step[..., None])[..., 0]
        total = total + (logp.cpu().double() * counted[:, bounds[k]:bounds[k + 1]]).sum(dim=1)
        return step

    for _ in decode(model, ids, pick, cfg_scale=cfg_scale, schedule=sched):
        pass
    return total


def generate(model: EAR, class_ids: int | Sequence[int] | torch.Tensor, **kwargs) -> torch.Tensor:
    """Run `sample` to the end and return the final (B, g, g) token grid."""
    final = None
    for final in sample(model, class_ids, **kwargs):  # noqa: B007
        pass
    assert final is not None
    return final.tokens
