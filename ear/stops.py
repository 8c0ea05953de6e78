"""Stop buttons that end a run between two updates, so the run finishes as a normal one.

Why not only Gradio's `cancels=`: Gradio 6.31 answers a cancel of a running event with an empty
"process_completed" message; the page cannot read it (no data), marks the event as failed and
shows the red "Error" badge on its progress component whenever that message is handled after the
Stop's own "complete" status. That is a race between the server's event stream and the page's
/cancel and /reset requests, lost more often while the server is busy (the batching worker
finishing its step). A run that stops itself sends an ordinary final message instead, and the
cancel that follows (for a run still queued, or one that did not stop in time) finds nothing
running to report on.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from typing import TypeVar

T = TypeVar("T")

STOP_WAIT_S = 5.0  # a run notices a Stop at its next update: one sampling step, or writing the animation


class RunStopped(Exception):
    """Thrown into a run at the update where Stop found it: the run may catch it and yield its
    last updates (what it got to), then end."""


class _Run:
    def __init__(self) -> None:
        self.stop, self.ended = threading.Event(), threading.Event()


class Stops:
    """Runs that a Stop button may end, by key (the visitor's session and the tab); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[Hashable, _Run] = {}

    def follow(self, key: Hashable | None, updates: Iterator[T]) -> Iterator[T]:
        """`updates` until `stop(key)` is called: then the update being computed is dropped,
        `RunStopped` is thrown into `updates` (a generator) at that point, and whatever it yields
        while winding up follows; then it is closed. A None key cannot be stopped."""
        run = _Run()
        if key is not None:
            with self._lock:
                self._runs[key] = run
        try:
            for update in updates:
                if run.stop.is_set():
                    break
                yield update
                if run.stop.is_set():
                    break
            else:
                return
            yield from _wound_up(updates)
        finally:
            close = getattr(updates, "close", None)
            if close is not None:
                close()
            with self._lock:
                if self._runs.get(key) is run:
                    del self._runs[key]
            run.ended.set()

    def stop(self, key: Hashable, wait_s: float = STOP_WAIT_S) -> bool:
        """Ask the run under `key` to end and wait until it has, `wait_s` seconds at most. True
        when it ended (or none was running); False when it is still busy."""
        with self._lock:
            run = self._runs.get(key)
        if run is None:
            return True
        run.stop.set()
        return run.ended.wait(wait_s)


def _wound_up(updates: Iterator[T]) -> Iterator[T]:
    """What a stopped run yields once told (nothing if it is not a generator or lets the stop end it)."""
    throw = getattr(updates, "throw", None)
    if throw is None:
        return
    try:
        update = throw(RunStopped())
    except (RunStopped, StopIteration):
        return
    yield update
    yield from updates
