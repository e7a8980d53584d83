"""Who changed what and why: --reason on every change a person makes, and audit's filters."""

import json
import time

import pytest
from typer.testing import CliRunner

from wattkeeper.cli import app
from wattkeeper.store.db import make_engine
from wattkeeper.store.repository import Store

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def audit(url: str, *filters: str) -> list[dict]:
    r = cli("audit", "--db", url, "-o", "json", "--limit", "500", *filters)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["entries"]


@pytest.fixture
def store_with_a_node(db_url):
    """A store at head with one node that has reported, as a running agent leaves it."""
    assert cli("db", "upgrade", "--db", db_url).exit_code == 0
    r = cli("run", "--simulate", "1x2", "--duration", "20s", "--fast", "--db", db_url)
    assert r.exit_code == 0, r.output
    node = json.loads(cli("status", "--db", db_url, "-o", "json").stdout)["nodes"][0]["name"]
    return db_url, node


def test_every_change_a_person_makes_keeps_its_reason(store_with_a_node):
    url, node = store_with_a_node
    steps = [
        ("budget", "set", "20kW", "--reason", "CHG-1 raise for the launch"),
        ("node", "drain", node, "-r", "  fan   alarm\n"),
        ("node", "resume", node, "--reason", "fan replaced"),
        (
            "budget",
            "schedule",
            "add",
            "15kW",
            "--cron",
            "0 17 * * 1-5",
            "--for",
            "3h",
            "--reason",
            "peak tariff",
        ),
        ("budget", "schedule", "remove", "1", "--reason", "tariff ended"),
    ]
    for step in steps:
        r = cli(*step, "--db", url)
        assert r.exit_code == 0, r.output

    why = {e["action"]: e["detail"].get("reason") for e in audit(url, "--actor", "cli")}
    assert why["budget.set"] == "CHG-1 raise for the launch"
    assert why["node.drain"] == "fan alarm"  # one line, as typed apart from the spacing
    assert why["node.undrain"] == "fan replaced"
    assert why["budget.schedule.add"] == "peak tariff"
    assert why["budget.schedule.remove"] == "tariff ended"


@pytest.mark.parametrize(
    "args",
    [
        ("budget", "set", "20kW", "--reason", "   "),
        ("budget", "set", "20kW", "--reason", "x" * 501),
    ],
)
def test_a_blank_or_overlong_reason_is_refused_and_changes_nothing(sqlite_url, args):
    r = cli("db", "upgrade", "--db", sqlite_url)
    assert r.exit_code == 0
    before = audit(sqlite_url)
    r = runner.invoke(app, [*args, "--db", sqlite_url])
    assert r.exit_code == 2 and "--reason" in r.output and "Traceback" not in r.output
    assert audit(sqlite_url) == before


def test_filters_narrow_by_actor_action_subject_and_time(db_url):
    assert cli("db", "upgrade", "--db", db_url).exit_code == 0
    store = Store(make_engine(db_url))
    t0 = time.time() - 3 * 3600
    store.audit("cli:alice", "budget.set", "facility", {"limit_w": 1.0}, t0)
    store.audit("cli:alice_b", "budget.schedule.add", "rack-1", {}, t0 + 3600)
    store.audit("cli:bob", "node.drain", "n1", {}, t0 + 2 * 3600)
    store.audit("controller", "target.set", "GPU-1", {}, t0 + 2 * 3600 + 1)
    store.audit("agent:n1", "power_limit.set", "GPU-1", {}, t0 + 3 * 3600 - 60)
    store.audit("cli:x", "budgetary.note", "facility", {}, t0 + 10)  # not under "budget"

    def actions(*filters: str) -> list[str]:
        return [e["action"] for e in audit(db_url, *filters)]

    assert actions("--actor", "cli") == [
        "node.drain",
        "budget.schedule.add",
        "budgetary.note",
        "budget.set",
    ]
    # Whole names only: "cli:alice" is not a prefix of "cli:alice_b", and "_" is no wildcard.
    assert actions("--actor", "cli:alice") == ["budget.set"]
    assert actions("--actor", "cli:alic_") == []
    assert actions("--action", "budget") == ["budget.schedule.add", "budget.set"]
    assert actions("--subject", "GPU-1") == ["power_limit.set", "target.set"]
    assert actions("--subject", "n1", "--subject", "rack-1") == [
        "node.drain",
        "budget.schedule.add",
    ]
    assert actions("--since", "30m") == ["power_limit.set"]
    assert actions("--since", "90m", "--until", "30m") == ["target.set", "node.drain"]
    assert actions("--actor", "cli", "--since", "150m") == ["node.drain", "budget.schedule.add"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--since", "yesterday"), "--since"),
        (("--until", "2026-13-45"), "--until"),
        (("--since", "1h", "--until", "2h"), "after"),
    ],
)
def test_a_bad_time_filter_is_one_clear_line(sqlite_url, args, says):
    cli("db", "upgrade", "--db", sqlite_url)
    r = runner.invoke(app, ["audit", *args, "--db", sqlite_url])
    assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output
