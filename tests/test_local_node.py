"""A real node's agent: NVML (the autospec'd fake driver), a real HTTP vLLM endpoint on
loopback serving a real page, the psutil host collector, a real SQLite store."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from nvml_fake import install_fake_pynvml
from sqlalchemy import func, select

from wattkeeper.config import load_config
from wattkeeper.runtime import build_local, open_store
from wattkeeper.store.db import make_engine, upgrade
from wattkeeper.store.models import TokenSampleRow

VLLM_PAGE = (Path(__file__).parent / "fixtures" / "metrics" / "vllm_metrics.txt").read_bytes()


@pytest.fixture
def endpoint():
    state = {"page": VLLM_PAGE}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = state["page"]
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics", state
    server.shutdown()


@pytest.fixture
def local(tmp_path, sqlite_url, endpoint, monkeypatch):
    _fake, nvml = install_fake_pynvml(monkeypatch, n_gpus=2)
    url, page = endpoint
    cfg_file = tmp_path / "wattkeeper.toml"
    cfg_file.write_text(
        f'[agent]\nnode = "gpu-node-1"\n[[agent.endpoints]]\nurl = "{url}"\nkind = "auto"\n'
        "[agent.host]\nuse_rapl = false\nidle_w = 1200\nper_cpu_util_w = 0\n"
    )
    cfg = load_config(cfg_file, environ={})
    upgrade(make_engine(sqlite_url))
    rt = build_local(cfg, open_store(cfg, sqlite_url))
    yield rt, nvml, page
    rt.store.engine.dispose()


def test_node_samples_nvml_host_and_tokens_and_applies_targets(local):
    rt, nvml, _ = local
    rt.store.set_budget(2000.0, "test", 0.0)
    rt.tick_agents()
    rt.tick_controller()
    rt.tick_agents()
    agent = rt.agents[0]
    assert agent.backend.name == "nvml"
    assert len(agent.state.samples) == 2
    assert agent.state.host is not None and agent.state.host.power_source == "model"
    reading = next(iter(agent.state.readings.values()))
    assert reading.kind == "vllm"
    assert reading.series[0].generation_tokens_total == 27453.0
    # node overhead (host model) 1.2 kW, 2% margin: the GPUs share the rest,
    # applied to the (fake) driver in milliwatts, within its constraints
    applied = [g.limit_mw for g in nvml.gpus]
    assert all(200_000 <= mw < 700_000 for mw in applied)
    plan = rt.controller.state.last_plan
    assert plan.feasible
    assert plan.non_gpu_power_w == 1200.0
    # raising GPUs from their 2 x 312 W draw raises non-GPU power by 0.2 W per W
    drawn = 2 * 312.0
    expected = drawn + (2000 * 0.98 - 1200 - drawn) / 1.2
    assert sum(t.power_limit_w for t in plan.targets) == pytest.approx(expected, abs=2)
    rt.shutdown()
    assert [g.limit_mw for g in nvml.gpus] == [700_000, 700_000]


def test_bad_endpoint_is_isolated(local):
    rt, _nvml, page = local
    page["page"] = b'vllm:generation_tokens_total{model_name="m"} 12\nthis is not metrics\n'
    rt.tick_agents()
    agent = rt.agents[0]
    assert len(agent.state.samples) == 2, "GPUs are still sampled"
    (error,) = agent.state.endpoint_errors.values()
    assert "malformed" in error and "line 2" in error
    with rt.store.session() as s:
        rows = s.scalars(select(TokenSampleRow)).all()
        assert [r.up for r in rows] == [False]
        assert "malformed" in rows[0].error
        assert s.scalar(select(func.count()).select_from(TokenSampleRow)) == 1


def test_permission_denied_is_audited_not_fatal(local):
    rt, nvml, _ = local
    nvml.is_root = False
    rt.store.set_budget(2000.0, "test", 0.0)
    rt.tick_agents()
    rt.tick_controller()
    rt.tick_agents()
    rt.tick_agents()  # audited with the next store round trip
    failed = [a for a in rt.store.audit_log(20) if a.action == "power_limit.failed"]
    assert failed and "CAP_SYS_ADMIN" in failed[0].detail["error"]
    assert [g.limit_mw for g in nvml.gpus] == [700_000, 700_000]
