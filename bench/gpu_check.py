"""One command that proves the GPU path: every check runs (a failure never stops the others) and
lands as one row of a markdown table, written the moment it finishes, so a run cut short still
reports what it got.

    python bench/gpu_check.py --out gpu_report.md          # a CUDA machine: emoji, B, L, XL (< 5 min)
    python bench/gpu_check.py --quick --out report.md      # a CPU: the checks that need no CUDA

Each row's `status` is exactly `pass`, `fail` (the exception beside it) or `skip` (the reason).
Every check has its own time cap (a check over it fails with TimeoutError). The released shapes
run with seeded random weights (std 0.02, `tests.helpers.noisy_weights`: `EAR()` itself zeroes the
head and adaLN, which would make every comparison pass trivially); the bundled model as shipped.
`--quick` uses a small random model and the bundled one; on a CPU the CUDA-only checks (graphs,
capture, peak memory) report `skip`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_engine import build, teacher_forced, timed
from ear import bulk, hub, startup
from ear.draw import RowSettings, row_keys
from ear.engine import configure, runner_for
from ear.model import EAR, EARConfig
from ear.sampler import UNKNOWN, generate, sample
from ear.serving import Scheduler
from tests.helpers import noisy_model, noisy_weights

STATUSES = ("pass", "fail", "skip")
GiB = 2**30
CLASSES = 8  # images in the comparisons
RANDOM = ("small", "B", "L", "XL")  # random weights; "emoji" is trained
TARGET_BF16 = 0.99


class CheckTimeout(TimeoutError):
    pass


@contextlib.contextmanager
def time_cap(seconds: float) -> Iterator[None]:
    """Raise CheckTimeout in the main thread once `seconds` have passed (the check's own cap)."""
    def expired(_signum, _frame):
        raise CheckTimeout(f"over its cap of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    quick: bool
    _models: dict[str, tuple[EAR, float]] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def model(self, name: str, dtype: torch.dtype | None = None, keep: bool = True) -> tuple[EAR, float]:
        """(model, its CFG scale): "small" (random, 16x16, quick runs), "emoji" or B/L/XL."""
        dtype = dtype or self.dtype
        key = f"{name}/{dtype}"
        if key in self._models:
            return self._models[key]
        if name == "small":
            made = noisy_model(grid_size=16, dim=128, n_layer=4).to(self.device, dtype), 1.5
        else:
            made = build(name, self.device, dtype)
        if keep:
            self._models[key] = made
        return made

    def drop_all(self) -> None:
        """Free the card for a check that measures the memory it needs."""
        self._models.clear()
        if self.cuda:
            torch.cuda.empty_cache()


Check = Callable[[Context, str], str]


@dataclass(frozen=True)
class Spec:
    title: str
    run: Check | None  # None: always skipped, for `needs_cuda`'s reason
    arg: str
    cap_s: float
    needs_cuda: str = ""  # why, when it needs CUDA (or why it cannot run at all)


def _ids(model: EAR, n: int = CLASSES) -> list[int]:
    return [i % model.config.num_classes for i in range(n)]


def _differ(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{int((a != b).sum())} of {a.numel()} tokens differ"


# ---- the checks: each returns its detail text or raises ------------------------------------------

def check_graphs(ctx: Context, name: str) -> str:
    model, cfg = ctx.model(name)
    ids = _ids(model)
    try:
        configure(model, graphs=False)
        eager = generate(model, ids, greedy=True, cfg_scale=cfg)
        sampled_eager = generate(model, ids, seed=3, cfg_scale=cfg, top_k=100)
        graphed = configure(model, graphs=True)
        first = generate(model, ids, greedy=True, cfg_scale=cfg)  # captures
        again = generate(model, ids, greedy=True, cfg_scale=cfg)  # replays
        sampled = generate(model, ids, seed=3, cfg_scale=cfg, top_k=100)
    finally:
        configure(model)
    for label, got, want in (("capture", first, eager), ("replay", again, eager),
                             ("sampled top-k", sampled, sampled_eager)):
        if not torch.equal(got, want):
            raise AssertionError(f"graphs on vs off, {label}: {_differ(got, want)}")
    return f"{len(ids)} images x {eager[0].numel()} tokens equal (greedy, replayed, sampled top-k 100); " \
           f"capture {graphed.capture_seconds:.2f} s"


def check_bf16(ctx: Context, name: str) -> str:
    full, cfg = ctx.model(name, torch.float32, keep=False)
    # on CUDA the cached bfloat16 model holds the same seeded weights, rounded
    half = ctx.model(name)[0] if ctx.cuda else copy.deepcopy(full).to(torch.bfloat16)
    agreement, err, rel = teacher_forced(half, cfg, _ids(full), reference=full)
    del full
    if ctx.cuda:
        torch.cuda.empty_cache()
    # the target (99 %) is for trained weights; random ones have near-tied logits, where a
    # rounding flips the top-1, so below 90 % only would they point at a bug
    floor = 0.9 if name in RANDOM else TARGET_BF16
    if agreement < floor:
        raise AssertionError(f"bfloat16 top-1 agreement {agreement:.4f} < {floor} "
                             f"(max logits error {err:.3g})")
    met = "met" if agreement >= TARGET_BF16 else "not met (random weights)"
    return (f"teacher-forced top-1 agreement {agreement:.4f} (target {TARGET_BF16:.0%}: {met}); "
            f"max logits error {err:.3g} ({rel:.2%} of the largest logit)")


def check_per_row(ctx: Context, name: str) -> str:
    model, cfg = ctx.model(name)
    others = [(c + 3) % model.config.num_classes for c in range(7)]
    settings = ({"cfg_scale": cfg}, {"cfg_scale": cfg, "top_k": 100, "temperature": 0.9})
    for kwargs in settings:
        alone = generate(model, [5], seed=11, **kwargs)
        crowd = generate(model, [5, *others], seed=[11, *range(20, 27)], row_ids=[0] * 8, **kwargs)
        if not torch.equal(alone[0], crowd[0]):
            raise AssertionError(f"alone vs among 7 others ({kwargs}): {_differ(alone[0], crowd[0])}")
    graphs = runner_for(model).use_graphs
    return f"an image alone == the same image among 7 others (plain and top-k/temperature); graphs {graphs}"


def check_prefix(ctx: Context, name: str) -> str:
    model, cfg = ctx.model(name)
    ids = _ids(model, 4)
    sched = model.schedule
    order = list(sched.order)
    full = generate(model, ids, greedy=True, cfg_scale=cfg).flatten(1)[:, order]
    prefix = full[:, : sched.boundaries[sched.num_steps // 3]]
    extended = generate(model, ids, greedy=True, cfg_scale=cfg, prefix=prefix).flatten(1)[:, order]
    if not torch.equal(extended[:, : prefix.shape[1]], prefix):
        raise AssertionError("the extension changed its prefix")
    with _graphs(model, False):
        eager = generate(model, ids, greedy=True, cfg_scale=cfg, prefix=prefix).flatten(1)[:, order]
    if not torch.equal(extended, eager):
        raise AssertionError(f"prefix decode, graphs on vs off: {_differ(extended, eager)}")
    same = (extended == full).float().mean().item()
    return f"prefix of {prefix.shape[1]} tokens kept; graphs on == off; {same:.1%} of cells as the full run"


def check_known(ctx: Context, name: str) -> str:
    """Known cells of different shapes per row (an edit): kept exactly, graphs on == off, and
    each row of the mixed batch as it comes alone."""
    model, cfg = ctx.model(name)
    ids = _ids(model, 4)
    g = model.config.grid_size
    full = generate(model, ids, greedy=True, cfg_scale=cfg)
    masks = torch.zeros(len(ids), g, g, dtype=torch.bool)
    masks[0, :, : g // 2] = True  # the left half known
    masks[1, : g // 2] = True  # the top half
    masks[2, g // 4: 3 * g // 4, g // 4: 3 * g // 4] = True  # the centre
    known = torch.where(masks, full, torch.full_like(full, UNKNOWN))  # row 3: nothing known
    edited = generate(model, ids, greedy=True, cfg_scale=cfg, known=known)
    if not torch.equal(edited[masks], full[masks]):
        raise AssertionError("a known cell changed")
    with _graphs(model, False):
        eager = generate(model, ids, greedy=True, cfg_scale=cfg, known=known)
    if not torch.equal(edited, eager):
        raise AssertionError(f"known-cell decode, graphs on vs off: {_differ(edited, eager)}")
    for r in range(len(ids)):
        alone = generate(model, ids[r:r + 1], greedy=True, cfg_scale=cfg, known=known[r:r + 1])
        if not torch.equal(alone[0], edited[r]):
            raise AssertionError(f"row {r} alone vs among mixed masks: {_differ(alone[0], edited[r])}")
    return "left/top/centre/no known cells in one batch: kept exactly; graphs on == off; rows == alone"


@contextlib.contextmanager
def _graphs(model: EAR, on: bool) -> Iterator[None]:
    """Graphs on or off where they exist (CUDA); a CPU has no graphs either way."""
    if torch.device(model.output.weight.device).type == "cuda":
        configure(model, graphs=on)
    try:
        yield
    finally:
        configure(model)


def check_interleaved(ctx: Context, name: str) -> str:
    """Two streams on one runner advanced one step each in turn (the serving scheduler's pattern),
    the second starting after the first's third step; every yielded token batch is kept and only
    read at the end (pinned host buffers must not be rewritten under it)."""
    model, cfg = ctx.model(name)
    sched = model.schedule
    a_ids, b_ids = torch.tensor(_ids(model, 3)), torch.tensor([7 % model.config.num_classes])

    def kept(ids: torch.Tensor, **kwargs) -> list[torch.Tensor]:
        return [t for _, _, t in _drawn(model, ids, cfg, **kwargs)]

    alone_a, alone_b = kept(a_ids, seed=5), kept(b_ids, seed=6, top_k=50)
    stream_a, stream_b = _drawn(model, a_ids, cfg, seed=5), _drawn(model, b_ids, cfg, seed=6, top_k=50)
    got_a = [next(stream_a)[2] for _ in range(3)]
    got_b: list[torch.Tensor] = []
    for item_a, item_b in zip(stream_a, stream_b, strict=False):
        got_a.append(item_a[2])
        got_b.append(item_b[2])
    got_a += [t for _, _, t in stream_a]
    got_b += [t for _, _, t in stream_b]
    for label, got, want in (("first", got_a, alone_a), ("second", got_b, alone_b)):
        if len(got) != len(want) or not all(torch.equal(g, w) for g, w in zip(got, want, strict=False)):
            raise AssertionError(f"the {label} stream's tokens differ from the same stream alone")
    return (f"2 streams ({len(a_ids)} + {len(b_ids)} images, {sched.num_steps} steps) interleaved == alone; "
            f"graphs {runner_for(model).use_graphs}")


def _drawn(model: EAR, ids: torch.Tensor, cfg: float,
           **kwargs) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The runner's own decode loop with on-device draws (what `sample` consumes)."""
    rows = RowSettings.build(len(ids), model.config.vocab_size, cfg_scale=cfg,
                             temperature=kwargs.get("temperature", 1.0), top_k=kwargs.get("top_k", 0),
                             top_p=1.0, greedy=False, keys=row_keys(kwargs["seed"], None, len(ids)))
    return runner_for(model).decode(ids, rows, prefix=torch.zeros(len(ids), 0, dtype=torch.long))


def check_capture(ctx: Context, name: str) -> str:
    model, cfg = ctx.model(name)
    parts = []
    for bucket in (1, 2, 16, 128):
        runner = configure(model)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        generate(model, _ids(model, bucket), seed=0, cfg_scale=cfg)
        torch.cuda.synchronize()
        kept = (torch.cuda.memory_allocated() - before) / 2**20
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        parts.append(f"b{bucket}: {runner.capture_seconds:.2f} s, {kept:.0f} MiB kept, {peak:.0f} MiB peak")
        runner.release()
    configure(model)
    torch.cuda.empty_cache()
    return "; ".join(parts)


def check_peak(ctx: Context, _name: str) -> str:
    total = torch.cuda.get_device_properties(ctx.device).total_memory
    peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    if reserved > total:
        raise AssertionError("reserved more than the card holds")
    return (f"since the last reset: {peak / GiB:.2f} GiB allocated, {reserved / GiB:.2f} GiB reserved "
            f"of {total / GiB:.1f}")


def check_speed(ctx: Context, name: str) -> str:
    model, cfg = ctx.model(name)
    batches = (16,) if ctx.quick else (16, 128, 512)
    fits = bulk.fitting_batch(model, cfg != 1.0, ctx.device) if ctx.cuda else max(batches)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    per_image, _ = timed(model, 1, cfg, 2 if ctx.quick else 5)
    parts = [f"b1 {per_image * 1e3:.1f} ms/img"]
    for batch in batches:
        if batch > fits:
            parts.append(f"b{batch} skipped (over the card's memory: fits {fits})")
            continue
        seconds, _ = timed(model, batch, cfg, 1)
        parts.append(f"b{batch} {batch / seconds:.0f} img/s")
        runner_for(model).release()
    if ctx.cuda:
        parts.append(f"peak {torch.cuda.max_memory_allocated() / GiB:.2f} GiB")
        torch.cuda.empty_cache()
    return "; ".join(parts)


def check_startup(ctx: Context, gb: str) -> str:
    """The start-up choice for a card of `gb` GB, and its warm-up under that memory limit (a CUDA
    card: random weights of the chosen shape with a random XQGAN; a CPU: the bundled model)."""
    card = int(float(gb) * 1e9)
    choice = startup.choose(startup.Hardware(cuda=True, gpu_name=f"{gb} GB card", gpu_bytes=card),
                            lambda: startup.HubAccess(online=True))
    needed = startup.gpu_bytes_needed(choice.name.rsplit("-", 1)[1]) if choice.name in startup.RELEASED else 0
    if choice.name not in startup.RELEASED:
        raise AssertionError(f"a {gb} GB card opens on {choice.name} ({choice.reason})")
    began = time.perf_counter()
    if ctx.cuda:
        ctx.drop_all()
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, card / total), ctx.device)
        torch.cuda.reset_peak_memory_stats()
        try:
            pipe = _random_pipeline(choice.name, ctx)
            startup.warm_up(pipe, check=False)
            used = torch.cuda.max_memory_reserved() / 1e9
            del pipe
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
            torch.cuda.empty_cache()
        where = f"warm-up of random {choice.name} within {gb} GB in {time.perf_counter() - began:.1f} s " \
                f"({used:.1f} GB reserved at most)"
    else:
        from ear.pipeline import EARPipeline

        startup.warm_up(EARPipeline.from_pretrained(hub.DEFAULT_MODEL, device="cpu"), check=True)
        where = f"warm-up on the CPU's model ({hub.DEFAULT_MODEL}) in {time.perf_counter() - began:.1f} s"
    return f"opens on {choice.name} (needs {needed / 1e9:.1f} GB); {where}"


def _random_pipeline(name: str, ctx: Context):
    from ear.pipeline import EARPipeline
    from ear.tokenizer.xqgan import XQGAN, XQGANConfig

    size = name.rsplit("-", 1)[1]
    config = EARConfig.official(size)
    with torch.device(ctx.device):
        model = noisy_weights(EAR(config), 0.02)
        tokenizer = XQGAN(XQGANConfig())
    loaded = hub.LoadedModel(name=f"random {name}", source="random", model=model, tokenizer=tokenizer,
                             class_names=[f"class {i}" for i in range(config.num_classes)],
                             presets={"visual": {"cfg_scale": 1.45, "temperature": 1.0, "top_k": 100,
                                                 "top_p": 1.0}}, default_preset="visual")
    return EARPipeline(loaded, ctx.device, ctx.dtype)


def check_bulk(ctx: Context, name: str) -> str:
    model, cfg = ctx.model(name)
    batch = bulk.fitting_batch(model, True, ctx.device)
    run = min(batch, 8) if not ctx.cuda else batch
    began = time.perf_counter()
    tokens = generate(model, _ids(model, run), seed=0, cfg_scale=cfg)
    if ctx.cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    runner_for(model).release()
    if ctx.cuda:
        torch.cuda.empty_cache()
    ran = f"ran {run} in {seconds:.1f} s ({run / seconds:.0f} img/s)"
    return f"default batch {batch} (guided); {ran}; {tokens.shape[0]} grids"


def check_serving(ctx: Context, name: str) -> str:
    """8 single-image requests at once through the batching scheduler; each consumer does device
    work of its own on every state (as previews do), and each result must equal its image alone."""
    model, cfg = ctx.model(name)
    scheduler = Scheduler(max_rows=16)
    results: dict[int, torch.Tensor] = {}
    errors: list[str] = []
    started = threading.Barrier(8)

    def visitor(i: int) -> None:
        try:
            started.wait()
            for state in scheduler.sample(model, [i % model.config.num_classes], seed=100 + i, cfg_scale=cfg):
                torch.ones(64, 64, device=ctx.device).matmul(torch.ones(64, 64, device=ctx.device)).sum()
                if state.done:
                    results[i] = state.tokens
        except Exception as err:
            errors.append(f"request {i}: {type(err).__name__}: {err}")

    began = time.perf_counter()
    threads = [threading.Thread(target=visitor, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    batches = scheduler.stats().batches_started
    scheduler.close()
    if errors:
        raise AssertionError("; ".join(errors))
    same = sum(torch.equal(results[i], generate(model, [i % model.config.num_classes], seed=100 + i,
                                                cfg_scale=cfg)) for i in range(8))
    if same != 8:
        raise AssertionError(f"only {same} of 8 served images equal the image alone")
    return f"8 concurrent requests in {seconds:.2f} s, {batches} batches; all 8 equal their image alone"


def _emoji_pipelines(ctx: Context, **names: str) -> dict[str, Any]:
    from ear.pipeline import EARPipeline

    return {k: EARPipeline.from_pretrained(m, device=ctx.device, dtype=ctx.dtype) for k, m in names.items()}


def check_radar(ctx: Context, name: str) -> str:
    """RadAR's rings with nested refinement and without against EAR's 31 steps (the bundled
    `radar-emoji` and `ear-emoji`, temperature 1.0): the decode loop's time per image at batch 1
    and 16, and 128 on CUDA (issue 21's targets: refined >= 1.2x at b1 and no slower at b16,
    unrefined >= 1.35x), and a refined image the same alone and among 7 others. Every arm's steps
    are graphed where the device allows (refined ones in their static form)."""
    from bench.bench_refine import seconds_per_image

    pipes = _emoji_pipelines(ctx, ear="ear-emoji", radar=name)
    settings = {k: {"cfg_scale": p.default_settings.cfg_scale, "temperature": 1.0, "refine_threshold": None}
                for k, p in pipes.items()}
    parts = []
    for batch in (1, 16, 128) if ctx.cuda and not ctx.quick else (1, 16):
        secs = seconds_per_image(pipes, settings, batch, 1 if ctx.quick else 3)
        parts.append(f"b{batch} " + ", ".join(f"{arm} {v * 1e3:.1f} ms/img ({secs['ear'] / v:.2f}x)"
                                             for arm, v in secs.items()))
    model = pipes["radar"].model
    others = [(c + 3) % model.config.num_classes for c in range(7)]
    alone = generate(model, [5], seed=11, temperature=1.0, refine=True)
    crowd = generate(model, [5, *others], seed=[11, *range(20, 27)], row_ids=[0] * 8, temperature=1.0,
                     refine=True)
    if not torch.equal(alone[0], crowd[0]):
        raise AssertionError(f"refined, alone vs among 7 others: {_differ(alone[0], crowd[0])}")
    return "; ".join(parts) + "; a refined image alone == among 7 others"


def check_refined_graphs(ctx: Context, name: str) -> str:
    """Refined decoding's static form, which CUDA graphs replay (every row's re-fed part fed again,
    the checked cells corrected by a select), against the eager form (only changed rows re-fed):
    the bundled RadAR model at temperature 1.0, the same tokens and corrected cells at capture,
    at replay and with known cells (an edit). A CPU runs the static form eagerly."""
    model = _emoji_pipelines(ctx, radar=name)["radar"].model
    ids = _ids(model, 2 * CLASSES)

    def final(static: bool | None, known: torch.Tensor | None = None) -> Any:
        runner_for(model).static_refinement = static  # `configure` installs a new runner
        return list(sample(model, ids, seed=3, temperature=1.0, refine=True, known=known))[-1]

    try:
        with _graphs(model, False):
            eager = final(False)
            known = torch.full_like(eager.tokens[0], UNKNOWN)
            known[:4] = eager.tokens[0, :4]
            eager_known = final(False, known)
        with _graphs(model, True):
            static = None if ctx.cuda else True  # graphed: static by default
            runs = {"capture": final(static), "replay": final(static), "known cells": final(static, known)}
    finally:
        runner_for(model).static_refinement = None
    if not eager.corrected.any():
        raise AssertionError("no cell was corrected: the comparison would say nothing")
    for label, got in runs.items():
        want = eager_known if label == "known cells" else eager
        if not (torch.equal(got.tokens, want.tokens) and torch.equal(got.corrected, want.corrected)):
            raise AssertionError(f"static vs eager refinement, {label}: {_differ(got.tokens, want.tokens)}, "
                                 f"{int((got.corrected != want.corrected).sum())} corrected cells differ")
    form = "graphed" if ctx.cuda else "static form, eager (no CUDA)"
    return f"{len(ids)} images x {eager.tokens[0].numel()} tokens and {int(eager.corrected.sum())} " \
           f"corrected cells equal ({form}: capture, replay, known cells)"


def check_activation(ctx: Context, name: str) -> str:
    """The bundled model's dynamic activation in each form the device runs (CUDA: masked and
    capacity, static shapes for graphs; CPU: grouped): every expert on gives the dense tokens, and
    the time per image at batch 16 (and 128 on CUDA) against dense (issue 22 asks which form is
    faster where)."""
    from bench.bench_activate import seconds_per_image as activated_seconds
    from ear.activate import Activation
    from ear.routed import RoutedFFN

    pipe = _emoji_pipelines(ctx, ear=name)["ear"]
    model, cfg = pipe.model, pipe.default_settings.cfg_scale
    activation = Activation.load(Path(pipe.info()["source"]), model)
    dense = generate(model, _ids(model), seed=4, cfg_scale=cfg, temperature=0.6)
    parts = []
    for mode in ("masked", "capacity") if ctx.cuda else ("grouped",):
        every = generate(model, _ids(model), seed=4, cfg_scale=cfg, temperature=0.6,
                         activation=RoutedFFN(activation, 1.0, mode=mode, capacity=1.0))
        if not torch.equal(every, dense):
            raise AssertionError(f"{mode}, every expert on vs dense: {_differ(every, dense)}")
        for batch in (16, 128) if ctx.cuda and not ctx.quick else (16,):
            secs = activated_seconds(model, RoutedFFN(activation, mode=mode), batch, 1 if ctx.quick else 3,
                                     cfg, 0.6)
            parts.append(f"{mode} b{batch}: dense {secs['dense'] * 1e3:.2f}, active "
                         f"{secs['active'] * 1e3:.2f} ms/img ({secs['dense'] / secs['active']:.2f}x)")
    return "; ".join(parts) + "; every expert on == dense in each form"


# ---- the plan ------------------------------------------------------------------------------------

NO_CUDA = "needs CUDA"


def plan(cuda: bool, quick: bool) -> list[Spec]:
    big = ("emoji", "B", "L", "XL") if cuda and not quick else ("small", "emoji")
    two = ("emoji", "B") if cuda and not quick else ("small",)
    xl = ("B", "XL") if cuda and not quick else ("small",)
    cap = 120 if quick else 60  # a CPU shared with other jobs may run 10x slower than when idle
    specs = [Spec(f"greedy tokens, CUDA graphs on == off · {n}", check_graphs, n, cap,
                  "CUDA graphs need CUDA") for n in big]
    specs += [Spec(f"bfloat16 vs float32: top-1 agreement, logits error · {n}", check_bf16, n, cap)
              for n in big]
    specs += [Spec(f"per-row randomness: alone == among 7 others · {n}", check_per_row, n, cap) for n in xl]
    specs += [Spec(f"prefix (extension) decode · {n}", check_prefix, n, cap) for n in two]
    specs += [Spec(f"two streams interleaved on one runner · {n}", check_interleaved, n, cap) for n in two]
    specs += [Spec(f"known-cell (edit) decode, mixed masks · {n}", check_known, n, cap) for n in two]
    specs += [Spec(f"graph capture time and memory per bucket 1/2/16/128 · {n}", check_capture, n, 2 * cap,
                   "graphs are captured on CUDA only") for n in xl]
    specs += [Spec(f"speed: ms/img b1, img/s at larger batches · {n}", check_speed, n, 2 * cap) for n in big]
    specs.append(Spec("peak GPU memory of the run", check_peak, "", 10, "GPU memory needs CUDA"))
    specs += [Spec(f"start-up choice and warm-up, {gb} GB card", check_startup, gb, 2 * cap)
              for gb in ("24", "80")]
    specs.append(Spec("bulk sampling: default batch on this card", check_bulk, two[-1], 2 * cap))
    specs.append(Spec("serving scheduler: 8 concurrent requests", check_serving, two[-1], 2 * cap))
    specs.append(Spec("RadAR refined steps, CUDA graphs (static form) == eager", check_refined_graphs,
                      "radar-emoji", cap))
    specs.append(Spec("RadAR rings, refined and not, vs EAR: speed, refined alone == in a crowd",
                      check_radar, "radar-emoji", 2 * cap))
    specs.append(Spec("ActVAR forms: every expert on == dense, b16 speed vs dense", check_activation,
                      "ear-emoji", 2 * cap))
    return specs


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "/").split())[:400]


def run(specs: list[Spec], ctx: Context, out: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    with out.open("a", encoding="utf-8") as report:
        for spec in specs:
            began = time.perf_counter()
            if spec.run is None:
                status, detail = "skip", spec.needs_cuda
            elif spec.needs_cuda and not ctx.cuda:
                status, detail = "skip", f"{spec.needs_cuda}; this machine has none"
            else:
                try:
                    with time_cap(spec.cap_s):
                        status, detail = "pass", spec.run(ctx, spec.arg)
                except Exception as err:  # every failure is a row, never the end of the run
                    status, detail = "fail", f"{type(err).__name__}: {err}"
                    traceback.print_exc()
                    with contextlib.suppress(Exception):
                        configure_all_default(ctx)
            seconds = time.perf_counter() - began
            line = f"| {spec.title} | {status} | {seconds:.1f} | {_cell(detail)} |\n"
            report.write(line)
            report.flush()
            print(line, end="", flush=True)
            rows.append((spec.title, status))
    return rows


def configure_all_default(ctx: Context) -> None:
    """After a failure: every cached model back on its default runner, cached memory returned."""
    for model, _ in ctx._models.values():
        configure(model)
    if ctx.cuda:
        torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_report.md"))
    parser.add_argument("--device", default=None, help="default: cuda where available, else cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (what a CPU runs in < 3 min)")
    parser.add_argument("--only", default="", help="comma-separated words: the checks whose title has one")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    ctx = Context(device, torch.bfloat16 if cuda else torch.float32, args.quick or not cuda)
    specs = plan(cuda, ctx.quick)
    if args.only:
        words = [w.strip().lower() for w in args.only.split(",") if w.strip()]
        specs = [s for s in specs if any(w in s.title.lower() for w in words)]
    machine = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        f"# GPU check\n\n{machine}; {ctx.dtype}; torch {torch.__version__}; {stamp}; "
        f"`python {' '.join(sys.argv) if argv is None else 'bench/gpu_check.py ' + ' '.join(argv)}`\n\n"
        "| check | status | seconds | detail |\n|---|---|---|---|\n", encoding="utf-8")
    began = time.perf_counter()
    rows = run(specs, ctx, args.out)
    counts = {s: sum(status == s for _, status in rows) for s in STATUSES}
    summary = f"\n{counts['pass']} pass, {counts['fail']} fail, {counts['skip']} skip in " \
              f"{time.perf_counter() - began:.0f} s.\n"
    with args.out.open("a", encoding="utf-8") as report:
        report.write(summary)
    print(summary, f"wrote {args.out}", flush=True)
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
