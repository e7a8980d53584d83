"""Agents and controllers as separate processes on one real PostgreSQL: one controller
leads, a standby takes over when the leader is stopped (SIGSTOP) or killed, and a
deposed leader that wakes up can no longer write (its epoch is fenced out).

Real processes, really stopped and killed. Waits are bounded generously and nothing
asserts how fast anything happened, so a busy machine only makes the test slower."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import WAIT_S, wait_for
from sqlalchemy import text

from wattkeeper.store.db import make_engine, upgrade

pytestmark = pytest.mark.postgres

ENV = {
    "WATTKEEPER_AGENT__INTERVAL_S": "0.5",
    "WATTKEEPER_AGENT__TOKENS_INTERVAL_S": "1",
    "WATTKEEPER_CONTROLLER__INTERVAL_S": "1",
    "WATTKEEPER_CONTROLLER__LEASE_S": "20",
    "WATTKEEPER_CONTROLLER__STALE_AFTER_S": "5",
    "WATTKEEPER_CONTROLLER__LEADER_LEASE_S": "3",
}


def _wattkeeper(tmp: Path, name: str, *args: str, **env: str) -> subprocess.Popen:
    log = (tmp / f"{name}.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "wattkeeper", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **ENV, **env},
    )


def test_standby_controller_takes_over_and_a_deposed_leader_is_fenced(
    pg_url: str, tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    upgrade(make_engine(pg_url))
    engine = make_engine(pg_url)

    def leader() -> tuple[str, int] | None:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT name, epoch FROM leader")).first()
        return None if row is None else (row[0], row[1])

    def epochs() -> set[int]:
        with engine.connect() as conn:
            return {e for (e,) in conn.execute(text("SELECT DISTINCT epoch FROM targets"))}

    for node in ("node-a", "node-b"):
        procs.append(
            _wattkeeper(
                tmp_path,
                node,
                "agent",
                "--simulate",
                "2",
                "--node",
                node,
                "--db",
                pg_url,
                "--no-metrics",
            )
        )
    first = _wattkeeper(
        tmp_path,
        "ctl-1",
        "controller",
        "--db",
        pg_url,
        "--no-metrics",
        WATTKEEPER_CONTROLLER__NAME="ctl-1",
    )
    procs.append(first)
    wait_for("ctl-1 to lead", lambda: leader() == ("ctl-1", 1), tmp_path)
    second = _wattkeeper(
        tmp_path,
        "ctl-2",
        "controller",
        "--db",
        pg_url,
        "--no-metrics",
        WATTKEEPER_CONTROLLER__NAME="ctl-2",
    )
    procs.append(second)
    r = subprocess.run(
        [sys.executable, "-m", "wattkeeper", "budget", "set", "2kW", "--db", pg_url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **ENV},
    )
    assert r.returncode == 0, r.stderr

    def targets() -> int:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM targets")).scalar() or 0)

    wait_for("targets for all four GPUs", lambda: targets() == 4 and epochs() == {1}, tmp_path)
    assert leader() == ("ctl-1", 1), "the standby must not take a live lease"

    # The leader hangs: the standby takes over with a new epoch.
    os.kill(first.pid, signal.SIGSTOP)
    wait_for("ctl-2 to lead", lambda: leader() == ("ctl-2", 2), tmp_path)
    wait_for("every target rewritten in epoch 2", lambda: epochs() == {2}, tmp_path)
    # It wakes up: its next write is fenced, it stands by, and epoch 1 never returns.
    os.kill(first.pid, signal.SIGCONT)
    wait_for(
        "ctl-1 to stand down",
        lambda: (
            "standing by" in (tmp_path / "ctl-1.log").read_text()
            or "stands down" in (tmp_path / "ctl-1.log").read_text()
        ),
        tmp_path,
    )
    time.sleep(3)
    assert epochs() == {2} and leader() == ("ctl-2", 2)

    # The new leader is killed outright: the first one takes over again, epoch 3.
    second.kill()
    second.wait(timeout=30)
    wait_for("ctl-1 to lead again", lambda: leader() == ("ctl-1", 3), tmp_path)
    wait_for("targets in epoch 3", lambda: epochs() == {3}, tmp_path)

    r = subprocess.run(
        [sys.executable, "-m", "wattkeeper", "status", "-o", "json", "--db", pg_url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **ENV},
    )
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["leader"]["name"] == "ctl-1" and status["leader"]["epoch"] == 3
    assert status["leader"]["pid"] == first.pid and status["leader"]["live"]
    assert status["facility_power_w"] > 0
    with engine.connect() as conn:
        acquired = conn.execute(
            text("SELECT count(*) FROM audit_log WHERE action = 'leader.acquired'")
        ).scalar()
        limits = [lim for (lim,) in conn.execute(text("SELECT power_limit_w FROM targets"))]
    assert acquired == 3
    # The budget still binds: 2 kW for four 700 W GPUs and two hosts.
    assert all(lim < 700.0 for lim in limits), limits
    engine.dispose()


def test_daemons_stop_and_restore_while_the_database_is_frozen(
    pg_server, pg_url: str, tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    """SIGTERM while PostgreSQL is stopped with SIGSTOP: the agent restores its GPUs and
    both daemons exit, without waiting for a database that may never answer."""
    upgrade(make_engine(pg_url))
    agent = _wattkeeper(
        tmp_path,
        "agent",
        "agent",
        "--simulate",
        "2",
        "--node",
        "frozen-a",
        "--db",
        pg_url,
        "--no-metrics",
    )
    ctl = _wattkeeper(tmp_path, "ctl", "controller", "--db", pg_url, "--no-metrics")
    procs.extend([agent, ctl])
    r = subprocess.run(
        [sys.executable, "-m", "wattkeeper", "budget", "set", "1kW", "--db", pg_url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **ENV},
    )
    assert r.returncode == 0, r.stderr
    wait_for(
        "the agent to apply a target",
        lambda: "power_limit.set" in _audit_actions(pg_url),
        tmp_path,
    )
    pg_server.freeze()
    try:
        time.sleep(2)
        for p in (agent, ctl):
            p.send_signal(signal.SIGTERM)
        for p in (agent, ctl):
            try:
                p.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{p.args[3]} did not exit while the database was frozen")
        log = (tmp_path / "agent.log").read_text()
        assert agent.returncode == 0 and ctl.returncode == 0, log
        assert "restored 2 GPU(s) of frozen-a but could not record it" in log, log
    finally:
        pg_server.thaw()


def _audit_actions(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {a for (a,) in conn.execute(text("SELECT DISTINCT action FROM audit_log"))}
    finally:
        engine.dispose()


def _cli(pg_url: str, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "wattkeeper", *args, "--db", pg_url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **ENV},
    )
    assert r.returncode == 0, r.stderr
    return r


def test_a_budget_changed_during_failover_is_met_and_a_node_lost_for_good_frees_its_share(
    pg_url: str, tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    """The budget is lowered while the leader hangs and before the standby has taken
    over: the new leader plans on it, the agents apply it, and the audit log has it
    with its reason. Then a node dies for good: its caps keep holding its share while
    it may come back, and once it is forgotten the share goes to the node that lives."""
    upgrade(make_engine(pg_url))
    engine = make_engine(pg_url)
    env = {"WATTKEEPER_CONTROLLER__FORGET_AFTER_S": "25"}

    def leader() -> str | None:
        with engine.connect() as conn:
            return conn.execute(text("SELECT name FROM leader")).scalar()

    def targets(node: str) -> dict[str, tuple[float, int]]:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT g.uuid, t.power_limit_w, t.epoch FROM targets t"
                    " JOIN gpus g ON g.id = t.gpu_id JOIN nodes n ON n.id = g.node_id"
                    " WHERE n.name = :n"
                ),
                {"n": node},
            ).all()
        return {u: (w, e) for u, w, e in rows}

    def applied(node: str) -> bool:
        """Each GPU's newest sample shows the limit of its target."""
        want = targets(node)
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT DISTINCT ON (g.uuid) g.uuid, s.power_limit_w FROM gpu_samples s"
                    " JOIN gpus g ON g.id = s.gpu_id JOIN nodes n ON n.id = g.node_id"
                    " WHERE n.name = :n ORDER BY g.uuid, s.ts DESC"
                ),
                {"n": node},
            ).all()
        return len(rows) == len(want) > 0 and all(
            lim is not None and abs(lim - want[u][0]) < 1.0 for u, lim in rows
        )

    agents = {}
    for node in ("node-a", "node-b"):
        agents[node] = _wattkeeper(
            tmp_path,
            node,
            "agent",
            "--simulate",
            "2",
            "--node",
            node,
            "--db",
            pg_url,
            "--no-metrics",
            **env,
        )
        procs.append(agents[node])
    first = _wattkeeper(
        tmp_path,
        "ctl-1",
        "controller",
        "--db",
        pg_url,
        "--no-metrics",
        WATTKEEPER_CONTROLLER__NAME="ctl-1",
        **env,
    )
    procs.append(first)
    wait_for("ctl-1 to lead", lambda: leader() == "ctl-1", tmp_path)
    second = _wattkeeper(
        tmp_path,
        "ctl-2",
        "controller",
        "--db",
        pg_url,
        "--no-metrics",
        WATTKEEPER_CONTROLLER__NAME="ctl-2",
        **env,
    )
    procs.append(second)
    _cli(pg_url, "budget", "set", "7kW")
    wait_for(
        "targets for both nodes",
        lambda: len(targets("node-a")) == len(targets("node-b")) == 2,
        tmp_path,
    )
    before = sum(w for w, _ in [*targets("node-a").values(), *targets("node-b").values()])

    os.kill(first.pid, signal.SIGSTOP)
    _cli(pg_url, "budget", "set", "6kW", "--reason", "feeder maintenance")
    wait_for("ctl-2 to lead", lambda: leader() == "ctl-2", tmp_path)

    def met() -> bool:
        mine = [*targets("node-a").values(), *targets("node-b").values()]
        epoch = {e for _, e in mine}
        return len(mine) == 4 and len(epoch) == 1 and sum(w for w, _ in mine) < before - 200

    wait_for("the lower budget planned by the new leader", met, tmp_path)
    wait_for("the agents to apply it", lambda: applied("node-a") and applied("node-b"), tmp_path)
    os.kill(first.pid, signal.SIGCONT)
    with engine.connect() as conn:
        reasons = [
            d
            for (d,) in conn.execute(
                text("SELECT detail FROM audit_log WHERE action = 'budget.set' ORDER BY id")
            )
        ]
    assert reasons[-1]["reason"] == "feeder maintenance" and reasons[-1]["limit_w"] == 6000.0

    # node-b dies for good.
    a_before = sum(w for w, _ in targets("node-a").values())
    agents["node-b"].kill()
    agents["node-b"].wait(timeout=30)
    # Its last samples count as fresh for stale_after_s (5 s here), then it is silent.
    time.sleep(7)
    silent = time.monotonic()
    b_held = {u: w for u, (w, _) in targets("node-b").items()}
    while time.monotonic() - silent < 10:
        # The silent node keeps its caps, budgeted with the host power a rise from its
        # last draw to them would bring: its peer may give up that much, but is never
        # pushed to its floors (as when the silent host was read as coupling).
        a_now = targets("node-a")
        assert all(w > 200.0 for w, _ in a_now.values()), (a_before, a_now)
        assert {u: w for u, (w, _) in targets("node-b").items()} == b_held
        time.sleep(0.5)
    seen: list[object] = []

    def freed() -> bool:
        now = targets("node-a")
        seen[:] = [now, targets("node-b")]
        return sum(w for w, _ in now.values()) == 1400.0  # alone under 6 kW: uncapped

    deadline = time.monotonic() + WAIT_S
    while not freed() and time.monotonic() < deadline:
        time.sleep(0.5)
    if not freed():
        with engine.connect() as conn:
            seen_at = conn.execute(text("SELECT name, last_seen_at FROM nodes")).all()
            seen_at += conn.execute(
                text("SELECT reason, issued_at, extract(epoch from now()) FROM targets")
            ).all()
            seen_at += conn.execute(text("SELECT name, epoch, expires_at FROM leader")).all()
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in tmp_path.glob("*.log"))
        pytest.fail(
            f"node-a kept {a_before:.0f} W after node-b was forgotten: {seen} {seen_at}\n{logs}"
        )
    engine.dispose()
