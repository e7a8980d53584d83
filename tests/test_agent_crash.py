"""An agent killed in the middle of an actuation and started again, as real processes on
a real PostgreSQL, with GPUs that outlive the agent (a fake NVML whose limits live in a
file, as a driver's do).

The kill lands after two of four GPUs took their new caps and before the agent's next
store round trip, so the store never heard what those two GPUs had before. The
restarted agent must still bring every GPU to its target, and a clean stop afterwards
must put back the limits the GPUs had before the first run touched them, not the caps
the killed run left (which is what the restarted run sees as "current")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from processes import wait_for
from sqlalchemy import text

from wattkeeper.store.db import make_engine, upgrade

pytestmark = pytest.mark.postgres

DRIVER = Path(__file__).resolve().parent / "fixtures" / "fake_nvml_wattkeeper.py"
ENV = {
    "WATTKEEPER_AGENT__INTERVAL_S": "0.5",
    "WATTKEEPER_CONTROLLER__INTERVAL_S": "1",
    "WATTKEEPER_CONTROLLER__LEASE_S": "20",
    "WATTKEEPER_CONTROLLER__STALE_AFTER_S": "5",
    "WATTKEEPER_CONTROLLER__LEADER_LEASE_S": "3",
}
ORIGINAL_MW = 700_000


def test_agent_killed_mid_actuation_restarts_onto_its_targets_and_restores_the_originals(
    pg_url: str, tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    upgrade(make_engine(pg_url))
    engine = make_engine(pg_url)
    gpus_file = tmp_path / "gpus.json"
    state = tmp_path / "state"
    env = {**os.environ, **ENV, "WK_FAKE_GPUS": str(gpus_file), "WATTKEEPER_STATE_DIR": str(state)}

    def start(name: str, *args: str, **extra: str) -> subprocess.Popen:
        log = (tmp_path / f"{name}.log").open("a")
        p = subprocess.Popen(
            [sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env={**env, **extra}
        )
        procs.append(p)
        return p

    def agent(**extra: str) -> subprocess.Popen:
        args = ("agent", "--node", "crash-node", "--db", pg_url, "--no-metrics")
        return start("agent", str(DRIVER), *args, **extra)

    def limits_mw() -> list[int]:
        return json.loads(gpus_file.read_text())["limit_mw"] if gpus_file.exists() else []

    def targets_mw() -> dict[str, float]:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT g.uuid, t.power_limit_w FROM targets t JOIN gpus g ON g.id = t.gpu_id"
                    " ORDER BY g.index"
                )
            ).all()
        return {uuid: w for uuid, w in rows if w is not None}

    def registered() -> bool:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM gpus")).scalar() == 4

    first = agent(WK_FAKE_BLOCK_AT="2")
    wait_for("the agent to register its GPUs", registered, tmp_path)
    start("controller", "-m", "wattkeeper", "controller", "--db", pg_url, "--no-metrics")
    budget = subprocess.run(
        [sys.executable, "-m", "wattkeeper", "budget", "set", "3kW", "--db", pg_url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert budget.returncode == 0, budget.stderr

    # The first run caps two GPUs and hangs inside the second change; it is killed there.
    wait_for("the agent to hang mid-actuation", (tmp_path / "gpus.json.blocked").exists, tmp_path)
    caught = limits_mw()
    assert sorted(mw < ORIGINAL_MW for mw in caught) == [False, False, True, True], caught
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    with engine.connect() as conn:
        in_store = conn.execute(
            text("SELECT count(*) FROM gpus WHERE original_power_limit_w IS NOT NULL")
        ).scalar()
    assert in_store == 0  # the kill came before the store heard of any original

    # Started again: every GPU reaches its target.
    second = agent()

    def on_targets() -> bool:
        want = targets_mw()
        now = limits_mw()
        return len(want) == 4 and all(
            abs(mw / 1000 - w) <= 1.0 for mw, w in zip(now, want.values(), strict=True)
        )

    wait_for("every GPU at its target after the restart", on_targets, tmp_path)
    assert all(mw < ORIGINAL_MW for mw in limits_mw())

    # A clean stop puts back what the GPUs had before the first run, for all four.
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 0
    assert limits_mw() == [ORIGINAL_MW] * 4
    with engine.connect() as conn:
        restored = conn.execute(
            text("SELECT subject, detail FROM audit_log WHERE action = 'gpu.restore'")
        ).all()
    assert len({subject for subject, _ in restored}) == 4
    assert not list(state.glob("originals-*.json"))  # nothing left to put back
