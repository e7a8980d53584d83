"""Single questions to the physics model, for people: "what would this GPU do if...".

The CLI's ``wattkeeper simulate point`` and ``simulate calibration`` print what these
return (as JSON with ``-o json``), so the dicts here are a versioned contract: add keys,
never rename them. Inputs are checked here, with messages that name the valid range,
because the physics functions clip silently (they run on whole facilities per step).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from importlib import resources
from typing import Any

from wattkeeper.simulator import physics

PHASES = ("decode", "prefill", "mixed")

CALIBRATION_CSV = "mlenergy_h100_v3.csv"
"""ML.ENERGY Leaderboard V3 rows (H100 SXM, 700 W default limit); its SOURCE line says
where every number was read from."""

CSV_MODELS = {
    "Llama-3.1-8B": "llama-8b",
    "Llama-3.1-70B": "llama-70b",
    "Llama-3.1-405B-FP8": "llama-405b-fp8",
}
"""The CSV's model names and the simulator's."""


def _known(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))


def _gpu(name: str) -> physics.GpuKind:
    try:
        return physics.GPU_KINDS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown gpu {name!r}; known: {_known(physics.GPU_KINDS)}") from None


def _model(name: str) -> physics.ModelProfile:
    try:
        return physics.MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {_known(physics.MODELS)}") from None


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def point(
    gpu: str,
    model: str,
    phase: str,
    batch: int,
    clock_mhz: int | None = None,
    power_limit_w: float | None = None,
    prefill_fraction: float | None = None,
) -> dict[str, Any]:
    """One GPU's steady state, with its replica's throughput, at the given settings.

    ``phase`` picks the share of time in prefill: 0 for decode, 1 for prefill, and
    ``prefill_fraction`` (required) for mixed. ``clock_mhz`` is a locked clock (upper
    end), ``power_limit_w`` a power limit; None means unlocked / the default limit.
    """
    kind = _gpu(gpu)
    prof = _model(model)
    prof.on(kind)  # raises if this model is not modelled on this GPU
    label = kind.name.upper()
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")
    if phase == "mixed":
        if prefill_fraction is None:
            raise ValueError("phase 'mixed' needs prefill_fraction (0..1)")
        if not 0.0 <= prefill_fraction <= 1.0:
            raise ValueError(f"prefill_fraction must be within 0..1, got {prefill_fraction}")
        pf = float(prefill_fraction)
    else:
        if prefill_fraction is not None:
            raise ValueError(
                f"prefill_fraction applies to phase 'mixed' only (phase {phase!r} implies "
                f"{0.0 if phase == 'decode' else 1.0})"
            )
        pf = 0.0 if phase == "decode" else 1.0
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    if clock_mhz is not None and not (kind.min_sm_clock_mhz <= clock_mhz <= kind.max_sm_clock_mhz):
        raise ValueError(
            f"clock {clock_mhz} MHz is outside the {label}'s supported range "
            f"{kind.min_sm_clock_mhz}-{kind.max_sm_clock_mhz} MHz"
        )
    if power_limit_w is not None:
        if power_limit_w < kind.power_min_w:
            raise ValueError(
                f"power limit {power_limit_w:g} W is below the {label}'s minimum of "
                f"{kind.power_min_w:g} W"
            )
        if power_limit_w > kind.power_max_w:
            raise ValueError(
                f"power limit {power_limit_w:g} W is above the {label}'s maximum of "
                f"{kind.power_max_w:g} W"
            )

    op = physics.operating_point(
        kind,
        prof,
        batch=batch,
        prefill_fraction=pf,
        clock_cap_mhz=clock_mhz,
        power_limit_w=power_limit_w,
    )
    decode_tps = float(op.decode_tokens_per_s)
    prefill_tps = float(op.prefill_tokens_per_s)
    tokens = {"decode": decode_tps, "prefill": prefill_tps}.get(phase, decode_tps + prefill_tps)
    power = float(op.power_w)
    replica_power = power * prof.tensor_parallel
    return {
        "gpu": kind.name,
        "product_name": kind.product_name,
        "model": prof.name,
        "tensor_parallel": prof.tensor_parallel,
        "phase": phase,
        "batch": batch,
        "clock_mhz": clock_mhz,
        "power_limit_w": power_limit_w,
        "prefill_fraction": pf,
        "tokens_per_s": tokens,
        "decode_tokens_per_s": decode_tps,
        "prefill_tokens_per_s": prefill_tps,
        "power_w": power,
        "replica_power_w": replica_power,
        "joules_per_token": replica_power / tokens if tokens > 0 else None,
        "effective_clock_mhz": float(op.effective_clock_mhz),
        "tpot_s": None if phase == "prefill" else _finite_or_none(float(op.tpot_s)),
        "power_capped": bool(op.power_capped),
        "capped_share": float(op.capped_share),
        "effective_power_limit_w": (
            power_limit_w if power_limit_w is not None else kind.power_default_w
        ),
    }


def _read_rows() -> tuple[str, list[dict[str, str]]]:
    text = (resources.files(__package__) / "data" / CALIBRATION_CSV).read_text()
    lines = text.splitlines()
    source = next((ln.lstrip("# ").strip() for ln in lines if ln.startswith("#")), "")
    return source, list(csv.DictReader(ln for ln in lines if ln and not ln.startswith("#")))


def _rel(sim: float, measured: float) -> float:
    return sim / measured - 1.0


def calibration() -> dict[str, Any]:
    """The simulator against every measured row (throughput and per-GPU power).

    This is the evidence the physics is right where it can be checked: each row is the
    model at the row's batch and the default power limit, nothing looked up per row.
    """
    source, rows = _read_rows()
    kind = physics.GPU_KINDS["h100"]
    out: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    errors: list[float] = []
    for row in rows:
        name = CSV_MODELS.get(row["model"])
        prof = physics.MODELS.get(name) if name else None
        num_gpus = int(row["num_gpus"])
        batch = int(row["batch"])
        if prof is None or not prof.supports(kind) or prof.tensor_parallel != num_gpus:
            skipped.append({"model": row["model"], "num_gpus": num_gpus, "batch": batch})
            continue
        op = physics.operating_point(kind, prof, batch=batch)
        tok = float(op.decode_tokens_per_s)
        pw = float(op.power_w)
        m_tok = float(row["output_tok_per_s"])
        m_pw = float(row["avg_gpu_power_w_per_gpu"])
        errors += [abs(_rel(tok, m_tok)), abs(_rel(pw, m_pw))]
        out.append(
            {
                "model": row["model"],
                "sim_model": prof.name,
                "num_gpus": num_gpus,
                "batch": batch,
                "measured_tokens_per_s": m_tok,
                "sim_tokens_per_s": round(tok, 1),
                "tokens_rel_error": round(_rel(tok, m_tok), 4),
                "measured_power_w_per_gpu": m_pw,
                "sim_power_w_per_gpu": round(pw, 1),
                "power_rel_error": round(_rel(pw, m_pw), 4),
                "sim_power_capped": bool(op.power_capped),
                "sim_clock_mhz": round(float(op.effective_clock_mhz), 1),
            }
        )
    return {
        "gpu": kind.name,
        "power_limit_w": kind.power_default_w,
        "source": source,
        "rows": out,
        "skipped": skipped,
        "max_abs_rel_error": round(max(errors), 4) if errors else None,
    }
