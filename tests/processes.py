"""Waiting on real processes in tests: generous bounds and the processes' own logs
when a bound runs out, so a slow machine makes a test slower, never wrong, and a
failure says what the processes said."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

WAIT_S = 90.0


def wait_for(what: str, check: Callable[[], object], logs: Path, bound_s: float = WAIT_S) -> object:
    """Poll ``check`` until it returns something true; on timeout, fail with the tail of
    every ``*.log`` under ``logs``."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.log")))
    pytest.fail(f"timed out waiting for {what}\n{tails}")
