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

from ear.draw import RowSettings, cell_streams, check_values, draw, guide, row_keys, vocab_codes
from ear.engine import Picker, runner_for
from ear.model import EAR, KVCache
from ear.order import Schedule

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


ENGINES = ("runner", "reference")
Value = float | Sequence[float]


def decode(model: EAR, class_ids: torch.Tensor, pick: Picker, *, cfg_scale: float = 1.0,
           prefix: torch.Tensor | None = None, schedule: Schedule | None = None,
           use_cache: bool = True, engine: str = "runner",
           ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The bare decode loop: yields (step index k, guided logits (B, m, V), picked tokens (B, m))
    for every step after the prefix. `pick(k, logits)` chooses the tokens, which lets tests
    teacher-force and samplers sample with the same loop. `engine="runner"` (with the cache) is the
    fast path of `ear.engine`; "reference" runs `EAR.forward_positions` step by step, and
    `use_cache=False` recomputes every step from scratch (the baseline)."""
    ids = class_ids.long()
    keys = torch.zeros(ids.shape[0], dtype=torch.long)  # unused: `pick` chooses
    rows = RowSettings.build(ids.shape[0], model.config.vocab_size, cfg_scale=cfg_scale, temperature=0.0,
                             top_k=0, top_p=1.0, greedy=True, keys=keys)
    yield from _steps(model, ids, rows, pick, prefix, schedule, use_cache, engine)


def _steps(model: EAR, class_ids: torch.Tensor, rows: RowSettings, pick: Picker | None,
           prefix: torch.Tensor | None, schedule: Schedule | None, use_cache: bool,
           engine: str) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    sched = model.layout(schedule).schedule
    known = _as_prefix(model, prefix, class_ids.shape[0], sched)
    if use_cache and engine == "runner":
        return runner_for(model).decode(class_ids, rows, prefix=known, schedule=sched, pick=pick)
    return _reference_steps(model, class_ids, rows, pick, known, sched, use_cache)


def _reference_steps(model: EAR, class_ids: torch.Tensor, rows: RowSettings, pick: Picker | None,
                     known: torch.Tensor, sched: Schedule,
                     use_cache: bool) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Step by step through the readable model (the path the runner is checked against)."""
    layout = model.layout(sched)
    device = model.output.weight.device
    rows = rows.to(device)
    known = known.to(device)
    first = sched.steps_for_prefix(known.shape[1])
    ids = class_ids.to(device)
    if rows.guided:
        ids = torch.cat([ids, torch.full_like(ids, model.null_class)])
    bounds = sched.boundaries
    streams = cell_streams(rows.keys, sched.num_tokens)
    codes = vocab_codes(model.config.vocab_size, device)
    with torch.no_grad():
        cond = model.cls_embedding.lookup(ids).unsqueeze(1)
        cache: list[KVCache] | None = model.new_cache(ids.shape[0]) if use_cache else None
    for k in range(first, sched.num_steps):
        with torch.no_grad():
            restart = cache is None or k == first
            start = 0 if restart else bounds[k - 1] + 1
            fed = known if restart else known[:, bounds[k - 1]:]
            if rows.guided:
                fed = torch.cat([fed, fed])
            x = model.embed_inputs(fed, cond, sched.sizes[k], with_class=restart)
            logits = model.forward_positions(x, cond, start, layout, cache)[:, -sched.sizes[k]:]
            if rows.guided:
                logits = guide(logits, rows)
            cells = torch.tensor(sched.groups[k], device=device)
            tokens = (pick(k, logits) if pick is not None
                      else draw(logits, rows, streams[:, cells], codes)).to(device=device, dtype=torch.long)
            known = torch.cat([known, tokens], dim=1)
        yield k, logits, tokens


def sample(model: EAR, class_ids: int | Sequence[int] | torch.Tensor, *, cfg_scale: Value = 1.0,
           temperature: Value = 1.0, top_k: int | Sequence[int] = 0, top_p: Value = 1.0,
           seed: int | Sequence[int] | None = None, row_ids: Sequence[int] | torch.Tensor | None = None,
           greedy: bool | Sequence[bool] = False, prefix: torch.Tensor | None = None,
           schedule: Schedule | None = None, use_cache: bool = True,
           engine: str = "runner") -> Iterator[StepState]:
    """Yield a StepState after every step (after the prefix, if one is given, a first state shows
    it). Every sampling value is one for all rows or one per row. Row i's randomness comes only from
    (seed_i, row_ids[i]) (row ids default to 0..B-1): same seed and settings -> same image, whatever
    else shares the batch. `schedule` runs another order of the same grid."""
    if model.training:
        raise ValueError("the model is in training mode (dropout, label drop): call model.eval() first")
    ids = _as_class_ids(model, class_ids)
    g, batch = model.config.grid_size, ids.shape[0]
    rows = RowSettings.build(batch, model.config.vocab_size, cfg_scale=cfg_scale, temperature=temperature,
                             top_k=top_k, top_p=top_p, greedy=greedy, keys=row_keys(seed, row_ids, batch))
    sched = model.layout(schedule).schedule
    steps = _steps(model, ids, rows, None, prefix, sched, use_cache, engine)
    grid = torch.full((batch, g * g), UNKNOWN, dtype=torch.long)
    known = torch.zeros(g * g, dtype=torch.bool)
    order = torch.tensor(sched.order)
    started = time.perf_counter()

    def state(step: int, cells: torch.Tensor) -> StepState:
        new = torch.zeros(g * g, dtype=torch.bool)
        new[cells] = True
        return StepState(step, sched.num_steps, grid.view(batch, g, g).clone(), known.view(g, g).clone(),
                         new.view(g, g), time.perf_counter() - started)

    if prefix is not None:
        given = _as_prefix(model, prefix, batch, sched)
        cells = order[: given.shape[1]]
        grid[:, cells] = given
        known[cells] = True
        yield state(sched.steps_for_prefix(given.shape[1]), cells)
    try:
        for k, _logits, tokens in steps:
            cells = torch.tensor(sched.groups[k])
            grid[:, cells] = tokens.cpu()
            known[cells] = True
            yield state(k + 1, cells)
    finally:  # a stream stopped early hands its cache back at once
        steps.close()


def generate(model: EAR, class_ids: int | Sequence[int] | torch.Tensor, **kwargs) -> torch.Tensor:
    """Run `sample` to the end and return the final (B, g, g) token grid."""
    final = None
    for final in sample(model, class_ids, **kwargs):  # noqa: B007
        pass
    assert final is not None
    return final.tokens
