"""Calls that may hang (a database stopped with SIGSTOP answers nothing, and no client
timeout fires: the kernel still acknowledges every packet), run so the caller never waits
longer than it chose.

Each call runs on a daemon thread of its own. A pool's worker threads are joined when
the interpreter exits, so one call stuck on a frozen database would keep a stopping
daemon from exiting after it has restored its GPUs; a daemon thread does not."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

T = TypeVar("T")


class Hung(Exception):
    """The call did not return in time."""


def spawn(fn: Callable[[], T], name: str) -> Future[T]:
    """Run ``fn`` on a new daemon thread; its outcome in the returned future."""
    future: Future[T] = Future()

    def body() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=body, name=name, daemon=True).start()
    return future


def call_within(fn: Callable[[], T], timeout_s: float, name: str) -> T:
    """``fn()``, or ``Hung`` after ``timeout_s`` (the call itself goes on, detached)."""
    try:
        return spawn(fn, name).result(timeout=timeout_s)
    except FutureTimeout:
        raise Hung(f"{name}: no answer within {timeout_s:g} s") from None


class SingleFlight:
    """One call at a time: a caller that finds a call in flight waits for it (up to its
    own deadline) and shares its result. A call in flight longer than the deadline is
    taken as hung, and callers fail at once until it returns, so hung calls never pile
    up threads or connections."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._running: tuple[Future[Any], float] | None = None

    def call(self, fn: Callable[[], T], timeout_s: float) -> T:
        with self._lock:
            running = self._running
            if running is None or running[0].done():
                running = (spawn(fn, self._name), time.monotonic())
                self._running = running
        future, started = running
        left = timeout_s - (time.monotonic() - started)
        if left <= 0:
            raise Hung(f"{self._name}: the call in flight has not returned for {timeout_s:g} s")
        try:
            return future.result(timeout=left)
        except FutureTimeout:
            raise Hung(f"{self._name}: no answer within {timeout_s:g} s") from None
