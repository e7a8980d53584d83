"""The Prometheus exporter against real consumers: httpx, promtool, a Prometheus server, Grafana.

Every test scrapes a real HTTP server over loopback; values are compared with what the
agents sampled and what the store holds, so a unit or label slip shows as a wrong
number, not only as a name. The Prometheus and promtool tests skip locally when the
binaries are absent and fail in CI (``_missing``), as the PostgreSQL tests do.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import _missing
from prometheus_client.parser import text_string_to_metric_families

from wattkeeper import __version__
from wattkeeper.agent import TokenEndpoint
from wattkeeper.clock import SimClock
from wattkeeper.collectors.gpu import THROTTLE_REASONS, GpuLostError
from wattkeeper.config import Config
from wattkeeper.exporter import serve
from wattkeeper.runtime import Runtime, build_simulated, open_store
from wattkeeper.simulator.facility import FacilitySpec
from wattkeeper.store.db import make_engine, upgrade
from wattkeeper.store.repository import Store

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOLDEN = FIXTURES / "exposition_golden.prom"
DASHBOARD = ROOT / "dashboards" / "wattkeeper-grafana.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"
START = 1_700_000_000.0
BUDGET_W = 3500.0  # below what 1x4 H100 draw uncapped, so the controller caps


# -- helpers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def migrated_store(tmp_path: Path, name: str = "wattkeeper.db") -> Store:
    url = f"sqlite:///{tmp_path / name}"
    upgrade(make_engine(url))
    return open_store(Config(), url)


def step(rt: Runtime, seconds: int) -> None:
    """Advance the simulated run one second at a time, as ``run --fast`` does."""
    for _ in range(seconds):
        rt.advance(rt.clock.now() + 1.0)


Key = tuple[str, frozenset[tuple[str, str]]]


class Scrape:
    """One parsed /metrics page: families by name and every sample by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[Key, float] = {}
        self.counts: Counter[Key] = Counter()
        for fam in self.families.values():
            for s in fam.samples:
                key = (s.name, frozenset(s.labels.items()))
                self.samples[key] = s.value
                self.counts[key] += 1
        self.type_names = set(re.findall(r"^# TYPE (\S+) \S+$", text, re.MULTILINE))

    def value(self, metric: str, /, **labels: str) -> float:
        return self.samples[(metric, frozenset(labels.items()))]

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(dict(lbl), v) for (n, lbl), v in self.samples.items() if n == name]

    def duplicates(self) -> list[Key]:
        return [k for k, n in self.counts.items() if n > 1]


def scrape(port: int) -> Scrape:
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


def gpu_labels(rt: Runtime, uuid: str) -> dict[str, str]:
    agent = rt.agents[0]
    info = agent.infos[uuid]
    return {"node": agent.node, "gpu": str(info.index), "uuid": uuid, "name": info.name}


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        _missing(f"{binary} (Debian package prometheus)")
    assert path is not None
    return path


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    """1 node x 4 simulated H100, capped by a budget, after 12 simulated seconds."""
    store = migrated_store(tmp_path)
    runtime = build_simulated(Config(), store, FacilitySpec(1, 4), SimClock(START))
    store.set_budget(BUDGET_W, "test", START)
    step(runtime, 12)
    yield runtime
    runtime.shutdown()


@pytest.fixture
def port(rt: Runtime) -> Iterator[int]:
    p = free_port()
    server = serve(rt, "127.0.0.1", p)
    yield p
    server.shutdown()
    server.server_close()


@pytest.fixture
def scraped(port: int) -> Scrape:
    return scrape(port)


# -- what a scrape says ----------------------------------------------------------------------
def test_gpu_series_are_the_agents_newest_samples(rt: Runtime, scraped: Scrape) -> None:
    agent = rt.agents[0]
    assert len(agent.state.samples) == 4
    for uuid, s in agent.state.samples.items():
        lbl = gpu_labels(rt, uuid)
        assert scraped.value("wattkeeper_gpu_power_watts", **lbl) == s.power_w
        assert scraped.value("wattkeeper_gpu_power_instant_watts", **lbl) == s.power_instant_w
        assert scraped.value("wattkeeper_gpu_energy_joules_total", **lbl) == s.energy_j
        assert scraped.value("wattkeeper_gpu_sm_clock_hertz", **lbl) == pytest.approx(
            s.sm_clock_mhz * 1e6
        )
        assert scraped.value("wattkeeper_gpu_memory_clock_hertz", **lbl) == pytest.approx(
            s.mem_clock_mhz * 1e6
        )
        assert scraped.value("wattkeeper_gpu_temperature_celsius", **lbl) == s.temperature_c
        util = scraped.value("wattkeeper_gpu_utilization_ratio", **lbl)
        assert util == s.utilization_gpu_ratio and 0.0 <= util <= 1.0
        assert scraped.value("wattkeeper_gpu_power_limit_watts", **lbl) == s.power_limit_w
        assert scraped.value("wattkeeper_gpu_last_sample_timestamp_seconds", **lbl) == s.timestamp
        lim = agent.infos[uuid].power_limits
        assert scraped.value("wattkeeper_gpu_power_limit_min_watts", **lbl) == lim.min_w
        assert scraped.value("wattkeeper_gpu_power_limit_max_watts", **lbl) == lim.max_w
        assert 50 < s.power_w < 700
    assert scraped.families["wattkeeper_gpu_energy_joules"].type == "counter"
    assert "# TYPE wattkeeper_gpu_energy_joules_total counter" in scraped.text
    assert scraped.value("wattkeeper_gpu_up", node=agent.node) == 1.0


def test_throttle_reasons_are_one_series_per_reason(rt: Runtime, scraped: Scrape) -> None:
    agent = rt.agents[0]
    capped = 0
    for uuid, s in agent.state.samples.items():
        lbl = gpu_labels(rt, uuid)
        reasons = {
            labels["reason"]: v
            for labels, v in scraped.series("wattkeeper_gpu_clock_event_reason")
            if labels["uuid"] == uuid
        }
        assert set(THROTTLE_REASONS.values()) <= set(reasons)
        assert {r for r, v in reasons.items() if v == 1.0} == set(s.throttle_reasons)
        assert set(reasons.values()) <= {0.0, 1.0}
        capped += reasons["sw_power_cap"] == 1.0
        assert scraped.value("wattkeeper_gpu_clock_event_reason", **lbl, reason="hw_slowdown") == 0
    assert capped > 0, "a budget below uncapped draw must show the software power cap"


def test_budget_targets_and_facility_come_from_the_store(rt: Runtime, scraped: Scrape) -> None:
    budget = rt.store.get_budget()
    assert budget is not None
    assert scraped.value("wattkeeper_facility_budget_watts") == budget.limit_w == BUDGET_W
    agent = rt.agents[0]
    targets = rt.store.targets_for_node(agent.node)
    assert len(targets) == 4
    for uuid, target in targets.items():
        lbl = gpu_labels(rt, uuid)
        assert scraped.value("wattkeeper_gpu_target_power_limit_watts", **lbl) == (
            target.power_limit_w
        )
        assert (
            scraped.value("wattkeeper_gpu_target_lease_expiry_timestamp_seconds", **lbl)
            == target.lease_expires_at
        )
    power = scraped.value("wattkeeper_facility_power_watts")
    gpu_sum = sum(s.power_w for s in agent.state.samples.values())
    assert agent.state.host is not None
    host_w = agent.state.host.non_gpu_power_w
    assert scraped.value("wattkeeper_node_non_gpu_power_watts", node=agent.node) == host_w
    assert power == pytest.approx(gpu_sum + host_w, abs=0.1)
    assert scraped.value("wattkeeper_facility_tokens_per_joule") > 0
    assert scraped.value("wattkeeper_node_tokens_per_joule", node=agent.node) > 0
    assert scraped.value("wattkeeper_node_drained", node=agent.node) == 0
    assert scraped.value("wattkeeper_store_up") == 1.0
    # The latency the controller steers on is the stored one, as the store has it.
    view = next(n for n in rt.store.snapshot(rt.clock.now()).nodes if n.name == agent.node)
    assert view.tpot_mean_s is not None and view.ttft_mean_s is not None
    assert scraped.value("wattkeeper_node_tpot_mean_seconds", node=agent.node) == view.tpot_mean_s
    assert scraped.value("wattkeeper_node_ttft_p90_seconds", node=agent.node) == view.ttft_p90_s


def test_token_and_source_series(rt: Runtime, scraped: Scrape) -> None:
    agent = rt.agents[0]
    (ep,) = agent.endpoints
    reading = agent.state.readings[ep.name]
    assert reading is not None
    generated = scraped.series("wattkeeper_tokens_generated_total")
    assert len(generated) == len(reading.series) > 1, "one series per vLLM engine"
    assert sum(v for _, v in generated) == sum(
        s.generation_tokens_total or 0.0 for s in reading.series
    )
    assert all(v > 0 for _, v in generated)
    assert {lbl["engine"] for lbl, _ in generated} == {s.labels["engine"] for s in reading.series}
    assert scraped.families["wattkeeper_tokens_generated"].type == "counter"
    src = {"node": agent.node, "endpoint": ep.name}
    assert scraped.value("wattkeeper_token_source_up", **src) == 1.0
    assert scraped.value("wattkeeper_token_source_info", **src, kind="vllm") == 1.0
    assert (
        scraped.value("wattkeeper_token_source_last_sample_timestamp_seconds", **src)
        == (agent.state.endpoint_last_ok[ep.name])
    )
    assert scraped.value("wattkeeper_host_up", node=agent.node) == 1.0
    assert scraped.value("wattkeeper_host_last_sample_timestamp_seconds", node=agent.node) == (
        rt.clock.now()
    )
    for collector, endpoint in (("gpu", ""), ("host", ""), ("tokens", ep.name)):
        lbl = {"node": agent.node, "collector": collector, "endpoint": endpoint}
        assert scraped.value("wattkeeper_collector_success", **lbl) == 1.0
        assert 0 <= scraped.value("wattkeeper_collector_duration_seconds", **lbl) < 5
    assert scraped.value("wattkeeper_build_info", version=__version__) == 1.0


def test_latency_histograms_are_the_servers_own_buckets(rt: Runtime, scraped: Scrape) -> None:
    """TTFT and TPOT keep every bucket the server exported, so histogram_quantile over
    a rate works on them as on the server's own metrics."""
    agent = rt.agents[0]
    (ep,) = agent.endpoints
    reading = agent.state.readings[ep.name]
    assert reading is not None
    assert scraped.families["wattkeeper_ttft_seconds"].type == "histogram"
    checked = 0
    for series in reading.series:
        labels = {
            "node": agent.node,
            "endpoint": ep.name,
            "model": series.model,
            "engine": series.labels["engine"],
        }
        for name, hist in (
            ("wattkeeper_ttft_seconds", series.ttft_seconds),
            ("wattkeeper_tpot_seconds", series.tpot_seconds),
        ):
            assert hist is not None and hist.count > 0
            for le, count in hist.buckets:
                bound = "+Inf" if le == float("inf") else repr(float(le))
                assert scraped.value(f"{name}_bucket", **labels, le=bound) == count
            assert scraped.value(f"{name}_count", **labels) == hist.count
            assert scraped.value(f"{name}_sum", **labels) == pytest.approx(hist.sum)
            checked += 1
    assert checked == 2 * len(reading.series)


def test_no_duplicate_series_and_base_units(scraped: Scrape) -> None:
    assert scraped.duplicates() == []
    for name in scraped.type_names:
        assert name.startswith("wattkeeper_"), name
        assert not re.search(r"_(mhz|percent|milli\w*|kilo\w*|mj)(_|$)", name), name
    for (name, _), value in scraped.samples.items():
        if name.endswith("_ratio"):
            assert 0.0 <= value <= 1.0, name
        assert math.isfinite(value), name
    for fam in scraped.families.values():
        if fam.type == "counter":
            assert f"# TYPE {fam.name}_total counter" in scraped.text


def test_promtool_finds_no_problem(scraped: Scrape) -> None:
    promtool = need("promtool")
    r = subprocess.run(
        [promtool, "check", "metrics"],
        input=scraped.text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (r.stdout + r.stderr).strip() == ""


# -- failures stay visible, and never break the scrape ---------------------------------------
def test_store_down_still_serves_agent_metrics(rt: Runtime, port: int) -> None:
    healthy = rt.store
    rt.store = Store(make_engine("postgresql+psycopg://nobody@127.0.0.1:9/nowhere"))
    try:
        down = scrape(port)
    finally:
        rt.store.engine.dispose()
        rt.store = healthy
    assert down.value("wattkeeper_store_up") == 0.0
    agent = rt.agents[0]
    for uuid, s in agent.state.samples.items():
        assert down.value("wattkeeper_gpu_power_watts", **gpu_labels(rt, uuid)) == s.power_w
    assert down.series("wattkeeper_tokens_generated_total")
    assert "wattkeeper_facility_budget_watts" not in down.families
    assert "wattkeeper_gpu_target_power_limit_watts" not in down.families
    assert scrape(port).value("wattkeeper_store_up") == 1.0


def test_failed_sources_go_down_and_keep_their_last_timestamp(
    rt: Runtime, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = rt.agents[0]
    page = (FIXTURES / "metrics" / "vllm_metrics.txt").read_text()
    broken = threading.Event()

    def flaky() -> str:
        if broken.is_set():
            raise OSError("connection refused")
        return page

    ep = TokenEndpoint("http://127.0.0.1:1/metrics", "vllm", flaky)
    agent.endpoints.append(ep)
    agent.tokens_interval_s = 0.0  # read servers on every tick once the 5 s wait is over
    step(rt, 5)
    good_ts = rt.clock.now()
    src = {"node": agent.node, "endpoint": ep.name}
    before = scrape(port)
    assert before.value("wattkeeper_token_source_up", **src) == 1.0
    assert any(
        lbl["endpoint"] == ep.name for lbl, _ in before.series("wattkeeper_tokens_generated_total")
    )

    lost = next(iter(agent.infos))
    real_sample = agent.backend.sample

    def sample(uuid: str):
        if uuid == lost:
            raise GpuLostError("fell off the bus")
        return real_sample(uuid)

    monkeypatch.setattr(agent.backend, "sample", sample)
    broken.set()
    step(rt, 3)
    after = scrape(port)
    assert after.value("wattkeeper_token_source_up", **src) == 0.0
    assert after.value("wattkeeper_token_source_last_sample_timestamp_seconds", **src) == good_ts
    assert after.value("wattkeeper_collector_success", **src, collector="tokens") == 0.0
    assert not any(
        lbl["endpoint"] == ep.name for lbl, _ in after.series("wattkeeper_tokens_generated_total")
    )
    lbl = gpu_labels(rt, lost)
    assert after.value("wattkeeper_gpu_up", node=agent.node) == 0.0
    assert ("wattkeeper_gpu_power_watts", frozenset(lbl.items())) not in after.samples
    assert after.value("wattkeeper_gpu_last_sample_timestamp_seconds", **lbl) == pytest.approx(
        good_ts
    )
    others = [u for u in agent.infos if u != lost]
    for uuid in others:
        assert after.value(
            "wattkeeper_gpu_last_sample_timestamp_seconds", **gpu_labels(rt, uuid)
        ) == pytest.approx(rt.clock.now())
    assert after.value("wattkeeper_agent_errors_total", node=agent.node) >= 3


def test_controller_periods_are_a_histogram_of_the_periods_it_led(rt: Runtime, port: int) -> None:
    """12 seconds at a 5 s period: periods at 1, 6 and 11 s, each observed once, in
    cumulative buckets; a standby's periods are not counted."""
    first = scrape(port)
    assert first.value("wattkeeper_controller_leading") == 1.0
    assert first.value("wattkeeper_controller_period_duration_seconds_count") == 3
    buckets = [
        (float(dict(labels)["le"]), v)
        for (name, labels), v in first.samples.items()
        if name == "wattkeeper_controller_period_duration_seconds_bucket"
    ]
    counts = [v for _, v in sorted(buckets)]
    assert counts == sorted(counts) and counts[-1] == 3
    total = first.value("wattkeeper_controller_period_duration_seconds_sum")
    assert 0 < total == pytest.approx(rt.controller.state.periods.sum_s)
    rt.controller.state.epoch = None  # as when the lease went to another controller
    rt.controller._lead = lambda now: False
    step(rt, 10)
    later = scrape(port)
    assert later.value("wattkeeper_controller_leading") == 0.0
    assert later.value("wattkeeper_controller_period_duration_seconds_count") == 3


# -- the names are a contract: golden file, docs, dashboard ----------------------------------
def structure(s: Scrape) -> str:
    """HELP, TYPE and one placeholder sample per label set: stable against physics changes."""
    lines = [
        "# Structure of a wattkeeper scrape: names, types, help and label names; values and",
        "# label values are placeholders. Regenerate: WATTKEEPER_UPDATE_GOLDEN=1 pytest -k golden",
    ]
    for block in re.split(r"(?=^# HELP )", s.text, flags=re.MULTILINE):
        if not block.strip():
            continue
        head = [ln for ln in block.splitlines() if ln.startswith("#")]
        lines += head
        shapes: dict[tuple[str, ...], str] = {}
        for ln in block.splitlines():
            if ln.startswith("#") or not ln.strip():
                continue
            m = re.match(r"^(\w+)(?:\{(.*)\})? ", ln)
            assert m, ln
            names = tuple(sorted(re.findall(r'(\w+)="', m.group(2) or "")))
            # A bucket's le must stay a number for promtool: the +Inf bucket stands in.
            body = ",".join(f'{n}="+Inf"' if n == "le" else f'{n}="{n}"' for n in names)
            key = (m.group(1), *names)
            shapes[key] = f"{m.group(1)}{{{body}}} 0" if names else f"{m.group(1)} 0"
        lines += [shapes[k] for k in sorted(shapes)]
    return "\n".join(lines) + "\n"


def test_golden_exposition(scraped: Scrape) -> None:
    """Renaming a metric or a label is a breaking change: it must show up in review."""
    got = structure(scraped)
    if os.environ.get("WATTKEEPER_UPDATE_GOLDEN"):
        GOLDEN.write_text(got)
    assert GOLDEN.read_text() == got, (
        "exposition changed; if intended, rerun with WATTKEEPER_UPDATE_GOLDEN=1 "
        "and update docs/metrics.md"
    )
    promtool = shutil.which("promtool")
    if promtool:
        r = subprocess.run(
            [promtool, "check", "metrics"], input=got, capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_every_metric_is_documented(scraped: Scrape) -> None:
    doc = METRICS_DOC.read_text()
    missing = sorted(n for n in scraped.type_names if f"`{n}`" not in doc)
    assert missing == []


def dashboard_exprs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str) and "(" in value:
                yield value
            else:
                yield from dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_exprs(item)


def test_dashboard_only_uses_exported_metrics_and_labels(scraped: Scrape) -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36 and dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    exprs = list(dashboard_exprs(dash))
    used = {n for e in exprs for n in re.findall(r"\bwattkeeper_\w+", e)}
    assert used - scraped.type_names == set()
    assert {
        "wattkeeper_facility_power_watts",
        "wattkeeper_facility_budget_watts",
        "wattkeeper_tokens_generated_total",
        "wattkeeper_facility_tokens_per_joule",
        "wattkeeper_gpu_power_watts",
        "wattkeeper_gpu_power_limit_watts",
        "wattkeeper_gpu_target_power_limit_watts",
        "wattkeeper_gpu_clock_event_reason",
        "wattkeeper_token_source_up",
    } <= used
    labels_of: dict[str, set[str]] = {}
    for (name, lbl), _ in scraped.samples.items():
        labels_of.setdefault(name, set()).update(k for k, _ in lbl)
    for e in exprs:
        for name, matchers in re.findall(r"\b(wattkeeper_\w+)\{([^}]*)\}", e):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in labels_of[name], f"{name} has no label {label!r}: {e}"
        for legend_label in re.findall(r"by \(([^)]*)\)", e):
            for label in (x.strip() for x in legend_label.split(",")):
                assert any(label in labels_of[n] for n in re.findall(r"wattkeeper_\w+", e)), e
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"]
            for label in re.findall(r"\{\{(\w+)\}\}", t.get("legendFormat", "")):
                names = re.findall(r"wattkeeper_\w+", t["expr"])
                assert any(label in labels_of[n] for n in names), (label, t["expr"])


def test_serves_on_ipv6_loopback(rt: Runtime) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            p = s.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = serve(rt, "::1", p)
    try:
        r = httpx.get(f"http://[::1]:{p}/metrics", timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    assert r.status_code == 200 and "wattkeeper_gpu_power_watts{" in r.text


# -- a real Prometheus server scraping the exporter ------------------------------------------
@pytest.mark.prometheus
def test_prometheus_scrapes_the_exporter(tmp_path: Path) -> None:
    prometheus = need("prometheus")
    store = migrated_store(tmp_path)
    clock = SimClock(time.time())
    rt = build_simulated(Config(), store, FacilitySpec(1, 4), clock)
    store.set_budget(BUDGET_W, "test", clock.now())
    stop = threading.Event()

    def ticker() -> None:
        """The simulated clock follows wall time, so rate() over real seconds is power."""
        next_controller = 0.0
        while not stop.is_set():
            t = max(time.time(), clock.now())
            clock.set(t)
            rt.facility.advance_to(t)
            rt.tick_agents()
            if t >= next_controller:
                rt.tick_controller()
                next_controller = t + 5.0
            stop.wait(0.25)

    exporter_port, prom_port = free_port(), free_port()
    while prom_port == exporter_port:
        prom_port = free_port()
    rt.tick_agents()
    server = serve(rt, "127.0.0.1", exporter_port)
    thread = threading.Thread(target=ticker, name="sim-ticker", daemon=True)
    thread.start()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: wattkeeper\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporter_port}']\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{prom_port}/api/v1/query"

    def query(expr: str) -> list[dict]:
        try:
            r = httpx.get(api, params={"query": expr}, timeout=5)
        except httpx.TransportError:
            return []
        if r.status_code != 200:
            return []
        return r.json()["data"]["result"]

    def wait_for(expr: str, deadline: float) -> list[dict]:
        for _ in range(200):
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()}")
            result = query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.5)
        return []

    try:
        # Generous: on a loaded machine a scrape can miss its 1 s timeout now and then
        # (Prometheus then records up=0 for it); every check waits for a good one.
        deadline = time.monotonic() + 60
        power = wait_for("wattkeeper_gpu_power_watts", deadline)
        # The counters start at 0: wait for the scrape after the first tokens.
        tokens = wait_for("wattkeeper_tokens_generated_total > 0", deadline)
        assert len(power) == 4, (tmp_path / "prometheus.log").read_text()
        assert all(50 <= float(r["value"][1]) <= 700 for r in power)
        assert {r["metric"]["uuid"] for r in power} == set(rt.agents[0].infos)
        assert tokens and all(float(r["value"][1]) > 0 for r in tokens)
        # Power from the energy counter, in range for every GPU. The first window may
        # hold the start-up tick, late on a loaded machine: wait for a settled one.
        settled = "(rate(wattkeeper_gpu_energy_joules_total[10s]) >= 50) <= 1000"
        rate: list[dict] = []
        while time.monotonic() < deadline and len(rate) < 4:
            rate = wait_for(settled, deadline)
            if len(rate) < 4:
                time.sleep(0.5)
        assert len(rate) == 4, query("rate(wattkeeper_gpu_energy_joules_total[10s])")
        up = wait_for('up{job="wattkeeper"} == 1', deadline)
        assert up and up[0]["value"][1] == "1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
        stop.set()
        thread.join(timeout=10)
        server.shutdown()
        server.server_close()
        rt.shutdown()
    assert not thread.is_alive()


# -- through the CLI, in its own process -----------------------------------------------------
def test_cli_run_serves_metrics_while_it_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    upgrade(make_engine(url))
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "wattkeeper",
        "run",
        "--simulate",
        "1x2",
        "--budget",
        "2kW",
        "--duration",
        "6s",
        "--metrics-listen",
        f"127.0.0.1:{port}",
        "-o",
        "json",
        "--db",
        url,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: Scrape | None = None
    try:
        deadline = time.monotonic() + 20
        for _ in range(100):
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            try:
                s = scrape(port)
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            if s.series("wattkeeper_gpu_power_watts"):
                seen = s
                break
            time.sleep(0.2)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert seen is not None, f"no scrape while running; stderr: {err}"
    assert "\nwattkeeper_facility_budget_watts 2000.0\n" in seen.text
    assert seen.value("wattkeeper_facility_budget_watts") == 2000.0
    assert len(seen.series("wattkeeper_gpu_power_watts")) == 2
    assert seen.value("wattkeeper_store_up") == 1.0
    assert f"metrics on http://127.0.0.1:{port}/metrics" in err
    assert json.loads(out)["budget_w"] == 2000.0
