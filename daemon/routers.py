"""Route actuators: how the controller's weights and in-flight limits reach the router.

- ``HaproxyRouter`` drives HAProxy's runtime API (``set weight``, ``set maxconn
  server``) over its stats socket. Only what changed is sent, and everything is sent
  again every ``resync_s`` so an HAProxy that reloaded gets its settings back.
- ``FileRouter`` rewrites a JSON file atomically whenever a route changes, for routers
  that read one (an Envoy or nginx sidecar, a script).
- The controller's HTTP endpoint serves the same JSON at ``/routes`` (see exporter).

A router that fails logs once per kind of failure and never stops the controller: the
GPUs' limits, not the router, are what keep the budget.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wattkeeper.paths import replace_file
from wattkeeper.store.repository import RouteRow

log = logging.getLogger(__name__)


def publication(
    routes: Sequence[RouteRow], servers: Mapping[str, Sequence[str]], now: float
) -> dict[str, Any]:
    """The routes as published to other routers: per node its servers (if configured),
    weight (0-256, 0: send nothing new), per-server in-flight limit (null: the servers'
    own) and why."""
    return {
        "generated_at": now,
        "weight_max": 256,
        "routes": [
            {
                "node": r.node,
                "servers": list(servers.get(r.node, [r.node])),
                "weight": r.weight,
                "max_inflight": r.max_inflight,
                "updated_at": r.updated_at,
                "reason": r.reason,
            }
            for r in routes
        ],
    }


class FileRouter:
    """Publishes the routes as JSON in a file, replaced atomically (readers never see a
    half-written file) and only when a route changed."""

    def __init__(self, path: Path, servers: Mapping[str, Sequence[str]] | None = None) -> None:
        self.path = path
        self.servers = dict(servers or {})
        self._last: list[Any] | None = None
        self._failed = False

    def apply(self, routes: Sequence[RouteRow], now: float) -> None:
        doc = publication(routes, self.servers, now)
        if doc["routes"] == self._last:
            return
        try:
            replace_file(self.path, json.dumps(doc, indent=1) + "\n", mode=0o644)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot write routes to %s: %s", self.path, exc)
            self._failed = True
            return
        self._failed = False
        self._last = doc["routes"]


class HaproxyError(Exception):
    pass


class HaproxyRuntime:
    """One command per connection on HAProxy's stats socket (non-interactive mode)."""

    def __init__(self, address: str, timeout_s: float = 2.0) -> None:
        self.address = address
        self.timeout_s = timeout_s

    def _connect(self) -> socket.socket:
        if "/" in self.address:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = self.address
        else:
            host, _, port = self.address.rpartition(":")
            host = host.strip("[]") or "127.0.0.1"
            sock = socket.socket(
                socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM
            )
            target = (host, int(port))
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(target)
        except OSError:
            sock.close()
            raise
        return sock

    def command(self, line: str) -> str:
        """Send one command, return HAProxy's answer (raises OSError when unreachable)."""
        with self._connect() as sock:
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def server_limits(self, backend: str) -> dict[str, int]:
        """Each server's configured ``maxconn`` in ``backend`` (0: none), from ``show stat``."""
        text = self.command("show stat")
        lines = text.splitlines()
        if not lines or not lines[0].startswith("# "):
            raise HaproxyError(f"unexpected answer to 'show stat': {text.strip()[:200]!r}")
        header = lines[0][2:].split(",")
        col = {name: k for k, name in enumerate(header)}
        out = {}
        for line in lines[1:]:
            cells = line.split(",")
            if len(cells) < len(header) or cells[col["pxname"]] != backend:
                continue
            if cells[col["svname"]] in ("FRONTEND", "BACKEND"):
                continue
            out[cells[col["svname"]]] = int(cells[col["slim"]] or 0)
        return out


class HaproxyRouter:
    """Sets each node's servers' weight and maxconn in one HAProxy backend."""

    def __init__(
        self,
        address: str,
        backend: str,
        servers: Mapping[str, Sequence[str]] | None = None,
        timeout_s: float = 2.0,
        resync_s: float = 60.0,
        maxconn: int | None = None,
    ) -> None:
        self.runtime = HaproxyRuntime(address, timeout_s)
        self.backend = backend
        self.servers = dict(servers or {})
        self.resync_s = resync_s
        self._sent: dict[str, tuple[int, int | None]] = {}
        self._last_sync = float("-inf")
        self.maxconn = maxconn
        self._configured: dict[str, int] | None = None
        """Each server's maxconn as haproxy.cfg gave it (or ``maxconn``), restored when
        no limit is set."""
        self._said: set[str] = set()

    def _say(self, key: str, message: str) -> None:
        if key not in self._said:
            log.warning("%s", message)
            self._said.add(key)

    def apply(self, routes: Sequence[RouteRow], now: float) -> None:
        resync = now - self._last_sync >= self.resync_s
        if resync:
            self._configured = None  # a reload may have added or renamed servers
        try:
            if self._configured is None:
                found = self.runtime.server_limits(self.backend)
                if self.maxconn is not None:
                    found = dict.fromkeys(found, self.maxconn)
                self._configured = found
            for r in routes:
                want = (r.weight, r.max_inflight)
                if not resync and self._sent.get(r.node) == want:
                    continue
                if self._send(r):
                    self._sent[r.node] = want
        except (OSError, HaproxyError) as exc:
            self._say(
                "unreachable", f"HAProxy at {self.runtime.address}: {exc}; routes not applied"
            )
            self._sent.clear()
            return
        self._said.discard("unreachable")
        if resync:
            self._last_sync = now

    def _send(self, r: RouteRow) -> bool:
        assert self._configured is not None
        ok = True
        for server in self.servers.get(r.node, [r.node]):
            name = f"{self.backend}/{server}"
            if server not in self._configured:
                self._say(name, f"HAProxy has no server {name} (node {r.node}): not routed")
                ok = False
                continue
            maxconn = self._configured[server] if r.max_inflight is None else r.max_inflight
            for line in (f"set weight {name} {r.weight}", f"set maxconn server {name} {maxconn}"):
                answer = self.runtime.command(line).strip()
                if answer:
                    self._say(f"{name}:{answer}", f"HAProxy refused '{line}': {answer}")
                    ok = False
        return ok
