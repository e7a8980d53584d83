"""Store.snapshot and Store.write_targets on SQLite and PostgreSQL.

The snapshot finds each GPU's and node's newest sample with one index probe per GPU or
node (a LATERAL subquery on PostgreSQL, a correlated subquery on SQLite); these tests pin
what it returns: the newest sample with ``now - window_s <= ts <= now``, GPUs and nodes
without one still listed with ``None`` readings, every token row at a node's newest token
``ts``, and (``test_snapshot_matches_reference``) the same values as a plain computation
over all rows on random data.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
from sqlalchemy import insert, select

from wattkeeper.collectors.gpu import GpuInfo, GpuSample, PowerLimitConstraints
from wattkeeper.store import repository
from wattkeeper.store.db import StoreError, make_engine, upgrade
from wattkeeper.store.models import (
    Budget,
    Gpu,
    GpuSampleRow,
    HostSampleRow,
    Node,
    Target,
    TokenSampleRow,
)
from wattkeeper.store.repository import (
    GpuView,
    NodeClaimedError,
    NodeTick,
    NodeView,
    Snapshot,
    Store,
    TargetSpec,
    TokenRow,
)

T = 1_700_000_000.0
LIMITS = PowerLimitConstraints(min_w=200.0, max_w=700.0, default_w=700.0)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield Store(engine)
    engine.dispose()


def _infos(node: str, n: int) -> list[GpuInfo]:
    return [
        GpuInfo(
            uuid=f"GPU-{node}-{k}",
            index=k,
            name="NVIDIA H100 80GB HBM3",
            pci_bus_id=f"0000:{k:02x}:00.0",
            memory_total_bytes=80 * 2**30,
            power_limits=LIMITS,
        )
        for k in range(n)
    ]


def _sample(uuid: str, ts: float, power_w: float, reasons: tuple[str, ...] = ()) -> GpuSample:
    return GpuSample(
        uuid=uuid,
        timestamp=ts,
        power_w=power_w,
        energy_j=1e6 + ts,
        sm_clock_mhz=1700.0,
        utilization_gpu_ratio=0.5,
        power_limit_w=600.0,
        throttle_reasons=reasons,
    )


def _tok(
    endpoint: str, up: bool, rate: float | None, total: float | None, **latency: float
) -> TokenRow:
    return TokenRow(
        endpoint=endpoint,
        model="llama",
        up=up,
        generation_tokens_per_s=rate,
        generation_tokens_total=total,
        **latency,
    )


# -- snapshot: window and newest ---------------------------------------------------------
def test_snapshot_newest_gpu_sample_within_window(store: Store) -> None:
    ids = store.register_node("n1", "sim", _infos("n1", 3), T - 1000)
    a, b, c = (f"GPU-n1-{k}" for k in range(3))
    for ts, power in ((T - 100, 1.0), (T - 60, 2.0), (T - 30, 3.0), (T + 10, 4.0)):
        store.write_samples("n1", ids, [_sample(a, ts, power, ("sw_power_cap", "hw_slowdown"))], ts)
    # b: one sample just too old and one in the future; c: no sample at all.
    store.write_samples("n1", ids, [_sample(b, T - 60.5, 5.0), _sample(b, T + 0.5, 6.0)], T)

    snap = store.snapshot(T, window_s=60.0)
    assert snap.ts == T and snap.budget_w is None
    assert [g.uuid for g in snap.gpus] == [a, b, c]
    ga, gb, gc = snap.gpus
    assert ga == GpuView(
        uuid=a,
        node="n1",
        index=0,
        name="NVIDIA H100 80GB HBM3",
        power_min_w=200.0,
        power_max_w=700.0,
        power_default_w=700.0,
        sample_ts=T - 30,
        power_w=3.0,
        energy_j=1e6 + T - 30,
        sm_clock_mhz=1700.0,
        utilization_gpu_ratio=0.5,
        power_limit_w=600.0,
        throttle_reasons=("sw_power_cap", "hw_slowdown"),
        target_power_limit_w=None,
        target_lease_expires_at=None,
    )
    for g in (gb, gc):
        assert (g.sample_ts, g.power_w, g.energy_j, g.power_limit_w) == (None,) * 4
        assert g.throttle_reasons == ()
    # Both bounds are inclusive: a sample exactly at now - window_s counts, and so does
    # one exactly at now; a later now sees the samples that were in the future.
    assert store.snapshot(T - 31, window_s=29.0).gpus[0].power_w == 2.0
    assert store.snapshot(T - 30, window_s=5.0).gpus[0].power_w == 3.0
    assert store.snapshot(T + 10, window_s=60.0).gpus[0].power_w == 4.0
    later = store.snapshot(T + 30, window_s=60.0)
    assert (later.gpus[0].sample_ts, later.gpus[1].sample_ts) == (T + 10, T + 0.5)
    assert store.snapshot(T, window_s=5.0).gpus[0].sample_ts is None


def test_snapshot_host_and_tokens_newest_per_node(store: Store) -> None:
    ids = store.register_node("alpha", "sim", _infos("alpha", 1), T - 1000)
    store.register_node("beta", "sim", _infos("beta", 1), T - 1000)
    ticks = [
        (T - 90, (10.0, 900.0, "model"), [_tok("e1", True, 1.0, 10.0)]),
        (T - 20, (20.0, 1000.0, "model"), [_tok("e1", True, 2.0, 20.0)]),
        (
            T - 2,
            (30.0, 1100.0, "ipmi"),
            [
                _tok(
                    "e1",
                    True,
                    100.0,
                    1000.0,
                    ttft_p90_s=0.5,
                    tpot_p90_s=0.03,
                    requests_waiting=2.0,
                    kv_cache_usage_ratio=0.4,
                    latency_requests=40.0,
                ),
                _tok("e2", False, None, None),
                _tok(
                    "e3",
                    True,
                    50.5,
                    2000.0,
                    ttft_p90_s=0.2,
                    tpot_p90_s=0.05,
                    requests_waiting=3.0,
                    kv_cache_usage_ratio=0.9,
                ),
            ],
        ),
        (T + 5, (40.0, 1200.0, "model"), [_tok("e1", True, 999.0, 9999.0)]),
    ]
    for ts, host, toks in ticks:
        store.write_samples("alpha", ids, [], ts, host=host, tokens=toks)
    # beta only ever reported too early: listed, with nothing in the window.
    store.write_samples(
        "beta", {}, [], T - 500, host=(0.1, 800.0, "model"), tokens=[_tok("e", True, 1, 1)]
    )

    snap = store.snapshot(T, window_s=60.0)
    assert snap.nodes == (
        NodeView(
            name="alpha",
            drained=False,
            last_seen_at=T + 5,
            host_ts=T - 2,
            non_gpu_power_w=1100.0,
            power_source="ipmi",
            generation_tokens_per_s=150.5,
            generation_tokens_total=3000.0,
            endpoints_up=2,
            endpoints_total=3,
            # Latency is the slowest server's, KV use the fullest's, the queue their sum.
            token_ts=T - 2,
            requests_waiting=5.0,
            kv_cache_usage_ratio=0.9,
            ttft_p90_s=0.5,
            tpot_p90_s=0.05,
            latency_requests=40.0,
            models=("llama",),
        ),
        NodeView(
            name="beta",
            drained=False,
            last_seen_at=T - 500,
            host_ts=None,
            non_gpu_power_w=None,
            power_source=None,
            generation_tokens_per_s=None,
            generation_tokens_total=None,
            endpoints_up=0,
            endpoints_total=0,
        ),
    )
    # Only the down endpoint at the newest tick: counted, but no rate or total.
    store.write_samples("alpha", ids, [], T + 1, tokens=[_tok("e2", False, None, None)])
    alpha = store.snapshot(T + 1, window_s=60.0).nodes[0]
    assert alpha.host_ts == T - 2  # no host row at T + 1
    assert (alpha.endpoints_up, alpha.endpoints_total) == (0, 1)
    assert alpha.generation_tokens_per_s is None and alpha.generation_tokens_total is None


def _rows(store: Store, node: str) -> tuple[list, list, list, float]:
    """Every stored row of a node, without ids, in a stable order."""
    with store.engine.connect() as conn:
        node_id, seen = conn.execute(
            select(Node.id, Node.last_seen_at).where(Node.name == node)
        ).one()
        gpu = conn.execute(
            select(Gpu.index, GpuSampleRow.ts, GpuSampleRow.power_w, GpuSampleRow.throttle_reasons)
            .join(Gpu, Gpu.id == GpuSampleRow.gpu_id)
            .where(Gpu.node_id == node_id)
            .order_by(GpuSampleRow.ts, Gpu.index)
        ).all()
        host = conn.execute(
            select(HostSampleRow.ts, HostSampleRow.non_gpu_power_w, HostSampleRow.power_source)
            .where(HostSampleRow.node_id == node_id)
            .order_by(HostSampleRow.ts)
        ).all()
        tokens = conn.execute(
            select(TokenSampleRow.ts, TokenSampleRow.endpoint, TokenSampleRow.ttft_p90_s)
            .where(TokenSampleRow.node_id == node_id)
            .order_by(TokenSampleRow.ts, TokenSampleRow.endpoint)
        ).all()
    return [tuple(r) for r in gpu], [tuple(r) for r in host], [tuple(r) for r in tokens], seen


def test_write_ticks_stores_what_tick_by_tick_writes_would(store: Store) -> None:
    """An agent that batches (agent.write_interval_s) or replays an outage's backlog
    hands over many ticks at once, in any order: the rows are the ones each tick would
    have written, and last seen is the newest tick, never an older one."""
    one = store.register_node("one", "sim", _infos("one", 2), T)
    many = store.register_node("many", "sim", _infos("many", 2), T)

    def tick(node: str, ids: dict[str, int], ts: float, k: int) -> NodeTick:
        return NodeTick(
            ts,
            tuple(_sample(u, ts, 100.0 + k, ("sw_power_cap",) * (k % 2)) for u in ids),
            (0.1 * k, 900.0 + k, "model") if k % 3 else None,
            tuple(_tok(f"e{j}", True, 1.0, 2.0, ttft_p90_s=0.1 * k) for j in range(k % 3)),
        )

    order = [4, 0, 1, 2, 3, 6, 5]  # the newest first, then a backlog, as after an outage
    for k in order:
        t = tick("one", one, T + k, k)
        store.write_samples("one", one, t.samples, t.ts, host=t.host, tokens=t.tokens)
    store.write_ticks("many", many, [tick("many", many, T + k, k) for k in order])
    assert _rows(store, "many") == _rows(store, "one")
    assert _rows(store, "many")[3] == T + 6
    # An older backlog after that does not move last seen back.
    store.write_ticks("many", many, [tick("many", many, T - 10, 1)])
    assert _rows(store, "many")[3] == T + 6


def test_write_ticks_lands_whole_or_not_at_all(store: Store) -> None:
    ids = store.register_node("n1", "sim", _infos("n1", 2), T, agent_id="host-a m1 10 aa")
    good = NodeTick(T + 1, tuple(_sample(u, T + 1, 100.0) for u in ids), (0.1, 900.0, "model"))
    before = _rows(store, "n1")
    # The second tick names a GPU the store does not have: the first must not land either.
    bogus = {**ids, "GPU-gone": max(ids.values()) + 1000}
    bad = NodeTick(T + 2, (_sample("GPU-gone", T + 2, 1.0),))
    with pytest.raises(StoreError):
        store.write_ticks("n1", bogus, [good, bad], agent_id="host-a m1 10 aa")
    assert _rows(store, "n1") == before
    # Another agent's batch under the name: refused, nothing written, last seen kept.
    with pytest.raises(NodeClaimedError, match="taken over"):
        store.write_ticks("n1", ids, [good], agent_id="host-b m2 10 bb")
    with pytest.raises(StoreError, match="not registered"):
        store.write_ticks("nobody", ids, [good])
    assert _rows(store, "n1") == before
    store.write_ticks("n1", ids, [good], agent_id="host-a m1 10 aa")
    assert len(_rows(store, "n1")[0]) == 2 and _rows(store, "n1")[3] == T + 1


def test_a_replayed_backlog_lands_once(store: Store) -> None:
    """An agent that crashed after the store took a batch but before it trimmed its
    spool sends the batch again: every row is kept once, and the new ticks sent with
    the replay land beside it."""
    ids = store.register_node("n1", "sim", _infos("n1", 2), T)

    def tick(ts: float) -> NodeTick:
        return NodeTick(
            ts,
            tuple(_sample(u, ts, 100.0 + ts - T) for u in ids),
            (0.1, 900.0, "model"),
            (_tok("e1", True, 1.0, 2.0), _tok("e2", True, 1.0, 2.0)),
        )

    store.write_ticks("n1", ids, [tick(T + k) for k in range(3)])
    # Two data-parallel engines of one model on one endpoint are two rows, not a replay.
    engines = [replace(_tok("e1", True, 5.0, 6.0), series=f'engine="{e}"') for e in (0, 1)]
    store.write_ticks("n1", ids, [NodeTick(T + 1, (), None, tuple(engines))])
    once = _rows(store, "n1")
    assert (len(once[0]), len(once[1]), len(once[2])) == (6, 3, 8)
    store.write_ticks("n1", ids, [tick(T + k) for k in range(3)])
    assert _rows(store, "n1") == once
    # The same second twice in one batch, and a batch of old and new ticks.
    store.write_ticks("n1", ids, [tick(T + 1), tick(T + 3), tick(T + 3), tick(T + 4)])
    gpu, host, tokens, seen = _rows(store, "n1")
    assert (len(gpu), len(host), len(tokens), seen) == (10, 5, 12, T + 4)
    assert gpu[:6] == once[0]


def test_snapshot_includes_targets_and_budget(store: Store) -> None:
    store.register_node("b-node", "sim", _infos("b-node", 2), T)
    store.register_node("a-node", "sim", _infos("a-node", 2), T)
    store.set_budget(5000.0, "test", T)
    assert store.write_targets([TargetSpec("GPU-b-node-1", 321.0, reason="r")], T, 30.0) == 1
    snap = store.snapshot(T)
    assert snap.budget_w == 5000.0
    assert [(g.node, g.index) for g in snap.gpus] == [
        ("a-node", 0),
        ("a-node", 1),
        ("b-node", 0),
        ("b-node", 1),
    ]
    assert [(g.target_power_limit_w, g.target_lease_expires_at) for g in snap.gpus] == [
        (None, None),
        (None, None),
        (None, None),
        (321.0, T + 30.0),
    ]
    assert [n.name for n in snap.nodes] == ["a-node", "b-node"]


# -- write_targets --------------------------------------------------------------------
def _audit(store: Store) -> list[tuple[str, dict]]:
    return [(e.subject, e.detail) for e in reversed(store.audit_log(1000))]


def test_write_targets_renews_leases_and_audits_only_changes(store: Store) -> None:
    store.register_node("n", "sim", _infos("n", 4), T)
    a, b, c, d = (f"GPU-n-{k}" for k in range(4))
    first = [TargetSpec(a, 300.0, reason="one"), TargetSpec(b, 400.0, 900, 1500, "one")]
    first += [TargetSpec(c, 500.0, reason="one"), TargetSpec("GPU-unknown", 1.0)]
    assert store.write_targets(first, T, 30.0) == 3
    assert _audit(store) == [
        (a, {"power_limit_w": 300.0, "previous_w": None, "reason": "one"}),
        (b, {"power_limit_w": 400.0, "previous_w": None, "reason": "one"}),
        (c, {"power_limit_w": 500.0, "previous_w": None, "reason": "one"}),
    ]
    assert set(store.targets_for_node("n")) == {a, b, c}

    # Nothing changed (a moved by less than 1 W): leases renewed, no audit, and the stored
    # value and reason stay as they were written. c is not in the plan: its lease runs on.
    same = [TargetSpec(a, 300.9, reason="two"), TargetSpec(b, 400.0, 900, 1500, "two")]
    assert store.write_targets(same, T + 5, 30.0) == 0
    assert len(_audit(store)) == 3
    t = store.targets_for_node("n")
    assert (t[a].power_limit_w, t[a].reason, t[a].issued_at, t[a].lease_expires_at) == (
        300.0,
        "one",
        T + 5,
        T + 35,
    )
    assert (t[b].sm_clock_min_mhz, t[b].sm_clock_max_mhz, t[b].lease_expires_at) == (
        900,
        1500,
        T + 35,
    )
    assert (t[c].issued_at, t[c].lease_expires_at) == (T, T + 30)

    # Changes: a by 1 W, b's clock bound, c to no limit, d new; each audited once.
    changed = [
        TargetSpec(a, 301.0, reason="three"),
        TargetSpec(b, 400.0, 900, 1400, "three"),
        TargetSpec(c, None, reason="three"),
        TargetSpec(d, 250.0, reason="three"),
    ]
    assert store.write_targets(changed, T + 10, 20.0) == 4
    assert _audit(store)[3:] == [
        (a, {"power_limit_w": 301.0, "previous_w": 300.0, "reason": "three"}),
        (b, {"power_limit_w": 400.0, "previous_w": 400.0, "reason": "three"}),
        (c, {"power_limit_w": None, "previous_w": 500.0, "reason": "three"}),
        (d, {"power_limit_w": 250.0, "previous_w": None, "reason": "three"}),
    ]
    t = store.targets_for_node("n")
    assert {u: (r.power_limit_w, r.sm_clock_max_mhz, r.reason) for u, r in t.items()} == {
        a: (301.0, None, "three"),
        b: (400.0, 1400, "three"),
        c: (None, None, "three"),
        d: (250.0, None, "three"),
    }
    assert {r.issued_at for r in t.values()} == {T + 10}
    assert {r.lease_expires_at for r in t.values()} == {T + 30}
    # Either side without a limit counts as a change (today's rule), every time.
    assert store.write_targets([TargetSpec(c, None, reason="four")], T + 15, 20.0) == 1
    assert store.write_targets([], T + 20, 20.0) == 0
    entries = store.audit_log(1)
    assert (entries[0].actor, entries[0].action, entries[0].ts) == (
        "controller",
        "target.set",
        T + 15,
    )


def test_write_targets_renews_many_leases(store: Store, monkeypatch) -> None:
    """Renewal ids go in IN lists of bounded size (one array parameter on PostgreSQL)."""
    monkeypatch.setattr(repository, "_MAX_IDS_PER_STATEMENT", 2)
    store.register_node("n", "sim", _infos("n", 5), T)
    specs = [TargetSpec(f"GPU-n-{k}", 300.0 + k) for k in range(5)]
    assert store.write_targets(specs, T, 30.0) == 5
    assert store.write_targets(specs[:4], T + 5, 30.0) == 0
    leases = {u: t.lease_expires_at for u, t in store.targets_for_node("n").items()}
    assert leases == {**{f"GPU-n-{k}": T + 35 for k in range(4)}, "GPU-n-4": T + 30}


# -- snapshot against a reference computed from all rows -------------------------------
def _random_store(store: Store, rng: random.Random) -> None:
    """Several nodes (one without GPUs), GPUs inserted out of index order, samples at
    distinct random quarter-second times around T (some beyond it), several token rows
    per tick, nullable readings sometimes NULL, targets for some GPUs."""
    maybe = lambda v: None if rng.random() < 0.2 else v  # noqa: E731
    names = [f"node-{c}" for c in "dbeafc"]
    with store.engine.begin() as conn:
        conn.execute(
            insert(Budget),
            [{"scope": "facility", "limit_w": 9e4, "updated_at": T, "updated_by": "t"}],
        )
        conn.execute(
            insert(Node),
            [
                {
                    "name": name,
                    "registered_at": T - 900,
                    "last_seen_at": T - rng.randrange(100),
                    "drained": rng.random() < 0.3,
                    "backend": "sim",
                }
                for name in names
            ],
        )
        node_ids = dict(conn.execute(select(Node.name, Node.id)).all())
        gpus = []
        for name in names[:-1]:
            for k in rng.sample(range(4), rng.randint(1, 4)):
                gpus.append(
                    {
                        "uuid": f"GPU-{name}-{k}",
                        "node_id": node_ids[name],
                        "index": k,
                        "name": rng.choice(["H100", "A100"]),
                        "pci_bus_id": f"0000:{k:02x}:00.0",
                        "memory_total_bytes": 2**30,
                        "power_min_w": 100.0 + k,
                        "power_max_w": 700.0 - k,
                        "power_default_w": 650.0,
                    }
                )
        conn.execute(insert(Gpu), gpus)
        gpu_ids = list(conn.scalars(select(Gpu.id)))

        def times(n: int) -> list[float]:
            return [T + q / 4 for q in rng.sample(range(-4 * 300, 4 * 60), n)]

        samples = []
        for gpu_id in gpu_ids:
            for ts in times(rng.randrange(25)):
                samples.append(
                    {
                        "gpu_id": gpu_id,
                        "ts": ts,
                        "power_w": maybe(rng.uniform(50, 700)),
                        "power_instant_w": maybe(rng.uniform(50, 700)),
                        "energy_j": maybe(rng.uniform(0, 1e9)),
                        "sm_clock_mhz": maybe(float(rng.randrange(200, 2000))),
                        "mem_clock_mhz": None,
                        "utilization_gpu_ratio": maybe(rng.random()),
                        "temperature_c": None,
                        "power_limit_w": maybe(float(rng.randrange(200, 700))),
                        "throttle_reasons": rng.choice(["", "sw_power_cap", "a,b", "hw_slowdown"]),
                    }
                )
        rng.shuffle(samples)  # insertion order is not time order
        conn.execute(insert(GpuSampleRow), samples)
        hosts, tokens = [], []
        for node_id in node_ids.values():
            for ts in times(rng.randrange(12)):
                hosts.append(
                    {
                        "node_id": node_id,
                        "ts": ts,
                        "cpu_util_ratio": maybe(rng.random()),
                        "non_gpu_power_w": maybe(rng.uniform(500, 1500)),
                        "power_source": rng.choice(["model", "ipmi"]),
                    }
                )
            for ts in times(rng.randrange(8)):
                for e in range(rng.randint(1, 3)):
                    tokens.append(
                        {
                            "node_id": node_id,
                            "ts": ts,
                            "endpoint": f"http://127.0.0.1:{8000 + e}/metrics",
                            "model": "m",
                            "up": rng.random() < 0.7,
                            "generation_tokens_per_s": maybe(rng.uniform(0, 5000)),
                            "generation_tokens_total": maybe(rng.uniform(0, 1e9)),
                            "requests_waiting": maybe(float(rng.randrange(50))),
                            "requests_running": maybe(float(rng.randrange(500))),
                            "kv_cache_usage_ratio": maybe(rng.random()),
                            "ttft_p90_s": maybe(rng.uniform(0.01, 5)),
                            "tpot_p90_s": maybe(rng.uniform(0.005, 0.2)),
                            "ttft_mean_s": maybe(rng.uniform(0.01, 5)),
                            "tpot_mean_s": maybe(rng.uniform(0.005, 0.2)),
                            "ttft_p90_floor_s": maybe(rng.uniform(0.01, 5)),
                            "tpot_p90_floor_s": maybe(rng.uniform(0.005, 0.2)),
                            "latency_requests": maybe(float(rng.randrange(100))),
                        }
                    )
        rng.shuffle(hosts)
        rng.shuffle(tokens)
        conn.execute(insert(HostSampleRow), hosts)
        conn.execute(insert(TokenSampleRow), tokens)
        conn.execute(
            insert(Target),
            [
                {
                    "gpu_id": gpu_id,
                    "power_limit_w": maybe(float(rng.randrange(200, 700))),
                    "issued_at": T,
                    "lease_expires_at": T + rng.randrange(60),
                    "reason": "",
                }
                for gpu_id in gpu_ids
                if rng.random() < 0.6
            ],
        )


def _reference(store: Store, now: float, window_s: float) -> Snapshot:
    """The snapshot computed the plain way: every row read, filtered and picked in Python."""
    since = now - window_s

    def rows(model: type) -> list:
        with store.engine.connect() as conn:
            return list(conn.execute(select(model.__table__)))

    def newest(samples: list, key: str) -> dict[int, list]:
        """Per key, the rows at the newest ts in the window, in id order."""
        best: dict[int, list] = {}
        for r in sorted(samples, key=lambda r: r.id):
            if since <= r.ts <= now:
                have = best.get(getattr(r, key))
                if have is None or r.ts > have[0].ts:
                    best[getattr(r, key)] = [r]
                elif r.ts == have[0].ts:
                    have.append(r)
        return best

    def agg(how: Callable[[list[float]], float], toks: list, name: str) -> float | None:
        values = [getattr(t, name) for t in toks if getattr(t, name) is not None]
        return how(values) if values else None

    nodes = {n.id: n for n in rows(Node)}
    targets = {t.gpu_id: t for t in rows(Target)}
    gpu_newest = newest(rows(GpuSampleRow), "gpu_id")
    host_newest = newest(rows(HostSampleRow), "node_id")
    tok_newest = newest(rows(TokenSampleRow), "node_id")
    gpus = []
    for g in sorted(rows(Gpu), key=lambda g: (nodes[g.node_id].name, g.index)):
        (s,) = gpu_newest.get(g.id, [None])
        t = targets.get(g.id)
        gpus.append(
            GpuView(
                uuid=g.uuid,
                node=nodes[g.node_id].name,
                index=g.index,
                name=g.name,
                power_min_w=g.power_min_w,
                power_max_w=g.power_max_w,
                power_default_w=g.power_default_w,
                sample_ts=s and s.ts,
                power_w=s and s.power_w,
                energy_j=s and s.energy_j,
                sm_clock_mhz=s and s.sm_clock_mhz,
                utilization_gpu_ratio=s and s.utilization_gpu_ratio,
                power_limit_w=s and s.power_limit_w,
                throttle_reasons=tuple(s.throttle_reasons.split(","))
                if s and s.throttle_reasons
                else (),
                target_power_limit_w=t and t.power_limit_w,
                target_lease_expires_at=t and t.lease_expires_at,
            )
        )
    views = []
    for n in sorted(nodes.values(), key=lambda n: n.name):
        (h,) = host_newest.get(n.id, [None])
        toks = tok_newest.get(n.id, [])
        rates = [t.generation_tokens_per_s for t in toks if t.generation_tokens_per_s is not None]
        totals = [t.generation_tokens_total for t in toks if t.generation_tokens_total is not None]
        views.append(
            NodeView(
                name=n.name,
                drained=n.drained,
                drained_by=n.drained_by if n.drained else None,
                standby=bool(n.standby) and n.drained,
                last_seen_at=n.last_seen_at,
                host_ts=h and h.ts,
                non_gpu_power_w=h and h.non_gpu_power_w,
                power_source=h and h.power_source,
                generation_tokens_per_s=sum(rates) if rates else None,
                generation_tokens_total=sum(totals) if totals else None,
                endpoints_up=sum(1 for t in toks if t.up),
                endpoints_total=len(toks),
                token_ts=toks[0].ts if toks else None,
                requests_waiting=agg(sum, toks, "requests_waiting"),
                requests_running=agg(sum, toks, "requests_running"),
                kv_cache_usage_ratio=agg(max, toks, "kv_cache_usage_ratio"),
                ttft_p90_s=agg(max, toks, "ttft_p90_s"),
                tpot_p90_s=agg(max, toks, "tpot_p90_s"),
                ttft_mean_s=agg(max, toks, "ttft_mean_s"),
                tpot_mean_s=agg(max, toks, "tpot_mean_s"),
                ttft_p90_floor_s=agg(max, toks, "ttft_p90_floor_s"),
                tpot_p90_floor_s=agg(max, toks, "tpot_p90_floor_s"),
                latency_requests=agg(sum, toks, "latency_requests"),
                models=tuple(sorted({t.model for t in toks if t.model})),
            )
        )
    budget = next((b.limit_w for b in rows(Budget) if b.scope == "facility"), None)
    return Snapshot(ts=now, budget_w=budget, nodes=tuple(views), gpus=tuple(gpus))


@pytest.mark.parametrize("seed", [1, 2])
def test_snapshot_matches_reference(store: Store, seed: int) -> None:
    _random_store(store, random.Random(seed))
    seen = set()
    for now, window_s in ((T, 60.0), (T - 37.25, 10.0), (T + 100, 120.0), (T, 3600.0)):
        snap = store.snapshot(now, window_s)
        assert snap == _reference(store, now, window_s), (now, window_s)
        seen |= {g.sample_ts is None for g in snap.gpus} | {n.host_ts is None for n in snap.nodes}
        seen |= {("tokens", min(n.endpoints_total, 2)) for n in snap.nodes}
    # The data exercised both sides: with and without a sample, several endpoints per tick.
    assert {True, False, ("tokens", 0), ("tokens", 2)} <= seen
