"""Calls that may hang (a database stopped with SIGSTOP answers nothing, and no client
timeout fires: the kernel still acknowledges every packet), run so the caller never waits
longer than it chose."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

T = TypeVar("T")


class Hung(Exception):
    """The call did not return in time (or an earlier one still has not)."""


class SingleFlight:
    """One call at a time on a thread of its own. A call still running when the next is
    asked for makes that one fail at once, so hung calls never pile up threads or
    connections."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._running: Future | None = None

    def call(self, fn: Callable[[], T], timeout_s: float) -> T:
        if self._running is not None and not self._running.done():
            raise Hung(f"{self._name}: the previous call has not returned yet")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        future = self._pool.submit(fn)
        self._running = future
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            raise Hung(f"{self._name}: no answer within {timeout_s:g} s") from None
