"""Agent and controller behaviour on the simulated facility and a real SQLite store."""

from dataclasses import replace

import pytest
from sqlalchemy import select, update

from wattkeeper.agent import agent_identity
from wattkeeper.clock import SimClock
from wattkeeper.config import load_config
from wattkeeper.runtime import build_simulated, open_store, run_fast
from wattkeeper.simulator.facility import FacilitySpec
from wattkeeper.store.db import make_engine, upgrade
from wattkeeper.store.models import AuditEntry, Gpu, Node


@pytest.fixture
def rt(sqlite_url):
    upgrade(make_engine(sqlite_url))
    cfg = load_config(None, environ={})
    store = open_store(cfg, sqlite_url)
    runtime = build_simulated(cfg, store, FacilitySpec(1, 4), SimClock(10_000.0))
    yield runtime
    runtime.store.engine.dispose()


def limits(rt):
    return [s.power_limit_requested_w for s in rt.agents[0].state.samples.values()]


def step(rt, seconds, controller=True):
    """Seconds of the run as ``run --fast`` drives it, or of the agents alone."""
    clock = rt.clock
    for _ in range(int(seconds)):
        if controller:
            rt.advance(clock.now() + 1)
            continue
        clock.set(clock.now() + 1)
        rt.facility.advance_to(clock.now())
        rt.tick_agents()


def test_no_budget_means_no_caps(rt):
    step(rt, 12)
    assert all(lim == 700 for lim in limits(rt))
    assert rt.controller.state.last_plan is None


def test_budget_applied_on_next_tick_and_written_to_audit(rt):
    step(rt, 3)
    rt.store.set_budget(3000.0, "test", rt.clock.now())
    step(rt, 8)
    assert all(200 <= lim < 700 for lim in limits(rt))
    actions = [a.action for a in rt.store.audit_log(200)]
    assert "budget.set" in actions and "target.set" in actions and "power_limit.set" in actions


def test_expired_lease_falls_back_to_the_safe_cap_not_uncapped(rt):
    rt.store.set_budget(100_000.0, "test", rt.clock.now())  # generous: targets at the max
    step(rt, 6)
    assert all(lim == 700 for lim in limits(rt))
    step(rt, 40, controller=False)  # controller gone: leases (30 s) expire
    assert all(lim == pytest.approx(0.6 * 700) for lim in limits(rt))
    reasons = [a.detail.get("reason", "") for a in rt.store.audit_log(50)]
    assert any("lease expired" in r for r in reasons)


def test_clean_stop_restores_what_the_gpus_had(rt):
    rt.store.set_budget(3000.0, "test", rt.clock.now())
    step(rt, 11)
    assert all(lim < 700 for lim in limits(rt))
    rt.shutdown()
    assert all(lim == 700 for lim in rt.facility.limit_requested[:4])
    with rt.store.session() as s:
        restored = s.scalars(select(AuditEntry).where(AuditEntry.action == "gpu.restore")).all()
    assert len(restored) == 4


def test_stale_node_is_not_relaxed_then_forgotten(rt):
    rt.store.set_budget(3000.0, "test", rt.clock.now())
    step(rt, 11)
    capped = rt.controller.state.last_plan.targets
    rt.store.set_budget(100_000.0, "test", rt.clock.now())
    rt.clock.set(rt.clock.now() + 30)  # the agent goes silent
    plan = rt.controller.tick(rt.clock.now())
    assert plan.stale_gpus == 4
    assert [t.power_limit_w for t in plan.targets] == [t.power_limit_w for t in capped]
    rt.clock.set(rt.clock.now() + 3700)
    plan = rt.controller.tick(rt.clock.now())
    assert plan.targets == ()


def test_a_gpu_the_node_no_longer_has_is_removed(rt):
    step(rt, 2)
    agent = rt.agents[0]
    infos = agent.backend.gpus()
    rt.store.register_node(agent.node, "sim", infos[:3], rt.clock.now())
    with rt.store.session() as s:
        assert len(s.scalars(select(Gpu)).all()) == 3
        removed = s.scalars(select(AuditEntry).where(AuditEntry.action == "gpu.removed")).all()
    assert [r.subject for r in removed] == [infos[3].uuid]


def test_fast_run_is_deterministic(sqlite_url, tmp_path):
    def once(url):
        upgrade(make_engine(url))
        cfg = load_config(None, environ={})
        rt = build_simulated(
            cfg, open_store(cfg, url), FacilitySpec(1, 4, seed=3), SimClock(50_000.0)
        )
        rt.store.set_budget(2500.0, "test", 50_000.0)
        return run_fast(rt, 60)

    a = once(sqlite_url)
    b = once(f"sqlite:///{tmp_path / 'other.db'}")
    assert a == b


def test_restart_after_a_crash_restores_the_original_limits(rt, sqlite_url):
    rt.store.set_budget(3000.0, "test", rt.clock.now())
    step(rt, 11)
    assert all(lim < 700 for lim in rt.facility.limit_requested[:4])
    # the process dies: no shutdown, and its pid is gone (a pid no process can have).
    # A new one starts on the same GPUs and store, and takes the names over at once.
    dead = agent_identity().split()
    dead[2] = str(2**22 + 1)
    with rt.store.engine.begin() as conn:
        conn.execute(update(Node).values(agent_id=" ".join(dead)))
    cfg = load_config(None, environ={})
    from wattkeeper.runtime import build_on_facility

    rt2 = build_on_facility(cfg, open_store(cfg, sqlite_url), rt.facility, rt.clock)
    rt.store.set_budget(2500.0, "test", rt.clock.now())
    step(rt2, 6)
    assert all(lim < 700 for lim in rt2.facility.limit_requested[:4])
    rt2.shutdown()
    assert list(rt.facility.limit_requested[:4]) == [700.0] * 4


def _stored_ticks(rt) -> list[float]:
    from wattkeeper.store.models import GpuSampleRow

    with rt.store.engine.connect() as conn:
        return sorted(set(conn.scalars(select(GpuSampleRow.ts))))


def test_batched_writes_carry_every_tick_and_targets_still_arrive_each_tick(rt):
    """agent.write_interval_s: samples wait until the oldest is that old and go in one
    transaction; targets are read at every tick all the same, so a cap is applied one
    tick after the controller writes it; a clean stop writes what is still waiting."""
    agent = rt.agents[0]
    agent.write_interval_s = 5.0
    step(rt, 1, controller=False)  # the first tick registers and writes at once
    first = _stored_ticks(rt)
    assert len(first) == 1
    step(rt, 4, controller=False)
    assert _stored_ticks(rt) == first and agent.state.spooled_ticks == 4
    step(rt, 1, controller=False)  # 5 s since the last write: the five waiting land
    assert len(_stored_ticks(rt)) == 6 and agent.state.spooled_ticks == 0
    rt.store.set_budget(3000.0, "test", rt.clock.now())
    rt.tick_controller()
    written = _stored_ticks(rt)
    step(rt, 1, controller=False)
    assert _stored_ticks(rt) == written  # nothing written this tick...
    assert all(lim < 700 for lim in limits(rt))  # ...but the new caps were read and applied
    step(rt, 2, controller=False)
    rt.shutdown()
    stored = _stored_ticks(rt)
    assert stored[:-1] == [float(t) for t in range(int(first[0]), int(rt.clock.now()) + 1)]
    # and the sample taken after the GPUs were restored, on a clock that did not move
    assert stored[-1] == pytest.approx(rt.clock.now() + 1e-3)


def test_original_limits_reach_a_local_file_before_the_first_change(rt, tmp_path, caplog):
    """The store hears of a GPU's original limit only at the next round trip; the local
    file has it before the change is made, and forgets it once the GPU is restored.
    A file that cannot be read or written costs the record, never the cap."""
    import json

    agent = rt.agents[0]
    agent.originals_path = tmp_path / "originals.json"
    seen: list[dict] = []
    set_limit = agent.backend.set_power_limit

    def watch(uuid, watts):
        seen.append(json.loads(agent.originals_path.read_text())["power_limit_w"])
        return set_limit(uuid, watts)

    agent.backend.set_power_limit = watch
    rt.store.set_budget(3000.0, "test", rt.clock.now())
    step(rt, 11)
    assert seen and all(lim < 700 for lim in limits(rt))
    # Each change found its GPU's original already on disk.
    assert len(seen[0]) == 1 and set(seen[-1].values()) == {700.0} and len(seen[-1]) == 4
    rt.shutdown()
    assert not agent.originals_path.exists()

    agent.originals_path.write_text("{not json")
    assert agent._read_originals() == ({}, set(), set())
    assert "unreadable" in caplog.text


def test_an_unwritable_originals_file_does_not_stop_the_caps(rt, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rt.agents[0].originals_path = blocker / "originals.json"  # under a file: cannot exist
    rt.store.set_budget(3000.0, "test", rt.clock.now())
    step(rt, 11)
    assert all(lim < 700 for lim in limits(rt))
    assert "cannot record original limits" in caplog.text


def test_a_spool_file_cut_short_by_a_crash_is_read_up_to_its_last_whole_line(rt, tmp_path, caplog):
    """An earlier run's spool on disk goes to the store first; a line a crash cut in
    half is skipped and said, and the file is gone once everything has landed."""
    import json

    from wattkeeper.agent import _tick_json
    from wattkeeper.store.repository import NodeTick

    agent = rt.agents[0]
    step(rt, 2)
    sample = next(iter(agent.state.samples.values()))
    old = NodeTick(5_000.0, (replace(sample, timestamp=5_000.0),), (0.2, 900.0, "model"))
    path = tmp_path / "spool.jsonl"
    path.write_text(json.dumps(_tick_json(old)) + "\n" + '{"ts": 5001.0, "samp')
    agent.spool_path = path
    agent._load_spool()
    assert agent.state.spooled_ticks == 1 and "1 unreadable line(s) skipped" in caplog.text
    step(rt, 1)
    assert 5_000.0 in _stored_ticks(rt)
    assert not path.exists() and agent.state.spooled_ticks == 0


def test_a_node_removed_from_the_store_registers_again_and_follows_its_targets(rt):
    """`node remove` on a live node (or a store restored from an old backup): the
    agent's reads say the node is gone; it registers again at its next round trip and
    the controller's targets reach its GPUs again, batching or not."""
    agent = rt.agents[0]
    agent.write_interval_s = 5.0
    rt.store.set_budget(3000.0, "test", rt.clock.now())
    step(rt, 11)
    assert all(lim < 700 for lim in limits(rt))
    rt.store.remove_nodes([agent.node], "test", rt.clock.now())
    step(rt, 1, controller=False)
    assert not agent.state.store_ok and agent.gpu_ids == {}
    step(rt, 12)
    assert agent.node in rt.store.node_claims() and agent.state.store_ok
    targets = rt.store.orders_for_node(agent.node).targets
    assert len(targets) == 4 and all(lim < 700 for lim in limits(rt))


@pytest.mark.postgres
def test_a_tick_the_store_refuses_is_dropped_and_counted_not_retried_forever(pg_url):
    """PostgreSQL refuses a tick (a model name longer than its column): the ticks with
    it in one transaction go one by one, the refused one is dropped and counted, the
    rest land, and the node keeps reading its targets."""
    from wattkeeper.store.repository import NodeTick, TokenRow

    upgrade(make_engine(pg_url))
    cfg = load_config(None, environ={})
    rt = build_simulated(cfg, open_store(cfg, pg_url), FacilitySpec(1, 2), SimClock(30_000.0))
    agent = rt.agents[0]
    step(rt, 2)
    sample = next(iter(agent.state.samples.values()))
    bad = TokenRow(endpoint="http://x/metrics", model="m" * 300, up=True)
    agent._spool_tick(NodeTick(29_000.0, (replace(sample, timestamp=29_000.0),), None, (bad,)))
    agent._spool_tick(NodeTick(29_001.0, (replace(sample, timestamp=29_001.0),)))
    step(rt, 1)
    stored = _stored_ticks(rt)
    assert 29_001.0 in stored and 29_000.0 not in stored
    assert agent.state.spool_dropped_ticks == 1 and agent.state.spooled_ticks == 0
    assert agent.state.store_ok
    rt.store.engine.dispose()


def test_a_locked_store_keeps_the_batch_for_later_instead_of_dropping_it(rt, sqlite_url):
    """Another writer holds SQLite's lock past the busy timeout: the batch fails, but
    the store did not refuse the data, so every tick stays in the spool and lands once
    the lock is gone; nothing is counted as dropped."""
    import sqlite3

    agent = rt.agents[0]
    agent.write_interval_s = 3.0
    step(rt, 1, controller=False)
    locked_from = rt.clock.now() + 1
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), timeout=1)
    holder.execute("BEGIN IMMEDIATE")
    try:
        step(rt, 3, controller=False)  # the write falls due and waits out the lock
        assert not agent.state.store_ok and agent.state.spooled_ticks >= 3
    finally:
        holder.rollback()
        holder.close()
    step(rt, 4, controller=False)
    stored = _stored_ticks(rt)
    assert all(locked_from + k in stored for k in range(3))  # the locked-out batch landed
    assert len(stored) + agent.state.spooled_ticks == 8  # and nothing went missing
    assert agent.state.spool_dropped_ticks == 0 and agent.state.store_ok


def test_an_agent_whose_name_was_taken_asks_for_it_again_once_the_taker_is_quiet(rt):
    """A cloned host took the node's name while this agent was away, then went quiet:
    this agent's reads and writes are refused (another's targets are not its own), its
    leases run down, and once the taker has been silent for a claim's life it takes
    its name back and follows its targets again."""
    from wattkeeper.store.repository import CLAIM_LIVE_S

    agent = rt.agents[0]
    step(rt, 3)
    with rt.store.engine.begin() as conn:
        conn.execute(
            update(Node)
            .where(Node.name == agent.node)
            .values(agent_id="clone m9 1 zz", last_seen_at=rt.clock.now())
        )
    step(rt, 1, controller=False)
    assert not agent.state.store_ok
    assert rt.store.node_claims()[agent.node][0] == "clone m9 1 zz"
    step(rt, int(CLAIM_LIVE_S) + 3, controller=False)
    assert rt.store.node_claims()[agent.node][0] == agent.agent_id
    step(rt, 6)
    assert agent.state.store_ok
