"""Configuration: one TOML file plus environment overrides, validated once at start.

A wrong key or value stops the daemon before it touches anything, with a message
that names the key and what was expected. Environment variables override the file:
``WATTKEEPER_<SECTION>__<KEY>`` (for example ``WATTKEEPER_STORE__URL``), which is how
systemd drop-ins and containers usually pass settings.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from wattkeeper.paths import default_db_url
from wattkeeper.units import parse_duration_s, parse_power_w

ENV_PREFIX = "WATTKEEPER_"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9847"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and what was expected."""


def _power(value: Any) -> Any:
    return parse_power_w(value) if isinstance(value, str) else value


def _duration(value: Any) -> Any:
    return parse_duration_s(value) if isinstance(value, str) else value


def _power_with_unit(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError(f'give a power with a unit, W, kW or MW ("{value}kW"?), not {value!r}')
    return parse_power_w(value, require_unit=True)


PowerW = Annotated[float, BeforeValidator(_power), Field(gt=0)]
"""Keys named ``*_w``: a bare number is watts, as the name says."""
PowerWithUnit = Annotated[float, BeforeValidator(_power_with_unit), Field(gt=0)]
"""Other powers: '40kW', never a bare 40 that could be watts or kilowatts."""
DurationS = Annotated[float, BeforeValidator(_duration), Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreConfig(_Section):
    url: str | None = None
    """SQLAlchemy URL; None means SQLite in the state directory."""
    migrate_on_start: bool = False
    retention_s: DurationS = 86400.0
    """The older name of retention.raw_s, still read; the two always hold one value."""

    def resolved_url(self) -> str:
        return self.url or default_db_url()


class RetentionConfig(_Section):
    """How long the store keeps what agents write, so that its size per GPU is bounded
    (docs/retention.md gives the bytes per GPU per day). Raw samples (one row per GPU per
    agent interval) are kept for ``raw_s``; each whole minute older than that becomes one
    row of means, maxima and end-of-minute counters, kept until ``rollup_s`` ago. The
    leading controller does it once a minute, one minute of one table per transaction.
    Long-term history belongs to Prometheus."""

    raw_s: Annotated[DurationS, Field(ge=60)] = 86400.0
    rollup_s: DurationS = 30 * 86400.0
    """Counted from now, like ``raw_s``: minutes are kept from ``raw_s`` to ``rollup_s``
    ago."""

    @model_validator(mode="after")
    def _rollups_outlast_raw(self) -> RetentionConfig:
        if self.rollup_s <= self.raw_s:
            raise ValueError(
                f"retention.rollup_s ({self.rollup_s:g} s) must be longer than "
                f"retention.raw_s ({self.raw_s:g} s): rollups keep what raw samples no longer do"
            )
        return self


class EndpointConfig(_Section):
    url: str
    kind: Literal["auto", "vllm", "sglang", "tgi", "triton", "nim", "llamacpp"] = "auto"
    gpus: list[int] = Field(default_factory=list)
    """GPU indices that serve this endpoint; empty means all GPUs of the node."""
    timeout_s: DurationS = 2.0


class HostPowerConfig(_Section):
    idle_w: PowerW = 1200.0
    """Non-GPU power of an idle node (CPUs, memory, fans, NICs, PSU losses)."""
    per_cpu_util_w: float = Field(default=800.0, ge=0)
    use_rapl: bool = True


class AgentConfig(_Section):
    node: str = Field(default_factory=socket.gethostname)
    interval_s: Annotated[DurationS, Field(ge=0.1)] = 1.0
    """GPU sampling period; below 100 ms NVML's averaged power is no longer an average."""
    tokens_interval_s: DurationS = 5.0
    """How often the inference servers' pages are read (GPUs are read every interval_s)."""
    restore_on_exit: bool = True
    fallback_power_limit_ratio: float = Field(default=0.6, gt=0, le=1)
    """Cap (as a share of the default limit) applied when the controller's lease expires."""
    drain_command: str | None = None
    """Run (no shell; {node} is the node's name) when the node is marked drained, e.g.
    "scontrol update NodeName={node} State=DRAIN Reason=wattkeeper"."""
    resume_command: str | None = None
    """Run when it is back in service, e.g. "scontrol update NodeName={node} State=RESUME"."""
    drain_powers_down: bool = False
    """Whether the drain command also powers the node down (standby, suspend)."""
    drain_now_command: str | None = None
    """Run after the drain command when a drain may not wait for the node's requests to
    finish (a budget below what the serving nodes draw at their floors, or `node drain
    --now`), e.g. "kubectl drain {node} --ignore-daemonsets --force --grace-period=0" or a
    script that restarts the node's inference servers. Unset: such a drain waits for
    them, the node over its share meanwhile."""
    store_timeout_s: Annotated[DurationS, Field(ge=0.5, le=600)] = 5.0
    """A store call unanswered this long counts as the store being down: the node runs on
    its cached targets (and their leases) and keeps its samples in the spool."""
    spool_ticks: int = Field(default=3600, ge=1, le=1_000_000)
    """Ticks of samples kept while the store is away (an hour at 1 s); older are dropped
    and counted in wattkeeper_agent_spool_dropped_ticks_total."""
    write_interval_s: Annotated[DurationS, Field(le=10)] | None = None
    """Samples go to the store this often, all that waits in one transaction (unset:
    every tick). A store's ingest is bounded by commits, not rows: 5 s cuts the
    database's work per sample by two to three times (bench/README.md). The price is
    that the controller sees each node up to this much later, and reacts to a breach
    that much later; and at most 10 s, since a node's claim on its name lives on its
    writes (30 s). Targets are still read every tick."""
    endpoints: list[EndpointConfig] = Field(default_factory=list)
    host: HostPowerConfig = HostPowerConfig()

    @model_validator(mode="after")
    def _drain_both_ways(self) -> AgentConfig:
        if (self.drain_command is None) != (self.resume_command is None):
            raise ValueError(
                "agent.drain_command and agent.resume_command are set together or not at all"
            )
        if self.drain_now_command is not None and self.drain_command is None:
            raise ValueError("agent.drain_now_command needs agent.drain_command")
        return self


class ControllerConfig(_Section):
    timezone: str = "UTC"
    """Time zone of budget schedules' cron expressions and --at times, and hourly prices."""
    interval_s: Annotated[DurationS, Field(ge=1.0)] = 5.0
    lease_s: DurationS = 30.0
    stale_after_s: DurationS = 10.0
    """Samples older than this do not count as fresh; without fresh samples caps never relax."""
    forget_after_s: DurationS = 3600.0
    """A node silent this long no longer holds budget (taken as gone)."""
    margin_ratio: float = Field(default=0.02, ge=0, lt=0.5)
    """Share of the budget kept in reserve for load swings between control periods."""
    non_gpu_w_per_gpu_w: float = Field(default=0.2, ge=0, le=2)
    """Rise of non-GPU power (fans, PSU losses) per watt of added GPU power."""
    oversubscribe: bool = False
    """Count a GPU drawing well under its limit at its predicted draw and lift its limit:
    more GPUs run at full speed under a budget, and the emergency check (every agent
    interval) is the backstop for a surge, so a budget may be passed for about two
    seconds. Off: limits count in full and nothing passes a budget."""
    clock_locks: bool = True
    """Where a node's latency SLO is known, lock each GPU's SM clock at the clock its
    binding cap held at peak load, so the lulls between peaks do not boost the clock
    (docs/policy.md). The power limit stays and keeps the budget. Needs root or
    CAP_SYS_ADMIN on the agent, as power limits do."""
    drain_nodes: bool = False
    """Let the controller drain nodes a budget cannot serve (docs/policy.md); each
    node's agent needs agent.drain_command for a drain to take work off it."""
    consolidate: bool = False
    """At low load, try serving each pool on one node fewer (its router weight at 0 for a
    minute and a half) and drain the node when the rest carry the load with room, its
    drain actuator powering it down; return it before the load outgrows the rest
    (docs/policy.md). Needs drain_nodes, the [slo] and a router the controller steers."""
    consolidate_min_nodes: int = Field(default=1, ge=1)
    """Consolidation leaves at least this many nodes serving each pool: 2 keeps one
    serving while another wakes after a failure."""
    name: str = Field(default_factory=socket.gethostname, min_length=1)
    """This controller's name in the leader lease (status shows the leader)."""
    leader_lease_s: Annotated[DurationS, Field(gt=0)] = 10.0
    """A standby controller takes over when the leader has not renewed for this long."""

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(value)
        except (KeyError, ValueError, OSError):
            raise ValueError(
                f"unknown time zone {value!r} (an IANA name, e.g. Europe/Paris)"
            ) from None
        return value

    drained_node_w: Annotated[float, BeforeValidator(_power), Field(ge=0)] | None = None
    """What a drained node draws (its standby power where the drain powers it down);
    unset: its host power, as if a drain saved only the GPUs' power."""


class MetricsConfig(_Section):
    listen: str = DEFAULT_METRICS_LISTEN
    enabled: bool = True

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_listen(value)
        return value


class SloConfig(_Section):
    """The latency the servers promise. With both set, the controller lowers each node's
    power ceiling while the servers' mean TTFT and TPOT have slack against them, and
    raises it when their p90 misses (see docs/policy.md); unset, it only enforces
    budgets."""

    ttft_s: DurationS | None = None
    tpot_s: DurationS | None = None
    target_ratio: float = Field(default=0.85, gt=0, lt=1)
    """Share of the SLO the p90 latency is steered to; the rest is margin."""

    @model_validator(mode="after")
    def _both_or_neither(self) -> SloConfig:
        if (self.ttft_s is None) != (self.tpot_s is None):
            raise ValueError("slo.ttft_s and slo.tpot_s are set together or not at all")
        return self

    @property
    def enabled(self) -> bool:
        return self.ttft_s is not None and self.tpot_s is not None


class DomainConfig(_Section):
    """A budget domain below the facility: a room, PDU or rack."""

    name: str = Field(min_length=1)
    parent: str = "facility"
    limit: PowerWithUnit | None = None
    """Its budget unless one is set at run time (wattkeeper budget set NAME VALUE)."""
    nodes: list[str] = Field(default_factory=list)
    """Nodes directly under it; a node in no domain is directly under the facility."""


class BudgetConfig(_Section):
    domains: list[DomainConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _a_tree(self) -> BudgetConfig:
        names = [d.name for d in self.domains]
        seen: set[str] = set()
        for name in names:
            if name == "facility":
                raise ValueError("'facility' is the root of the budget tree, not a domain name")
            if name in seen:
                raise ValueError(f"budget domain {name!r} is defined twice")
            seen.add(name)
        placed: dict[str, str] = {}
        for d in self.domains:
            if d.parent != "facility" and d.parent not in seen:
                raise ValueError(f"budget domain {d.name!r}: unknown parent {d.parent!r}")
            for node in d.nodes:
                if node in placed:
                    raise ValueError(
                        f"node {node!r} is in budget domains {placed[node]!r} and {d.name!r}"
                    )
                placed[node] = d.name
        parent = {d.name: d.parent for d in self.domains}
        for name in names:
            chain, at = [name], parent[name]
            while at != "facility":
                if at in chain:
                    raise ValueError(f"budget domains form a cycle: {' > '.join([*chain, at])}")
                chain.append(at)
                at = parent[at]
        return self


class HaproxyConfig(_Section):
    """One HAProxy in front of the replicas, driven through its runtime API (a
    ``stats socket ... level admin`` line in haproxy.cfg; see docs/router.md)."""

    socket: str = Field(min_length=1)
    """A Unix socket path (/run/haproxy/admin.sock) or host:port of a TCP stats socket."""
    backend: str = Field(min_length=1)
    """The backend whose servers are the replicas."""
    servers: dict[str, list[str]] = Field(default_factory=dict)
    """Each node's server names in that backend; a node not listed is one server named
    after the node."""
    maxconn: int | None = Field(default=None, ge=0)
    """The servers' own maxconn, restored when no in-flight limit is set (0: none).
    Unset: read from HAProxy when the controller first reaches it, which after a
    controller restart may be a limit it set itself; set it to be sure."""
    timeout_s: Annotated[DurationS, Field(gt=0, le=30)] = 2.0
    resync_s: Annotated[DurationS, Field(ge=1)] = 60.0
    """Every route is sent again this often, so an HAProxy that restarted (and lost its
    runtime settings) gets them back."""


class RouterConfig(_Section):
    """Routing weights and in-flight limits the controller decides (with an [slo]), and
    where they are published besides the HTTP endpoint's /routes."""

    weights: bool = True
    """Tilt weights towards the nodes that make the most tokens per joule."""
    inflight_limits: bool = True
    """Cap the requests per server where TPOT nears the SLO and power cannot rise."""
    file: Path | None = None
    """A JSON file rewritten (atomically) whenever a route changes, for other routers."""
    haproxy: list[HaproxyConfig] = Field(default_factory=list)


class CostConfig(_Section):
    """What energy costs, for cost per million tokens in `status` and the exporter."""

    price_per_kwh: float | None = Field(default=None, ge=0)
    """Price of a kWh drawn from the grid (any currency); unset: no cost figures."""
    hourly_price_per_kwh: list[float] | None = None
    """24 prices, one per hour of the day in controller.timezone; overrides the flat one."""
    pue: float = Field(default=1.0, ge=1.0, le=5.0)
    """Power usage effectiveness: grid power per watt the IT equipment draws."""

    @field_validator("hourly_price_per_kwh")
    @classmethod
    def _one_per_hour(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 24 or min(value) < 0):
            raise ValueError("24 prices, one per hour from 00:00, none negative")
        return value

    def price_at(self, ts: float, timezone: str) -> float | None:
        if self.hourly_price_per_kwh is not None:
            import datetime as dt
            from zoneinfo import ZoneInfo

            hour = dt.datetime.fromtimestamp(ts, ZoneInfo(timezone)).hour
            return self.hourly_price_per_kwh[hour]
        return self.price_per_kwh


class Config(_Section):
    store: StoreConfig = StoreConfig()
    retention: RetentionConfig = RetentionConfig()
    agent: AgentConfig = AgentConfig()
    controller: ControllerConfig = ControllerConfig()
    metrics: MetricsConfig = MetricsConfig()
    slo: SloConfig = SloConfig()
    cost: CostConfig = CostConfig()
    router: RouterConfig = RouterConfig()
    budget: BudgetConfig = BudgetConfig()

    @model_validator(mode="before")
    @classmethod
    def _retention_s_is_raw_s(cls, data: Any) -> Any:
        """``store.retention_s`` was the raw window's name before [retention]: a file or
        variable that sets it sets ``retention.raw_s``, and readers of either see one
        value."""
        if not isinstance(data, Mapping):
            return data
        store, retention = data.get("store"), data.get("retention")
        store = dict(store) if isinstance(store, Mapping) else store
        retention = dict(retention) if isinstance(retention, Mapping) else retention
        if isinstance(store, dict) and "retention_s" in store:
            if isinstance(retention, dict) and "raw_s" in retention:
                raise ValueError(
                    "store.retention_s is the older name of retention.raw_s: set only "
                    "retention.raw_s"
                )
            if retention is None or isinstance(retention, dict):
                retention = {**(retention or {}), "raw_s": store["retention_s"]}
        elif isinstance(retention, dict) and "raw_s" in retention:
            if store is None or isinstance(store, dict):
                store = {**(store or {}), "retention_s": retention["raw_s"]}
        out = dict(data)
        for key, value in (("store", store), ("retention", retention)):
            if value is not None:
                out[key] = value
        return out

    @model_validator(mode="after")
    def _raw_samples_outlast_the_snapshot(self) -> Config:
        """The controller plans on the newest sample of the last minute (or of three
        stale_after_s): raw samples must be kept at least that long."""
        need = max(60.0, 3 * self.controller.stale_after_s)
        if self.retention.raw_s < need:
            raise ValueError(
                f"retention.raw_s ({self.retention.raw_s:g} s) must be at least "
                f"{need:g} s: the controller reads the newest samples of that window"
            )
        return self

    @model_validator(mode="after")
    def _consolidation_has_its_levers(self) -> Config:
        """Consolidation moves load with routing weights (which need the SLO) and powers
        nodes down with drains: without either it would only ever try and fail."""
        if not self.controller.consolidate:
            return self
        missing = []
        if not self.controller.drain_nodes:
            missing.append("controller.drain_nodes = true")
        if not self.slo.enabled:
            missing.append("slo.ttft_s and slo.tpot_s")
        if missing:
            raise ValueError("controller.consolidate needs " + " and ".join(missing))
        return self

    @model_validator(mode="after")
    def _timings_fit_together(self) -> Config:
        """A lease shorter than a control period expires between plans and flips every
        GPU to the fallback cap and back; stale data must span a few agent samples."""
        c, a = self.controller, self.agent
        need = 2 * c.interval_s + a.interval_s
        if c.lease_s < need:
            raise ValueError(
                f"controller.lease_s ({c.lease_s:g} s) must be at least 2 x "
                f"controller.interval_s + agent.interval_s ({need:g} s)"
            )
        batch = a.write_interval_s or 0.0
        if c.stale_after_s < 2 * a.interval_s + batch:
            raise ValueError(
                f"controller.stale_after_s ({c.stale_after_s:g} s) must be at least 2 x "
                f"agent.interval_s{' + agent.write_interval_s' if batch else ''} "
                f"({2 * a.interval_s + batch:g} s)"
            )
        if c.leader_lease_s < 2 * a.interval_s:
            raise ValueError(
                f"controller.leader_lease_s ({c.leader_lease_s:g} s) must be at least 2 x "
                f"agent.interval_s ({2 * a.interval_s:g} s): the leader renews its lease at "
                "each emergency check, which runs every agent interval"
            )
        if c.forget_after_s < c.lease_s:
            raise ValueError(
                f"controller.forget_after_s ({c.forget_after_s:g} s) must be at least "
                f"controller.lease_s ({c.lease_s:g} s)"
            )
        return self


def parse_listen(value: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [::1]:PORT), refusing anything else with the expected form."""
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    name = host[1:-1] if bracketed else host
    if (
        not sep
        or not port.isdigit()
        or not (0 < int(port) < 65536)
        or not name
        or (":" in name and not bracketed)
        or any(c in name for c in "[] ")
    ):
        raise ValueError(
            f"invalid listen address {value!r}: expected HOST:PORT, e.g. 127.0.0.1:9847 or "
            "[::1]:9847 (0.0.0.0 to listen on every interface, said on purpose)"
        )
    return name, int(port)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Nest WATTKEEPER_SECTION__KEY variables into a dict shaped like the TOML file."""
    tree: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(error: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif not err["loc"]:
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {key}: {msg} (got {err.get('input')!r})")
    return "\n".join(lines)


def _warn_if_secret_readable(path: Path, text: str) -> None:
    """A config that holds a database password and that every local user can read hands
    the store (budgets, caps) to all of them: say so, with the fix. Only a warning, since
    the file's owner decides its mode; the environment (WATTKEEPER_STORE__URL) or a
    0600 file keeps the password private."""
    from wattkeeper.store.db import scrub

    if scrub(text) == text:
        return
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        logging.getLogger(__name__).warning(
            "config file %s holds a password and every local user can read it (mode %o): "
            "chmod 600 %s, or pass the URL in WATTKEEPER_STORE__URL",
            path,
            mode & 0o777,
            path,
        )


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the file (or $WATTKEEPER_CONFIG), apply environment overrides, validate."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("WATTKEEPER_CONFIG")
    data: dict[str, Any] = {}
    origin = "defaults"
    if path:
        p = Path(path)
        origin = str(p)
        try:
            text = p.read_text(encoding="utf-8")
            data = tomllib.loads(text)
            _warn_if_secret_readable(p, text)
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {p} is a directory, not a TOML file") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {p} is not UTF-8 text (byte {exc.start}): TOML files are UTF-8"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    overrides = _env_overrides(environ)
    if overrides:
        origin += " + environment"
    try:
        return Config.model_validate(_merge(data, overrides))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None
