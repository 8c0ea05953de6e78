"""The batching scheduler: a request's tokens do not depend on who shares its batch, kinds that
cannot share a forward get batches of their own, Stop and slow consumers affect only themselves."""

from __future__ import annotations

import gc
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from ear import serving
from ear.activate import Activation, ActivationConfig
from ear.engine import MAX_IDLE_SLOTS, runner_for
from ear.order import make_schedule
from ear.pipeline import EARPipeline
from ear.routed import RoutedFFN
from ear.sampler import generate, sample
from ear.serving import Scheduler, ServedState
from tests.helpers import noisy_model, same_picture, write_tiny_model

TIMEOUT_S = 60


@pytest.fixture
def model():
    return noisy_model()


@pytest.fixture
def make_scheduler() -> Iterator[Callable[..., Scheduler]]:
    made: list[Scheduler] = []

    def make(**kwargs: Any) -> Scheduler:
        made.append(Scheduler(**kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def make_process_scheduler() -> Iterator[Callable[..., serving.ProcessScheduler]]:
    made: list[serving.ProcessScheduler] = []

    def make(**kwargs: Any) -> serving.ProcessScheduler:
        made.append(serving.ProcessScheduler(**kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


def crowd(scheduler: Scheduler, model, requests: list[dict[str, Any]]) -> list[list[ServedState]]:
    """Every request consumed to the end in its own thread, as the app's handlers do."""
    def run(request: dict[str, Any]) -> list[ServedState]:
        kwargs = dict(request)
        return list(scheduler.sample(model, kwargs.pop("class_ids"), **kwargs))

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(run, requests, timeout=TIMEOUT_S))


REQUESTS = [  # different settings each, all guided: one batch
    {"class_ids": [1, 1], "seed": 7, "cfg_scale": 1.5, "temperature": 1.0, "top_k": 20, "top_p": 1.0},
    {"class_ids": [4], "seed": 7, "cfg_scale": 3.0, "temperature": 0.7, "top_k": 0, "top_p": 0.8},
    {"class_ids": [2, 3, 9], "seed": 123, "cfg_scale": 0.5, "temperature": 1.3, "top_k": 5, "top_p": 0.9},
    {"class_ids": [0], "seed": 7, "cfg_scale": 2.0, "greedy": True},
]


def alone(model, request: dict[str, Any]) -> torch.Tensor:
    kwargs = dict(request)
    return generate(model, kwargs.pop("class_ids"), **kwargs)


def test_served_in_a_crowd_equals_served_alone(model, make_scheduler):
    rows = sum(len(r["class_ids"]) for r in REQUESTS)
    # everyone in one batch: it starts when full (the gather window is far longer than the test)
    scheduler = make_scheduler(max_rows=rows, gather_s=TIMEOUT_S)
    results = crowd(scheduler, model, REQUESTS)
    for request, states in zip(REQUESTS, results, strict=True):
        n = len(request["class_ids"])
        assert [s.step for s in states] == list(range(1, model.schedule.num_steps + 1))
        assert all(s.tokens.shape == (n, 8, 8) and s.batch_rows == rows for s in states)
        assert states[-1].done
        assert torch.equal(states[-1].tokens, alone(model, request)), request
    assert scheduler.stats().batches_started == 1


def test_kinds_that_cannot_share_a_forward_get_their_own_batches(model, make_scheduler):
    """Guidance on/off, another schedule and a prefix each make a batch of their own; all run side
    by side and each still equals the request served alone."""
    prefix = generate(model, [5], seed=1)[0].flatten()[list(model.schedule.order)][:9]
    requests = [
        {"class_ids": [1], "seed": 3, "cfg_scale": 2.0},
        {"class_ids": [1], "seed": 3, "cfg_scale": 1.0},
        {"class_ids": [1], "seed": 3, "cfg_scale": 2.0, "schedule": make_schedule("raster", 8)},
        {"class_ids": [1], "seed": 3, "cfg_scale": 2.0, "prefix": prefix},
    ]
    scheduler = make_scheduler(max_rows=8)
    results = crowd(scheduler, model, requests)
    for request, states in zip(requests, results, strict=True):
        assert all(s.batch_rows == 1 for s in states)
        assert torch.equal(states[-1].tokens, alone(model, request))
    assert scheduler.stats().batches_started == 4


def test_requests_wait_for_the_next_batch_within_max_rows(model, make_scheduler):
    """max_rows bounds the rows in flight; a request bigger than that runs alone; first come,
    first served."""
    scheduler = make_scheduler(max_rows=3)
    requests = [{"class_ids": [i] * n, "seed": i, "cfg_scale": 1.5} for i, n in enumerate([2, 2, 1, 4, 1])]
    results = crowd(scheduler, model, requests)
    for request, states in zip(requests, results, strict=True):
        n = len(request["class_ids"])
        assert all(s.rows_in_flight <= max(3, n) and s.batch_rows >= n for s in states)
        assert torch.equal(states[-1].tokens, alone(model, request))
    assert scheduler.stats() == serving.SchedulerStats(0, 0, 0, scheduler.stats().batches_started)


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "the scheduler did not get there in time"
        time.sleep(0.01)


@pytest.mark.parametrize("where", ["thread", "process"])
def test_stop_drops_only_its_own_rows(model, make_scheduler, make_process_scheduler, where):
    make = make_scheduler if where == "thread" else make_process_scheduler
    scheduler = make(max_rows=3, gather_s=TIMEOUT_S)
    stopped = scheduler.sample(model, [2, 2], seed=5, cfg_scale=1.5)
    kept = scheduler.sample(model, [6], seed=9, cfg_scale=1.5)
    with ThreadPoolExecutor(1) as pool:
        first_kept = pool.submit(next, kept)
        assert next(stopped).batch_rows == 3  # both in one batch
        stopped.close()  # Stop
        states = [first_kept.result(TIMEOUT_S), *kept]
    assert states[-1].done and all(s.batch_rows == 3 for s in states)
    assert states[-1].rows_in_flight == 1  # the stopped rows are no longer counted
    assert states[-1].requests_in_flight == 1 and states[0].requests_in_flight == 2
    assert torch.equal(states[-1].tokens, generate(model, [6], seed=9, cfg_scale=1.5))
    with pytest.raises(ValueError, match="class"):  # checked here, before anything is queued
        scheduler.sample(model, [99])


def test_idle_caches_of_many_batch_sizes_are_not_all_kept(model, make_scheduler):
    scheduler = make_scheduler()
    for rows in range(1, 9):  # a CPU sizes every batch exactly: eight sizes, eight caches
        list(scheduler.sample(model, [1] * rows, seed=rows, cfg_scale=1.5))
    wait_until(lambda: scheduler.stats().batches_running == 0)
    assert runner_for(model).cached_slots() <= MAX_IDLE_SLOTS  # the engine's own bound


def test_a_batch_nobody_listens_to_ends_early(model, make_scheduler):
    scheduler = make_scheduler()
    states = scheduler.sample(model, [1, 2], seed=0, cfg_scale=1.5)
    assert next(states).step == 1
    states.close()
    wait_until(lambda: scheduler.stats().batches_running == 0)
    assert scheduler.stats().rows_in_flight == 0


def test_a_consumer_that_never_reads_holds_back_nobody(model, make_scheduler):
    scheduler = make_scheduler(max_rows=2, gather_s=TIMEOUT_S)
    slow = scheduler.sample(model, [3], seed=1, cfg_scale=1.5)
    fast = scheduler.sample(model, [4], seed=2, cfg_scale=1.5)
    started = threading.Event()

    def read_one() -> None:
        next(slow)
        started.set()  # ... and then reads nothing more

    reader = threading.Thread(target=read_one, daemon=True)
    reader.start()
    final = list(fast)[-1]  # would hang if the batch waited for `slow`
    assert final.done and started.wait(TIMEOUT_S)
    wait_until(lambda: scheduler.stats().batches_running == 0)
    rest = list(slow)  # everything was queued for it meanwhile
    assert rest[-1].done and len(rest) == model.schedule.num_steps - 1
    slow.close()


def test_bad_arguments_are_refused_before_anything_is_queued(model, make_scheduler):
    scheduler = make_scheduler()
    for kwargs in ({"class_ids": [11]}, {"class_ids": [1], "cfg_scale": -1.0},
                   {"class_ids": [1], "top_p": 0.0}, {"class_ids": [1], "seed": -3},
                   {"class_ids": [1], "prefix": torch.zeros(64, dtype=torch.long)},
                   {"class_ids": [1], "schedule": make_schedule("arms", 6)}):
        with pytest.raises(ValueError):
            scheduler.sample(model, kwargs.pop("class_ids"), **kwargs)
    assert scheduler.stats().requests_waiting == 0
    with pytest.raises(ValueError, match="max_rows"):
        Scheduler(max_rows=0)
    with pytest.raises(ValueError, match="overlap"):
        Scheduler(overlap=0)


def test_a_failed_batch_fails_its_requests_and_the_scheduler_carries_on(model, make_scheduler, monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> Iterator[Any]:
        raise RuntimeError("out of memory")
        yield  # a generator, like the sampler

    scheduler = make_scheduler()
    monkeypatch.setattr(serving, "sample", broken)
    with pytest.raises(RuntimeError, match="generation failed: out of memory"):
        list(scheduler.sample(model, [1], seed=0))
    monkeypatch.setattr(serving, "sample", sample)
    assert list(scheduler.sample(model, [1], seed=0))[-1].done


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setenv("EAR_BATCHING", "0")
    assert not serving.batching_enabled() and serving.from_environment() is None
    monkeypatch.delenv("EAR_BATCHING")
    assert serving.batching_enabled()
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")  # every call in a GPU process of its own
    assert not serving.batching_enabled()
    monkeypatch.delenv("SPACES_ZERO_GPU")
    monkeypatch.setenv("EAR_MAX_BATCH", "24")
    scheduler = serving.from_environment()
    assert isinstance(scheduler, serving.ProcessScheduler) and scheduler.max_rows == 24
    scheduler.close()
    monkeypatch.setenv("EAR_SERVING_PROCESS", "0")  # the scheduler's thread in the server's process
    scheduler = serving.from_environment()
    assert isinstance(scheduler, Scheduler) and scheduler.max_rows == 24
    scheduler.close()
    monkeypatch.setenv("EAR_MAX_BATCH", "lots")
    with pytest.raises(ValueError, match="EAR_MAX_BATCH"):
        serving.max_rows_setting()


def test_a_pipeline_served_by_a_scheduler_streams_the_same_pictures(tmp_path, make_scheduler):
    pipe = EARPipeline.from_pretrained(str(write_tiny_model(tmp_path / "model")))
    direct = list(pipe.stream(["cat", "dog"], seed=np.int64(4)))
    assert serving.attach(pipe, None).sampler is sample
    serving.attach(pipe, make_scheduler())
    served = list(pipe.stream(["cat", "dog"], seed=np.int64(4)))
    assert [f.state.step for f in served] == [f.state.step for f in direct]
    assert torch.equal(served[-1].state.tokens, direct[-1].state.tokens)
    assert served[-1].caption == f"{direct[-1].caption.rsplit(' · ', 1)[0]} · " \
        f"{served[-1].state.elapsed:.2f} s"  # alone: nothing said about sharing
    assert direct[0].sharing == 1 and served[0].sharing == 1  # one request (of two rows) alone
    extended = list(pipe.extend(served[-1].images[0], keep=4, class_id="cat", seed=1))
    assert extended[-1].state.done and extended[0].state.step > 1  # the prefix, then the rest


@pytest.mark.parametrize(("requests", "said"), [(1, ""), (2, " · shared with 1 other visitor"),
                                                (4, " · shared with 3 other visitors")])
def test_captions_say_in_words_when_others_share_the_batch(tmp_path, requests, said):
    pipe = EARPipeline.from_pretrained(str(write_tiny_model(tmp_path / "model")))
    g = pipe.grid
    known = torch.zeros(g, g, dtype=torch.bool)
    known[0, :3] = True
    state = ServedState(2, 9, torch.zeros(1, g, g, dtype=torch.long), known, known, 0.5,
                        batch_rows=6, rows_in_flight=6, requests_in_flight=requests)
    frame = next(pipe._frames(iter([state]), pipe.renderer()))
    assert frame.caption == f"step 2 / 9 · 3 / {g * g} tokens · 0.50 s{said}"
    assert frame.sharing == requests


def test_a_finished_batch_is_decoded_once_for_all_its_requests(tmp_path, make_scheduler, monkeypatch):
    pipe = EARPipeline.from_pretrained(str(write_tiny_model(tmp_path / "model")))
    alone = [pipe.generate("cat", seed=s)[0] for s in (1, 2)]
    serving.attach(pipe, make_scheduler(max_rows=2, gather_s=TIMEOUT_S))  # one batch once both are in
    calls = []
    decode = type(pipe.tokenizer).decode
    monkeypatch.setattr(type(pipe.tokenizer), "decode",
                        lambda self, tokens: calls.append(tokens.shape[0]) or decode(self, tokens))

    def finals(seed: int) -> list:
        *_, last = pipe.stream(["cat"], seed=seed)
        return last.images

    with ThreadPoolExecutor(2) as pool:
        pictures = list(pool.map(finals, (1, 2), timeout=TIMEOUT_S))
    assert calls == [2]  # one decode of both rows, not one per request
    for (served,), own in zip(pictures, alone, strict=True):
        assert same_picture(served, own)  # decoded in a batch of 2, then alone


def test_a_worker_process_serves_a_crowd_the_tokens_each_gets_alone(model, make_process_scheduler):
    rows = sum(len(r["class_ids"]) for r in REQUESTS)
    scheduler = make_process_scheduler(max_rows=rows, gather_s=TIMEOUT_S)  # one batch once all are in
    results = crowd(scheduler, model, REQUESTS)
    for request, states in zip(REQUESTS, results, strict=True):
        assert [s.step for s in states] == list(range(1, model.schedule.num_steps + 1))
        assert all(s.batch_rows == rows and s.requests_in_flight == len(REQUESTS) for s in states)
        assert torch.equal(states[-1].tokens, alone(model, request)), request
        assert states[-1].shared is not None and states[-1].shared is results[0][-1].shared  # one decode


def test_a_dead_worker_fails_its_requests_and_the_next_request_starts_another(model, make_process_scheduler):
    scheduler = make_process_scheduler()
    running = scheduler.sample(model, [1], seed=3)
    next(running)
    scheduler._worker.process.kill()
    with pytest.raises(RuntimeError, match="the serving process stopped"):
        list(running)
    assert torch.equal(list(scheduler.sample(model, [1], seed=3))[-1].tokens, generate(model, [1], seed=3))
    for seed in range(8):  # batch after batch, each finished step shares its own batch's tokens
        last = list(scheduler.sample(model, [1, 2], seed=seed))[-1]
        assert torch.equal(last.shared.tokens[last.rows], last.tokens)
    gone = noisy_model(seed=1)
    list(scheduler.sample(gone, [2], seed=3))
    del gone  # the worker forgets a model the server has let go, on the next request
    gc.collect()
    assert scheduler._worker._notices.get_nowait()[0] == "drop"


def test_a_scheduler_let_go_of_stops_its_worker(model):
    scheduler = serving.ProcessScheduler()
    list(scheduler.sample(model, [1], seed=3))
    process = scheduler._worker.process
    del scheduler
    gc.collect()
    assert process.wait(timeout=TIMEOUT_S) is not None


def test_models_off_the_cpu_are_served_in_this_process(model, make_process_scheduler, monkeypatch):
    scheduler = make_process_scheduler()
    monkeypatch.setattr(scheduler._local, "_follow", lambda request: ("in this process", request.seed))
    monkeypatch.setattr(serving, "_on_cpu", lambda model: False)  # as for a model on a GPU
    assert scheduler.sample(model, [1], seed=3) == ("in this process", 3)
    assert scheduler._worker is None  # no worker started for it


def drain(request: serving._Request) -> list[ServedState]:
    states = []
    while not request.out.empty():
        states.extend(request.out.get())  # bundles of states (see serving.HANDOVER_S)
    return states


def request(model, ids: list[int], seed: int) -> serving._Request:
    return serving._Request(model, torch.tensor(ids), serving.SamplingParams(cfg_scale=1.5), seed,
                            None, model.schedule)


@pytest.mark.parametrize(("done", "overlap", "placed"),
                         [(3, 2, "joins"), (4, 2, "own batch"), (4, 1, "waits"), (3, 1, "joins")])
def test_where_a_newcomer_goes(model, done, overlap, placed):
    """join_share 0.25 of 15 steps: a batch 3 steps in takes newcomers, one 4 steps in does not;
    then a second batch of the kind starts at once if `overlap` allows, else the newcomer waits."""
    scheduler = Scheduler(max_rows=8, join_share=0.25, overlap=overlap)
    running = serving._Batch(1, [request(model, [1], 0)])
    running.produced = done
    newcomer = request(model, [2], 1)
    scheduler._running.append(running)
    scheduler._waiting.append(newcomer)
    ready, _ = scheduler._admit(time.perf_counter())
    expected = {"joins": [(running, [newcomer])], "own batch": [(None, [newcomer])], "waits": []}[placed]
    assert ready == expected
    running.close()


def test_a_late_request_joins_by_replaying_and_nobody_gets_a_step_twice(model):
    """The replay hands the first request only steps it has not had, with the same tokens."""
    early, late = request(model, [1, 2], 5), request(model, [3], 6)
    batch = serving._Batch(1, [early])
    for _ in range(3):
        assert batch.advance(rows_in_flight=2, requests_in_flight=1)
    batch = batch.joined_by([late])
    while batch.advance(rows_in_flight=3, requests_in_flight=2):
        pass
    steps = model.schedule.num_steps
    for r, ids, seed, rows in ((early, [1, 2], 5, [2] * 3 + [3] * (steps - 3)), (late, [3], 6, [3] * steps)):
        states = drain(r)
        assert [s.step for s in states] == list(range(1, steps + 1))
        assert [s.batch_rows for s in states] == rows
        assert [s.requests_in_flight for s in states] == [1 if r == 2 else 2 for r in rows]
        assert torch.equal(states[-1].tokens, generate(model, ids, seed=seed, cfg_scale=1.5))
        assert all(b.elapsed >= a.elapsed for a, b in itertools.pairwise(states))


@pytest.mark.parametrize(("join_share", "overlap"), [(0.0, 1), (1.0, 1), (0.0, 2), (0.25, 2)])
def test_requests_arriving_during_a_batch_all_get_their_own_steps(model, make_scheduler, join_share,
                                                                  overlap):
    """Whether they join the running batch, start another or wait: every step once, in order,
    tokens as if alone."""
    scheduler = make_scheduler(max_rows=16, join_share=join_share, overlap=overlap)
    requests = [{"class_ids": [i] * (1 + i % 3), "seed": i, "cfg_scale": 1.5} for i in range(8)]

    def staggered(i: int) -> list[ServedState]:
        time.sleep(0.002 * i)
        kwargs = dict(requests[i])
        return list(scheduler.sample(model, kwargs.pop("class_ids"), **kwargs))

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(staggered, range(len(requests)), timeout=TIMEOUT_S))
    for request, states in zip(requests, results, strict=True):
        assert [s.step for s in states] == list(range(1, model.schedule.num_steps + 1))
        assert torch.equal(states[-1].tokens, alone(model, request))


@pytest.mark.parametrize("where", ["thread", "process"])
def test_refined_and_activated_requests_share_batches_of_their_kind(make_scheduler, make_process_scheduler,
                                                                    where):
    """Refined rows (RadAR) share a forward with refined rows at the same threshold, activated rows
    (ActVAR) with rows of the same activation at the same tau; each request still gets the tokens
    and the corrected cells it gets alone."""
    model = noisy_model(correction=True, schedule="radar")
    ffn = RoutedFFN(Activation(model, ActivationConfig(experts=4, router_hidden=16, tau=0.5)))
    hot = {"temperature": 3.0}  # a ring's draws disagree: corrections happen
    requests = [
        {"class_ids": [1, 2], "seed": 3, "refine": True, **hot},
        {"class_ids": [4], "seed": 5, "refine": True, **hot},  # with the one before
        {"class_ids": [4], "seed": 5, "refine": True, "refine_threshold": 0.3, **hot},
        {"class_ids": [6], "seed": 1, "activation": ffn, **hot},
        {"class_ids": [7, 8], "seed": 2, "activation": ffn, **hot},  # with the one before
        {"class_ids": [7], "seed": 2, "activation": ffn.at(0.2), **hot},
        {"class_ids": [7], "seed": 2, **hot},
    ]
    shared_rows = [3, 3, 1, 3, 3, 1, 1]
    made = make_scheduler if where == "thread" else make_process_scheduler
    scheduler = made(max_rows=sum(len(r["class_ids"]) for r in requests), gather_s=1.0)
    results = crowd(scheduler, model, requests)
    for request, states, rows in zip(requests, results, shared_rows, strict=True):
        kwargs = dict(request)
        own = list(sample(model, kwargs.pop("class_ids"), **kwargs))[-1]
        assert all(s.batch_rows == rows for s in states), (request, [s.batch_rows for s in states])
        assert torch.equal(states[-1].tokens, own.tokens), request
        if request.get("refine"):
            assert torch.equal(states[-1].corrected, own.corrected), request
        else:
            assert states[-1].corrected is None
        assert (states[-1].ffn_active < 1) == ("activation" in request)
    assert any(states[-1].corrected.any() for states in results[:3])


def test_refinement_and_activation_are_checked_before_anything_is_queued(model, make_scheduler):
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="correction objective"):
        scheduler.sample(model, [1], refine=True)
    with pytest.raises(ValueError, match="threshold must be a probability"):
        scheduler.sample(noisy_model(correction=True), [1], refine=True, refine_threshold=1.5)
    with pytest.raises(ValueError, match="RoutedFFN"):
        scheduler.sample(model, [1], activation=0.5)
    assert scheduler.stats().requests_waiting == 0 and scheduler.stats().batches_started == 0
