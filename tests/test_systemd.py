"""The systemd units as systemd reads them, and the notify protocol as systemd hears it.

Units: ``systemd-analyze verify`` and ``systemd-analyze security --offline=true`` on
each (ExecStart pointed at this checkout's wattkeeper, as docs/systemd.md installs it
under /opt/wattkeeper), sysusers and tmpfiles applied to a scratch root. Notify: the
real daemons run with NOTIFY_SOCKET on a datagram socket the test binds, and the
watchdog keeps being pinged while PostgreSQL is frozen, since the agent's loop does
not wait on it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import started_pg
from pg import PgServer

from wattkeeper.store.db import make_engine, upgrade

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SERVICES = ("wattkeeper.service", "wattkeeper-agent.service", "wattkeeper-controller.service")
INSTALLED = "/opt/wattkeeper/bin/wattkeeper"
GOAL = 2.0

needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None and not os.environ.get("CI"),
    reason="systemd-analyze is not installed (apt-get install systemd); CI installs it",
)


def _settings(unit: str) -> dict[str, list[str]]:
    """Every Key=value of a unit, repeated keys kept in order."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def _here(unit: str, tmp_path: Path) -> Path:
    """The unit with ExecStart on this checkout's wattkeeper (verify checks that the
    binary exists and is executable)."""
    wattkeeper = Path(sys.executable).with_name("wattkeeper")
    assert wattkeeper.exists(), "the package's console script is not installed"
    path = tmp_path / unit
    path.write_text((UNITS / unit).read_text().replace(INSTALLED, str(wattkeeper)))
    return path


@needs_systemd
@pytest.mark.parametrize("unit", SERVICES)
def test_systemd_accepts_the_unit(unit, tmp_path):
    r = subprocess.run(
        ["systemd-analyze", "verify", str(_here(unit, tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert unit not in r.stderr, r.stderr  # no warning about this unit either


@needs_systemd
@pytest.mark.parametrize("unit", SERVICES)
def test_the_unit_is_hardened_below_the_goal(unit, tmp_path):
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(_here(unit, tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert found, r.stdout + r.stderr
    assert float(found.group(1)) <= GOAL, r.stdout


@pytest.mark.parametrize("unit", SERVICES)
def test_every_unit_runs_unprivileged_with_a_private_umask(unit):
    s = _settings(unit)
    assert s["Type"] == ["notify"] and s["WatchdogSec"]
    assert s["User"] == ["wattkeeper"]
    assert s["UMask"] == ["0077"]
    assert s["ExecStart"][0].startswith(INSTALLED + " ")
    assert s["NoNewPrivileges"] == ["yes"]
    assert "~@privileged @resources" in s["SystemCallFilter"]


@pytest.mark.parametrize("unit", ["wattkeeper.service", "wattkeeper-agent.service"])
def test_units_that_set_gpu_limits_keep_one_capability_and_the_nvidia_devices(unit):
    s = _settings(unit)
    assert s["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN"]
    assert s["AmbientCapabilities"] == ["CAP_SYS_ADMIN"]
    assert s["DevicePolicy"] == ["closed"]
    assert all("nvidia" in d for d in s["DeviceAllow"])
    assert "PrivateDevices" not in s  # it would hide /dev/nvidia*


def test_the_controller_has_no_device_and_no_capability():
    s = _settings("wattkeeper-controller.service")
    assert s["CapabilityBoundingSet"] == [""]
    assert "AmbientCapabilities" not in s
    assert s["PrivateDevices"] == ["yes"]
    assert " controller " in s["ExecStart"][0]


@needs_systemd
def test_sysusers_and_tmpfiles_apply(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    r = subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(UNITS / "wattkeeper.sysusers")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert re.search(r"^wattkeeper:x:\d+:\d+:", (root / "etc/passwd").read_text(), re.M)
    r = subprocess.run(
        ["systemd-tmpfiles", "--create", f"--root={root}", str(UNITS / "wattkeeper.tmpfiles")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert (root / "etc/wattkeeper").stat().st_mode & 0o777 == 0o750


# -- the notify protocol ------------------------------------------------------------------


class Listener:
    """systemd's end of NOTIFY_SOCKET: a datagram socket, every message kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.heard: list[tuple[float, str]] = []

    def listen(self, seconds: float, until: str | None = None) -> list[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.heard.append((time.monotonic(), data.decode()))
            if until is not None and data.decode() == until:
                break
        return self.messages()

    def messages(self) -> list[str]:
        return [m for _, m in self.heard]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path) -> Iterator[Listener]:
    # A short path: Unix socket names are limited to 108 bytes.
    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"wk-notify-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir()
    ear = Listener(d / "notify")
    yield ear
    ear.close()
    shutil.rmtree(d, ignore_errors=True)


def _daemon(listener: Listener, tmp_path: Path, *args: str, **env: str) -> subprocess.Popen:
    log = (tmp_path / "daemon.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "wattkeeper", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "NOTIFY_SOCKET": str(listener.path), **env},
    )


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.mark.parametrize("command", [("run", "--simulate", "1x2"), ("controller",)])
def test_the_daemon_says_ready_pings_the_watchdog_and_says_stopping(listener, tmp_path, command):
    db = f"sqlite:///{tmp_path / 'notify.db'}"
    upgrade(make_engine(db))
    proc = _daemon(listener, tmp_path, *command, "--no-metrics", "--db", db)
    try:
        heard = listener.listen(120, until="READY=1")
        assert heard[-1:] == ["READY=1"], (tmp_path / "daemon.log").read_text()
        # Pings come from the healthy loop: wait for a few however slow the machine.
        deadline = time.monotonic() + 120
        while listener.messages().count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            listener.listen(1)
    finally:
        rc = _stop(proc)
    listener.listen(5, until="STOPPING=1")
    heard = listener.messages()
    assert rc == 0, (tmp_path / "daemon.log").read_text()
    assert heard.count("WATCHDOG=1") >= 3
    assert heard.index("READY=1") < heard.index("WATCHDOG=1") < heard.index("STOPPING=1")
    assert heard[-1] == "STOPPING=1"


@pytest.fixture(scope="module")
def frozen_pg() -> Iterator[PgServer]:
    """A server of this module's own, since the test freezes it."""
    yield from started_pg()


@pytest.mark.postgres
def test_the_agent_keeps_pinging_while_the_database_is_frozen(
    listener, tmp_path, frozen_pg: PgServer
):
    """The watchdog follows the loop that samples and caps, not the store: with
    PostgreSQL stopped by SIGSTOP (connections open, nothing answers) the agent keeps
    pinging, so systemd does not kill the process that holds the caps."""
    url = frozen_pg.create_database("notify_agent")
    upgrade(make_engine(url))
    proc = _daemon(
        listener,
        tmp_path,
        "agent",
        "--simulate",
        "2",
        "--node",
        "notify-node",
        "--no-metrics",
        "--db",
        url,
        WATTKEEPER_AGENT__STORE_TIMEOUT_S="2s",
    )
    try:
        assert listener.listen(120, until="READY=1")[-1:] == ["READY=1"], (
            tmp_path / "daemon.log"
        ).read_text()
        listener.listen(3)
        frozen_pg.freeze()
        try:
            frozen_at = time.monotonic()
            listener.listen(12)
        finally:
            frozen_pg.thaw()
        pings = [t for t, m in listener.heard if m == "WATCHDOG=1" and t > frozen_at + 3]
        assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
        assert len(pings) >= 3, (tmp_path / "daemon.log").read_text()
    finally:
        assert _stop(proc) == 0, (tmp_path / "daemon.log").read_text()
