"""Scenarios: a fleet, its traffic, an SLO, a power budget over time and node events.

A scenario is a TOML data file (``simulator/scenarios/*.toml`` ships the standard set)
so that the policy comparison runs on named, reviewable situations rather than on code
paths; every file says in its ``description`` why it exists. The loader is strict: an
unknown key or a value of the wrong type is a ValueError naming the file and the key,
because a typo in a scenario would otherwise silently benchmark something else.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from wattkeeper.simulator import physics
from wattkeeper.simulator.workload import Diurnal, LengthDist, OnOff, Spike, Stream

ROLES = ("mixed", "prefill", "decode")
"""A replica prefills and decodes (``mixed``), or is in a disaggregated pool that only
prefills or only decodes (Splitwise, DistServe; vLLM and SGLang P/D disaggregation)."""

SERVER_FORMATS = ("vllm", "sglang")
"""Metric pages the simulated servers can render (see ``simulator/server.py``)."""

EVENT_KINDS = ("fail", "recover")

STANDBY_HOST_W = 150.0
"""Power of a drained node once it is powered down to standby (GPUs off, 0 W): BMC,
fans at minimum and PSU standby rails. ASSUMPTION: DGX-class BMCs and standby rails draw
on the order of 100-200 W; no public DGX standby figure."""

WAKE_S = 120.0
"""Time from un-draining a node in standby until it serves again (boot or resume, GPU
driver, server start and loading the weights), drawing host idle and GPU idle power
meanwhile. ASSUMPTION: resume plus loading a model from local NVMe or page cache takes
minutes rather than seconds; two minutes is the middle of that."""

DEFAULT_HOSTS = {"h100": "dgx-h100", "a100": "dgx-a100"}
"""The host kind a node group gets when it names none: the DGX of its GPU."""


@dataclass(frozen=True)
class NodeGroup:
    """``count`` identical nodes: GPUs of one kind, one model, one role, one server format."""

    name: str
    count: int
    gpus_per_node: int
    gpu: str
    host: str
    model: str
    role: str
    max_inflight: int
    """Router limit of requests in flight per replica at the start (settable at run time)."""
    server: str


@dataclass(frozen=True)
class Slo:
    """Latency targets a finished request must meet to count as within SLO."""

    ttft_s: float
    """Time to first token: router queue wait plus prefill."""
    tpot_s: float
    """Mean time per output token over the request's decode."""


@dataclass(frozen=True)
class NodeEvent:
    """A node (global index, fleet order) fails or comes back at ``at_s``."""

    at_s: float
    node: int
    kind: str


@dataclass(frozen=True)
class EnergyPrice:
    """What energy costs in the scenario, for cost per million good tokens. The run
    starts at 00:00, so hourly prices are indexed by the hour of simulated time."""

    per_kwh: tuple[float, ...]
    """One flat price, or 24, one per hour from 00:00."""
    pue: float = 1.0

    def at(self, t_s: np.ndarray) -> np.ndarray:
        """Price per kWh at each of these simulated seconds since the start."""
        if len(self.per_kwh) == 1:
            return np.full(np.shape(t_s), self.per_kwh[0])
        hours = (np.asarray(t_s, dtype=float) // 3600).astype(int) % 24
        return np.asarray(self.per_kwh)[hours]

    def cost(self, t_s: np.ndarray, joules: np.ndarray) -> float:
        """Grid energy cost of ``joules`` (IT energy) drawn at ``t_s``."""
        return float((np.asarray(joules) * self.at(t_s)).sum()) * self.pue / 3.6e6


@dataclass(frozen=True)
class Scenario:
    """Everything a simulated run needs besides the policy under test."""

    name: str
    description: str
    duration_s: float
    seed: int
    fleet: tuple[NodeGroup, ...]
    workload: tuple[Stream, ...]
    slo: Slo
    budget_schedule: tuple[tuple[float, float], ...] = ()
    """(time_s, budget_w) pairs in time order; empty means no budget."""
    events: tuple[NodeEvent, ...] = ()
    standby_w: float = STANDBY_HOST_W
    wake_s: float = WAKE_S
    price: EnergyPrice | None = None

    @property
    def n_nodes(self) -> int:
        return sum(g.count for g in self.fleet)

    @property
    def n_gpus(self) -> int:
        return sum(g.count * g.gpus_per_node for g in self.fleet)

    def budget_at(self, t_s: float) -> float | None:
        """Budget in force ``t_s`` seconds into the scenario (None before the first entry)."""
        current = None
        for at_s, watts in self.budget_schedule:
            if at_s <= t_s + 1e-9:
                current = watts
            else:
                break
        return current


# --------------------------------------------------------------------------------------
# Strict parsing
# --------------------------------------------------------------------------------------

_REQUIRED = object()


class _Table:
    """One TOML table being read: typed getters, then ``done`` refuses what was not read."""

    def __init__(self, data: Any, path: str, source: str) -> None:
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: {path}: expected a table, got {_kind(data)}")
        self.data = data
        self.path = path
        self.source = source
        self.read: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, problem: str) -> ValueError:
        return ValueError(f"{self.source}: {self.where(key)}: {problem}")

    def raw(self, key: str, default: Any = _REQUIRED) -> Any:
        self.read.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                raise self.fail(key, "missing (required)")
            return default
        return self.data[key]

    def number(
        self,
        key: str,
        default: Any = _REQUIRED,
        *,
        minimum: float | None = None,
        above: bool = False,
    ) -> float:
        value = self.raw(key, default)
        if value is default and key not in self.data:
            return value  # type: ignore[no-any-return]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {_kind(value)}")
        if minimum is not None and (value <= minimum if above else value < minimum):
            relation = "above" if above else "at least"
            raise self.fail(key, f"must be {relation} {minimum:g}, got {value!r}")
        return float(value)

    def integer(self, key: str, default: Any = _REQUIRED, *, minimum: int | None = None) -> int:
        value = self.raw(key, default)
        if value is default and key not in self.data:
            return value  # type: ignore[no-any-return]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {_kind(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value}")
        return value

    def string(self, key: str, default: Any = _REQUIRED, *, choices: Any = None) -> str:
        value = self.raw(key, default)
        if value is default and key not in self.data:
            return value  # type: ignore[no-any-return]
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_kind(value)}")
        if choices is not None and value not in choices:
            raise self.fail(key, f"unknown value {value!r} (known: {', '.join(sorted(choices))})")
        return value

    def table(self, key: str) -> _Table | None:
        value = self.raw(key, None)
        return None if value is None else _Table(value, self.where(key), self.source)

    def tables(self, key: str, *, required: bool = False) -> list[_Table]:
        value = self.raw(key, _REQUIRED if required else [])
        if not isinstance(value, list):
            raise self.fail(key, f"expected an array of tables, got {_kind(value)}")
        return [_Table(v, f"{self.where(key)}[{i}]", self.source) for i, v in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            known = ", ".join(sorted(self.read))
            raise self.fail(unknown[0], f"unknown key (known here: {known})")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"{type(value).__name__} ({value!r})"


def _node_group(t: _Table, index: int) -> NodeGroup:
    gpu = t.string("gpu", "h100", choices=physics.GPU_KINDS)
    model = t.string("model", "llama-8b", choices=physics.MODELS)
    profile = physics.MODELS[model]
    if not profile.supports(gpu):
        raise t.fail("model", f"{model} is not modelled on {gpu}")
    gpus_per_node = t.integer("gpus_per_node", 8, minimum=1)
    if gpus_per_node % profile.tensor_parallel:
        raise t.fail(
            "gpus_per_node",
            f"{model} runs on groups of {profile.tensor_parallel} GPUs; "
            f"{gpus_per_node} per node is not a multiple of it",
        )
    group = NodeGroup(
        name=t.string("name", f"group{index}"),
        count=t.integer("count", minimum=1),
        gpus_per_node=gpus_per_node,
        gpu=gpu,
        host=t.string("host", DEFAULT_HOSTS[gpu], choices=physics.HOST_KINDS),
        model=model,
        role=t.string("role", "mixed", choices=ROLES),
        max_inflight=t.integer("max_inflight", 256, minimum=1),
        server=t.string("server", "vllm", choices=SERVER_FORMATS),
    )
    t.done()
    return group


def _length(t: _Table | None, key: str, parent: _Table) -> LengthDist:
    if t is None:
        raise parent.fail(key, "missing (required): a table such as { mean = 300, sigma = 0.8 }")
    dist = LengthDist(mean=t.number("mean", minimum=1.0), sigma=t.number("sigma", 0.0, minimum=0.0))
    t.done()
    return dist


def _stream(t: _Table, duration_s: float, models: set[str]) -> Stream:
    model = t.string("model", choices=physics.MODELS)
    if model not in models:
        raise t.fail("model", f"no node group of the fleet serves {model}")
    rate = t.number("rate_per_s", minimum=0.0)
    prompt = _length(t.table("prompt"), "prompt", t)
    output = _length(t.table("output"), "output", t)
    diurnal = None
    if (d := t.table("diurnal")) is not None:
        amplitude = d.number("amplitude", minimum=0.0)
        if amplitude > 1.0:
            raise d.fail(
                "amplitude", f"must be at most 1 (a negative rate is no rate), got {amplitude}"
            )
        diurnal = Diurnal(
            amplitude=amplitude,
            period_s=d.number("period_s", duration_s, minimum=0.0, above=True),
            peak_s=d.number("peak_s", 0.0),
        )
        d.done()
    onoff = None
    if (b := t.table("bursts")) is not None:
        onoff = OnOff(
            on_s=b.number("on_s", minimum=0.0, above=True),
            off_s=b.number("off_s", minimum=0.0, above=True),
            off_ratio=b.number("off_ratio", 0.0, minimum=0.0),
            start_s=b.number("start_s", 0.0, minimum=0.0),
        )
        b.done()
    spikes = []
    for s in t.tables("spikes"):
        spikes.append(
            Spike(
                at_s=s.number("at_s", minimum=0.0),
                length_s=s.number("length_s", minimum=0.0, above=True),
                ratio=s.number("ratio", minimum=0.0),
            )
        )
        s.done()
    t.done()
    return Stream(model, rate, prompt, output, diurnal, onoff, tuple(spikes))


def _budget(t: _Table | None) -> tuple[tuple[float, float], ...]:
    if t is None:
        return ()
    has_watts = "watts" in t.data
    has_schedule = "schedule" in t.data
    if has_watts == has_schedule:
        raise ValueError(
            f"{t.source}: budget: give either watts (constant) or schedule ([[time_s, watts], ...])"
        )
    if has_watts:
        schedule: tuple[tuple[float, float], ...] = (
            (0.0, t.number("watts", minimum=0.0, above=True)),
        )
    else:
        raw = t.raw("schedule")
        if not isinstance(raw, list) or not raw:
            raise t.fail(
                "schedule", f"expected a non-empty array of [time_s, watts], got {_kind(raw)}"
            )
        entries = []
        for i, entry in enumerate(raw):
            key = f"schedule[{i}]"
            if (
                not isinstance(entry, list)
                or len(entry) != 2
                or any(isinstance(x, bool) or not isinstance(x, int | float) for x in entry)
            ):
                raise t.fail(key, f"expected [time_s, watts] (two numbers), got {entry!r}")
            at_s, watts = float(entry[0]), float(entry[1])
            if watts <= 0:
                raise t.fail(key, f"watts must be above 0, got {watts:g}")
            if entries and at_s <= entries[-1][0]:
                raise t.fail(key, "times must increase")
            entries.append((at_s, watts))
        schedule = tuple(entries)
    t.done()
    return schedule


def parse_scenario(data: Mapping[str, Any], source: str, default_name: str) -> Scenario:
    """Validate a parsed TOML document; ``source`` names it in every error message."""
    top = _Table(data, "", source)
    duration_s = top.number("duration_s", 3600.0, minimum=0.0, above=True)
    fleet = tuple(_node_group(t, i) for i, t in enumerate(top.tables("fleet", required=True)))
    if not fleet:
        raise top.fail("fleet", "needs at least one node group")
    models = {g.model for g in fleet}
    for model in models:
        roles = {g.role for g in fleet if g.model == model}
        if "mixed" in roles and roles != {"mixed"}:
            raise top.fail("fleet", f"{model}: mixed replicas cannot share a model with P/D pools")
        if roles & {"prefill", "decode"} and roles != {"prefill", "decode"}:
            missing = ({"prefill", "decode"} - roles).pop()
            raise top.fail("fleet", f"{model} is disaggregated but has no {missing} node group")
    n_nodes = sum(g.count for g in fleet)
    slo_t = top.table("slo")
    if slo_t is None:
        raise top.fail("slo", "missing (required): { ttft_s = ..., tpot_s = ... }")
    slo = Slo(
        ttft_s=slo_t.number("ttft_s", minimum=0.0, above=True),
        tpot_s=slo_t.number("tpot_s", minimum=0.0, above=True),
    )
    slo_t.done()
    workload = tuple(_stream(t, duration_s, models) for t in top.tables("workload"))
    events = []
    for t in top.tables("events"):
        node = t.integer("node", minimum=0)
        if node >= n_nodes:
            raise t.fail("node", f"the fleet has nodes 0..{n_nodes - 1}, got {node}")
        events.append(
            NodeEvent(t.number("at_s", minimum=0.0), node, t.string("kind", choices=EVENT_KINDS))
        )
        t.done()
    scenario = Scenario(
        name=top.string("name", default_name),
        description=top.string("description", ""),
        duration_s=duration_s,
        seed=top.integer("seed", 0, minimum=0),
        fleet=fleet,
        workload=workload,
        slo=slo,
        budget_schedule=_budget(top.table("budget")),
        events=tuple(sorted(events, key=lambda e: e.at_s)),
        standby_w=top.number("standby_w", STANDBY_HOST_W, minimum=0.0),
        wake_s=top.number("wake_s", WAKE_S, minimum=0.0),
        price=_price(top.table("cost")),
    )
    top.done()
    return scenario


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def _price(t: _Table | None) -> EnergyPrice | None:
    if t is None:
        return None
    flat = t.raw("price_per_kwh", None)
    hourly = t.raw("hourly_price_per_kwh", None)
    if (flat is None) == (hourly is None):
        raise t.fail("price_per_kwh", "set price_per_kwh or hourly_price_per_kwh (24 prices)")
    if flat is not None:
        prices = (t.number("price_per_kwh", minimum=0.0),)
    else:
        ok = isinstance(hourly, list) and len(hourly) == 24
        if not ok or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and x >= 0 for x in hourly
        ):
            raise t.fail(
                "hourly_price_per_kwh", "24 prices, one per hour from 00:00, none negative"
            )
        prices = tuple(float(x) for x in hourly)
    price = EnergyPrice(prices, t.number("pue", 1.0, minimum=1.0))
    t.done()
    return price


def _packaged() -> dict[str, Callable[[], bytes]]:
    folder = resources.files("wattkeeper.simulator").joinpath("scenarios")
    out: dict[str, Callable[[], bytes]] = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".toml"):
            out[entry.name[: -len(".toml")]] = entry.read_bytes
    return dict(sorted(out.items()))


def _parse_bytes(raw: bytes, source: str, default_name: str) -> Scenario:
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{source}: not valid TOML: {exc}") from None
    return parse_scenario(data, source, default_name)


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A packaged scenario by name (``steady-decode``) or any scenario file by path."""
    text = str(name_or_path)
    path = Path(text)
    if text.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise ValueError(f"{text}: no such scenario file")
        return _parse_bytes(path.read_bytes(), text, path.stem)
    packaged = _packaged()
    if text not in packaged:
        raise ValueError(f"unknown scenario {text!r}; known: {', '.join(packaged)}")
    return _parse_bytes(packaged[text](), f"scenarios/{text}.toml", text)


def list_scenarios() -> list[tuple[str, str]]:
    """(name, description) of every packaged scenario, by name."""
    out = []
    for name, read in _packaged().items():
        scenario = _parse_bytes(read(), f"scenarios/{name}.toml", name)
        out.append((scenario.name, scenario.description))
    return out


__all__ = [
    "EVENT_KINDS",
    "ROLES",
    "SERVER_FORMATS",
    "STANDBY_HOST_W",
    "WAKE_S",
    "NodeEvent",
    "NodeGroup",
    "Scenario",
    "Slo",
    "list_scenarios",
    "load_scenario",
    "parse_scenario",
]
