"""Step-by-step EAR sampling: a generator that yields the canvas after every schedule step.

Each step is one forward pass: the tokens sampled at the previous step are fed once (their K/V go
into the cache) together with mask-token queries for the next group of cells; the logits of those
queries are guided (CFG) and sampled. Everything a consumer sees is a `StepState`; stopping the
iteration at any step leaves nothing behind (the cache lives only inside the generator).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ear.model import EAR, KVCache
from ear.order import Schedule

UNKNOWN = -1
Picker = Callable[[int, torch.Tensor], torch.Tensor]


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


@dataclass(frozen=True)
class SamplingParams:
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self) -> None:
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    def merged(self, **overrides: Any) -> SamplingParams:
        """These settings with every non-None override applied (and checked again)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def guided(self) -> bool:
        """Official EAR doubles the batch only above 1; we also honour scales below 1 (0 = fully
        unconditional), which the official sampler silently treats as 1."""
        return self.cfg_scale != 1.0


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top-k logits (ties at the k-th value kept), then the smallest set whose
    probability reaches top_p; the rest become -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, index = logits.sort(dim=-1, descending=True)
        beyond = sorted_logits.softmax(-1).cumsum(-1) > top_p
        beyond[..., 1:] = beyond[..., :-1].clone()
        beyond[..., 0] = False
        logits = logits.scatter(-1, index, sorted_logits.masked_fill(beyond, float("-inf")))
    return logits


def pick_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """(B, m, V) float logits -> (B, m) token ids, one multinomial draw per cell."""
    if params.greedy:
        return logits.argmax(-1)
    logits = filter_logits(logits / max(params.temperature, 1e-5), params.top_k, params.top_p)
    probs = logits.softmax(-1).flatten(0, 1)
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])


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


def decode(model: EAR, class_ids: torch.Tensor, pick: Picker, *, cfg_scale: float = 1.0,
           prefix: torch.Tensor | None = None, schedule: Schedule | None = None,
           use_cache: bool = True) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The bare decode loop: yields (step index k, guided logits (B, m, V), picked tokens (B, m))
    for every step after the prefix. `pick(k, logits)` chooses the tokens, which lets tests
    teacher-force and samplers sample with the same loop."""
    layout = model.layout(schedule)
    sched = layout.schedule
    device = model.output.weight.device
    batch = class_ids.shape[0]
    known = _as_prefix(model, prefix, batch, sched).to(device)
    first = sched.steps_for_prefix(known.shape[1])
    guided = cfg_scale != 1.0
    ids = class_ids.to(device)
    if guided:
        ids = torch.cat([ids, torch.full_like(ids, model.null_class)])
    bounds = sched.boundaries
    with torch.no_grad():
        cond = model.cls_embedding.embedding_table(ids).unsqueeze(1)
        cache: list[KVCache] | None = model.new_cache(ids.shape[0]) if use_cache else None
    for k in range(first, sched.num_steps):
        with torch.no_grad():
            restart = cache is None or k == first
            start = 0 if restart else bounds[k - 1] + 1
            fed = known if restart else known[:, bounds[k - 1]:]
            if guided:
                fed = torch.cat([fed, fed])
            x = model.embed_inputs(fed, cond, sched.sizes[k], with_class=restart)
            logits = model.forward_positions(x, cond, start, layout, cache)[:, -sched.sizes[k]:]
            if guided:
                cond_logits, uncond_logits = logits.chunk(2)
                logits = uncond_logits + (cond_logits - uncond_logits) * cfg_scale
            tokens = pick(k, logits).to(device=device, dtype=torch.long)
            known = torch.cat([known, tokens], dim=1)
        yield k, logits, tokens


def sample(model: EAR, class_ids: int | Sequence[int] | torch.Tensor, *, cfg_scale: float = 1.0,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
           greedy: bool = False, prefix: torch.Tensor | None = None, schedule: Schedule | None = None,
           use_cache: bool = True) -> Iterator[StepState]:
    """Yield a StepState after every step (after the prefix, if one is given, a first state shows
    it). Same seed and settings -> same tokens. `schedule` runs another order of the same grid."""
    if model.training:
        raise ValueError("the model is in training mode (dropout, label drop): call model.eval() first")
    params = SamplingParams(cfg_scale, temperature, top_k, top_p, greedy)
    ids = _as_class_ids(model, class_ids)
    sched = model.layout(schedule).schedule
    device = model.output.weight.device
    generator = torch.Generator(device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))

    g, batch = sched.grid, ids.shape[0]
    grid = torch.full((batch, g * g), UNKNOWN, dtype=torch.long)
    known = torch.zeros(g * g, dtype=torch.bool)
    order = torch.tensor(sched.order)
    started = time.perf_counter()

    def state(step: int, cells: torch.Tensor) -> StepState:
        new = torch.zeros(g * g, dtype=torch.bool)
        new[cells] = True
        return StepState(step, sched.num_steps, grid.view(batch, g, g).clone(), known.view(g, g).clone(),
                         new.view(g, g), time.perf_counter() - started)

    steps = decode(model, ids, lambda _k, logits: pick_tokens(logits, params, generator),
                   cfg_scale=params.cfg_scale, prefix=prefix, schedule=sched, use_cache=use_cache)
    if prefix is not None:
        given = _as_prefix(model, prefix, batch, sched)
        cells = order[: given.shape[1]]
        grid[:, cells] = given
        known[cells] = True
        yield state(sched.steps_for_prefix(given.shape[1]), cells)
    for k, _logits, tokens in steps:
        cells = torch.tensor(sched.groups[k])
        grid[:, cells] = tokens.cpu()
        known[cells] = True
        yield state(k + 1, cells)


def generate(model: EAR, class_ids: int | Sequence[int] | torch.Tensor, **kwargs) -> torch.Tensor:
    """Run `sample` to the end and return the final (B, g, g) token grid."""
    final = None
    for final in sample(model, class_ids, **kwargs):  # noqa: B007
        pass
    assert final is not None
    return final.tokens
