"""Request traffic for the simulated facility: when requests arrive and how long they are.

A facility's power follows its traffic, so the policies can only be judged on traffic
that moves: a steady rate, a day compressed into the scenario (diurnal), on/off bursts
and short spikes. Each stream belongs to one model; its rate at time ``t`` is the
product of its base rate and whichever of those shapes it has, so shapes combine.

Arrivals are sampled per simulator step, not per request: a Poisson count for the step
and the sums of that many lognormal prompt and output lengths (seeded numpy Generator).
That keeps an hour of a thousand requests per second to a few numpy calls per step
while the totals keep the variance of real traffic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LengthDist:
    """Token lengths of one kind (prompt or output): lognormal with a given mean.

    ``sigma`` is the standard deviation of the log-length. ASSUMPTION: lognormal, the
    usual fit for chat traces (ShareGPT- and Azure-trace-like prompt and output lengths
    are right-skewed with a long tail); 0 makes every request exactly ``mean`` long.
    """

    mean: float
    sigma: float = 0.0

    @property
    def mu(self) -> float:
        """Location of the underlying normal, chosen so that the lognormal's mean is ``mean``."""
        return math.log(self.mean) - self.sigma**2 / 2.0

    def sample_sum(self, rng: np.random.Generator, n: int) -> float:
        """Total tokens of ``n`` requests (each at least one token)."""
        if n <= 0:
            return 0.0
        if self.sigma == 0.0:
            return float(n * max(1.0, self.mean))
        return float(np.maximum(1.0, rng.lognormal(self.mu, self.sigma, n)).sum())


@dataclass(frozen=True)
class Diurnal:
    """A day's swing compressed into ``period_s``: ``1 + amplitude·cos(2π(t - peak_s)/period)``.

    The mean over a whole period is the base rate, so a diurnal stream serves as many
    requests per period as a steady one with the same ``rate_per_s``.
    """

    amplitude: float
    period_s: float
    peak_s: float

    def factor(self, t_s: float) -> float:
        return 1.0 + self.amplitude * math.cos(2.0 * math.pi * (t_s - self.peak_s) / self.period_s)


@dataclass(frozen=True)
class OnOff:
    """Repeating bursts: ``on_s`` at the full rate, then ``off_s`` at ``off_ratio`` of it."""

    on_s: float
    off_s: float
    off_ratio: float
    start_s: float = 0.0

    def factor(self, t_s: float) -> float:
        if t_s < self.start_s:
            return self.off_ratio
        phase = (t_s - self.start_s) % (self.on_s + self.off_s)
        return 1.0 if phase < self.on_s else self.off_ratio


@dataclass(frozen=True)
class Spike:
    """A one-off surge: ``ratio`` times the rate from ``at_s`` for ``length_s``."""

    at_s: float
    length_s: float
    ratio: float

    def factor(self, t_s: float) -> float:
        return self.ratio if self.at_s <= t_s < self.at_s + self.length_s else 1.0


@dataclass(frozen=True)
class Stream:
    """One kind of traffic to one model (chat, summarisation, RAG...)."""

    model: str
    rate_per_s: float
    """Requests/s before the shapes are applied (the mean for diurnal, the on-rate for bursts)."""
    prompt: LengthDist
    output: LengthDist
    diurnal: Diurnal | None = None
    onoff: OnOff | None = None
    spikes: tuple[Spike, ...] = ()

    def rate_at(self, t_s: float) -> float:
        """Requests/s at ``t_s`` seconds into the scenario."""
        rate = self.rate_per_s
        if self.diurnal is not None:
            rate *= self.diurnal.factor(t_s)
        if self.onoff is not None:
            rate *= self.onoff.factor(t_s)
        for spike in self.spikes:
            rate *= spike.factor(t_s)
        return max(0.0, rate)


@dataclass(frozen=True)
class Arrivals:
    """Requests that arrived to one model during one step."""

    count: int
    prompt_tokens: float
    output_tokens: float


class Workload:
    """All streams of a scenario, sampled step by step from one seeded Generator."""

    def __init__(self, streams: tuple[Stream, ...], rng: np.random.Generator) -> None:
        self.streams = streams
        self.rng = rng
        self.models: tuple[str, ...] = tuple(dict.fromkeys(s.model for s in streams))

    def rate(self, model: str, t_s: float) -> float:
        """Requests/s to ``model`` at ``t_s`` seconds into the scenario."""
        return sum(s.rate_at(t_s) for s in self.streams if s.model == model)

    def mean_lengths(self, model: str, t_s: float) -> tuple[float, float]:
        """Rate-weighted mean (prompt, output) tokens of the requests ``model`` gets now.

        Falls back to the plain mean of its streams when the rate is zero, and to one
        token when the model has no stream at all (it only serves re-queued work).
        """
        streams = [s for s in self.streams if s.model == model]
        if not streams:
            return 1.0, 1.0
        weights = [s.rate_at(t_s) for s in streams]
        if sum(weights) <= 0.0:
            weights = [1.0] * len(streams)
        total = sum(weights)
        prompt = sum(w * s.prompt.mean for w, s in zip(weights, streams, strict=True)) / total
        output = sum(w * s.output.mean for w, s in zip(weights, streams, strict=True)) / total
        return prompt, output

    def sample(self, t0_s: float, dt_s: float) -> dict[str, Arrivals]:
        """Arrivals per model during ``[t0_s, t0_s + dt_s)``, rate taken at the step's middle.

        Streams are drawn in scenario order so that the same seed gives the same traffic.
        """
        out: dict[str, Arrivals] = {}
        mid = t0_s + dt_s / 2.0
        for s in self.streams:
            n = int(self.rng.poisson(s.rate_at(mid) * dt_s))
            prompt = s.prompt.sample_sum(self.rng, n)
            output = s.output.sample_sum(self.rng, n)
            prev = out.get(s.model)
            if prev is not None:
                n += prev.count
                prompt += prev.prompt_tokens
                output += prev.output_tokens
            out[s.model] = Arrivals(n, prompt, output)
        return out


__all__ = ["Arrivals", "Diurnal", "LengthDist", "OnOff", "Spike", "Stream", "Workload"]
