"""Parsing of the power and duration values operators type on the command line and in config."""

from __future__ import annotations

import re

_POWER_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(w|kw|mw)?\s*$", re.IGNORECASE)
_POWER_SCALE = {"w": 1.0, "kw": 1e3, "mw": 1e6}

_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_SCALE = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_power_w(text: str | float | int, *, require_unit: bool = False) -> float:
    """Turn '18kW', '750 W', '1.5MW' or a bare number of watts into watts.

    'MW' is megawatts (nobody caps a facility in milliwatts); anything that is not a
    positive finite number with one of W, kW, MW is refused with the accepted forms
    named, so a typo never becomes a budget.
    """
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
        unit = "w"
    else:
        m = _POWER_RE.match(str(text))
        if not m:
            raise ValueError(
                f"invalid power {text!r}: expected a positive number with a unit W, kW or MW "
                "(for example 18kW, 750W, 1.5MW)"
            )
        if require_unit and not m.group(2):
            raise ValueError(
                f"invalid power {text!r}: give a unit, W, kW or MW ({text}W or {text}kW?)"
            )
        value = float(m.group(1))
        unit = (m.group(2) or "w").lower()
    watts = value * _POWER_SCALE[unit]
    if not watts > 0 or watts != watts or watts == float("inf"):
        raise ValueError(f"invalid power {text!r}: it must be greater than zero")
    return watts


def parse_duration_s(text: str | float | int) -> float:
    """Turn '10m', '90s', '1.5h' or a bare number of seconds into seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = _DURATION_RE.match(str(text))
        if not m:
            raise ValueError(
                f"invalid duration {text!r}: expected a number with a unit ms, s, m, h or d "
                "(for example 90s, 10m, 1h)"
            )
        seconds = float(m.group(1)) * _DURATION_SCALE[m.group(2) or "s"]
    if not seconds > 0:
        raise ValueError(f"invalid duration {text!r}: it must be greater than zero")
    return seconds


def format_power(watts: float | None) -> str:
    """Human power with a unit that keeps three significant figures readable."""
    if watts is None:
        return "-"
    if abs(watts) >= 1e6:
        return f"{watts / 1e6:.2f} MW"
    if abs(watts) >= 1e4:
        return f"{watts / 1e3:.1f} kW"
    if abs(watts) >= 1e3:
        return f"{watts / 1e3:.2f} kW"
    return f"{watts:.0f} W"
