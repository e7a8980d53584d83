"""Routing weights and in-flight limits: the policy, the store, and how they reach a real
HAProxy, a JSON file, the HTTP endpoint and the simulated router."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import _missing

from wattkeeper.config import load_config
from wattkeeper.policies.route import MAX_WEIGHT, RouteNode, Routes, RouteSettings, RouteTarget
from wattkeeper.routers import FileRouter, HaproxyRouter, HaproxyRuntime
from wattkeeper.store.db import make_engine, upgrade
from wattkeeper.store.repository import RouteRow, Store


def node(name: str = "a", **kw: object) -> RouteNode:
    base: dict[str, object] = dict(
        name=name,
        serving=True,
        servers=1,
        tokens_per_s=1000.0,
        gpu_power_w=1000.0,
        steer=0.5,
        tpot_ratio=0.5,
        power_can_rise=True,
        requests_running=100.0,
    )
    base.update(kw)
    return RouteNode(**base)  # type: ignore[arg-type]


# -- the policy ----------------------------------------------------------------------------
def test_weights_follow_tokens_per_joule_within_bounds() -> None:
    routes = Routes()
    out = {
        t.node: t
        for t in routes.update(
            [
                node("fast", tokens_per_s=3000.0),
                node("slow", tokens_per_s=2000.0),
                node("poor", tokens_per_s=100.0),
            ]
        )
    }
    assert out["fast"].weight == MAX_WEIGHT
    assert out["slow"].weight == round(MAX_WEIGHT * 2 / 3)
    # Never starved: its latency and efficiency must stay measurable.
    assert out["poor"].weight == round(MAX_WEIGHT * RouteSettings().min_share)
    assert all(t.max_inflight is None for t in out.values())


def test_weights_compare_nodes_of_one_pool_only() -> None:
    """A 70B pool makes a tenth of an 8B pool's tokens per joule: that says nothing about
    its nodes, whose tilt among themselves must survive the 8B pool's presence."""
    out = {
        t.node: t.weight
        for t in Routes().update(
            [
                node("big-1", tokens_per_s=200.0, pool="llama-70b"),
                node("big-2", tokens_per_s=100.0, pool="llama-70b"),
                node("small", tokens_per_s=3000.0, pool="llama-8b"),
            ]
        )
    }
    assert out == {"big-1": MAX_WEIGHT, "big-2": MAX_WEIGHT // 2, "small": MAX_WEIGHT}


def test_a_node_near_its_slo_gives_up_weight_and_takes_it_back_with_slack() -> None:
    routes = Routes()
    weights = []
    for _ in range(3):
        (t,) = routes.update([node(steer=0.97)])
        weights.append(t.weight)
    assert weights[0] < MAX_WEIGHT and weights[2] < weights[1] < weights[0]
    for _ in range(20):
        (t,) = routes.update([node(steer=0.5)])
    assert t.weight == MAX_WEIGHT


def test_not_serving_gets_no_new_requests_and_weights_off_gives_full_weight() -> None:
    out = Routes().update([node("up"), node("drained", serving=False)])
    assert [t.weight for t in out] == [MAX_WEIGHT, 0]
    out = Routes(RouteSettings(weights=False)).update(
        [node("fast", tokens_per_s=3000.0), node("slow", tokens_per_s=300.0, steer=0.99)]
    )
    assert [t.weight for t in out] == [MAX_WEIGHT, MAX_WEIGHT]


def test_inflight_limit_only_where_power_cannot_rise_then_lifted() -> None:
    routes = Routes()
    (t,) = routes.update([node(tpot_ratio=0.99, steer=0.99, power_can_rise=True)])
    assert t.max_inflight is None, "the latency ceiling can still add power: no limit"
    limits = []
    for _ in range(3):
        (t,) = routes.update(
            [node(tpot_ratio=0.99, steer=0.99, power_can_rise=False, requests_running=200.0)]
        )
        limits.append(t.max_inflight)
    assert limits[0] == 180 and limits[2] is not None and limits[2] < limits[1] < limits[0]
    assert "in flight per server" in t.reason
    # Slack: the limit rises; once far above the batch it no longer binds and is lifted.
    (t,) = routes.update([node(tpot_ratio=0.7, steer=0.7, requests_running=140.0)])
    assert t.max_inflight is not None and t.max_inflight > limits[2]
    for _ in range(30):
        (t,) = routes.update([node(tpot_ratio=0.5, steer=0.5, requests_running=60.0)])
    assert t.max_inflight is None
    off = Routes(RouteSettings(inflight_limits=False))
    (t,) = off.update([node(tpot_ratio=0.99, steer=0.99, power_can_rise=False)])
    assert t.max_inflight is None


def test_limit_is_per_server() -> None:
    (t,) = Routes().update(
        [node(servers=4, tpot_ratio=1.2, power_can_rise=False, requests_running=400.0)]
    )
    assert t.max_inflight == 90


# -- the store ------------------------------------------------------------------------------
@pytest.fixture
def store(db_url: str) -> Store:
    upgrade(make_engine(db_url))
    s = Store(make_engine(db_url))
    for name in ("a", "b"):
        s.register_node(name, "sim", [], now=0.0)
    return s


def test_routes_are_stored_and_audited_only_when_they_change(store: Store) -> None:
    t = [RouteTarget("a", 200, None, "x"), RouteTarget("b", 100, 40, "y")]
    assert store.write_routes(t, 1.0) == 2
    # A weight within the tolerance is the same weight: neither rewritten nor audited.
    assert store.write_routes([RouteTarget("a", 204, None, "x2")], 2.0) == 0
    assert store.write_routes([RouteTarget("b", 100, 30, "z")], 3.0) == 1
    assert store.write_routes([RouteTarget("a", 0, None, "drained")], 4.0) == 1
    assert store.write_routes([RouteTarget("ghost", 1, None, "?")], 4.0) == 0
    rows = {r.node: r for r in store.routes()}
    assert rows["a"] == RouteRow("a", 0, None, 4.0, "drained")
    assert rows["b"].max_inflight == 30 and rows["b"].updated_at == 3.0
    log = [e for e in store.audit_log(20) if e.action == "route.set"]
    assert len(log) == 4
    assert log[0].detail["previous_weight"] == 200 and log[0].detail["weight"] == 0
    # The same route for a reason that moved on: the reason is brought up to date at
    # most once a minute, without an audit row.
    assert store.write_routes([RouteTarget("b", 101, 30, "measured now")], 30.0) == 0
    assert {r.node: r.reason for r in store.routes()}["b"] == "z"
    assert store.write_routes([RouteTarget("b", 101, 30, "measured now")], 64.0) == 0
    row = {r.node: r for r in store.routes()}["b"]
    assert (row.reason, row.weight, row.updated_at) == ("measured now", 100, 64.0)
    assert len([e for e in store.audit_log(20) if e.action == "route.set"]) == 4


# -- publication -------------------------------------------------------------------------------
ROWS = [RouteRow("node-a", 64, 12, 5.0, "slow"), RouteRow("node-b", 256, None, 5.0, "best")]


def test_file_router_writes_json_atomically_and_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "pub" / "routes.json"
    router = FileRouter(path, {"node-a": ["a1", "a2"]})
    router.apply(ROWS, 10.0)
    doc = json.loads(path.read_text())
    assert doc["generated_at"] == 10.0
    assert doc["routes"][0] == {
        "node": "node-a",
        "servers": ["a1", "a2"],
        "weight": 64,
        "max_inflight": 12,
        "updated_at": 5.0,
        "reason": "slow",
    }
    assert doc["routes"][1]["servers"] == ["node-b"]
    router.apply(ROWS, 20.0)
    assert json.loads(path.read_text())["generated_at"] == 10.0
    assert [p.name for p in path.parent.iterdir()] == ["routes.json"]


def test_file_router_that_cannot_write_says_so_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    router = FileRouter(blocker / "routes.json")
    router.apply(ROWS, 1.0)
    router.apply(ROWS, 2.0)
    assert sum("cannot write routes" in r.message for r in caplog.records) == 1


# -- a real HAProxy -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def haproxy(tmp_path: Path):
    binary = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if binary is None:
        _missing("haproxy (Debian package haproxy)")
    assert binary is not None
    sock = tmp_path / "admin.sock"
    tcp = _free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        f"""global
    stats socket {sock} mode 600 level admin
    stats socket ipv4@127.0.0.1:{tcp} level admin
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend fe
    bind 127.0.0.1:{_free_port()}
    default_backend llm
backend llm
    balance leastconn
    server node-a 127.0.0.1:9 maxconn 256
    server node-b1 127.0.0.1:9
    server node-b2 127.0.0.1:9
"""
    )
    proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(
                f"haproxy did not start: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        time.sleep(0.05)
    yield proc, str(sock), f"127.0.0.1:{tcp}"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


def _state(address: str) -> dict[str, tuple[int, int]]:
    """(weight, maxconn) of each server in backend llm, as HAProxy reports them."""
    text = HaproxyRuntime(address).command("show stat")
    lines = text.splitlines()
    header = lines[0][2:].split(",")
    col = {k: i for i, k in enumerate(header)}
    out = {}
    for line in lines[1:]:
        c = line.split(",")
        if len(c) > 1 and c[0] == "llm" and c[1] not in ("FRONTEND", "BACKEND"):
            out[c[1]] = (int(c[col["weight"]]), int(c[col["slim"]] or 0))
    return out


def test_haproxy_gets_weights_and_maxconn_and_its_own_limit_back(haproxy) -> None:
    _, unix, tcp = haproxy
    router = HaproxyRouter(unix, "llm", {"node-b": ["node-b1", "node-b2"]}, resync_s=60)
    router.apply(ROWS, 0.0)
    state = _state(tcp)
    assert state["node-a"] == (64, 12)
    assert state["node-b1"] == (256, 0) and state["node-b2"] == (256, 0)
    # No limit any more: the maxconn haproxy.cfg gave the server comes back.
    router.apply([RouteRow("node-a", 0, None, 6.0, "drained"), ROWS[1]], 1.0)
    assert _state(tcp)["node-a"] == (0, 256)
    # A restarted controller cannot tell haproxy.cfg's maxconn from its own: configured.
    HaproxyRuntime(unix).command("set maxconn server llm/node-a 12")
    again = HaproxyRouter(unix, "llm", {"node-b": ["node-b1", "node-b2"]}, maxconn=256)
    again.apply([RouteRow("node-a", 10, None, 7.0, "x"), ROWS[1]], 2.0)
    assert _state(tcp)["node-a"] == (10, 256)


def test_router_configuration(tmp_path: Path) -> None:
    from wattkeeper.runtime import config_routers, route_servers

    path = tmp_path / "wattkeeper.toml"
    path.write_text(
        """
[router]
file = "/run/wattkeeper/routes.json"
inflight_limits = false

[[router.haproxy]]
socket = "/run/haproxy/admin.sock"
backend = "llm"
maxconn = 256
servers = { gpu-01 = ["gpu-01-a", "gpu-01-b"] }
"""
    )
    cfg = load_config(path)
    routers = config_routers(cfg)
    assert [type(r).__name__ for r in routers] == ["HaproxyRouter", "FileRouter"]
    assert routers[0].maxconn == 256 and routers[0].backend == "llm"  # type: ignore[attr-defined]
    assert route_servers(cfg) == {"gpu-01": ["gpu-01-a", "gpu-01-b"]}
    assert cfg.router.inflight_limits is False
    path.write_text('[[router.haproxy]]\nsocket = "/x.sock"\n')
    with pytest.raises(Exception, match="backend"):
        load_config(path)


def test_haproxy_over_tcp_and_a_restart_is_repaired_by_the_resync(haproxy) -> None:
    _, unix, tcp = haproxy
    router = HaproxyRouter(tcp, "llm", {"node-b": ["node-b1", "node-b2"]}, resync_s=30)
    router.apply(ROWS, 0.0)
    # Someone (a reload) puts the old weight back; unchanged routes are not resent...
    HaproxyRuntime(unix).command("set weight llm/node-a 100")
    router.apply(ROWS, 10.0)
    assert _state(tcp)["node-a"][0] == 100
    # ...until the resync.
    router.apply(ROWS, 31.0)
    assert _state(tcp)["node-a"][0] == 64


def test_unknown_server_and_unreachable_haproxy_are_said_once_and_never_raise(
    haproxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proc, unix, tcp = haproxy
    router = HaproxyRouter(unix, "llm")  # node-b's servers are not named node-b
    router.apply(ROWS, 0.0)
    router.apply(ROWS, 1.0)
    assert _state(tcp)["node-a"] == (64, 12)
    assert sum("no server llm/node-b" in r.message for r in caplog.records) == 1
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    caplog.clear()
    for t in (2.0, 3.0):
        router.apply([RouteRow("node-a", 128, None, t, "x")], t)
    assert sum("routes not applied" in r.message for r in caplog.records) == 1
    gone = HaproxyRouter(str(tmp_path / "nothing.sock"), "llm")
    gone.apply(ROWS, 0.0)


# -- the controller, end to end --------------------------------------------------------------
def test_controller_publishes_routes_over_http_file_and_the_simulated_router(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Hetero facility (H100 and A100 nodes behind one router): after a few simulated
    minutes the routes in the store reach the simulator's router, the JSON file and
    /routes, and the H100 nodes, which make more tokens per joule, weigh more."""
    from wattkeeper.clock import SimClock
    from wattkeeper.exporter import serve
    from wattkeeper.runtime import build_simulated, open_store, run_fast

    pub = tmp_path / "routes.json"
    production = tmp_path / "production-routes.json"
    env = {
        "WATTKEEPER_SLO__TTFT_S": "2",
        "WATTKEEPER_SLO__TPOT_S": "0.06",
        "WATTKEEPER_ROUTER__FILE": str(production),
    }
    cfg = load_config(None, environ=env)
    upgrade(make_engine(sqlite_url))
    rt = build_simulated(cfg, open_store(cfg, sqlite_url), "hetero", SimClock(1_000_000.0))
    assert rt.controller is not None
    rt.controller.routers.append(FileRouter(pub))
    run_fast(rt, 240.0)
    # A simulation never publishes to the routers the configuration names (real ones).
    assert not production.exists()
    rows = {r.node: r for r in rt.store.routes()}
    f = rt.facility
    kinds = {a.node: f.gpu_kind_names[f.node_gpu_indices(k)[0]] for k, a in enumerate(rt.agents)}
    h100 = [rows[n].weight for n, k in kinds.items() if k == "h100"]
    a100 = [rows[n].weight for n, k in kinds.items() if k == "a100"]
    assert min(h100) > max(a100), rows
    for k, a in enumerate(rt.agents):
        for r in f.node_replicas(k):
            assert f.route_weight[r] == rows[a.node].weight / MAX_WEIGHT
    doc = json.loads(pub.read_text())
    assert {r["node"]: r["weight"] for r in doc["routes"]} == {n: r.weight for n, r in rows.items()}
    server = serve(rt, "127.0.0.1", 0)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/routes", timeout=10) as resp:
            assert resp.headers["Content-Type"] == "application/json"
            served = json.loads(resp.read())
        assert served["routes"] == doc["routes"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert b"wattkeeper_gpu_power_watts" in resp.read()
    finally:
        server.shutdown()
        server.server_close()


def test_a_node_that_falls_silent_gets_no_new_requests(sqlite_url: str) -> None:
    from wattkeeper.clock import SimClock
    from wattkeeper.runtime import build_simulated, open_store, run_fast
    from wattkeeper.simulator.facility import FacilitySpec

    env = {"WATTKEEPER_SLO__TTFT_S": "2", "WATTKEEPER_SLO__TPOT_S": "0.06"}
    cfg = load_config(None, environ=env)
    upgrade(make_engine(sqlite_url))
    rt = build_simulated(cfg, open_store(cfg, sqlite_url), FacilitySpec(2, 2), SimClock(5e5))
    run_fast(rt, 60.0)
    assert all(r.weight > 0 for r in rt.store.routes())
    rt.agents = rt.agents[:1]  # sim-node-1's agent dies: nothing more from it
    run_fast(rt, 90.0)
    weights = {r.node: r.weight for r in rt.store.routes()}
    assert weights["sim-node-0"] > 0 and weights["sim-node-1"] == 0, weights
    assert rt.facility.route_weight[rt.facility.node_replicas(1)[0]] == 0.0
