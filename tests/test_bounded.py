"""Bounded calls: a caller never waits past its deadline, overlapping callers share one
call, and a hung call holds no scheduler thread and no exit."""

from __future__ import annotations

import threading
import time

import pytest

from wattkeeper.bounded import Hung, SingleFlight, call_within, spawn


def test_overlapping_callers_share_the_call_in_flight() -> None:
    flight = SingleFlight("t")
    calls = []
    gate = threading.Event()

    def slow() -> int:
        calls.append(1)
        gate.wait(10)
        return 42

    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(flight.call(slow, 30.0))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(10)
    assert results == [42, 42, 42] and len(calls) == 1


def test_a_hung_call_fails_its_callers_at_their_deadline_then_at_once() -> None:
    flight = SingleFlight("t")
    release = threading.Event()
    with pytest.raises(Hung, match="no answer within"):
        flight.call(lambda: release.wait(30), 0.2)
    with pytest.raises(Hung, match="has not returned"):
        flight.call(lambda: 1, 0.1)  # the hung one is still in flight: no second call
    release.set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        # Just after the release a caller may still share the old call's result.
        if flight.call(lambda: 7, 5.0) == 7:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the flight never recovered")


def test_call_within_and_spawn_run_on_daemon_threads() -> None:
    assert call_within(lambda: "ok", 5.0, "t") == "ok"
    with pytest.raises(ZeroDivisionError):
        call_within(lambda: 1 / 0, 5.0, "t")
    seen: list[bool] = []
    spawn(lambda: seen.append(threading.current_thread().daemon), "t").result(5)
    assert seen == [True]
