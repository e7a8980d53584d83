"""Compare what NvmlBackend reads on a real machine with what nvidia-smi reports. READ-ONLY.

THIS SCRIPT NEVER CHANGES A GPU. It uses only ``NvmlBackend.gpus()``, ``.sample()`` and
``.close()``, and before the backend starts it replaces every function of the ``pynvml``
module except ``nvmlInit*``, ``nvmlShutdown``, ``nvmlErrorString``, ``nvmlSystemGet*`` and
``nvmlDeviceGet*`` with one that raises, so even a bug in the backend cannot reach an NVML
setter from this process. It is safe on a shared machine used by others.

Usage::

    python bench/nvml_check.py            # a table per GPU: wattkeeper | nvidia-smi
    python bench/nvml_check.py --json     # the same as one JSON document on stdout

It also times one full sample of all GPUs (median of 20 rounds). Exit status: 0 ok, 1 no
driver or NVML failure, 2 usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

# Every nvidia-smi field we compare, in --query-gpu order.
SMI_FIELDS = (
    "uuid",
    "name",
    "pci.bus_id",
    "memory.total",
    "power.draw",
    "power.draw.average",
    "power.draw.instant",
    "power.limit",
    "enforced.power.limit",
    "power.min_limit",
    "power.max_limit",
    "power.default_limit",
    "clocks.sm",
    "clocks.mem",
    "clocks.max.sm",
    "utilization.gpu",
    "utilization.memory",
    "temperature.gpu",
    "clocks_event_reasons.active",
)

# (label, where in our data, nvidia-smi field or None, how to show ours next to theirs).
# nvidia-smi with nounits: MiB, W, MHz, %, C; reasons as a hex mask.
Row = tuple[str, str, str | None, Callable[[Any], str]]


def _num(scale: float = 1.0, digits: int = 2) -> Callable[[Any], str]:
    def fmt(value: Any) -> str:
        return "None" if value is None else f"{value * scale:.{digits}f}"

    return fmt


def _plain(value: Any) -> str:
    return "None" if value is None else str(value)


def _clocks(value: Any) -> str:
    if not value:
        return "()"
    return f"{len(value)} clocks, {min(value)}-{max(value)} MHz"


ROWS: tuple[Row, ...] = (
    ("uuid", "info.uuid", "uuid", _plain),
    ("name", "info.name", "name", _plain),
    ("pci bus id", "info.pci_bus_id", "pci.bus_id", _plain),
    ("memory total (MiB)", "info.memory_total_bytes", "memory.total", _num(1 / 2**20, 0)),
    ("power limit min (W)", "info.power_limits.min_w", "power.min_limit", _num()),
    ("power limit max (W)", "info.power_limits.max_w", "power.max_limit", _num()),
    ("power limit default (W)", "info.power_limits.default_w", "power.default_limit", _num()),
    ("max SM clock (MHz)", "info.max_sm_clock_mhz", "clocks.max.sm", _plain),
    ("supported SM clocks", "info.supported_sm_clocks_mhz", None, _clocks),
    ("power, 1 s average (W)", "sample.power_w", "power.draw.average", _num()),
    ("  nvidia-smi power.draw (W)", "sample.power_w", "power.draw", _num()),
    ("power, instant (W)", "sample.power_instant_w", "power.draw.instant", _num()),
    ("energy counter (J)", "sample.energy_j", None, _num(1.0, 3)),
    ("SM clock (MHz)", "sample.sm_clock_mhz", "clocks.sm", _num(1.0, 0)),
    ("memory clock (MHz)", "sample.mem_clock_mhz", "clocks.mem", _num(1.0, 0)),
    ("utilization GPU (%)", "sample.utilization_gpu_ratio", "utilization.gpu", _num(100, 0)),
    ("utilization memory (%)", "sample.utilization_mem_ratio", "utilization.memory", _num(100, 0)),
    ("temperature (C)", "sample.temperature_c", "temperature.gpu", _num(1.0, 0)),
    ("power limit enforced (W)", "sample.power_limit_w", "enforced.power.limit", _num()),
    ("power limit requested (W)", "sample.power_limit_requested_w", "power.limit", _num()),
    ("clock event reasons", "sample.throttle_reasons", "clocks_event_reasons.active", _plain),
    ("energy counter reset", "sample.energy_counter_reset", None, _plain),
)

_READ_ONLY_PREFIXES = (
    "nvmlInit",
    "nvmlShutdown",
    "nvmlErrorString",
    "nvmlSystemGet",
    "nvmlDeviceGet",
)


def make_pynvml_read_only() -> int:
    """Replace every pynvml function that is not a pure read with one that raises.

    An allowlist, not a denylist: a setter added to a future binding is blocked too. Returns
    how many functions were blocked. pynvml calls its own functions through module globals,
    so the replacement holds inside the binding as well.
    """
    import pynvml

    blocked = 0
    for name in list(vars(pynvml)):
        value = getattr(pynvml, name)
        if not name.startswith("nvml") or not callable(value) or isinstance(value, type):
            continue
        if name.startswith(_READ_ONLY_PREFIXES):
            continue

        def refuse(*_args: Any, _name: str = name, **_kwargs: Any) -> Any:
            raise RuntimeError(f"nvml_check.py is read-only: refused to call pynvml.{_name}")

        setattr(pynvml, name, refuse)
        blocked += 1
    return blocked


def query_nvidia_smi() -> tuple[dict[str, dict[str, str]], str | None]:
    """nvidia-smi's view, keyed by UUID; fields an older driver does not know read "unknown".

    One query with every field first; if nvidia-smi rejects it (an unknown field fails the
    whole query), ask field by field so the known ones still come back.
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}, "nvidia-smi not found on PATH"

    def run(fields: tuple[str, ...]) -> list[list[str]] | None:
        proc = subprocess.run(
            [exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            return None
        return [[c.strip() for c in line.split(", ")] for line in proc.stdout.splitlines() if line]

    rows = run(SMI_FIELDS)
    if rows is not None and all(len(r) == len(SMI_FIELDS) for r in rows):
        columns = {f: [r[i] for r in rows] for i, f in enumerate(SMI_FIELDS)}
    else:
        uuids = run(("uuid",))
        if uuids is None:
            return {}, "nvidia-smi --query-gpu=uuid failed"
        columns = {}
        for f in SMI_FIELDS:
            got = run((f,))
            # A field holding ", " (never for these) would split wrongly; rejoin to be safe.
            columns[f] = (
                [", ".join(r) for r in got]
                if got is not None
                else ["unknown to this nvidia-smi"] * len(uuids)
            )
    by_uuid: dict[str, dict[str, str]] = {}
    for i, uuid in enumerate(columns["uuid"]):
        by_uuid[uuid] = {f: columns[f][i] for f in SMI_FIELDS}
    return by_uuid, None


def _get(record: dict[str, Any], path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        value = value[part]
    return value


def time_full_sample(sample_all: Callable[[], object], rounds: int = 20) -> dict[str, float]:
    """Median, min and max seconds for one sample of every GPU."""
    durations = []
    for _ in range(rounds):
        start = time.perf_counter()
        sample_all()
        durations.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(durations),
        "min_s": min(durations),
        "max_s": max(durations),
        "rounds": rounds,
    }


def _driver_version() -> str:
    """For the report only; a failure here must not hide the readings."""
    import pynvml

    try:
        version = pynvml.nvmlSystemGetDriverVersion()
    except pynvml.NVMLError as err:
        return f"unknown ({err})"
    return version.decode() if isinstance(version, bytes) else str(version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--rounds", type=int, default=20, help="timing rounds (default 20)")
    args = parser.parse_args(argv)

    try:
        blocked = make_pynvml_read_only()
    except ImportError:
        print(
            "nvml_check: the nvidia-ml-py package (module pynvml) is not installed",
            file=sys.stderr,
        )
        return 1

    from wattkeeper.collectors.gpu import BackendUnavailableError, GpuError
    from wattkeeper.collectors.nvml import NvmlBackend

    try:
        backend = NvmlBackend()
    except BackendUnavailableError as err:
        print(f"nvml_check: {err}", file=sys.stderr)
        return 1

    try:
        driver = _driver_version()
        gpus = backend.gpus()
        samples = {g.uuid: backend.sample(g.uuid) for g in gpus}
        timing = time_full_sample(lambda: [backend.sample(g.uuid) for g in gpus], args.rounds)
    except GpuError as err:
        print(f"nvml_check: NVML failed: {err}", file=sys.stderr)
        return 1
    finally:
        backend.close()

    smi, smi_problem = query_nvidia_smi()
    records = [
        {
            "info": dataclasses.asdict(g),
            "sample": dataclasses.asdict(samples[g.uuid]),
            "nvidia_smi": smi.get(g.uuid),
        }
        for g in gpus
    ]

    if args.json:
        doc = {
            "version": 1,
            "driver_version": driver,
            "pynvml_functions_blocked": blocked,
            "nvidia_smi_problem": smi_problem,
            "gpus": records,
            "full_sample_all_gpus": timing,
        }
        json.dump(doc, sys.stdout, indent=2, default=str)
        print()
        return 0

    print(f"driver {driver}; {len(gpus)} GPU(s); {blocked} pynvml functions blocked (read-only)")
    if smi_problem:
        print(f"nvidia-smi: {smi_problem}")
    for record in records:
        info = record["info"]
        print(f"\nGPU {info['index']}  {info['uuid']}")
        print(f"  {'reading':<30} {'wattkeeper (NvmlBackend)':<34} nvidia-smi")
        for label, path, smi_field, fmt in ROWS:
            ours = fmt(_get(record, path))
            theirs = "-"
            if smi_field and record["nvidia_smi"] is not None:
                theirs = record["nvidia_smi"].get(smi_field, "-")
            print(f"  {label:<30} {ours:<34} {theirs}")
    print(
        f"\none full sample of all {len(gpus)} GPU(s): median {timing['median_s'] * 1e3:.2f} ms "
        f"(min {timing['min_s'] * 1e3:.2f}, max {timing['max_s'] * 1e3:.2f}, "
        f"{timing['rounds']} rounds)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
