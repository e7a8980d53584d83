"""The node agent: sample GPUs, host and token sources, store them, reconcile targets.

``tick(now)`` is a step function of an injected clock: APScheduler calls it in real time,
the simulator calls it on a simulated clock, and both run exactly this code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from wattkeeper.bounded import Hung, call_within, spawn
from wattkeeper.collectors.drain import DrainActuator, DrainError, DrainNowActuator
from wattkeeper.collectors.gpu import (
    GpuBackend,
    GpuError,
    GpuInfo,
    GpuSample,
    PowerLimitConstraints,
)
from wattkeeper.collectors.host import HostSample
from wattkeeper.collectors.tokens import (
    CounterRate,
    LatencyWindows,
    TokenReading,
    TokenSourceError,
    parse_page,
)
from wattkeeper.paths import replace_file
from wattkeeper.store.db import StoreError
from wattkeeper.store.repository import (
    CLAIM_LIVE_S,
    LIMIT_TOLERANCE_W,
    NodeClaimedError,
    NodeGoneError,
    NodeTick,
    Store,
    TokenRow,
)

log = logging.getLogger(__name__)

MAX_PENDING_AUDIT = 10_000
"""Audit entries kept while the store is away; beyond this the oldest are dropped."""
DRAIN_RETRY_S = 30.0
"""After a drain or resume command failed, wait this long before running it again."""
SHUTDOWN_STORE_S = 5.0
"""How long a stopping agent waits for the store to take its last records."""
REPLAY_TICKS = 300
"""Ticks written per store round trip after an outage: the newest and the 299 oldest of
the backlog, in one transaction."""
SPOOL_TICKS = 3600
"""Ticks of samples kept while the store is away (an hour at 1 s); beyond this the
oldest are dropped and counted."""


def _machine_id() -> str:
    try:
        with open("/etc/machine-id", encoding="ascii") as f:
            return f.read().strip()[:12] or "-"
    except OSError:
        return "-"


def agent_identity() -> str:
    """Who holds a node's name: host, machine id, pid and a random token (a pid is reused
    across restarts, and cloned hosts share a hostname)."""
    return f"{socket.gethostname()} {_machine_id()} {os.getpid()} {secrets.token_hex(3)}"


def holder_gone(holder: str) -> bool:
    """Whether a name's holder is certainly dead: a process of this very machine that no
    longer exists (a crashed run restarting). Anything else may be alive."""
    parts = holder.split()
    if len(parts) != 4 or parts[0] != socket.gethostname() or parts[1] != _machine_id():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


@dataclass(frozen=True)
class CachedTarget:
    """A target as last read from the store, so reconcile survives a store outage."""

    power_limit_w: float | None
    lease_expires_at: float
    reason: str
    epoch: int | None = None
    """The leader epoch that wrote it."""
    issued_at: float = math.nan
    """When the controller wrote it (its clock): a new value is a renewal."""
    sm_clock_max_mhz: int | None = None
    """Lock the SM clock at or below this (None: no lock)."""


@dataclass
class _StoreWork:
    """What one round trip to the store does, in order. Built on the agent's thread and
    handed whole to the store thread, which touches nothing else of the agent."""

    register: bool
    gpu_ids: dict[str, int]
    ticks: list[NodeTick]
    originals: dict[str, float | None]
    standby: bool | None
    audit: list[tuple[str, str, dict, float]]
    now: float = 0.0
    cleared: tuple[str, ...] = ()
    """GPUs an earlier run restored at a stop the store did not hear of: their original
    limits in the store are stale (an administrator may have set another since)."""


@dataclass
class _StoreResult:
    """How far a round trip got; what it did not do goes back to the agent's outbox."""

    registered: tuple[dict[str, int], dict[str, float | None]] | None = None
    ticks_written: int = 0
    """How many of the round trip's ticks are done with, from the first."""
    ticks_refused: int = 0
    """Of those, how many the store refused and were dropped."""
    read_at: float | None = None
    """The monotonic time the targets were read: their leases run from then, not from
    when the agent took the result (a slow write after the read must not stretch them)."""
    originals_written: bool = False
    standby_written: bool = False
    audited: int = 0
    targets: dict[str, CachedTarget] | None = None
    drained: tuple[bool, bool] | None = None
    """Whether the node is drained, and whether at once."""
    error: StoreError | None = None


@dataclass
class TokenEndpoint:
    """Where a node's token counters come from: a URL fetched over HTTP, or a callable page."""

    name: str
    kind: str
    read_page: Callable[[], str]


@dataclass
class AgentState:
    """What the last tick saw, kept for the exporter and the live view."""

    samples: dict[str, GpuSample] = field(default_factory=dict)
    host: HostSample | None = None
    readings: dict[str, TokenReading | None] = field(default_factory=dict)
    endpoint_errors: dict[str, str] = field(default_factory=dict)
    endpoint_last_ok: dict[str, float] = field(default_factory=dict)
    tick_ts: float | None = None
    store_ok: bool = True
    collectors: dict[str, tuple[float, bool]] = field(default_factory=dict)
    """Per collector ('gpu', 'host', 'tokens:<endpoint>'): last duration in s and success."""
    actuations: int = 0
    errors: int = 0
    spooled_ticks: int = 0
    """Ticks of samples not yet in the store."""
    spool_dropped_ticks: int = 0
    """Ticks of samples dropped because the store was away longer than the spool holds."""


class HostReader:
    """What the agent needs from the host collector."""

    def sample(self, now: float) -> HostSample:  # pragma: no cover - protocol
        raise NotImplementedError


def _tick_json(t: NodeTick) -> dict[str, Any]:
    """A tick as one line of the spool file (JSON has no tuples: ``_tick_from_json``
    puts them back)."""
    return {
        "ts": t.ts,
        "samples": [asdict(g) for g in t.samples],
        "host": t.host,
        "tokens": [asdict(r) for r in t.tokens],
    }


def _tick_from_json(d: dict[str, Any]) -> NodeTick:
    """A spool file's line back as the tick it was; malformed raises (the caller skips
    it)."""

    def sample(g: dict[str, Any]) -> GpuSample:
        locked = g.get("locked_sm_clocks_mhz")
        return GpuSample(
            **{
                **g,
                "throttle_reasons": tuple(g.get("throttle_reasons") or ()),
                "locked_sm_clocks_mhz": None if locked is None else (locked[0], locked[1]),
            }
        )

    host = d.get("host")
    return NodeTick(
        float(d["ts"]),
        tuple(sample(g) for g in d["samples"]),
        None if host is None else (host[0], host[1], host[2]),
        tuple(TokenRow(**r) for r in d.get("tokens") or ()),
    )


CLOCK_RETRY_S = 60.0
"""How long after a GPU refused a clock lock the same lock is asked for again."""


def clock_at_or_below(info: GpuInfo, mhz: int | None) -> int | None:
    """The highest clock the GPU supports at or below ``mhz`` (its lowest, when ``mhz``
    is below them all): a lock NVML accepts, never above what was asked. None: no lock
    (none asked, or a GPU that does not list its clocks)."""
    supported = info.supported_sm_clocks_mhz
    if mhz is None or mhz <= 0 or not supported:
        # Without the list there is no floor to lock from: a lock would pin the clock
        # and an idle GPU could not clock down. Power limits alone, then.
        return None
    below = [c for c in supported if c <= mhz]
    return max(below) if below else min(supported)


class Agent:
    def __init__(
        self,
        node: str,
        backend: GpuBackend,
        store: Store,
        *,
        host: HostReader | None = None,
        endpoints: Sequence[TokenEndpoint] = (),
        fallback_power_limit_ratio: float = 0.6,
        restore_on_exit: bool = True,
        tokens_interval_s: float = 0.0,
        drain: DrainActuator | None = None,
        store_timeout_s: float | None = None,
        spool_ticks: int = SPOOL_TICKS,
        write_interval_s: float = 0.0,
        agent_id: str | None = None,
        monotonic: Callable[[], float] | None = None,
        originals_path: Path | None = None,
        spool_path: Path | None = None,
    ) -> None:
        self.node = node
        self.spool_path = spool_path
        """Where the spool goes on disk while the store is away, so an agent restarted
        during an outage (a crash, a host reboot, systemd) loses none of it. Only
        then: while the store answers, ticks wait at most write_interval_s in memory.
        None: in memory only (a simulated run)."""
        self._spool_on_disk = False
        self._spool_file_ticks = 0
        self.originals_path = originals_path
        """A local file holding each GPU's limit from before the first change, written
        before that change is made. The store keeps them too, but only once a round trip
        gets there: an agent killed in between (or during an outage) would otherwise come
        back taking its own cap for the original, and a clean stop would leave it. None:
        GPUs that do not outlive the process (simulated)."""
        self._monotonic = monotonic
        """Leases are timed on it, not on the wall clock ``tick`` is given, so a clock
        step on this host or the controller's neither expires every lease at once nor
        holds a cap past its lease; so are the agent's own timers (token reads, the store
        timeout, batched writes, drain retries), which a step back would otherwise stop
        for as long as it stepped. None: the tick's clock (a simulated run)."""
        self._lease_ends: dict[str, tuple[float, float]] = {}
        """Per GPU: the issue time of the target last seen and when, on the monotonic
        clock, its lease ends."""
        self.agent_id = agent_id or agent_identity()
        self.store_timeout_s = store_timeout_s
        """None: store calls run inline (the simulated clock must not race a thread).
        Otherwise they run on a thread of their own, and the agent waits for them at
        most this long per tick (and half an interval at most): a hung database never
        holds up a sample, a cap or a scrape."""
        self._io_job: tuple[_StoreWork, Future[_StoreResult], float] | None = None
        self._spool: list[NodeTick] = []
        self._spool_max = max(1, spool_ticks)
        self.write_interval_s = write_interval_s
        """Samples are written this often, all that waits in one transaction (0: every
        tick). Targets are read at every tick regardless, so a longer interval delays what
        the controller sees, never what the agent applies."""
        self._write_due = float("-inf")
        self._reclaim_at = float("inf")
        self._outbox_originals: dict[str, float | None] = {}
        self._outbox_standby: bool | None = None
        self._targets_read = False
        self._drained_mark: tuple[bool, bool] | None = None
        self._epoch_seen = 0
        self.drain = drain
        self._drained_applied: bool | None = None
        self._drain_job: tuple[str, Future[None]] | None = None
        self._drain_now_applied = False
        self._drain_pool: ThreadPoolExecutor | None = None
        self._drain_retry_at = float("-inf")
        self._errors: dict[str, str] = {}
        self.backend = backend
        self.store = store
        self.host = host
        self.endpoints = list(endpoints)
        self.fallback_ratio = fallback_power_limit_ratio
        self.restore_on_exit = restore_on_exit
        self.actor = f"agent:{node}"
        self.infos: dict[str, GpuInfo] = {}
        self.gpu_ids: dict[str, int] = {}
        self.state = AgentState()
        self._rates = CounterRate()
        self._latency = LatencyWindows()
        self.tokens_interval_s = tokens_interval_s
        self._tokens_due = float("-inf")
        self._targets: dict[str, CachedTarget] = {}
        self._restored = 0
        """How many GPUs the clean stop restored."""
        self._locks: dict[str, int] = {}
        """The SM clock lock (its top, MHz) this run set on each GPU."""
        self._clock_refused: dict[str, tuple[int | None, float]] = {}
        """A lock (or reset) a GPU refused, and when to ask again: a GPU without the
        capability would otherwise be asked twice a tick, forever."""
        self._pending_audit: list[tuple[str, str, dict, float]] = []
        originals, left_locked, cleared = self._read_originals()
        self._cleared: set[str] = cleared
        """GPUs restored at a stop whose record did not reach the store (``_StoreWork``)."""
        self._persisted_originals: dict[str, float | None] = dict(originals)
        self._locked_on_disk: set[str] = left_locked
        """GPUs whose clocks a run of this agent locked, on disk before the lock: NVML
        cannot read a lock back, so after a crash this is how the next run knows."""
        # A lock an earlier run left, of unknown height (0): the first reconcile resets
        # it or sets the one the target asks for.
        self._locks.update(dict.fromkeys(left_locked, 0))
        self._load_spool()

    @property
    def clock_locks(self) -> dict[str, int]:
        """The top of each SM clock lock this run set (MHz), for the exporter."""
        return {uuid: mhz for uuid, mhz in self._locks.items() if mhz > 0}

    def _usable(self, info: GpuInfo) -> GpuInfo:
        """A GPU whose limit constraints cannot be read is pinned to its current limit:
        it still counts in the budget at that value, and nothing ever tries to change it."""
        lim = info.power_limits
        if all(math.isfinite(x) for x in (lim.min_w, lim.max_w, lim.default_w)):
            return info
        current: float | None = None
        try:
            current = self.backend.sample(info.uuid).power_limit_w
        except GpuError:
            pass
        fixed = current if current is not None and math.isfinite(current) else 0.0
        log.error(
            "GPU %s: power limit constraints unreadable: not managed, counted at %.0f W",
            info.uuid,
            fixed,
        )
        return replace(info, power_limits=PowerLimitConstraints(fixed, fixed, fixed))

    def tick(self, now: float) -> None:
        """Observe, reconcile, store. The GPUs are reconciled on the cached targets before
        any store call, and store calls never hold the tick past ``store_timeout_s``: a
        store that is down or hung does not stop the caps. Targets are cached with their
        lease, so when the store stays away past the lease, the GPUs fall back to the
        safe cap on their own; a node that never read a target falls back at once."""
        if not self.infos:
            self.infos = {i.uuid: i for i in (self._usable(g) for g in self.backend.gpus())}
        samples = self._timed("gpu", self._sample_gpus, lambda r: len(r) == len(self.infos))
        host = self._timed("host", lambda: self._sample_host(now), lambda r: r is not None)
        tokens: list[TokenRow] = []
        mono = self._mono(now)  # timers, unlike samples, must not follow a clock step
        if mono >= self._tokens_due:
            # Servers are scraped less often than GPUs: a page costs milliseconds to parse
            # and token rates need no finer grain than the control period.
            self._tokens_due = mono + self.tokens_interval_s - 1e-6
            tokens = self._read_tokens(now)
        self.state.samples = samples
        self.state.host = host
        self.state.tick_ts = now
        self._spool_tick(
            NodeTick(
                now,
                tuple(samples.values()),
                (host.cpu_util_ratio, host.non_gpu_power_w, host.power_source) if host else None,
                tuple(tokens),
            )
        )
        samples = self.reconcile(now, samples)
        if self._store_round_trip(now):
            samples = self.reconcile(now, samples)
        elif not self.state.store_ok and not self._targets_read:
            samples = self.reconcile(now, samples)
        if self._drained_mark is not None:
            # After the GPUs are reconciled: a drain command may take seconds.
            self._apply_drain(self._drained_mark, now)

    # -- the store, off the agent's thread ----------------------------------------------
    def _spool_tick(self, tick: NodeTick) -> None:
        self._spool.append(tick)
        if self._spool_on_disk:
            # Appended; rewritten from the spool once the file holds twice what the
            # spool keeps, so a long outage does not grow it without bound.
            if self._spool_file_ticks < 2 * self._spool_max:
                self._spool_write([tick], append=True)
            else:
                self._spool_write(self._unwritten()[-self._spool_max :], append=False)
        over = len(self._spool) - self._spool_max
        if over > 0:
            del self._spool[:over]
            self.state.spool_dropped_ticks += over
            if self._first("spool", "full"):
                log.error(
                    "store away for more than %d ticks: dropping the oldest samples",
                    self._spool_max,
                )
        self.state.spooled_ticks = len(self._spool)

    def _store_round_trip(self, now: float) -> bool:
        """Collect the last round trip if it finished, start the next one, and wait a
        little for it. Returns whether fresh targets arrived."""
        fresh = False
        if self._io_job is not None:
            fresh = self._collect(now)
            if self._io_job is not None:
                waited = self._mono(now) - self._io_job[2]
                if self.store_timeout_s is not None and waited > self.store_timeout_s:
                    self._store_ok(
                        False, StoreError(f"the store has not answered for {waited:.0f} s")
                    )
                return fresh
        # Written every write_interval_s, one transaction for all that waits; after an
        # outage, the newest tick and the oldest of the backlog, a bounded batch per
        # round trip, so the controller sees the node as it is now and the backlog
        # drains in order.
        mono = self._mono(now)
        ticks: list[NodeTick] = []
        if self._spool and (not self.gpu_ids or mono >= self._write_due):
            self._write_due = mono + self.write_interval_s - 1e-6
            if len(self._spool) <= REPLAY_TICKS:
                ticks, self._spool = self._spool, []
            else:
                ticks = [*self._spool[: REPLAY_TICKS - 1], self._spool[-1]]
                self._spool = self._spool[REPLAY_TICKS - 1 : -1]
        reclaim = mono >= self._reclaim_at
        if reclaim:
            self._reclaim_at = float("inf")
        register = not self.gpu_ids or reclaim
        work = _StoreWork(
            register=register,
            gpu_ids=dict(self.gpu_ids),
            ticks=ticks,
            originals=self._outbox_originals,
            standby=self._outbox_standby,
            audit=self._pending_audit,
            now=now,
            cleared=tuple(sorted(self._cleared)) if register else (),
        )
        self._outbox_originals, self._outbox_standby = {}, None
        self._pending_audit = []
        if self.store_timeout_s is None:
            future: Future[_StoreResult] = Future()
            future.set_result(self._store_job(work))
        else:
            future = spawn(lambda: self._store_job(work), f"store-{self.node}")
        self._io_job = (work, future, mono)
        if self.store_timeout_s is not None:
            wait([future], timeout=min(self.store_timeout_s, self._wait_s))
        return self._collect(now) or fresh

    _wait_s = 0.5
    """Longest wait for a round trip within one tick, in seconds (the rest is taken at
    the next tick, and the caps never wait for it)."""

    def _store_job(self, work: _StoreWork) -> _StoreResult:
        """One round trip. What keeps the node safe goes first: registration, the limits
        to restore after a crash, the standby flag, the audit, the targets and drain
        mark; then the samples. Stops at the first error and says how far it got."""
        out = _StoreResult()
        store = self.store
        try:
            gpu_ids = work.gpu_ids
            persisted: dict[str, float | None] = {}
            if work.register:
                gpu_ids = store.register_node(
                    self.node,
                    self.backend.name,
                    list(self.infos.values()),
                    work.now,
                    agent_id=self.agent_id,
                    holder_gone=holder_gone,
                )
                persisted = store.original_power_limits(self.node)
                if work.cleared:
                    store.clear_original_power_limits(
                        [gpu_ids[u] for u in work.cleared if u in gpu_ids]
                    )
                    persisted = {u: w for u, w in persisted.items() if u not in work.cleared}
                out.registered = (gpu_ids, persisted)
            for uuid, before in work.originals.items():
                # A limit a crashed earlier run persisted is the true original: what this
                # run saw before its first cap may be that run's cap.
                if uuid in gpu_ids and uuid not in persisted:
                    store.set_original_power_limit(gpu_ids[uuid], before)
            out.originals_written = True
            if work.standby is not None:
                store.set_standby(self.node, work.standby)
            out.standby_written = True
            for action, subject, detail, ts in work.audit:
                store.audit(self.actor, action, subject, detail, ts)
                out.audited += 1
            # Orders before samples: a write that fails (a backlog the store refuses) must
            # not keep the node from its targets.
            orders = store.orders_for_node(self.node, self.agent_id)
            out.targets = {
                uuid: CachedTarget(
                    t.power_limit_w,
                    t.lease_expires_at,
                    t.reason or "target",
                    t.epoch,
                    t.issued_at,
                    t.sm_clock_max_mhz,
                )
                for uuid, t in orders.targets.items()
            }
            out.drained = (orders.drained, orders.drain_now)
            if self._monotonic is not None:
                out.read_at = self._monotonic()
            if work.ticks:
                self._write(store, gpu_ids, work.ticks, out)
        except StoreError as exc:
            out.error = exc
        except Exception as exc:  # a bug must not lose what was done, nor stop the agent
            log.exception("store round trip failed")
            out.error = StoreError(f"store round trip failed: {exc}")
        return out

    def _write(
        self, store: Store, gpu_ids: dict[str, int], ticks: list[NodeTick], out: _StoreResult
    ) -> None:
        """All ticks in one transaction. When the store refuses the data itself (a
        constraint, a value too long for its column), they go one by one, and a tick it
        refuses is dropped and counted rather than retried for the spool's whole life.
        Any other failure (away, locked, timed out, a full disk) keeps them all."""
        try:
            store.write_ticks(self.node, gpu_ids, ticks, agent_id=self.agent_id)
            out.ticks_written = len(ticks)
            return
        except (NodeGoneError, NodeClaimedError):
            raise
        except StoreError as exc:
            if not exc.refused:
                raise
        for tick in ticks:
            try:
                store.write_ticks(self.node, gpu_ids, [tick], agent_id=self.agent_id)
            except (NodeGoneError, NodeClaimedError):
                raise
            except StoreError as exc:
                if not exc.refused:
                    raise
                out.ticks_refused += 1
                log.error("the store refused the samples of %.0f: dropped (%s)", tick.ts, exc)
            out.ticks_written += 1

    def _collect(self, now: float) -> bool:
        """Take a finished round trip's outcome; what it did not do goes back into the
        spool and the outbox. Returns whether fresh targets arrived."""
        assert self._io_job is not None
        work, future, _ = self._io_job
        if not future.done():
            return False
        self._io_job = None
        try:
            res = future.result()
        except Exception as exc:  # the job catches everything; this is the last net
            log.exception("store round trip failed")
            res = _StoreResult(error=StoreError(str(exc)))
        if res.registered is not None:
            self.gpu_ids = res.registered[0]
            self._persisted_originals = {**self._persisted_originals, **res.registered[1]}
        if res.registered is not None and work.cleared:  # cleared as it registered
            self._cleared.difference_update(work.cleared)
            self._write_originals()
        unwritten = work.ticks[res.ticks_written :]
        if unwritten:
            self._spool = sorted([*unwritten, *self._spool], key=lambda t: t.ts)
        self._spool_tick_trim()
        if not self._spool:
            self._first("spool", None)
        if not res.originals_written:
            self._outbox_originals = {**work.originals, **self._outbox_originals}
        if not res.standby_written and self._outbox_standby is None:
            self._outbox_standby = work.standby
        self._pending_audit[:0] = work.audit[res.audited :]
        del self._pending_audit[:-MAX_PENDING_AUDIT]
        self.state.spool_dropped_ticks += res.ticks_refused
        if isinstance(res.error, NodeGoneError):
            self.gpu_ids = {}  # removed from the store: the next round trip registers it
        elif (
            isinstance(res.error, NodeClaimedError)
            and self.gpu_ids
            and math.isinf(self._reclaim_at)
        ):
            # Taken over while this agent was away: it asks for its name again once the
            # other holder can have gone quiet (registration refuses a live one).
            self._reclaim_at = self._mono(now) + CLAIM_LIVE_S
        if res.error is not None:
            self._store_ok(False, res.error)
            if res.targets is None:
                return False
        else:
            self._store_ok(True, None)
            if self._spool_on_disk and (
                not self._spool or len(self._spool) <= self._spool_file_ticks // 2
            ):
                # What is left of the backlog, rewritten as it halves (a rewrite per
                # round trip would cost the agent's thread the whole file each time),
                # and nothing once it has all landed.
                self._spool_write(self._spool, append=False)
        assert res.targets is not None
        self._targets = self._fenced(res.targets)
        self._time_leases(now, res.read_at)
        self._targets_read = True
        self._drained_mark = res.drained
        return True

    def _mono(self, now: float) -> float:
        return now if self._monotonic is None else self._monotonic()

    def _time_leases(self, now: float, read_at: float | None = None) -> None:
        """Start each renewed lease on the monotonic clock.

        A target whose issue time changed was renewed: its lease runs its full length
        from now, whatever either wall clock says, so it ends at most one store round
        trip later than the controller meant. A target first seen (this agent just
        started), or renewed after the lease held here had run out, is trusted to the
        wall clock, but never for longer than its lease: a clock set back cannot keep a
        dead controller's targets alive, and one set forward only brings the safe cap
        early. The same issue time keeps its end. ``read_at``: when, on the monotonic
        clock, the targets were read (None: now)."""
        mono = self._mono(now)
        start = mono if read_at is None else min(read_at, mono)
        ends = {}
        for uuid, t in self._targets.items():
            seen = self._lease_ends.get(uuid)
            if seen is not None and seen[0] == t.issued_at:
                ends[uuid] = seen
                continue
            length = t.lease_expires_at - t.issued_at
            if math.isnan(length):  # no issue time known: the wall clock alone
                left = t.lease_expires_at - now
            elif seen is None or seen[1] < mono:
                # First sight, or a renewal after the last lease ran out here (a store
                # away longer than a lease): it may be a dead controller's last word, so
                # it gets no more than the wall clock says is left of it.
                left = min(t.lease_expires_at - now, length)
            else:
                left = length
            ends[uuid] = (t.issued_at, start + left)
        self._lease_ends = ends

    def _fenced(self, targets: dict[str, CachedTarget]) -> dict[str, CachedTarget]:
        """Targets written by a leader epoch older than one already seen come from a
        deposed controller: the cached target stands (its lease runs out as usual)."""
        epochs = [t.epoch for t in targets.values() if t.epoch is not None]
        self._epoch_seen = max([self._epoch_seen, *epochs])
        out = {}
        for uuid, t in targets.items():
            if t.epoch is not None and t.epoch < self._epoch_seen:
                if self._first(f"epoch:{uuid}", f"{t.epoch}"):
                    log.warning(
                        "GPU %s: ignoring a target of leader epoch %d (now %d)",
                        uuid,
                        t.epoch,
                        self._epoch_seen,
                    )
                if uuid in self._targets:
                    out[uuid] = self._targets[uuid]
                continue
            self._first(f"epoch:{uuid}", None)
            out[uuid] = t
        return out

    def _spool_tick_trim(self) -> None:
        over = len(self._spool) - self._spool_max
        if over > 0:
            del self._spool[:over]
            self.state.spool_dropped_ticks += over
        self.state.spooled_ticks = len(self._spool)

    def _apply_drain(self, mark: tuple[bool, bool], now: float) -> None:
        """Act on the store's drain mark when it changes, and at start when it is set (a
        node drained while its agent was down is drained when it comes back; one in
        service is not "resumed", which would undo a drain made outside wattkeeper).
        A drain marked "now" runs the actuator's ``drain_now`` once, after the drain.

        A command runs in a worker thread, so a hung ``scontrol`` never holds up the
        next sample or the caps; its outcome is taken at a later tick, and a failure is
        retried after ``DRAIN_RETRY_S``, said once per distinct error."""
        if self.drain is None:
            return
        drained, at_once = mark
        job = self._drain_job
        if job is not None:
            want, future = job
            if not future.done():
                return
            self._drain_job = None
            self._drain_done(want, future.exception(), now)
        if self._mono(now) < self._drain_retry_at:
            return
        if drained != self._drained_applied:
            if self._drained_applied is None and not drained:
                self._drained_applied = False
                return
            actuator = self.drain
            self._drain_run(
                "drain" if drained else "resume", lambda: actuator.set_drained(drained), now
            )
            if drained != self._drained_applied:
                return  # in a worker thread, or failed
        if drained and not at_once:
            # The store clears the mark only with the drain: unmarked, this is a new
            # drain (or one a person took over), to be hurried afresh if marked later.
            self._drain_now_applied = False
        if not (drained and at_once) or self._drain_now_applied:
            return
        if not getattr(self.drain, "can_drain_now", False):
            self._drain_now_applied = True
            log.warning(
                "%s: asked to end its drain now, but its drain actuator cannot "
                "(agent.drain_now_command): its requests in flight finish where they are",
                self.node,
            )
            self._audit("node.drain.now.unsupported", self.node, {}, now)
            return
        self._drain_run("drain now", cast(DrainNowActuator, self.drain).drain_now, now)

    def _drain_run(self, want: str, act: Callable[[], None], now: float) -> None:
        if getattr(self.drain, "inline", False):
            error: DrainError | None = None
            try:
                act()
            except DrainError as exc:
                error = exc
            self._drain_done(want, error, now)
            return
        if self._drain_pool is None:
            self._drain_pool = ThreadPoolExecutor(1, thread_name_prefix=f"drain-{self.node}")
        self._drain_job = (want, self._drain_pool.submit(act))

    def _drain_done(self, want: str, error: BaseException | None, now: float) -> None:
        if error is not None:
            self._drain_retry_at = self._mono(now) + DRAIN_RETRY_S
            if self._first("drain", f"{want}: {error}"):
                log.error("%s: %s", want, error)
                detail = {"drained": want != "resume", "action": want, "error": str(error)}
                self._audit("node.drain.failed", self.node, detail, now)
            return
        self._first("drain", None)
        if want == "drain now":
            self._drain_now_applied = True
            log.warning("%s: drain ended now, its requests in flight sent back", self.node)
            self._audit("node.drain.now.applied", self.node, {}, now)
            return
        drained = want == "drain"
        self._drained_applied = drained
        self._drain_now_applied = False
        standby = self._asleep
        if standby:
            log.info("%s drained and powering down: its GPUs going silent is expected", self.node)
        self._audit(
            "node.drain.applied", self.node, {"drained": drained, "powers_down": standby}, now
        )
        self._outbox_standby = standby

    def _store_ok(self, ok: bool, exc: StoreError | None) -> None:
        if not ok and not self._spool_on_disk and self.spool_path is not None:
            # From now on every tick also goes to disk, the ones waiting already and
            # those of a round trip still in flight (hung) included.
            self._spool_on_disk = True
            self._spool_write(self._unwritten(), append=False)
        if ok and not self.state.store_ok:
            log.warning("store reachable again")
        elif not ok and self.state.store_ok:
            if isinstance(exc, NodeClaimedError):
                log.error("%s; reconciling on cached targets until it is free", exc)
            else:
                log.error("store unavailable, reconciling on cached targets: %s", exc)
        self.state.store_ok = ok
        self.state.collectors["store"] = (0.0, ok)

    # -- observation -------------------------------------------------------------------
    def _timed(self, name: str, fn: Callable[[], Any], ok: Callable[[Any], bool]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        self.state.collectors[name] = (time.perf_counter() - t0, ok(result))
        return result

    def _sample_gpus(self) -> dict[str, GpuSample]:
        out: dict[str, GpuSample] = {}
        for uuid in self.infos:
            try:
                out[uuid] = self.backend.sample(uuid)
            except GpuError as exc:
                self.state.errors += 1
                if self._first(f"sample:{uuid}", str(exc)):
                    log.warning("GPU %s: %s", uuid, exc)
            else:
                self._first(f"sample:{uuid}", None)
        return out

    def _first(self, key: str, error: str | None) -> bool:
        """Whether ``error`` is new for ``key`` (None: it cleared). A powered-down node's
        GPUs fail every tick; one line and one audit row per change say it, not thousands."""
        if self._errors.get(key) == error:
            return False
        if error is None:
            self._errors.pop(key, None)
        else:
            self._errors[key] = error
        # In standby its GPUs are expected to be unreachable: nothing to say.
        return error is None or not self._asleep or key == "drain"

    @property
    def _asleep(self) -> bool:
        """Drained by an actuator that powers the node down."""
        return bool(self._drained_applied) and bool(getattr(self.drain, "powers_down", False))

    def _sample_host(self, now: float) -> HostSample | None:
        if self.host is None:
            return None
        try:
            sample = self.host.sample(now)
        except OSError as exc:
            if self._first("host", str(exc)):
                log.warning("host collector: %s", exc)
            return None
        self._first("host", None)
        return sample

    def _read_tokens(self, now: float) -> list[TokenRow]:
        rows: list[TokenRow] = []
        for ep in self.endpoints:
            t0 = time.perf_counter()
            try:
                reading = parse_page(ep.read_page(), ep.kind)
            except (TokenSourceError, OSError) as exc:
                self.state.collectors[f"tokens:{ep.name}"] = (time.perf_counter() - t0, False)
                self.state.readings[ep.name] = None
                self.state.endpoint_errors[ep.name] = str(exc)
                rows.append(TokenRow(endpoint=ep.name, model="", up=False, error=str(exc)[:1000]))
                continue
            self.state.collectors[f"tokens:{ep.name}"] = (time.perf_counter() - t0, True)
            self.state.readings[ep.name] = reading
            self.state.endpoint_errors.pop(ep.name, None)
            self.state.endpoint_last_ok[ep.name] = now
            for series in reading.series:
                key = (ep.name, series.model, tuple(sorted(series.labels.items())))
                rate = None
                if series.generation_tokens_total is not None:
                    rate = self._rates.update(key, series.generation_tokens_total, now)
                latency = self._latency.update(key, series)
                rows.append(
                    TokenRow(
                        endpoint=ep.name,
                        model=series.model,
                        up=True,
                        prompt_tokens_total=series.prompt_tokens_total,
                        generation_tokens_total=series.generation_tokens_total,
                        generation_tokens_per_s=rate,
                        requests_running=series.requests_running,
                        requests_waiting=series.requests_waiting,
                        kv_cache_usage_ratio=series.kv_cache_usage_ratio,
                        **asdict(latency),
                        series=",".join(f"{k}={v}" for k, v in key[2])[:255],
                    )
                )
        return rows

    # -- actuation ---------------------------------------------------------------------
    def _audit(self, action: str, subject: str, detail: dict, now: float) -> None:
        """Audit with the next store round trip, kept until the store takes it: no
        actuation goes unrecorded because the database was away."""
        self._pending_audit.append((action, subject, detail, now))
        del self._pending_audit[:-MAX_PENDING_AUDIT]

    def _flush_audit(self) -> None:
        while self._pending_audit:
            action, subject, detail, ts = self._pending_audit[0]
            self.store.audit(self.actor, action, subject, detail, ts)
            self._pending_audit.pop(0)

    def reconcile(self, now: float, samples: dict[str, GpuSample]) -> dict[str, GpuSample]:
        """Move each GPU toward its target; an expired lease falls back to the safe cap,
        and so does every GPU of a node that has never read its targets while the store
        is away (a start during an outage: whatever the GPUs had is not a plan).

        Decreases are applied before increases so that, between the two, the facility
        never holds more power than either the old or the new plan allows. Returns the
        samples with the limits just requested, so a second pass in the same tick does
        not apply them again.
        """
        moves: list[tuple[str, float, str]] = []
        targets = dict(self._targets)
        if not self._targets_read and not self.state.store_ok:
            for uuid in self.infos:
                targets.setdefault(
                    uuid, CachedTarget(float("inf"), float("-inf"), "store unreachable")
                )
        mono = self._mono(now)
        for uuid, target in targets.items():
            info = self.infos.get(uuid)
            if info is None or target.power_limit_w is None:
                continue
            lim = info.power_limits
            end = self._lease_ends.get(uuid)
            if end is not None and end[1] >= mono:
                want, why = target.power_limit_w, target.reason
            else:
                fallback = max(lim.min_w, min(lim.max_w, self.fallback_ratio * lim.default_w))
                want = min(fallback, target.power_limit_w)
                length = target.lease_expires_at - target.issued_at
                why = (
                    "store unreachable and no target yet: fallback safe cap"
                    if not self._targets_read
                    else f"lease expired ({length:.0f} s, not renewed): fallback safe cap"
                    if math.isfinite(length)
                    else "lease expired: fallback safe cap"
                )
            want = min(max(want, lim.min_w), lim.max_w)
            current = samples[uuid].power_limit_requested_w if uuid in samples else None
            if current is not None and abs(current - want) < LIMIT_TOLERANCE_W:
                continue
            moves.append((uuid, want, why))

        def rise(move: tuple[str, float, str]) -> float:
            s = samples.get(move[0])
            current = s.power_limit_requested_w if s is not None else None
            return move[1] - (current if current is not None else move[1])

        out = dict(samples)
        for uuid, want, why in sorted(moves, key=rise):
            before = samples[uuid].power_limit_requested_w if uuid in samples else None
            first_touch = self._before_first_change(uuid, before)
            try:
                self.backend.set_power_limit(uuid, want)
            except GpuError as exc:
                self.state.errors += 1
                if self._first(f"limit:{uuid}", f"{want:.0f}: {exc}"):
                    log.error("cannot set power limit of %s to %.0f W: %s", uuid, want, exc)
                    self._audit(
                        "power_limit.failed", uuid, {"power_limit_w": want, "error": str(exc)}, now
                    )
                continue
            self._first(f"limit:{uuid}", None)
            if uuid in out:
                out[uuid] = replace(out[uuid], power_limit_requested_w=want)
            if first_touch:
                self._after_first_change(uuid, before)
            self.state.actuations += 1
            self._audit(
                "power_limit.set",
                uuid,
                {"power_limit_w": want, "previous_w": before, "reason": why},
                now,
            )
        self._reconcile_clocks(now, targets, samples, mono)
        self.state.samples = out
        return out

    def _reconcile_clocks(
        self,
        now: float,
        targets: dict[str, CachedTarget],
        samples: dict[str, GpuSample],
        mono: float,
    ) -> None:
        """Clock locks follow the targets whose lease is live; a target without one, or a
        lease that ran out, releases the lock this run made (the safe cap is a power
        limit, and it holds whatever the clock). NVML cannot read a lock back, so what
        this run applied is what is compared: a lock is set once, not every tick."""
        for uuid, info in self.infos.items():
            target = targets.get(uuid)
            end = self._lease_ends.get(uuid)
            want = None
            lim = info.power_limits
            if lim.min_w >= lim.max_w:
                continue  # pinned (_usable): nothing ever changes it
            if target is not None and end is not None and end[1] >= mono:
                want = clock_at_or_below(info, target.sm_clock_max_mhz)
            if want == self._locks.get(uuid):
                continue
            refused = self._clock_refused.get(uuid)
            if refused is not None and refused[0] == want and mono < refused[1]:
                continue  # the GPU refused this very lock lately: ask again in a while
            before = samples[uuid].power_limit_requested_w if uuid in samples else None
            first_touch = self._before_first_change(uuid, before)
            if want is not None and uuid not in self._locked_on_disk:
                self._locked_on_disk.add(uuid)
                self._write_originals()
            supported = info.supported_sm_clocks_mhz
            try:
                if want is None:
                    self.backend.reset_sm_clocks(uuid)
                else:
                    # The floor of the range is the lowest clock, so an idle GPU still
                    # clocks down: only the top is the policy's.
                    self.backend.lock_sm_clocks(uuid, min(supported) if supported else want, want)
            except GpuError as exc:
                self.state.errors += 1
                if self._first(f"clock:{uuid}", f"{want}: {exc}"):
                    what = "reset" if want is None else f"lock at {want} MHz"
                    log.error("cannot %s the SM clock of %s: %s", what, uuid, exc)
                    self._audit("sm_clock.failed", uuid, {"max_mhz": want, "error": str(exc)}, now)
                self._clock_refused[uuid] = (want, mono + CLOCK_RETRY_S)
                continue
            self._clock_refused.pop(uuid, None)
            self._first(f"clock:{uuid}", None)
            if first_touch:
                self._after_first_change(uuid, before)
            previous = self._locks.pop(uuid, None)
            if want is not None:
                self._locks[uuid] = want
            elif uuid in self._locked_on_disk:
                self._locked_on_disk.discard(uuid)
                self._write_originals()
            self.state.actuations += 1
            if want is not None and target is not None:
                reason = target.reason
            elif target is not None and target.sm_clock_max_mhz is not None:
                reason = "lease expired: clock lock released"
            else:
                reason = "the target holds no clock lock"
            self._audit(
                "sm_clock.lock" if want is not None else "sm_clock.reset",
                uuid,
                {"max_mhz": want, "previous_mhz": previous, "reason": reason},
                now,
            )

    def _before_first_change(self, uuid: str, before: float | None) -> bool:
        """Whether the change about to be made is this run's first to the GPU; if so, its
        limit goes to the originals file first (a crash after the change must still be
        able to put it back)."""
        first = self.backend.original_settings(uuid) is None
        if first and uuid not in self._persisted_originals and before is not None:
            self._keep_original(uuid, before)
        return first

    def _after_first_change(self, uuid: str, before: float | None) -> None:
        """The first change went through: the original limit goes to the store as well,
        where `explain` and a new host can see it. Where this tick's sample of the GPU
        failed, the limit was not known before the change; the backend read it on its way
        in, and it is recorded now."""
        if before is None:
            kept = self.backend.original_settings(uuid)
            before = kept.power_limit_w if kept is not None else None
            if before is not None and uuid not in self._persisted_originals:
                self._keep_original(uuid, before)
        if before is not None and uuid not in self._outbox_originals:
            self._persisted_originals.setdefault(uuid, before)
            self._outbox_originals[uuid] = self._persisted_originals[uuid]

    # -- the spool on disk --------------------------------------------------------------
    def _unwritten(self) -> list[NodeTick]:
        """Every tick not known to be in the store, in order: the spool, and the ticks of
        a round trip still in flight (it may hang, or fail, and hand them back)."""
        if self._io_job is None:
            return list(self._spool)
        return sorted([*self._io_job[0].ticks, *self._spool], key=lambda t: t.ts)

    def _spool_write(self, ticks: Sequence[NodeTick], *, append: bool) -> None:
        """Append ticks to the spool file, or replace it with ``ticks`` (removed when
        there are none). A disk that fails costs the copy on disk, never the tick."""
        path = self.spool_path
        if path is None:
            return
        try:
            if not append and not ticks:
                path.unlink(missing_ok=True)
                self._spool_on_disk = False
                return
            lines = "".join(json.dumps(_tick_json(t), separators=(",", ":")) + "\n" for t in ticks)
            if append:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                with os.fdopen(fd, "a") as f:
                    f.write(lines)
                self._spool_file_ticks += len(ticks)
            else:
                self._spool_file_ticks = len(ticks)
                replace_file(path, lines, mode=0o600, dir_mode=0o700)
            self._first("spool-file", None)
        except (OSError, TypeError, ValueError) as exc:  # a disk, or a value JSON refuses
            if self._first("spool-file", str(exc)):
                log.error("cannot keep the spool in %s: %s (it stays in memory)", path, exc)

    def _load_spool(self) -> None:
        """Ticks a previous run of this agent spooled on disk during an outage: they go
        to the store first, in order."""
        path = self.spool_path
        if path is None or not path.exists():
            return
        ticks: list[NodeTick] = []
        bad = 0
        try:
            with path.open() as f:
                for line in f:
                    try:
                        ticks.append(_tick_from_json(json.loads(line)))
                    except (ValueError, TypeError, KeyError):
                        bad += 1  # a line cut short by a crash
        except (OSError, ValueError) as exc:
            log.error("%s: unreadable (%s): its samples are lost", path, exc)
            return
        ticks.sort(key=lambda t: t.ts)
        self._spool = ticks[-self._spool_max :]
        self.state.spool_dropped_ticks += len(ticks) - len(self._spool)
        self.state.spooled_ticks = len(self._spool)
        self._spool_on_disk = True
        # Written back whole: a line a crash cut short would otherwise take the next
        # append with it, and the count bounds the file from here.
        self._spool_write(self._spool, append=False)
        log.warning(
            "%d tick(s) of samples spooled on disk by an earlier run: writing them first%s",
            len(self._spool),
            f" ({bad} unreadable line(s) skipped)" if bad else "",
        )

    def _read_originals(self) -> tuple[dict[str, float], set[str], set[str]]:
        """What an earlier run of this agent recorded before changing each GPU: its
        limit, whether it locked its clocks, and the GPUs it restored at a stop that the
        store did not hear of."""
        path = self.originals_path
        if path is None or not path.exists():
            return {}, set(), set()
        try:
            data = json.loads(path.read_text())
            limits = {str(u): float(w) for u, w in data["power_limit_w"].items()}
            locked = {str(u) for u in data.get("sm_clock_locked", [])}
            return limits, locked, {str(u) for u in data.get("cleared", [])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("%s: unreadable (%s): original limits from the store only", path, exc)
            return {}, set(), set()

    def _keep_original(self, uuid: str, watts: float) -> None:
        """Record a GPU's limit before its first change, on disk before the change."""
        self._persisted_originals[uuid] = watts
        self._write_originals()

    def _write_originals(self) -> None:
        """Replaced whole (``replace_file``): a crash leaves the old file or the new one,
        never half of one."""
        path = self.originals_path
        if path is None:
            return
        known = {u: w for u, w in self._persisted_originals.items() if w is not None}
        try:
            if not known and not self._locked_on_disk and not self._cleared:
                path.unlink(missing_ok=True)
                return
            text = json.dumps(
                {
                    "node": self.node,
                    "power_limit_w": known,
                    "sm_clock_locked": sorted(self._locked_on_disk),
                    "cleared": sorted(self._cleared),
                }
            )
            replace_file(path, text, mode=0o600, dir_mode=0o700)
            self._first("originals-file", None)
        except OSError as exc:
            # The cap still goes on: the budget matters more than the restore.
            if self._first("originals-file", str(exc)):
                log.error("cannot record original limits in %s: %s", path, exc)

    def shutdown(self, now: float) -> None:
        """On a clean stop, put back what each GPU had before wattkeeper touched it.

        Every GPU is restored before anything is written, and a store error only costs
        the audit entries: never a GPU left capped. What a crashed earlier run changed is
        restored from the original limits it persisted.
        """
        self.record_stop(self.restore_gpus(now), SHUTDOWN_STORE_S)

    def record_stop(self, record: Callable[[], list[str]] | None, within_s: float) -> None:
        """Tell the store what ``restore_gpus`` did, waiting at most ``within_s``: the
        GPUs are restored, and a store that does not answer must not hold the exit.
        The GPUs whose originals the store cleared leave the originals file here, on
        the caller's thread, once the store said so."""
        if record is None:
            return
        try:
            done = call_within(record, within_s, f"shutdown-{self.node}")
            self._cleared.difference_update(done)
            self._write_originals()
        except (StoreError, Hung) as exc:
            log.error(
                "restored %d GPU(s) of %s but could not record it: %s",
                self._restored,
                self.node,
                exc,
            )

    def restore_gpus(self, now: float) -> Callable[[], list[str]] | None:
        """The first half of ``shutdown``, with no store call: the GPUs restored and the
        unwritten ticks on disk. Returns the second half, the store records, so a
        process with several agents restores all of their GPUs before it waits on a
        store for any of them."""
        if self._drain_pool is not None:
            self._drain_pool.shutdown(wait=False, cancel_futures=True)
        if self._io_job is not None and self._io_job[1].done():
            self._collect(now)
        pending = self._unwritten()
        if pending:
            # On disk first: whatever the store does below, the next start has them.
            self._spool_write(pending, append=False)
        if not self.restore_on_exit:
            return None
        restored: dict[str, float | None] = {}
        for uuid, info in self.infos.items():
            original = self.backend.original_settings(uuid)
            persisted = self._persisted_originals.get(uuid)
            try:
                if original is not None:
                    self.backend.restore(uuid)  # also undoes clock locks this run made
                    if persisted is None:
                        restored[uuid] = original.power_limit_w
                if uuid in self._locked_on_disk:
                    # An earlier run's lock this run could not reset (or never touched).
                    self.backend.reset_sm_clocks(uuid)
                    self._locked_on_disk.discard(uuid)
                if persisted is not None:
                    # What the GPU had before the first run that capped it, which may
                    # have crashed: this run's "original" would be that run's cap. Only
                    # once it is set does the record of it go.
                    lim = info.power_limits
                    self.backend.set_power_limit(uuid, min(max(persisted, lim.min_w), lim.max_w))
                    restored[uuid] = persisted
            except GpuError as exc:
                (log.debug if self._asleep else log.error)("cannot restore %s: %s", uuid, exc)
        self._locks.clear()
        for uuid, watts in restored.items():
            self._audit("gpu.restore", uuid, {"power_limit_w": watts}, now)
        for uuid in restored:  # nothing left to put back
            self._persisted_originals.pop(uuid, None)
        # Until the store hears of it, the next run must not take its stale originals.
        # (Every one of them: a run that never registered cannot tell which the store has.)
        self._cleared.update(restored)
        self._write_originals()
        self._restored = len(restored)
        last = list(self._sample_gpus().values()) if restored and self.gpu_ids else []
        # Stamped after the tick's own sample even where the clock has not moved (a
        # simulated stop): the store keeps one sample per GPU and time, the first.
        before = {u: s.timestamp for u, s in self.state.samples.items()}
        last = [
            replace(g, timestamp=max(g.timestamp, before.get(g.uuid, -math.inf) + 1e-3))
            for g in last
        ]
        unwritten = pending[-REPLAY_TICKS:]

        def record() -> list[str]:
            done = [u for u in restored if u in self.gpu_ids]
            self.store.clear_original_power_limits([self.gpu_ids[u] for u in done])
            self._flush_audit()
            # What is spooled, and a last sample so the controller budgets these GPUs at
            # their restored limits rather than at the targets they no longer follow.
            ticks = [*unwritten, *([NodeTick(now, tuple(last))] if last else [])]
            if ticks and self.gpu_ids:
                self.store.write_ticks(self.node, self.gpu_ids, ticks, agent_id=self.agent_id)
                self._spool_write(pending[: -len(unwritten) or None], append=False)
            if self.gpu_ids:
                self.store.release_node(self.node, self.agent_id)
            return done

        return record
