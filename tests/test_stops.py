"""ear.stops: a Stop ends a run between two updates, as a normal end, and waits for it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from ear.stops import RunStopped, Stops


def _updates(log: list[str], ready: threading.Event, release: threading.Event) -> Iterator[int]:
    try:
        yield 1
        ready.set()
        release.wait(5)  # a sampling step in progress when Stop is pressed
        log.append("step computed")
        yield 2
        log.append("asked for more")
        yield 3
    finally:
        log.append("closed")


def test_stop_ends_the_run_at_its_next_update_and_waits_for_it() -> None:
    stops, log, ready, release = Stops(), [], threading.Event(), threading.Event()
    run = stops.follow(("session", "gen"), _updates(log, ready, release))
    got: list[int] = []
    consumer = threading.Thread(target=lambda: got.extend(run))
    consumer.start()
    assert ready.wait(5)
    answers: list[bool] = []
    stopper = threading.Thread(target=lambda: answers.append(stops.stop(("session", "gen"))))
    stopper.start()
    time.sleep(0.1)
    assert not answers  # still waiting: the step in progress has not ended yet
    release.set()
    stopper.join(5)
    consumer.join(5)
    assert answers == [True]
    assert got == [1]  # the update computed after the Stop is dropped, nothing more is asked for
    assert log == ["step computed", "closed"]
    assert stops.stop(("session", "gen")) is True  # nothing running any more: returns at once


def test_stop_touches_only_its_own_key_and_reports_a_run_busy_past_the_wait() -> None:
    stops, log, ready, release = Stops(), [], threading.Event(), threading.Event()
    other = stops.follow(("session", "cmp"), iter([7, 8]))
    run = stops.follow(("session", "gen"), _updates(log, ready, release))
    assert next(run) == 1 and next(other) == 7
    consumer = threading.Thread(target=lambda: list(run))
    consumer.start()
    assert ready.wait(5)
    assert stops.stop(("session", "gen"), wait_s=0.05) is False  # busy in its step
    release.set()
    consumer.join(5)
    assert list(other) == [8]  # the other tab's run went on
    assert "asked for more" not in log and log[-1] == "closed"


def test_a_run_without_a_session_runs_to_the_end() -> None:
    stops = Stops()
    assert list(stops.follow(None, iter([1, 2, 3]))) == [1, 2, 3]


def test_a_run_that_catches_the_stop_winds_up_with_what_it_got_to() -> None:
    """The stop is thrown into the run where it was found; its wind-up updates still arrive."""
    def run() -> Iterator[str]:
        got = 0
        try:
            for got in range(1, 10):
                yield f"step {got}"
        except RunStopped:
            yield f"stopped at step {got}"
            yield "animation written"

    stops = Stops()
    updates = stops.follow(("session", "gen"), run())
    assert next(updates) == "step 1" and next(updates) == "step 2"
    threading.Thread(target=stops.stop, args=(("session", "gen"),)).start()
    time.sleep(0.05)
    assert list(updates) == ["stopped at step 2", "animation written"]  # "step 3" was dropped
