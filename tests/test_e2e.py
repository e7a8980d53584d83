"""The whole loop on one host, through the CLI, on SQLite and on a real PostgreSQL."""

import json

import pytest
from sqlalchemy import create_engine, func, select, text
from typer.testing import CliRunner

from wattkeeper.cli import app
from wattkeeper.store.db import head_revision
from wattkeeper.store.models import AuditEntry, GpuSampleRow, Target

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def upgraded(url):
    r = cli("db", "upgrade", "--db", url)
    assert r.exit_code == 0, r.output
    return url


def fast_run(url, budget, duration="3m", *extra):
    r = cli(
        "run",
        "--simulate",
        "2x8",
        "--budget",
        budget,
        "--duration",
        duration,
        "--fast",
        "-o",
        "json",
        "--db",
        url,
        *extra,
    )
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_capped_run_stays_under_budget_and_status_reports_it(db_url):
    url = upgraded(db_url)
    uncapped = fast_run(upgraded_copy(db_url), "1MW")
    budget = 0.7 * uncapped["max_power_w"]
    res = fast_run(url, f"{budget:.0f}W")
    assert uncapped["over_budget_s"] == 0
    assert uncapped["max_power_w"] > budget, "the scenario must need capping"
    assert res["budget_w"] == pytest.approx(round(budget))
    assert res["over_budget_s"] == 0
    assert res["max_power_w"] <= res["budget_w"]
    assert res["tokens"] > 0 and res["energy_j"] > 0
    assert res["tokens_per_joule"] == pytest.approx(res["tokens"] / res["energy_j"], rel=1e-3)
    assert res["tokens"] < uncapped["tokens"]
    assert res["energy_j"] < uncapped["energy_j"]

    st = cli("status", "--db", url, "-o", "json", "--gpus")
    assert st.exit_code == 0, st.output
    s = json.loads(st.stdout)
    assert s["budget_w"] == res["budget_w"]
    assert [n["name"] for n in s["nodes"]] == ["sim-node-0", "sim-node-1"]
    assert all(n["gpus"] == 8 and len(n["gpu_list"]) == 8 for n in s["nodes"])
    assert 0 < s["facility_power_w"] <= res["budget_w"]
    assert s["tokens_per_s"] > 0 and s["tokens_per_joule"] > 0
    # A --fast run simulates minutes that end when it started: status describes the
    # simulation as of its last samples, however long the run took on this machine.
    assert s["clock"] == "simulated"
    assert not any(n["stale"] for n in s["nodes"]) and s["stale_nodes"] == 0
    assert s["newest_sample_age_s"] == 0
    # the run capped every GPU, and its clean stop put each one back to 700 W
    targets = [g["target_power_limit_w"] for n in s["nodes"] for g in n["gpu_list"]]
    assert all(200 <= lim < 700 for lim in targets)
    limits = [g["power_limit_w"] for n in s["nodes"] for g in n["gpu_list"]]
    assert limits == [700.0] * 16

    engine = create_engine(url)
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(GpuSampleRow)) > 0
        assert c.scalar(select(func.count()).select_from(Target)) == 16
        actions = set(c.scalars(select(AuditEntry.action)))
    assert {"budget.set", "target.set", "power_limit.set", "gpu.restore"} <= actions


_copies = {}


def upgraded_copy(db_url):
    """A second database of the same kind, for the uncapped reference run."""
    if db_url.startswith("sqlite"):
        return upgraded(db_url.replace("wattkeeper.db", "reference.db"))
    engine = create_engine(db_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    name = db_url.rsplit("/", 1)[1] + "_ref"
    with engine.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    return upgraded(db_url.rsplit("/", 1)[0] + "/" + name)


def test_budget_set_and_show(db_url):
    url = upgraded(db_url)
    assert "no facility budget" in cli("budget", "show", "--db", url).stdout
    r = cli("budget", "set", "18kW", "--db", url)
    assert r.exit_code == 0 and "18.0 kW" in r.stdout
    shown = json.loads(cli("budget", "show", "--db", url, "-o", "json").stdout)
    assert shown["budget_w"] == 18000.0
    assert shown["updated_by"].startswith("cli:")
    cli("budget", "set", "1.5MW", "--db", url)
    assert json.loads(cli("budget", "show", "--db", url, "-o", "json").stdout)["budget_w"] == 1.5e6


@pytest.mark.parametrize("bad", ["18 kilowatts", "-5kW", "0"])
def test_malformed_budget_changes_nothing(sqlite_url, bad):
    url = upgraded(sqlite_url)
    cli("budget", "set", "10kW", "--db", url)
    r = runner.invoke(app, ["budget", "set", bad, "--db", url])
    assert r.exit_code == 2
    assert "invalid power" in r.output
    assert json.loads(cli("budget", "show", "--db", url, "-o", "json").stdout)["budget_w"] == 1e4
    r = runner.invoke(
        app,
        ["run", "--simulate", "1x2", "--budget", bad, "--duration", "10s", "--fast", "--db", url],
    )
    assert r.exit_code == 2 and "invalid power" in r.output
    engine = create_engine(url)
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(GpuSampleRow)) == 0


def test_unknown_config_key_stops_before_anything_is_written(tmp_path, sqlite_url):
    url = upgraded(sqlite_url)
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[controler]\ninterval_s = 5\n")
    r = runner.invoke(
        app,
        [
            "run",
            "--simulate",
            "1x2",
            "--budget",
            "5kW",
            "--duration",
            "10s",
            "--fast",
            "--db",
            url,
            "--config",
            str(cfg),
        ],
    )
    assert r.exit_code == 2
    assert "controler: unknown key" in r.output
    assert "no facility budget" in cli("budget", "show", "--db", url).stdout


@pytest.mark.parametrize(
    "cmd",
    [
        ["status"],
        ["budget", "set", "5kW"],
        ["db", "upgrade"],
        ["run", "--simulate", "1x2", "--duration", "5s", "--fast"],
    ],
)
def test_unreachable_database_is_a_clear_error(cmd):
    url = "postgresql+psycopg://nobody@127.0.0.1:9/nowhere"
    r = runner.invoke(app, [*cmd, "--db", url])
    assert r.exit_code == 1, r.output
    assert "cannot reach the database" in r.output or "database" in r.output
    assert "127.0.0.1:9" in r.output
    assert "Traceback" not in r.output


def test_malformed_database_url():
    r = runner.invoke(app, ["status", "--db", "mysql-ish:/x"])
    assert r.exit_code == 1
    assert "invalid database URL" in r.output or "unsupported database" in r.output


def test_run_creates_a_new_sqlite_store_and_says_so_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'new' / 'fresh.db'}"
    args = ["run", "--simulate", "1x2", "--budget", "2kW", "--duration", "20s", "--fast"]
    first = runner.invoke(app, [*args, "-o", "json", "--db", url])
    assert first.exit_code == 0, first.output
    assert first.stderr.count("created a new store") == 1
    assert json.loads(first.stdout)["tokens"] > 0
    current = cli("db", "current", "--db", url)
    assert current.stdout.split()[1] == current.stdout.split()[3], current.stdout  # at head
    again = runner.invoke(app, [*args, "-o", "json", "--db", url])
    assert again.exit_code == 0, again.output
    assert "created" not in again.stderr


def test_a_sqlite_file_that_holds_other_tables_is_left_as_it_was(tmp_path):
    path = tmp_path / "other.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as c:
        c.execute(text("CREATE TABLE theirs (x INTEGER)"))
    engine.dispose()
    before = path.read_bytes()
    url = f"sqlite:///{path}"
    for args in (
        ["run", "--simulate", "1x2", "--duration", "5s", "--fast"],
        ["db", "current"],
        ["status"],
        ["budget", "set", "18kW"],
    ):
        r = runner.invoke(app, [*args, "--db", url])
        assert r.exit_code in (0, 1), r.output
    assert path.read_bytes() == before, "the file was changed (journal mode, tables)"
    assert not (tmp_path / "other.db-wal").exists()


def test_commands_that_do_not_create_a_store_leave_no_file(tmp_path):
    for args in (
        ["db", "current"],
        ["budget", "set", "18kW"],
        ["db", "downgrade", "base", "--yes"],
    ):
        url = f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}"
        r = runner.invoke(app, [*args, "--db", url])
        assert r.exit_code == 1 and "no database at" in r.output, (args, r.output)
    assert not (tmp_path / "nowhere").exists()


def test_a_store_downgraded_to_base_counts_as_empty(sqlite_url):
    url = upgraded(sqlite_url)
    assert cli("db", "downgrade", "base", "--yes", "--db", url).exit_code == 0
    r = runner.invoke(
        app, ["run", "--simulate", "1x2", "--duration", "10s", "--fast", "-o", "json", "--db", url]
    )
    assert r.exit_code == 0, r.output
    assert "created a new store" in r.stderr


def test_runs_starting_together_on_a_new_store_create_it_once_and_never_share_it(tmp_path):
    """The store is created once, whoever comes first. Runs that overlap in time would
    control the same simulated nodes: all but the one holding them are refused with a
    clear message (which ones depends on timing); none fails any other way."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'new' / 'together.db'}"
    args = [sys.executable, "-m", "wattkeeper", "run", "--simulate", "1x2", "--duration"]
    procs = [
        subprocess.Popen(
            [*args, "10s", "--fast", "-o", "json", "--db", url, "--no-metrics"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes, [err for _, err in outs]
    for code, (_, err) in zip(codes, outs, strict=True):
        assert code == 0 or (
            code == 1 and "held by another live agent" in err and "Traceback" not in err
        ), err
    assert sum(err.count("created a new store") for _, err in outs) == 1


def test_an_unknown_revision_is_refused_by_upgrade_with_one_line(sqlite_url):
    url = upgraded(sqlite_url)
    with create_engine(url).begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '9999_newer'"))
    r = runner.invoke(app, ["db", "upgrade", "--db", url])
    assert r.exit_code == 1 and "does not know" in r.output and "9999_newer" in r.output


@pytest.mark.postgres
def test_run_never_creates_the_schema_on_postgresql(pg_url):
    r = runner.invoke(
        app, ["run", "--simulate", "1x2", "--duration", "5s", "--fast", "--db", pg_url]
    )
    assert r.exit_code == 1
    assert "no wattkeeper schema" in r.output and "wattkeeper db upgrade" in r.output
    with create_engine(pg_url).connect() as c:
        assert c.scalar(text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")) == 0


def test_a_store_at_another_revision_still_refuses(sqlite_url):
    url = upgraded(sqlite_url)
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '0000_older'"))
    r = runner.invoke(app, ["run", "--simulate", "1x2", "--duration", "5s", "--fast", "--db", url])
    assert r.exit_code == 1
    assert "at schema 0000_older" in r.output and "wattkeeper db upgrade" in r.output
    with engine.connect() as c:
        assert c.scalar(text("SELECT version_num FROM alembic_version")) == "0000_older"
        assert c.scalar(select(func.count()).select_from(GpuSampleRow)) == 0


def test_read_only_commands_never_create_a_schema(tmp_path):
    path = tmp_path / "empty.db"
    path.touch()
    for cmd in (["status"], ["budget", "show"], ["audit"]):
        r = runner.invoke(app, [*cmd, "--db", f"sqlite:///{path}"])
        assert r.exit_code == 1 and "no wattkeeper schema" in r.output, r.output
    assert path.stat().st_size == 0


def test_migrate_on_start(tmp_path, sqlite_url, monkeypatch):
    monkeypatch.setenv("WATTKEEPER_STORE__MIGRATE_ON_START", "true")
    r = runner.invoke(
        app,
        [
            "run",
            "--simulate",
            "1x2",
            "--budget",
            "2kW",
            "--duration",
            "20s",
            "--fast",
            "-o",
            "json",
            "--db",
            sqlite_url,
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tokens"] > 0


def test_plain_run_without_a_driver_suggests_simulate(sqlite_url, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # what a machine without NVML looks like
    url = upgraded(sqlite_url)
    r = runner.invoke(app, ["run", "--duration", "1s", "--db", url])
    assert r.exit_code == 1
    assert "--simulate" in r.output


def test_default_database_lives_in_the_state_dir(tmp_path):
    r = cli("db", "upgrade")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "state" / "wattkeeper.db").exists()


def test_budget_without_a_unit_is_refused_on_the_command_line(sqlite_url):
    url = upgraded(sqlite_url)
    r = runner.invoke(app, ["budget", "set", "18", "--db", url])
    assert r.exit_code == 2 and "give a unit" in r.output and "18kW?" in r.output
    assert "no facility budget" in cli("budget", "show", "--db", url).stdout


def test_read_only_commands_leave_no_file_behind(tmp_path):
    url = f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}"
    for cmd in (["status"], ["budget", "show"], ["audit"]):
        r = runner.invoke(app, [*cmd, "--db", url])
        assert r.exit_code == 1 and "no database at" in r.output
    assert not (tmp_path / "nowhere").exists()


def test_downgrade_asks_first(sqlite_url):
    url = upgraded(sqlite_url)
    r = runner.invoke(app, ["db", "downgrade", "base", "--db", url], input="n\n")
    assert r.exit_code == 1 and "nothing changed" in r.output
    assert head_revision() in cli("db", "current", "--db", url).stdout
    r = runner.invoke(app, ["db", "downgrade", "base", "--db", url, "--yes"])
    assert r.exit_code == 0 and "empty" in r.stdout


def test_simulation_refuses_a_store_with_real_nodes(sqlite_url):
    from wattkeeper.collectors.gpu import GpuInfo, PowerLimitConstraints
    from wattkeeper.store.db import make_engine
    from wattkeeper.store.repository import Store

    url = upgraded(sqlite_url)
    gpu = GpuInfo(
        "GPU-real-0",
        0,
        "NVIDIA H100 80GB HBM3",
        "00000000:18:00.0",
        80 * 2**30,
        PowerLimitConstraints(200, 700, 700),
    )
    Store(make_engine(url)).register_node("gpu-node-7", "nvml", [gpu], 0.0)
    r = runner.invoke(
        app,
        ["run", "--simulate", "1x2", "--budget", "1kW", "--duration", "5s", "--fast", "--db", url],
    )
    assert r.exit_code == 1 and "holds real nodes (gpu-node-7)" in r.output
    assert "no facility budget" in cli("budget", "show", "--db", url).stdout


def test_a_simulation_of_another_shape_replaces_the_last_one(sqlite_url):
    url = upgraded(sqlite_url)
    fast = ("--budget", "20kW", "--duration", "20s", "--fast", "-o", "json", "--db", url)
    assert cli("run", "--simulate", "3x2", *fast).exit_code == 0
    assert cli("run", "--simulate", "1x2", *fast).exit_code == 0
    s = json.loads(cli("status", "--db", url, "-o", "json").stdout)
    assert [n["name"] for n in s["nodes"]] == ["sim-node-0"]


def test_busy_metrics_port_fails_before_the_budget_changes(sqlite_url):
    import socket

    url = upgraded(sqlite_url)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = runner.invoke(
            app,
            [
                "run",
                "--simulate",
                "1x2",
                "--budget",
                "9kW",
                "--duration",
                "2s",
                "--metrics-listen",
                f"127.0.0.1:{port}",
                "--db",
                url,
            ],
        )
    assert r.exit_code == 1 and "cannot serve /metrics" in r.output
    assert "no facility budget" in cli("budget", "show", "--db", url).stdout


def test_budget_below_the_hardware_floor_is_refused_unless_forced(sqlite_url):
    url = upgraded(sqlite_url)
    r = cli(
        "run", "--simulate", "1x8", "--budget", "1kW", "--duration", "5s", "--fast", "--db", url
    )
    assert r.exit_code == 1 and "below the hardware floor" in r.output and "1.60 kW" in r.output
    assert cli("run", "--simulate", "1x8", "--duration", "5s", "--fast", "--db", url).exit_code == 0
    r = cli("budget", "set", "750W", "--db", url)
    assert r.exit_code == 1 and "8 GPUs" in r.output
    assert "no facility budget" in cli("budget", "show", "--db", url).stdout
    assert cli("budget", "set", "750W", "--force", "--db", url).exit_code == 0
    # Above the GPUs' floors but under floors plus the host's power: set, with a warning.
    r = cli("budget", "set", "2kW", "--db", url)
    assert r.exit_code == 0 and "only draining nodes can meet 2.00 kW" in r.stderr
    r = cli("budget", "set", "20kW", "--db", url)
    assert r.exit_code == 0 and "warning" not in r.stderr


def test_unknown_revision_is_named():
    r = runner.invoke(app, ["db", "downgrade", "9999", "--yes"])
    assert r.exit_code == 2 and "unknown schema revision '9999'" in r.output
    assert "Traceback" not in r.output


def test_audit_command_shows_who_did_what(sqlite_url):
    url = upgraded(sqlite_url)
    cli("budget", "set", "10kW", "--db", url)
    cli("run", "--simulate", "1x2", "--budget", "1.5kW", "--duration", "20s", "--fast", "--db", url)
    entries = json.loads(cli("audit", "--db", url, "-o", "json", "--limit", "500").stdout)[
        "entries"
    ]
    actions = {(e["actor"].split(":")[0], e["action"]) for e in entries}
    assert {
        ("cli", "budget.set"),
        ("controller", "target.set"),
        ("agent", "power_limit.set"),
        ("agent", "gpu.restore"),
    } <= actions
    assert entries[0]["ts"] >= entries[-1]["ts"]


def test_live_run_json_and_status_describe_the_same_moment_and_clock(sqlite_url):
    r = runner.invoke(
        app,
        [
            "run",
            "--simulate",
            "1x2",
            "--duration",
            "3s",
            "--no-metrics",
            "-o",
            "json",
            "--db",
            sqlite_url,
        ],
    )
    assert r.exit_code == 0, r.output
    live = json.loads(r.stdout)
    st = json.loads(cli("status", "--db", sqlite_url, "-o", "json").stdout)
    assert live["clock"] == st["clock"] == "simulated"
    assert live["ts"] == st["ts"]
    assert [n["name"] for n in live["nodes"]] == [n["name"] for n in st["nodes"]]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["run", "--simulate", "1x2", "--seed", "-1", "--fast", "--duration", "1m"], "--seed"),
        (["run", "--simulate", "100000x8", "--fast", "--duration", "1m"], "10,000 in all"),
        (["run", "--simulate", "1x200", "--fast", "--duration", "1m"], "72 GPUs per node"),
        (["audit", "--limit", "-1"], "--limit"),
    ],
)
def test_out_of_range_options_are_refused_before_any_work(sqlite_url, args, says):
    r = runner.invoke(app, [*args, "--db", sqlite_url])
    assert r.exit_code != 0 and says in r.output and "Traceback" not in r.output


def test_run_without_gpus_says_so_before_creating_a_store(tmp_path):
    from wattkeeper.collectors.gpu import BackendUnavailableError
    from wattkeeper.collectors.nvml import NvmlBackend

    try:
        NvmlBackend().close()
    except BackendUnavailableError:
        pass
    else:
        pytest.skip("this machine has NVIDIA GPUs: run would start for real")
    path = tmp_path / "state" / "wattkeeper.db"
    r = runner.invoke(app, ["run", "--db", f"sqlite:///{path}", "--duration", "5s"])
    assert r.exit_code == 1 and "--simulate" in r.output
    assert not path.exists() and not path.parent.exists()


def test_an_unquoted_budget_with_a_space_is_understood(sqlite_url):
    url = upgraded(sqlite_url)
    r = runner.invoke(app, ["budget", "set", "18", "kW", "--db", url])
    assert r.exit_code == 0 and "facility budget: 18.0 kW" in r.stdout
