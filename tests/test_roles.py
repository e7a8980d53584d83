"""Least privilege on a real PostgreSQL: the roles the migrations make, the login role
``db add-agent`` makes per node, and what row-level security lets each of them do.

The test server trusts local logins (no passwords), so connecting as a role is enough
to act as it; what is checked is what that role may do, which is the server's, not
ours, to enforce.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from wattkeeper.cli import app
from wattkeeper.clock import SimClock
from wattkeeper.collectors.gpu import GpuInfo, GpuSample, PowerLimitConstraints
from wattkeeper.config import load_config
from wattkeeper.runtime import build_simulated
from wattkeeper.simulator.facility import FacilitySpec
from wattkeeper.store.db import StoreError, make_engine, upgrade
from wattkeeper.store.repository import Store, TargetSpec, TokenRow
from wattkeeper.store.roles import agent_role, group_role

pytestmark = pytest.mark.postgres
runner = CliRunner()
NOW = 1_800_000_000.0


def _info(uuid: str) -> GpuInfo:
    return GpuInfo(
        uuid=uuid,
        index=0,
        name="NVIDIA H100 80GB HBM3",
        pci_bus_id="00000000:18:00.0",
        memory_total_bytes=80 * 2**30,
        power_limits=PowerLimitConstraints(200.0, 700.0, 700.0),
        max_sm_clock_mhz=1980,
    )


def _as(url: str, role: str) -> Store:
    return Store(make_engine(make_url(url).set(username=role, password=None)))


def _add_agent(url: str, node: str) -> dict:
    r = runner.invoke(app, ["db", "add-agent", node, "--db", url, "-o", "json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture
def fleet(pg_server, request):
    """A migrated database with two nodes registered by their own agents' roles, and a
    controller login; yields the admin URL and a store per role."""
    url = pg_server.create_database(f"roles_{abs(hash(request.node.name)) % 10**10}")
    upgrade(make_engine(url))
    database = make_url(url).database
    with make_engine(url).begin() as conn:
        conn.execute(
            text(
                f'CREATE ROLE "{database}_ctl" LOGIN IN ROLE "{group_role(database, "controller")}"'
            )
        )
    a, b = _add_agent(url, "node-a"), _add_agent(url, "node-b")
    stores = {"a": _as(url, a["role"]), "b": _as(url, b["role"])}
    ids = {
        "a": stores["a"].register_node("node-a", "nvml", [_info("GPU-a")], NOW, agent_id="a"),
        "b": stores["b"].register_node("node-b", "nvml", [_info("GPU-b")], NOW, agent_id="b"),
    }
    stores["ctl"] = _as(url, f"{database}_ctl")
    yield url, stores, ids
    for s in stores.values():
        s.engine.dispose()


def _sample(uuid: str) -> GpuSample:
    return GpuSample(uuid=uuid, timestamp=NOW + 1, power_w=500.0, power_limit_w=700.0)


def test_add_agent_makes_a_login_in_the_agent_group_and_prints_it_once(pg_server):
    url = pg_server.create_database("roles_cli")
    upgrade(make_engine(url))
    made = _add_agent(url, "gpu-node-17")
    database = make_url(url).database
    assert made["role"] == agent_role(database, "gpu-node-17")
    assert make_url(made["url"]).username == made["role"]
    assert make_url(made["url"]).password == made["password"] and len(made["password"]) >= 24
    with make_engine(url).connect() as conn:
        member = conn.scalar(
            text("SELECT pg_has_role(:r, :g, 'MEMBER')"),
            {"r": made["role"], "g": group_role(database, "agent")},
        )
    assert member
    again = runner.invoke(app, ["db", "add-agent", "gpu-node-17", "--db", url])
    assert again.exit_code == 1 and "already has the login role" in again.output
    r = runner.invoke(app, ["db", "roles", "--db", url, "-o", "json"])
    assert json.loads(r.stdout)["agents"][0]["node"] == "gpu-node-17"
    r = runner.invoke(app, ["db", "remove-agent", "gpu-node-17", "--db", url])
    assert r.exit_code == 0, r.output
    with make_engine(url).connect() as conn:
        gone = conn.scalar(
            text("SELECT count(*) FROM pg_roles WHERE rolname = :r"), {"r": made["role"]}
        )
    assert gone == 0


def test_roles_are_the_databases_own_and_go_with_its_schema(pg_server):
    """Two databases on one server migrate side by side; stepping one down to base
    drops its roles and leaves the other's."""
    urls = [pg_server.create_database(f"roles_side_{k}") for k in (1, 2)]
    for url in urls:
        upgrade(make_engine(url))
    first = make_url(urls[0]).database
    _add_agent(urls[0], "n1")
    r = runner.invoke(app, ["db", "downgrade", "base", "--yes", "--db", urls[0]])
    assert r.exit_code == 0, r.output
    with make_engine(urls[1]).connect() as conn:
        left = set(
            conn.scalars(text("SELECT rolname FROM pg_roles WHERE rolname LIKE 'roles_side_%'"))
        )
    assert not {r for r in left if r.startswith(first + "_")}
    assert group_role(make_url(urls[1]).database, "agent") in left


def test_an_agent_writes_its_own_node_and_reads_its_own_targets(fleet):
    _url, stores, ids = fleet
    a = stores["a"]
    a.write_samples(
        "node-a",
        ids["a"],
        [_sample("GPU-a")],
        NOW + 1,
        host=(0.2, 900.0, "model"),
        tokens=[TokenRow(endpoint="http://node-a:8000/metrics", model="m", up=True)],
        agent_id="a",
    )
    stores["ctl"].write_targets(
        [TargetSpec("GPU-a", 400.0), TargetSpec("GPU-b", 450.0)], NOW + 2, 30.0
    )
    assert {u: t.power_limit_w for u, t in a.targets_for_node("node-a").items()} == {"GPU-a": 400.0}
    # A replayed tick is skipped without the role needing to read the samples it repeats.
    a.write_samples("node-a", ids["a"], [_sample("GPU-a")], NOW + 1, agent_id="a")
    with stores["ctl"].engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM gpu_samples")) == 1
    assert a.targets_for_node("node-b") == {}
    # The other node's rows are not there for it, nor its samples.
    with a.engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM gpus")) == 1
        assert conn.scalar(text("SELECT count(*) FROM targets")) == 1
    snap = a.snapshot(NOW + 2)
    assert [n.name for n in snap.nodes] == ["node-a"]


def test_agent_credentials_cannot_change_a_budget_or_another_nodes_target(fleet):
    url, stores, ids = fleet
    a = stores["a"]
    with pytest.raises(StoreError, match="permission denied"):
        a.set_budget(1.0, "agent:node-a", NOW)
    # Another node's GPU is not even there for it; written straight, it is refused.
    assert a.write_targets([TargetSpec("GPU-b", 700.0)], NOW, 30.0) == 0
    with pytest.raises(Exception, match="permission denied"), a.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO targets (gpu_id, power_limit_w, issued_at, lease_expires_at,"
                " reason) VALUES (:g, 700, 0, 1e12, 'x')"
            ),
            {"g": ids["b"]["GPU-b"]},
        )
    with pytest.raises(StoreError, match="permission denied"):
        a.set_drained("node-a", True, "agent:node-a", NOW)  # drains are the controller's
    # Samples under another node's name, or an audit line in another's name: refused.
    with pytest.raises(StoreError):
        a.write_samples("node-b", ids["b"], [_sample("GPU-b")], NOW + 1)
    with pytest.raises(StoreError, match="row-level security"):
        a.audit("agent:node-b", "x.y", "node-b", {}, NOW)
    a.audit("agent:node-a", "gpu.restore", "GPU-a", {}, NOW)  # its own: fine
    with pytest.raises(Exception, match="permission denied"), a.engine.begin() as conn:
        conn.execute(text("UPDATE targets SET power_limit_w = 700"))  # not even its own
    with make_engine(url).connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM budgets")) == 0
        assert conn.scalar(text("SELECT count(*) FROM targets")) == 0


def test_the_controller_plans_but_cannot_set_a_budget(fleet):
    url, stores, _ids = fleet
    ctl = stores["ctl"]
    with pytest.raises(StoreError, match="permission denied"):
        ctl.set_budget(5000.0, "controller", NOW)
    assert ctl.write_targets([TargetSpec("GPU-b", 450.0)], NOW, 30.0) == 1
    assert ctl.set_drained("node-b", True, "controller", NOW)
    assert ctl.drain_now("node-b", "controller", NOW, only_own=True)
    assert stores["b"].orders_for_node("node-b").drain_now  # its agent reads it
    with pytest.raises(Exception, match="permission denied"), stores["b"].engine.begin() as c:
        c.execute(text("UPDATE nodes SET drain_now = false"))  # not an agent's to change
    # What it learned is its own: an agent's login cannot read or change it.
    ctl.remember("learned", {"coupling": 0.3}, NOW)
    assert ctl.recall("learned") == ({"coupling": 0.3}, NOW)
    with pytest.raises(StoreError, match="permission denied"):
        stores["a"].recall("learned")
    admin = Store(make_engine(url))
    admin.set_budget(5000.0, "cli:root", NOW)
    assert admin.get_budget().limit_w == 5000.0


def test_a_simulated_facility_runs_with_each_part_on_its_own_role(pg_server):
    """Agents on their nodes' logins, the controller on a controller login: samples go
    in, the budget is enforced, as with one all-powerful role."""
    url = pg_server.create_database("roles_e2e")
    upgrade(make_engine(url))
    database = make_url(url).database
    with make_engine(url).begin() as conn:
        conn.execute(
            text(
                f'CREATE ROLE "{database}_ctl" LOGIN IN ROLE "{group_role(database, "controller")}"'
            )
        )
    admin = Store(make_engine(url))
    cfg = load_config(None, environ={})
    rt = build_simulated(cfg, admin, FacilitySpec(2, 4), SimClock(NOW))
    names = [a.node for a in rt.agents]
    for agent in rt.agents:
        agent.store = _as(url, _add_agent(url, agent.node)["role"])
    assert rt.controller is not None
    rt.controller.store = _as(url, f"{database}_ctl")
    admin.set_budget(3500.0, "cli:root", NOW)
    for k in range(1, 40):
        rt.clock.set(NOW + k)
        rt.facility.advance_to(rt.clock.now())
        rt.tick_agents()
        if k % 5 == 0:
            rt.tick_controller()
    caps = [s.power_limit_requested_w for a in rt.agents for s in a.state.samples.values()]
    assert len(caps) == 8 and max(caps) < 700.0
    with make_engine(url).connect() as conn:
        written = dict(
            conn.execute(
                text(
                    "SELECT n.name, count(*) FROM gpu_samples s JOIN gpus g ON g.id = s.gpu_id"
                    " JOIN nodes n ON n.id = g.node_id GROUP BY n.name"
                )
            ).all()
        )
    assert set(written) == set(names) and min(written.values()) >= 4 * 30


def test_a_temporary_table_does_not_let_an_agent_pass_for_another_node(fleet):
    """The policies' functions run with their owner's rights: a temporary table named
    like the one they read must not stand in for it."""
    _url, stores, _ids = fleet
    stores["ctl"].write_targets([TargetSpec("GPU-b", 450.0)], NOW, 30.0)
    with stores["a"].engine.begin() as conn:
        conn.execute(text("CREATE TEMP TABLE agent_roles (role_name text, node text)"))
        conn.execute(text("INSERT INTO agent_roles VALUES (session_user, 'node-b')"))
        conn.execute(text("CREATE TEMP TABLE nodes (id integer, name text)"))
        conn.execute(text("INSERT INTO nodes SELECT 2, 'node-b'"))
        seen = conn.execute(text("SELECT count(*) FROM public.targets")).scalar()
        gpus = conn.execute(text("SELECT uuid FROM public.gpus")).scalars().all()
    assert seen == 0
    assert gpus == ["GPU-a"]


@pytest.fixture(scope="module")
def scram_pg():
    """A server of this module's own that asks every login but its owner for a
    SCRAM-SHA-256 password, as a production server does."""
    from conftest import started_pg

    for server in started_pg():
        hba = server.data / "pg_hba.conf"
        hba.write_text(
            "local all all trust\n"
            "host all wattkeeper 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        server._run(str(server.bindir / "pg_ctl"), "-D", str(server.data), "reload")
        yield server


def test_the_printed_url_logs_in_with_its_password_and_only_with_it(scram_pg):
    url = scram_pg.create_database("roles_scram")
    upgrade(make_engine(url))
    made = _add_agent(url, "gpu-node-3")
    import psycopg

    login = make_url(made["url"])
    dsn = f"host=127.0.0.1 port={login.port} dbname={login.database} user={login.username}"
    with psycopg.connect(f"{dsn} password={login.password}") as conn:
        assert conn.execute("SELECT session_user").fetchone()[0] == made["role"]
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(f"{dsn} password=not-{login.password}").close()
    with make_engine(url).connect() as conn:
        stored = conn.scalar(
            text("SELECT rolpassword FROM pg_authid WHERE rolname = :r"), {"r": made["role"]}
        )
    assert stored.startswith("SCRAM-SHA-256$") and login.password not in stored


def test_a_gpu_moved_between_nodes_is_named_until_an_admin_removes_its_old_node(fleet):
    """Under row-level security an agent cannot see, so cannot adopt, a GPU registered
    under another node: its registration is refused with a message naming the GPU and
    the command that resolves it, and nothing of either node changes."""
    url, stores, _ids = fleet
    a = stores["a"]
    moved = [_info("GPU-a"), _info("GPU-b")]
    with pytest.raises(
        StoreError, match=r"GPU GPU-b is registered under another node.*node remove"
    ):
        a.register_node("node-a", "nvml", moved, NOW + 40, agent_id="a")
    with make_engine(url).connect() as conn:
        owners = dict(
            conn.execute(
                text("SELECT g.uuid, n.name FROM gpus g JOIN nodes n ON n.id = g.node_id")
            ).all()
        )
    assert owners == {"GPU-a": "node-a", "GPU-b": "node-b"}

    refused = runner.invoke(app, ["node", "remove", "node-b", "--db", url])
    assert refused.exit_code == 1 and "would register it again" in refused.output
    gone = runner.invoke(app, ["node", "remove", "nobody", "--db", url])
    assert gone.exit_code == 1 and "no node named 'nobody'" in gone.output
    done = runner.invoke(
        app, ["node", "remove", "node-b", "--force", "--reason", "GPU moved", "--db", url]
    )
    assert done.exit_code == 0, done.output
    assert "node-b: removed, with its 1 GPU(s)" in done.output
    ids = a.register_node("node-a", "nvml", moved, NOW + 41, agent_id="a")
    assert set(ids) == {"GPU-a", "GPU-b"}
    entry = next(e for e in Store(make_engine(url)).audit_log(20) if e.action == "node.removed")
    assert (entry.subject, entry.detail) == ("node-b", {"gpus": 1, "reason": "GPU moved"})
