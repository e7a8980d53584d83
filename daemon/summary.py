"""Facility power, tokens/s and tokens per joule from a store snapshot.

One function serves ``status``, the live view of ``run`` and the exporter, so the three
can never disagree on what "facility power" means: the sum of every GPU's power and
every node's non-GPU power, from the newest samples.
"""

from __future__ import annotations

from typing import Any

from wattkeeper.store.repository import Snapshot

FORMAT_VERSION = 1


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or not den:
        return None
    return num / den


def in_force(store: Any, snap: Snapshot, now: float) -> Snapshot:
    """The snapshot with the facility budget in force at ``now``: a schedule's window
    lowers the standing one, as the controller sees it (without its look-ahead)."""
    from dataclasses import replace

    from wattkeeper.policies.schedule import effective_budget

    schedules = [s for s in store.schedules() if s.scope == "facility"]
    budget, _ = effective_budget(snap.budget_w, schedules, now, 0.0)
    return replace(snap, budget_w=budget)


def cost_options(cfg: Any, ts: float) -> dict[str, Any]:
    """``facility_summary``'s price and PUE from the configuration, at moment ``ts``."""
    return {
        "price_per_kwh": cfg.cost.price_at(ts, cfg.controller.timezone),
        "pue": cfg.cost.pue,
    }


def facility_summary(
    snap: Snapshot,
    *,
    with_gpus: bool = False,
    stale_after_s: float = float("inf"),
    clock: str = "wall",
    price_per_kwh: float | None = None,
    pue: float = 1.0,
) -> dict[str, Any]:
    """Totals count only nodes heard from within ``stale_after_s``; a silent node is
    listed with its last values and ``stale: true``, never added in as if current.

    Ages and staleness are judged at ``snap.ts``: the wall clock for real nodes, the
    simulated run's last moment for a simulation (``clock``, reported as is).

    With ``price_per_kwh`` (the price in force at ``snap.ts``), cost per million tokens
    at the present rate: facility-side power (IT power times ``pue``) over tokens/s."""

    def cost(power_w: float, tps: float | None) -> float | None:
        if price_per_kwh is None or not tps:
            return None
        per_s = power_w * pue / 3.6e6 * price_per_kwh
        return float(f"{per_s / tps * 1e6:.6g}")  # significant figures: prices vary widely

    now = snap.ts
    by_node: dict[str, list] = {}
    for g in snap.gpus:
        by_node.setdefault(g.node, []).append(g)
    nodes = []
    newest: float | None = None
    tot_gpu = tot_host = tot_tps = 0.0
    any_tps = False
    stale_nodes = 0
    for n in snap.nodes:
        gpus = by_node.get(n.name, [])
        gpu_w = sum(g.power_w for g in gpus if g.power_w is not None)
        host_w = n.non_gpu_power_w or 0.0
        stamps = [g.sample_ts for g in gpus if g.sample_ts is not None]
        if n.host_ts is not None:
            stamps.append(n.host_ts)
        node_newest = max(stamps) if stamps else None
        if node_newest is not None:
            newest = node_newest if newest is None else max(newest, node_newest)
        tps = n.generation_tokens_per_s
        stale = node_newest is None or now - node_newest > stale_after_s
        if stale:
            stale_nodes += 1
        else:
            if tps is not None:
                any_tps = True
                tot_tps += tps
            tot_gpu += gpu_w
            tot_host += host_w
        row: dict[str, Any] = {
            "name": n.name,
            "drained": n.drained,
            "gpus": len(gpus),
            "power_w": round(gpu_w + host_w, 1),
            "gpu_power_w": round(gpu_w, 1),
            "non_gpu_power_w": n.non_gpu_power_w,
            "non_gpu_power_source": n.power_source,
            "tokens_per_s": None if tps is None else round(tps, 1),
            "tokens_per_joule": _round(_ratio(tps, gpu_w + host_w)),
            "cost_per_million_tokens": cost(gpu_w + host_w, tps),
            "endpoints_up": n.endpoints_up,
            "endpoints": n.endpoints_total,
            "sample_age_s": None if node_newest is None else round(now - node_newest, 1),
            "stale": stale,
        }
        if with_gpus:
            row["gpu_list"] = [
                {
                    "index": g.index,
                    "uuid": g.uuid,
                    "name": g.name,
                    "power_w": g.power_w,
                    "power_limit_w": g.power_limit_w,
                    "target_power_limit_w": g.target_power_limit_w,
                    "power_min_w": g.power_min_w,
                    "power_max_w": g.power_max_w,
                    "sm_clock_mhz": g.sm_clock_mhz,
                    "utilization_gpu_ratio": g.utilization_gpu_ratio,
                    "throttle_reasons": list(g.throttle_reasons),
                    "sample_age_s": None if g.sample_ts is None else round(now - g.sample_ts, 1),
                }
                for g in gpus
            ]
        nodes.append(row)
    facility_w = tot_gpu + tot_host
    tps_total = tot_tps if any_tps else None
    return {
        "format_version": FORMAT_VERSION,
        "ts": now,
        "clock": clock,
        "budget_w": snap.budget_w,
        "facility_power_w": round(facility_w, 1),
        "gpu_power_w": round(tot_gpu, 1),
        "non_gpu_power_w": round(tot_host, 1),
        "budget_used_ratio": _round(_ratio(facility_w, snap.budget_w)),
        "tokens_per_s": None if tps_total is None else round(tps_total, 1),
        "tokens_per_joule": _round(_ratio(tps_total, facility_w)),
        "price_per_kwh": price_per_kwh,
        "cost_per_million_tokens": cost(facility_w, tps_total),
        "newest_sample_age_s": None if newest is None else round(now - newest, 1),
        "stale_nodes": stale_nodes,
        "nodes": nodes,
    }


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)
