"""The oracle as a policy of the simulated facility: its plan applied every period.

Scoring the oracle on the same facility as everyone else (rather than quoting its
predicted tokens) is what proves it is realisable: the router, the admission rule, the
limits' lag and the batch that grows with the load all apply to it too. It reads the
facility's true state (arrival rates, request lengths, which nodes are up), which no
other policy may: that is what makes it the reference.

Each control period it solves ``oracle.solve`` on the current arrival rates and applies:

- per replica a power limit, or a clock lock with a limit just above the power the plan
  expects (so a batch that overshoots during a transient cannot carry the facility over
  the budget);
- in the full variant, in-flight limits and routing weights (weights proportional to
  the planned batch: weighted least-in-flight routing then holds each replica at its
  planned share of the requests), and drains;
- in the limits variant, power limits only: in-flight limits, weights and drains stay
  as the scenario has them, as for every limits-only policy.

Drains take minutes in the facility (in-flight requests finish first; a woken node needs
``wake_s``), so the drain set is re-decided only when the budget changes or every
``DRAIN_EVERY_S``; between those, each period's solve keeps it and charges what the
draining or waking nodes draw against the budget.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from wattkeeper.simulator import oracle
from wattkeeper.simulator.facility import SimFacility

CONTROL_INTERVAL_S = 5.0
DRAIN_EVERY_S = 300.0
LOOKAHEAD_S = 30.0
"""Each period plans for the highest arrival rate of the next this-many seconds (the
oracle knows the workload's rate function). A steady-state plan for the current rate
meets a burst with the capacity of the lull before it: in the seconds until the next
period the queue outgrows the TTFT SLO and is shed, and the batch's TPOT, averaged over
a decode lifetime (about half a minute), stays over the SLO long after. Planning on the
coming peak costs the energy of serving it a little early, which any policy that knew
the future would also pay."""
REALISE_TPOT_RATIO = 0.95
"""The applied plan aims at this share of the TPOT SLO. The bound is exact on the model,
so its plan sits on the SLO's edge, and the facility's per-request TPOT spreads around
the replica's mean: aimed at the edge, a third of the requests of an hour-long
steady-decode run missed it. The bound itself keeps the full SLO."""
BACKLOG_DRAIN_S = 10.0
"""Requests waiting in the router are planned for as extra demand, cleared over this."""
BOUND_SMOOTHING_S = 120.0
"""The bound serves, each period, the mean of the traffic that arrived in the
surrounding this-many seconds. A steady state per period cannot carry work across a
burst, which batches and the router queue do: in a one-minute burst at full capacity
the batch grows for the whole minute without breaking the TPOT SLO, where the burst's
steady state would. On steady or slowly moving load the mean is the rate of the
moment."""
INFLIGHT_HEADROOM = 1.15
"""A replica's in-flight limit: this much above its planned batch."""
LOCK_POWER_HEADROOM = 1.03
"""A clock-locked GPU's limit: this much above the power its plan expects."""


class OraclePolicy:
    def __init__(
        self,
        variant: oracle.Variant = "full",
        interval_s: float = CONTROL_INTERVAL_S,
        margin_ratio: float = oracle.DEFAULT_MARGIN,
    ) -> None:
        self.variant = variant
        self.interval_s = interval_s
        self.margin = margin_ratio
        self._next = float("-inf")
        self._drain_due = float("-inf")
        self._budget: float | None = float("nan")
        self._drained: frozenset[int] = frozenset()
        self.last: oracle.OracleResult | None = None
        self._periods: list[tuple[float, float | None, frozenset[int]]] = []
        """Per period: its time, budget and the nodes that were up, for ``bound``."""

    def step(self, f: SimFacility, t: float) -> None:
        if t < self._next:
            return
        self._next = t + self.interval_s
        budget = f.budget_at(t)
        full = self.variant == "full"
        self._periods.append(
            (t, budget, frozenset(n for n in range(f.n_nodes) if not f.node_alive[n]))
        )
        if full and (budget != self._budget or t >= self._drain_due):
            self._budget = budget
            self._drain_due = t + DRAIN_EVERY_S
            self._drained = self._solve(
                f, t, budget, aside=set(), drains=True, tpot_ratio=REALISE_TPOT_RATIO
            ).drained_nodes
            for n in range(f.n_nodes):
                f.set_drained(n, n in self._drained)
        # Nodes drained (in any state) or still waking take no part in this period's plan:
        # their GPUs sit at the floor and what they draw now is charged first.
        aside = {n for n in range(f.n_nodes) if n in self._drained or not f.node_up(n)}
        usable = budget
        lo = np.array([f.gpu_kind(g).power_min_w for g in range(f.n_gpus)])
        hi = np.array([f.gpu_kind(g).power_max_w for g in range(f.n_gpus)])
        for n in aside:
            gpus = list(f.node_gpu_indices(n))
            f.limit_requested[gpus] = lo[gpus]
            if usable is not None:
                usable -= float(f.power_true[gpus].sum() + f.host_power[n])
        result = self._solve(f, t, usable, aside=aside, drains=False, tpot_ratio=REALISE_TPOT_RATIO)
        self.last = result
        self._apply(f, result, lo, hi, full)

    def bound(self, f: SimFacility) -> list[tuple[float, float, float]]:
        """Per period (time, good tokens/s, facility W) of the bound, after the run: the
        oracle on the traffic this seed actually sent (its mean over the surrounding
        ``BOUND_SMOOTHING_S``), on the nodes that were up, free to drain and wake at once.
        The comparison reports it as the oracle's goodput and energy; taken from the
        seed's own arrivals, not the expected rate, so that every policy and the bound
        are judged on the same requests."""
        out = []
        half = BOUND_SMOOTHING_S / 2.0
        for t, budget, dead in self._periods:
            t_rel = t - f.start_ts
            demands = []
            for m in f.models:
                output_tps, prompt_tps = f.arrived_tokens_per_s(m, t_rel - half, t_rel + half)
                prompt, output = f.workload.mean_lengths(m, t_rel)
                demands.append(oracle.ModelDemand(m, output_tps, prompt_tps, prompt, output))
            res = self._solve(
                f,
                t,
                budget,
                aside=set(dead),
                drains=self.variant == "full",
                demands=demands,
                recorded=True,
            )
            out.append((t, res.good_tokens_per_s, res.facility_power_w))
        return out

    def _solve(
        self,
        f: SimFacility,
        t: float,
        budget: float | None,
        aside: set[int],
        drains: bool,
        tpot_ratio: float = 1.0,
        demands: list[oracle.ModelDemand] | None = None,
        recorded: bool = False,
    ) -> oracle.OracleResult:
        """``recorded``: a period replayed after the run, where ``aside`` holds the nodes
        that were down then (the facility's state now is the run's end)."""
        t_rel = t - f.start_ts
        if demands is None:
            demands = []
            ahead = np.arange(0.0, LOOKAHEAD_S + 1.0, 1.0) + t_rel
            queue = f.router_queue
            for m in f.models:
                rate = max(f.workload.rate(m, float(x)) for x in ahead)
                rate += queue.get(m, 0.0) / BACKLOG_DRAIN_S
                prompt, output = f.workload.mean_lengths(m, t_rel)
                demands.append(
                    oracle.ModelDemand(
                        model=m,
                        output_tokens_per_s=rate * output,
                        prompt_tokens_per_s=rate * prompt,
                        mean_prompt_tokens=prompt,
                        mean_output_tokens=output,
                    )
                )
        full = self.variant == "full"
        replicas = []
        for r in range(f.n_replicas):
            node = int(f.replica_node[r])
            g0 = int(np.flatnonzero(f.replica_of == r)[0])
            group = f.node_group[node]
            replicas.append(
                oracle.ReplicaIn(
                    replica=r,
                    node=node,
                    kind=f.gpu_kind_names[g0],
                    model=f.replica_model[r],
                    role=f.replica_role[r],  # type: ignore[arg-type]
                    max_inflight=None if full else int(group.max_inflight),
                )
            )
        nodes = [
            oracle.NodeIn(
                node=n,
                host_kind=f.node_host_kind[n],
                gpus=len(f.node_gpu_indices(n)),
                alive=(recorded or bool(f.node_alive[n])) and n not in aside,
                standby_w=f.scenario.standby_w,
            )
            for n in range(f.n_nodes)
        ]
        return oracle.solve(
            replicas,
            nodes,
            demands,
            replace(f.slo, tpot_s=f.slo.tpot_s * tpot_ratio),
            budget,
            margin=self.margin,
            variant=self.variant,
            # Between drain decisions the drain set is fixed: nodes aside are not alive
            # here, and every other node stays on.
            allow_drain=drains,
        )

    def _apply(
        self,
        f: SimFacility,
        result: oracle.OracleResult,
        lo: np.ndarray,
        hi: np.ndarray,
        full: bool,
    ) -> None:
        weights = np.zeros(f.n_replicas)
        for plan in result.replicas:
            r = plan.replica
            gpus = np.flatnonzero(f.replica_of == r)
            if not f.node_up(int(f.replica_node[r])):
                continue
            if plan.clock_lock_mhz is not None:
                per_gpu = plan.setting_power_w / len(gpus) * LOCK_POWER_HEADROOM
                f.limit_requested[gpus] = np.clip(per_gpu, lo[gpus], hi[gpus])
                f.clock_lock[gpus] = plan.clock_lock_mhz
                f.clock_lock_min[gpus] = min(f.gpu_kind(int(g)).min_sm_clock_mhz for g in gpus)
            else:
                limit = plan.power_limit_w if plan.power_limit_w is not None else lo[gpus]
                f.limit_requested[gpus] = np.clip(limit, lo[gpus], hi[gpus])
                f.clock_lock[gpus] = np.nan
                f.clock_lock_min[gpus] = np.nan
            if full:
                if plan.inflight_limit is not None:
                    # The planned batch with headroom, not the next power of two: where
                    # the plan sheds (demand above what the budget serves), a loose
                    # limit lets the router stuff every replica past its TPOT SLO, and
                    # then no request meets it. Held tight, the excess waits in the
                    # router and is shed there, as the plan intends.
                    tight = math.ceil(plan.batch * INFLIGHT_HEADROOM) + 1
                    f.set_max_inflight(r, max(1, min(plan.inflight_limit, tight)))
                weights[r] = max(plan.batch, 0.0) if plan.role != "prefill" else 1.0
        if full:
            # A replica the plan leaves idle gets no traffic; a model whose plan serves
            # nothing keeps even weights (the admission rule sheds what cannot be served).
            for m in f.models:
                reps = [r for r in range(f.n_replicas) if f.replica_model[r] == m]
                if weights[reps].sum() <= 0:
                    weights[reps] = 1.0
            f.route_weight[:] = weights

    def close(self) -> None:
        pass
