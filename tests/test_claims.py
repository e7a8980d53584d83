"""Node names are claimed: two agents under one name (cloned hosts, a second `run` on the
same store) never both control a node, and never delete each other's GPUs."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import update

from wattkeeper.agent import agent_identity, holder_gone
from wattkeeper.collectors.gpu import GpuInfo, PowerLimitConstraints
from wattkeeper.store.db import make_engine, upgrade
from wattkeeper.store.models import Node
from wattkeeper.store.repository import CLAIM_LIVE_S, NodeClaimedError, Store

GPU = GpuInfo(
    uuid="GPU-claim-0",
    index=0,
    name="NVIDIA H100 80GB HBM3",
    pci_bus_id="00000000:18:00.0",
    memory_total_bytes=80 * 2**30,
    power_limits=PowerLimitConstraints(200.0, 700.0, 700.0),
    max_sm_clock_mhz=1980,
)
GPUS = [replace(GPU, uuid=f"GPU-claim-{k}", index=k) for k in range(4)]


@pytest.fixture
def store(db_url: str) -> Store:
    upgrade(make_engine(db_url))
    return Store(make_engine(db_url))


def _dead_on_this_machine() -> str:
    parts = agent_identity().split()
    parts[2] = str(2**22 + 1)  # above any pid_max: no process has it
    return " ".join(parts)


def test_a_live_holder_keeps_its_name_and_its_gpus(store: Store) -> None:
    ids = store.register_node("n1", "nvml", GPUS, 100.0, agent_id="host-a m1 10 aa")
    with pytest.raises(NodeClaimedError, match="held by another live agent"):
        # Another shape under the same name: it would have deleted three GPUs.
        store.register_node("n1", "nvml", GPUS[:1], 110.0, agent_id="host-b m2 10 bb")
    backends = store.node_backends()
    assert backends == {"n1": "nvml"}
    assert store.register_node("n1", "nvml", GPUS, 111.0, agent_id="host-a m1 10 aa") == ids
    # Silent for longer than the claim lasts: the name is free.
    later = 111.0 + CLAIM_LIVE_S + 1
    store.register_node("n1", "nvml", GPUS[:1], later, agent_id="host-b m2 10 bb")
    # The old holder, back from a hang, may no longer write under the name.
    with pytest.raises(NodeClaimedError, match="taken over"):
        store.write_samples("n1", ids, [], later + 1, agent_id="host-a m1 10 aa")
    store.write_samples(
        "n1", {GPUS[0].uuid: ids[GPUS[0].uuid]}, [], later + 1, agent_id="host-b m2 10 bb"
    )


def test_a_dead_process_of_this_machine_or_a_clean_stop_frees_the_name_at_once(
    store: Store,
) -> None:
    dead = _dead_on_this_machine()
    assert holder_gone(dead) and not holder_gone(agent_identity())
    assert not holder_gone("other-host m9 1 zz")
    store.register_node("n2", "nvml", GPUS, 100.0, agent_id=dead)
    mine = agent_identity()
    with pytest.raises(NodeClaimedError):
        store.register_node("n2", "nvml", GPUS, 101.0, agent_id=mine)
    store.register_node("n2", "nvml", GPUS, 101.0, agent_id=mine, holder_gone=holder_gone)
    store.release_node("n2", mine)
    assert store.node_claims()["n2"][0] is None
    store.register_node("n2", "nvml", GPUS, 102.0, agent_id="another 1 2 3")


def _run(db: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "wattkeeper", "run", "--db", db, "--no-metrics", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_second_run_on_a_store_in_use_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    first = _run(db, "--simulate", "1x4", "--duration", "60s")
    try:
        store = Store(make_engine(db))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if first.poll() is not None:
                pytest.fail(f"first run exited: {first.communicate()[1]}")
            try:
                claims = store.node_claims()
            except Exception:
                claims = {}
            if claims.get("sim-node-0", (None, 0.0))[0] is not None:
                break
            time.sleep(0.2)
        else:
            pytest.fail("first run never claimed its node")
        before = store.node_claims()["sim-node-0"][0]
        second = _run(db, "--simulate", "1x2", "--duration", "10s", "--fast")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 1, err
        assert "held by another live agent" in err and "Traceback" not in err
        with store.engine.connect() as conn:
            gpus = conn.exec_driver_sql(
                "SELECT count(*) FROM gpus g JOIN nodes n ON n.id = g.node_id"
                " WHERE n.name = 'sim-node-0'"
            ).scalar()
        assert gpus == 4
        assert store.node_claims()["sim-node-0"][0] == before
    finally:
        first.terminate()
        first.communicate(timeout=120)
    assert first.returncode == 0
    # Stopped cleanly: the name is free, and the next run takes it.
    assert Store(make_engine(db)).node_claims()["sim-node-0"][0] is None
    later = _run(db, "--simulate", "1x2", "--duration", "10s", "--fast")
    assert later.wait(timeout=120) == 0, later.communicate()[1]


def test_claims_survive_an_update_of_last_seen(store: Store) -> None:
    """A node whose holder wrote long ago is free even though the row still names it."""
    store.register_node("n3", "nvml", GPUS, 100.0, agent_id="a 1 1 1")
    with store.engine.begin() as conn:
        conn.execute(update(Node).values(last_seen_at=0.0))
    store.register_node("n3", "nvml", GPUS, 100.0, agent_id="b 2 2 2")
    assert store.node_claims()["n3"][0] == "b 2 2 2"


def test_two_first_controllers_racing_for_the_lease_row_get_one_leader(
    store: Store, db_url: str
) -> None:
    """Both find no lease row; the other inserts it first. The loser must stand by, not
    fail with the database's unique-key error (seen with three first `run`s at once)."""
    from sqlalchemy import event, insert
    from sqlalchemy.orm import Session

    from wattkeeper.store.models import Leader

    other = make_engine(db_url)
    now = time.time()

    raced: list[bool] = []

    def first_in(session, *_: object) -> None:
        if raced:
            return
        raced.append(True)
        with other.begin() as conn:
            row = dict(holder="other", name="c2", host="h2", pid=2, epoch=1)
            conn.execute(insert(Leader).values(id=1, acquired_at=now, expires_at=now + 10, **row))

    event.listen(Session, "before_flush", first_in)
    try:
        assert store.lead("me", "c1", "h1", 1, now, 10.0) is None
    finally:
        event.remove(Session, "before_flush", first_in)
    assert raced
    held = store.leader()
    assert held is not None and (held.holder, held.epoch) == ("other", 1)
    assert store.lead("me", "c1", "h1", 1, now + 11, 10.0) == 2  # takes over once it expires
