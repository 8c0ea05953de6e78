"""Many visitors, one forward pass: a batching scheduler in front of the decode engine.

A forward over 16 rows costs about what a forward over one costs on a GPU (and less than 16 single
forwards on a CPU), so requests that arrive together should be sampled together. `Scheduler.sample`
takes one request (its classes, seed and sampling settings) with the signature of
`ear.sampler.sample` and returns that request's own StepStates; one worker thread runs the batches:

* Requests that arrive while a batch runs join it at the next step boundary if it is still early
  (within its first `join_share` of steps, a quarter by default): a new, bigger batch replays the
  steps done so far, and the earlier requests are handed only the states they have not had yet
  (the replay gives their rows the same tokens again, as the next points explain). Later arrivals
  start a second batch of their kind at once (which takes joiners in turn), and beyond `overlap`
  such batches (2) wait for one to finish. First come, first served; at most `max_rows` rows in
  flight; a request bigger than that runs alone.
* Rows share a forward only when the engine can run them as one batch: same model, schedule,
  known cells (none, or some with the same first steps known: Extend, Edit), guidance on or
  off (cfg 1 rows in a guided batch would double their cost and add a rounding step), nested
  refinement (RadAR, `ear.refine`) off or on at the same threshold, and dynamic activation
  (ActVAR, `ear.routed`) off or the same activation at the same tau. Batches of
  different kinds run side by side, one step of each in turn, so an Extend or a Compare never
  waits for a long Generate batch to finish.
* Every row keeps its own settings and randomness: row i of a request with seed s is drawn from
  (s, i) (`ear.draw`), so its image is the same whoever else shares the batch, as long as the
  batch's shape does not change the rounding of the forward (on a CPU in float32 no token of the
  bundled model differed in `bench/bench_serving.py`; half precision on a GPU may differ rarely).
* The worker never waits for a consumer: each request has its own unbounded queue of states, and
  rendering happens in the consumer's thread. A consumer that stops (closes its generator) only
  cancels its own rows: their results are dropped (and the rows leave the batch if it grows), and a
  batch whose requests all stopped ends at the next step boundary.

* A batch's finished step is decoded once for all its requests (`SharedDecode`).
* `ProcessScheduler` runs the same scheduler in a worker process for models on the CPU, where the
  web server's threads would otherwise hold the GIL that every small operation of a forward pass
  needs back.

`EAR_BATCHING=0` turns batching off in the app (the benchmark's baseline); `EAR_MAX_BATCH` bounds
the rows of one batch (memory); `EAR_SERVING_PROCESS=0` keeps the scheduler in the server's process.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import operator
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ear.activate import Activation
from ear.model import EAR, EARConfig
from ear.order import Schedule
from ear.refine import refinement
from ear.routed import RoutedFFN
from ear.sampler import (
    Decoded,
    SamplingParams,
    StepState,
    _as_class_ids,
    _as_known,
    lead_steps,
    sample,
    state_count,
)

log = logging.getLogger("ear.serving")  # also in the worker process, where this runs as __main__

DEFAULT_MAX_ROWS = 16
DEFAULT_JOIN_SHARE = 0.25
DEFAULT_OVERLAP = 2
# States reach a request in bundles at most this far apart (its first and last state at once):
# waking every consumer thread at every step costs a batch of single-image requests a good share
# of a small model's step time in thread switches, and a live view needs no more than this.
HANDOVER_S = 0.03
_BATCH_NUMBERS = itertools.count()


def batching_enabled() -> bool:
    """EAR_BATCHING=0 serves every request with its own forwards (the old behaviour). ZeroGPU runs
    each request in a GPU worker process of its own, where a shared worker thread cannot reach."""
    zero_gpu = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
    return os.environ.get("EAR_BATCHING", "1").strip() != "0" and not zero_gpu


def max_rows_setting() -> int:
    """Rows in flight at most, from EAR_MAX_BATCH (default 16)."""
    raw = os.environ.get("EAR_MAX_BATCH", "").strip()
    if not raw:
        return DEFAULT_MAX_ROWS
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"EAR_MAX_BATCH must be a whole number >= 1, got {raw!r}")
    return int(raw)


def from_environment() -> Scheduler | ProcessScheduler | None:
    """The app's scheduler (EAR_MAX_BATCH rows), or None when batching is off. Models on the CPU
    are served from a worker process (`ProcessScheduler`) unless EAR_SERVING_PROCESS=0."""
    if not batching_enabled():
        return None
    if os.environ.get("EAR_SERVING_PROCESS", "1").strip() == "0":
        return Scheduler(max_rows_setting())
    return ProcessScheduler(max_rows_setting())


def attach(pipeline: Any, scheduler: Scheduler | ProcessScheduler | None) -> Any:
    """`pipeline` (an `EARPipeline`) with every generation sampled through `scheduler` (if any)."""
    if scheduler is not None:
        pipeline.sampler = scheduler.sample
    return pipeline


def log_batches() -> None:
    """Print one line per batch (rows, requests, rows in flight, waiting) on stderr: the server log."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class SharedDecode:
    """A finished batch's tokens, decoded once for all its requests: the first request to ask
    decodes every row in one call and the others take their rows. A decode per request costs more
    (a tokenizer call of one row is far from a row's share of a call of n), and n requests decoding
    at once in their own threads crowd the cores just when each of them is sending its pictures."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens
        self.number = next(_BATCH_NUMBERS)  # unique, unlike id(): how a worker process names it
        self._lock = threading.Lock()
        self._decoded: dict[Hashable, Any] = {}

    def rows(self, decode: Callable[[torch.Tensor], Decoded], key: Hashable, rows: slice) -> Decoded:
        with self._lock:
            if key not in self._decoded:
                self._decoded[key] = decode(self.tokens)
            return self._decoded[key][rows]


@dataclass
class ServedState(StepState):
    """A request's own StepState (its rows only), with what it shared the step with."""

    batch_rows: int = 0  # rows in the forward that produced this step
    rows_in_flight: int = 0  # rows in every batch running at that step
    requests_in_flight: int = 1  # requests those rows belong to (who share the server's time)
    shared: SharedDecode | None = None  # the finished step of the whole batch (done states only)
    rows: slice | None = None  # this request's rows in it

    def decoded(self, decode: Callable[[torch.Tensor], Decoded], key: Hashable) -> Decoded:
        if self.shared is None or self.rows is None:
            return decode(self.tokens)
        return self.shared.rows(decode, key, self.rows)


@dataclass(eq=False)
class _Request:
    model: EAR
    class_ids: torch.Tensor  # (n,)
    params: SamplingParams
    seed: int
    known: torch.Tensor | None  # (n, g*g) raster, UNKNOWN where drawn (`ear.sampler._as_known`)
    schedule: Schedule
    refine_threshold: float | None = None  # nested refinement at this threshold; None: off
    activation: RoutedFFN | None = None  # the FFNs activated; None: dense
    submitted: float = field(default_factory=time.perf_counter)
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    received: int = 0  # states handed over so far (a batch that replays skips these)
    began: float | None = None  # when its first batch started
    bundle: list[ServedState] = field(default_factory=list)  # computed, not yet handed over
    handed: float = 0.0  # when the last bundle went out
    lead: int = field(init=False)  # first steps known in every row: fed at once, as a prefix

    def __post_init__(self) -> None:
        self.lead = lead_steps(self.known, self.schedule)

    def hand_over(self, state: ServedState, now: float) -> None:
        self.bundle.append(state)
        # the first two at once: a consumer that looks one state ahead (is this the last?) can then
        # show the first without waiting for a bundle
        if state.done or self.received <= 2 or now - self.handed >= HANDOVER_S:
            self.out.put(self.bundle)
            self.bundle, self.handed = [], now

    @property
    def rows(self) -> int:
        return self.class_ids.shape[0]

    @property
    def key(self) -> tuple:
        """What must match for rows to share a forward."""
        ffn = self.activation
        activated = None if ffn is None else (ffn.activation, ffn.tau, ffn.lead, ffn.mode, ffn.capacity)
        return (self.model, self.schedule.name, self.lead, self.known is None, self.params.guided,
                self.refine_threshold, activated)


def _new_request(model: EAR, class_ids: int | Sequence[int] | torch.Tensor, params: SamplingParams,
                 seed: int | None, prefix: torch.Tensor | None, known: torch.Tensor | None,
                 schedule: Schedule | None, refine: bool = False, refine_threshold: float | None = None,
                 activation: RoutedFFN | None = None) -> _Request:
    """A request with every argument checked (before anything is queued)."""
    if model.training:
        raise ValueError("the model is in training mode (dropout, label drop): call model.eval() first")
    ids = _as_class_ids(model, class_ids)
    seed = secrets.randbits(63) if seed is None else _whole(seed)
    sched = model.layout(schedule).schedule
    refined = refinement(model, refine, refine_threshold)
    if activation is not None and not isinstance(activation, RoutedFFN):
        raise ValueError(f"activation must be an ear.routed.RoutedFFN (or None), got {activation!r}")
    return _Request(model, ids, params, seed, _as_known(model, known, prefix, ids.shape[0], sched), sched,
                    None if refined is None else refined.threshold, activation)


def _whole(seed: object) -> int:
    try:
        value = operator.index(seed)  # ints and numpy integers, not floats
    except TypeError:
        value = -1
    if isinstance(seed, bool) or value < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return value


def _handed_over(request: _Request) -> Iterator[ServedState]:
    """The states put in the request's queue, in order, to its last (a failed batch raises)."""
    while True:
        bundle = request.out.get()
        if isinstance(bundle, _Failed):
            raise RuntimeError(f"generation failed: {bundle.error}") from bundle.error
        yield from bundle
        if bundle[-1].done:
            return


class _Failed:
    """Put into a request's queue when its batch failed: the consumer raises."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Batch:
    """Requests of one kind sampled together; `advance` runs one step and hands each request its
    rows. A request joining late makes a new batch that replays the first steps: rows are drawn
    from their own (seed, row id), so the replay gives the earlier rows the tokens they already
    have, and each request is handed only the states it has not had yet."""

    def __init__(self, number: int, requests: list[_Request]) -> None:
        self.number, self.requests = number, requests
        self.key = requests[0].key
        self.started = time.perf_counter()
        for r in requests:
            r.began = self.started if r.began is None else r.began
        first = requests[0]
        per_row = [(r, i) for r in requests for i in range(r.rows)]
        params = [r.params for r, _ in per_row]
        known = None if first.known is None else torch.cat([r.known for r in requests if r.known is not None])
        self._states = sample(
            first.model, torch.cat([r.class_ids for r in requests]),
            cfg_scale=[p.cfg_scale for p in params], temperature=[p.temperature for p in params],
            top_k=[p.top_k for p in params], top_p=[p.top_p for p in params],
            greedy=[p.greedy for p in params], seed=[r.seed for r, _ in per_row],
            row_ids=[i for _, i in per_row], known=known, schedule=first.schedule,
            refine=first.refine_threshold is not None, refine_threshold=first.refine_threshold,
            activation=first.activation)
        self.offsets = list(itertools.accumulate([r.rows for r in requests], initial=0))
        self.produced = 0  # states this batch has computed
        self.num_states = state_count(known, first.schedule)

    def close(self) -> None:
        self._states.close()  # hands the engine's cache back at once

    @property
    def live_rows(self) -> int:
        return sum(r.rows for r in self.requests if not r.cancelled)

    def joined_by(self, newcomers: list[_Request]) -> _Batch:
        """This batch's live requests and `newcomers` as one new batch (this one is closed)."""
        self.close()
        return _Batch(self.number, [r for r in self.requests if not r.cancelled] + newcomers)

    def advance(self, rows_in_flight: int, requests_in_flight: int) -> bool:
        """One step; False when the batch is finished (done, failed or nobody is listening)."""
        if not self.live_rows:
            self.close()
            return False
        try:
            state = next(self._states)
        except Exception as err:  # a failed forward (out of memory, a bug) fails this batch only
            log.exception("batch %d failed", self.number)
            for r in self.requests:
                r.out.put(_Failed(err))
            return False
        self.produced += 1
        rows, now = self.offsets[-1], time.perf_counter()
        shared = SharedDecode(state.tokens) if state.done else None
        for r, start, stop in zip(self.requests, self.offsets, self.offsets[1:], strict=False):
            if not r.cancelled and r.received < self.produced:
                assert r.began is not None
                r.received += 1
                corrected = None if state.corrected is None else state.corrected[start:stop]
                r.hand_over(ServedState(state.step, state.num_steps, state.tokens[start:stop], state.known,
                                        state.new, state.elapsed + self.started - r.began, corrected,
                                        ffn_active=state.ffn_active, batch_rows=rows,
                                        rows_in_flight=rows_in_flight, requests_in_flight=requests_in_flight,
                                        shared=shared, rows=slice(start, stop)), now)
        return not state.done


@dataclass(frozen=True)
class SchedulerStats:
    rows_in_flight: int
    batches_running: int
    requests_waiting: int
    batches_started: int


class Scheduler:
    """Batches concurrent requests (see the module docstring). One worker thread, started on the
    first request; thread-safe; `close()` stops it.

    `max_rows` bounds the rows in flight; `join_share` is how far into its steps a batch still takes
    newcomers of its kind (by replaying its first steps with them; 0: never); `overlap` is how many
    batches of one kind may run at once (a newcomer that can no longer join starts another one at
    once, up to this many, else waits); `gather_s` holds a new batch back until its first request
    is that old, unless it is full (0: start at once)."""

    def __init__(self, max_rows: int = DEFAULT_MAX_ROWS, join_share: float = DEFAULT_JOIN_SHARE,
                 overlap: int = DEFAULT_OVERLAP, gather_s: float = 0.0) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 1:
            raise ValueError(f"overlap must be an integer >= 1, got {overlap!r}")
        if not 0 <= join_share <= 1:
            raise ValueError(f"join_share must lie in [0, 1], got {join_share!r}")
        if not gather_s >= 0:
            raise ValueError(f"gather_s must be >= 0 seconds, got {gather_s!r}")
        self.max_rows, self.join_share, self.overlap, self.gather_s = max_rows, join_share, overlap, gather_s
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Batch] = []
        self._started = 0
        self._worker: threading.Thread | None = None
        self._closed = False

    # ---- the request side ------------------------------------------------------------------------

    def sample(self, model: EAR, class_ids: int | Sequence[int] | torch.Tensor, *, cfg_scale: float = 1.0,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
               seed: int | None = None, prefix: torch.Tensor | None = None,
               known: torch.Tensor | None = None, schedule: Schedule | None = None, refine: bool = False,
               refine_threshold: float | None = None,
               activation: RoutedFFN | None = None) -> Iterator[ServedState]:
        """`ear.sampler.sample` for one request, served in a shared batch: the same states, the
        same tokens (row i drawn from (seed, i)). Arguments are checked now; the request joins the
        queue when the first state is asked for, and leaves it when the iterator is closed."""
        params = SamplingParams(cfg_scale, temperature, top_k, top_p, greedy)
        return self._follow(_new_request(model, class_ids, params, seed, prefix, known, schedule,
                                         refine, refine_threshold, activation))

    def _follow(self, request: _Request) -> Iterator[ServedState]:
        self._submit(request)
        try:
            yield from _handed_over(request)
        finally:  # also on Stop: only this request's rows are dropped
            self._cancel(request)

    def _submit(self, request: _Request) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler has been closed")
            self._waiting.append(request)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="ear-serving", daemon=True)
                self._worker.start()
            self._cond.notify()

    def _cancel(self, request: _Request) -> None:
        with self._cond:
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)

    def stats(self) -> SchedulerStats:
        with self._cond:
            return SchedulerStats(self._in_flight(), len(self._running), len(self._waiting), self._started)

    def close(self) -> None:
        """Stop the worker after the current step; requests still waiting or running fail."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            worker = self._worker
        if worker is not None:
            worker.join()

    # ---- the worker ------------------------------------------------------------------------------

    def _in_flight(self) -> int:
        return sum(b.live_rows for b in self._running)

    def _requests_in_flight(self) -> int:
        return sum(not r.cancelled for b in self._running for r in b.requests)

    def _joinable(self, batch: _Batch) -> bool:
        """Early enough that replaying the steps done so far costs little."""
        done = max([batch.produced, *(r.received for r in batch.requests)])
        return done <= self.join_share * batch.num_states

    def _admit(self, now: float) -> tuple[list[tuple[_Batch | None, list[_Request]]], float | None]:
        """Waiting requests that go now, in arrival order, grouped by the running batch they join
        (None: a new batch); at most `max_rows` rows in flight in all (a request that does not fit
        stops the admission, so nothing overtakes it). Returns them and when to look again (a
        group held back by `gather_s`). Called with the lock held."""
        kinds: dict[tuple, list[_Batch]] = {}
        for batch in self._running:
            kinds.setdefault(batch.key, []).append(batch)
        room = self.max_rows - self._in_flight()
        groups: dict[tuple, tuple[_Batch | None, list[_Request]]] = {}
        left = room
        for request in self._waiting:
            if request.key not in groups:
                batches = kinds.get(request.key, [])
                if batches and self._joinable(batches[-1]):
                    target = batches[-1]
                elif len(batches) < self.overlap:
                    target = None
                else:
                    continue  # waits until a batch of its kind finishes
            if request.rows > left and (self._running or groups):  # bigger than max_rows: alone
                break
            groups.setdefault(request.key, (target, []))[1].append(request)
            left -= request.rows
        ready: list[tuple[_Batch | None, list[_Request]]] = []
        wake = None
        for target, group in groups.values():
            due = group[0].submitted + self.gather_s
            if target is not None or due <= now or sum(r.rows for r in group) >= room:
                ready.append((target, group))
                for request in group:
                    self._waiting.remove(request)
            else:
                wake = due if wake is None else min(wake, due)
        return ready, wake

    def _work(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # a bug in the loop itself: fail everyone rather than hang them
            log.exception("the serving worker stopped")
            with self._cond:
                self._fail_all(RuntimeError(f"the serving worker stopped: {err}"))
                self._worker = None  # the next request starts a fresh one
            raise

    def _loop(self) -> None:
        while True:
            with self._cond:
                ready, wake = self._admit(time.perf_counter())
                while not ready and not self._running and not self._closed:
                    self._cond.wait(None if wake is None else max(0.0, wake - time.perf_counter()))
                    ready, wake = self._admit(time.perf_counter())
                if self._closed:
                    self._fail_all(RuntimeError("the scheduler was closed"))
                    return
            for batch, requests in ready:
                self._launch(batch, requests)
            rows, requests = self._in_flight(), self._requests_in_flight()
            finished = [b for b in list(self._running) if not b.advance(rows, requests)]
            for batch in finished:
                batch.close()  # its cache goes back to the engine now, not when collected
            with self._cond:
                for batch in finished:
                    self._running.remove(batch)
                    seconds = time.perf_counter() - batch.started
                    log.debug("batch %d finished in %.2f s", batch.number, seconds)

    def _launch(self, running: _Batch | None, requests: list[_Request]) -> None:
        """Start a batch for `requests`, or grow `running` by them (a new batch that replays)."""
        with self._cond:
            if running is None:
                self._started += 1
            number = self._started if running is None else running.number
        try:
            batch = _Batch(number, requests) if running is None else running.joined_by(requests)
        except Exception as err:  # arguments were checked on submission; this is a failure, not input
            log.exception("batch %d could not start", number)
            for r in requests if running is None else [*running.requests, *requests]:
                r.out.put(_Failed(err))
            if running is not None:
                with self._cond:
                    self._running.remove(running)
            return
        with self._cond:
            if running is None:
                self._running.append(batch)
            else:
                self._running[self._running.index(running)] = batch
            waited = time.perf_counter() - min(r.submitted for r in requests)
            how = "started" if running is None else f"grew at step {running.produced}"
            log.info("batch %d %s: %d rows, %d requests (the new ones waited up to %.2f s); "
                     "%d rows in flight, %d requests waiting", number, how, batch.offsets[-1],
                     len(batch.requests), waited, self._in_flight(), len(self._waiting))

    def _fail_all(self, error: Exception) -> None:
        for request in [*self._waiting, *(r for b in self._running for r in b.requests)]:
            request.out.put(_Failed(error))
        self._waiting.clear()
        for batch in self._running:
            batch.close()
        self._running.clear()


# ---- the scheduler in a process of its own -----------------------------------------------------


class ProcessScheduler:
    """`Scheduler` run in a worker process of its own, for models on the CPU (others are served by
    an in-process `Scheduler`): on a CPU every small operation of a forward pass takes Python's
    GIL back, which the web server's threads hold while they handle requests, so a crowd's
    requests arriving together used to stall the very forward passes they wait for. The worker
    gets its own copy of each model (sent once, as weights); requests and states cross as plain
    arrays, each request's states in the same bundles as from `Scheduler`. Same interface, same
    tokens (row i of seed s drawn from (s, i) there as here). A worker that dies fails the requests
    it was serving, and the next request starts a new one. `close()` stops it."""

    def __init__(self, max_rows: int = DEFAULT_MAX_ROWS, join_share: float = DEFAULT_JOIN_SHARE,
                 overlap: int = DEFAULT_OVERLAP, gather_s: float = 0.0) -> None:
        # checks the settings, and serves models on a GPU
        self._local = Scheduler(max_rows, join_share, overlap, gather_s)
        self.max_rows, self._settings = max_rows, {"max_rows": max_rows, "join_share": join_share,
                                                   "overlap": overlap, "gather_s": gather_s}
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self._closed = False

    def start(self) -> None:
        """Start the worker now (it takes a second or two to import torch), not on the first request."""
        self._running()

    def sample(self, model: EAR, class_ids: int | Sequence[int] | torch.Tensor, *, cfg_scale: float = 1.0,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
               seed: int | None = None, prefix: torch.Tensor | None = None,
               known: torch.Tensor | None = None, schedule: Schedule | None = None, refine: bool = False,
               refine_threshold: float | None = None,
               activation: RoutedFFN | None = None) -> Iterator[ServedState]:
        """As `Scheduler.sample`."""
        params = SamplingParams(cfg_scale, temperature, top_k, top_p, greedy)
        request = _new_request(model, class_ids, params, seed, prefix, known, schedule, refine,
                               refine_threshold, activation)
        return self._follow(request) if _on_cpu(model) else self._local._follow(request)

    def _follow(self, request: _Request) -> Iterator[ServedState]:
        worker = self._running()
        number = worker.submit(request)
        try:
            yield from _handed_over(request)
        finally:  # also on Stop: only this request's rows are dropped
            worker.finished(number)

    def _running(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise RuntimeError("the scheduler has been closed")
            if self._worker is None or not self._worker.alive:
                self._worker = _Worker(self._settings)
                # its receiver thread keeps it alive: stop it with the scheduler (or at exit)
                weakref.finalize(self, self._worker.stop)
            return self._worker

    def close(self) -> None:
        """Stop the worker; requests it is serving fail."""
        with self._lock:
            self._closed = True
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()
        self._local.close()


def _on_cpu(model: EAR) -> bool:
    return model.output.weight.device.type == "cpu"


class _Worker:
    """The parent's end of one worker process: sends requests, hands each its states."""

    def __init__(self, scheduler: dict[str, Any]) -> None:
        from_parent, to_worker = os.pipe()  # (read end, write end)
        from_worker, to_parent = os.pipe()
        settings = {"scheduler": scheduler, "threads": torch.get_num_threads(), "log": bool(log.handlers)}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ear.serving", str(from_parent), str(to_parent), json.dumps(settings)],
            pass_fds=(from_parent, to_parent), env=env)
        os.close(from_parent)
        os.close(to_parent)
        self._out = Connection(to_worker, readable=False)
        self._in = Connection(from_worker, writable=False)
        self._send_lock = threading.Lock()
        self._models: weakref.WeakKeyDictionary[EAR, int] = weakref.WeakKeyDictionary()
        self._activations: weakref.WeakKeyDictionary[Activation, int] = weakref.WeakKeyDictionary()
        self._requests: dict[int, _Request] = {}
        self._numbers = itertools.count()
        # finished batches while a request still holds one of their states (their decoded pixels)
        self._batches: weakref.WeakValueDictionary[int, SharedDecode] = weakref.WeakValueDictionary()
        # cancels and model drops, sent by whoever holds the send lock next: they come from
        # generator and weakref finalizers, which may run in a thread that holds it already
        self._notices: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.alive = True
        threading.Thread(target=self._receive, name="ear-serving-receiver", daemon=True).start()

    def submit(self, request: _Request) -> int:
        number = next(self._numbers)
        self._requests[number] = request
        try:
            with self._send_lock:
                self._flush()
                model = self._models.get(request.model)
                if model is None:
                    model = self._models[request.model] = next(self._numbers)
                    weakref.finalize(request.model, self._notices.put, ("drop", model))
                    weights = io.BytesIO()
                    torch.save(request.model.state_dict(), weights)
                    self._send(("model", model, asdict(request.model.config), weights.getvalue()))
                self._send(("sample", number, model, request.class_ids.numpy(), request.params,
                            request.seed, None if request.known is None else request.known.numpy(),
                            request.schedule, request.refine_threshold, self._activation(request, model)))
        except BaseException:
            self._requests.pop(number, None)
            raise
        if not self.alive:  # died before this request was counted among those to fail
            request.out.put(_Failed(RuntimeError("the serving process stopped")))
        return number

    def _activation(self, request: _Request, model: int) -> tuple | None:
        """How the worker finds the request's activated FFNs: (activation number, tau, dense lead,
        mode, capacity); the activation itself is sent once (as safetensors bytes). With the send
        lock held."""
        ffn = request.activation
        if ffn is None:
            return None
        number = self._activations.get(ffn.activation)
        if number is None:
            number = self._activations[ffn.activation] = next(self._numbers)
            weakref.finalize(ffn.activation, self._notices.put, ("drop activation", number))
            tensors, metadata = ffn.activation.tensors()
            self._send(("activation", number, model, metadata, save_tensors(tensors)))
        return number, ffn.tau, ffn.lead, ffn.mode, ffn.capacity

    def finished(self, number: int) -> None:
        """The request ended (done, failed or stopped): its rows leave the worker's batches."""
        if self._requests.pop(number, None) is not None:
            self._notices.put(("cancel", number))
            if self._send_lock.acquire(blocking=False):  # else the next to take the lock sends it
                try:
                    self._flush()
                finally:
                    self._send_lock.release()

    def _flush(self) -> None:
        """Send the waiting cancels and drops (with the send lock held)."""
        while not self._notices.empty():
            self._send(self._notices.get())

    def _send(self, message: tuple) -> None:
        try:
            self._out.send(message)
        except OSError:  # the worker is gone (or stopped); `_receive` fails its requests
            self.alive = False

    def _receive(self) -> None:
        try:
            while True:
                self._deliver(*self._in.recv())  # (a method: no request stays referenced here)
        except BaseException as err:  # the worker ended (EOF), or this thread failed: fail them all
            if not isinstance(err, EOFError | OSError):
                log.exception("the serving process's states could not be read")
            self.alive = False
            for request in list(self._requests.values()):
                request.out.put(_Failed(RuntimeError("the serving process stopped")))
            self.stop()

    def _deliver(self, kind: str, number: int, payload: Any) -> None:
        request = self._requests.get(number)
        if request is None:  # stopped meanwhile
            return
        if kind == "failed":
            request.out.put(_Failed(RuntimeError(payload)))
        else:
            request.out.put([self._state(*packed) for packed in payload])

    def _state(self, fields: tuple, batch: tuple | None) -> ServedState:
        step, num_steps, *grids, elapsed, corrected, ffn_active, batch_rows, in_flight, requests = fields
        state = ServedState(step, num_steps, *(torch.from_numpy(a) for a in grids), elapsed,
                            None if corrected is None else torch.from_numpy(corrected),
                            ffn_active=ffn_active, batch_rows=batch_rows, rows_in_flight=in_flight,
                            requests_in_flight=requests)
        if batch is not None:  # the finished step: one decode for the whole batch, as in-process
            key, tokens, start, stop = batch
            shared = self._batches.get(key)
            if shared is None:
                shared = self._batches[key] = SharedDecode(torch.from_numpy(tokens))
            state.shared, state.rows = shared, slice(start, stop)
        return state

    def stop(self) -> None:
        """Close the pipes (the worker ends when its input does) and reap the process."""
        self.alive = False
        with self._send_lock:
            self._out.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _Outbox:
    """In the worker, a request's queue of states: each bundle goes straight to the parent."""

    def __init__(self, number: int, send: Callable[[tuple], None]) -> None:
        self.number, self.send = number, send

    def put(self, bundle: list[ServedState] | _Failed) -> None:
        if isinstance(bundle, _Failed):
            self.send(("failed", self.number, str(bundle.error)))
            return
        self.send(("states", self.number, [_packed(state) for state in bundle]))


def _packed(state: ServedState) -> tuple[tuple, tuple | None]:
    fields = (state.step, state.num_steps, state.tokens.numpy(), state.known.numpy(), state.new.numpy(),
              state.elapsed, None if state.corrected is None else state.corrected.numpy(),
              state.ffn_active, state.batch_rows, state.rows_in_flight, state.requests_in_flight)
    batch = None
    if state.shared is not None and state.rows is not None:
        batch = (state.shared.number, state.shared.tokens.numpy(), state.rows.start, state.rows.stop)
    return fields, batch


def _worker_main(read_fd: int, write_fd: int, settings: dict[str, Any]) -> None:
    """The worker process: a `Scheduler` fed by the parent's messages until its pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's: this ends with its pipe
    torch.set_num_threads(settings["threads"])
    if settings["log"]:
        log_batches()
    incoming, outgoing = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        # the server gone: nobody to tell, and this process ends with its pipe
        with send_lock, contextlib.suppress(OSError):
            outgoing.send(message)

    scheduler = Scheduler(**settings["scheduler"])
    models: dict[int, EAR] = {}
    activations: dict[int, Activation] = {}
    routed: dict[tuple, RoutedFFN] = {}  # one per (activation, tau, ...): rows that match share a batch
    requests: dict[int, _Request] = {}
    while True:
        try:
            message = incoming.recv()
        except EOFError:
            break
        kind, number, *rest = message
        if kind == "model":
            config, weights = rest
            state = torch.load(io.BytesIO(weights), weights_only=True)
            model = EAR(EARConfig(**config))
            model.load_weights(state)
            models[number] = model.to(next(iter(state.values())).dtype).eval()
        elif kind == "activation":
            model_number, metadata, tensors = rest
            activations[number] = Activation.from_tensors(models[model_number], load_tensors(tensors),
                                                          metadata)
        elif kind == "sample":
            model_number, class_ids, params, seed, known, schedule, threshold, activated = rest
            try:
                ffn = None
                if activated is not None:
                    if activated not in routed:
                        at, tau, lead, mode, capacity = activated
                        routed[activated] = RoutedFFN(activations[at], tau, mode, capacity, lead)
                    ffn = routed[activated]
                request = _Request(models[model_number], torch.from_numpy(class_ids), params, seed,
                                   None if known is None else torch.from_numpy(known), schedule,
                                   threshold, ffn)
                request.out = _Outbox(number, send)
                scheduler._submit(request)
            except Exception as err:  # a bug, not the input (checked in the parent): this request fails
                log.exception("request %d could not be queued", number)
                send(("failed", number, f"{type(err).__name__}: {err}"))
                continue
            requests[number] = request
        elif kind == "cancel" and number in requests:
            scheduler._cancel(requests.pop(number))
        elif kind == "drop":
            models.pop(number, None)
        elif kind == "drop activation":
            activations.pop(number, None)
            for key in [k for k in routed if k[0] == number]:
                del routed[key]
    scheduler.close()


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]))
