"""The real-GPU backend, through NVIDIA's official ``nvidia-ml-py`` binding (``import pynvml``).

Everything NVML-specific stays in this module: units are converted to the base units of
``gpu.py`` here, and every ``pynvml.NVMLError`` is translated here, in one function
(``_translate``), so nothing above this module ever sees a vendor exception.

Rules this module keeps, and why:

- A reading the device cannot give (``NVML_ERROR_NOT_SUPPORTED``, a symbol the installed
  driver lacks, or a field whose own ``nvmlReturn`` is not success) becomes ``None``. A zero
  would look like a measurement and would drag the learned power curves down.
- A setter is checked against what the device reports (limit constraints, supported clocks)
  *before* NVML is called, so an out-of-range value never reaches the device; NVML's own
  ``INVALID_ARGUMENT`` is still mapped to ``GpuValueError`` as a second line of defence.
- The GPU's settings are remembered before this backend first changes them, so a clean stop
  can put them back. NVML cannot read locked clocks back, so the original lock is recorded as
  ``None``: the only way to undo a lock is ``nvmlDeviceResetGpuLockedClocks``, which is what
  ``restore`` does when this backend locked the clocks.
- ``pynvml`` is imported inside the constructor, so this module (and the CLI's ``--help``)
  imports on machines without the library or a driver.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from wattkeeper.collectors.gpu import (
    BackendUnavailableError,
    GpuError,
    GpuInfo,
    GpuLostError,
    GpuNotFoundError,
    GpuNotSupportedError,
    GpuPermissionError,
    GpuSample,
    GpuValueError,
    OriginalSettings,
    PowerLimitConstraints,
    decode_throttle_reasons,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

NO_DRIVER_MESSAGE = (
    "no NVIDIA driver found (NVML could not load): run with --simulate to use simulated GPUs"
)
POWER_LIMIT_CAPABILITY = "setting power limits needs root or CAP_SYS_ADMIN"
CLOCK_LOCK_CAPABILITY = "locking or resetting SM clocks needs root or CAP_SYS_ADMIN"

# Field ids from nvml.h (NVML API v13). Literal fallbacks because bindings older than the
# driver (nvidia-ml-py 12.535, our floor) may not define the names; the ids are stable ABI.
FI_POWER_AVERAGE = 185  # NVML_FI_DEV_POWER_AVERAGE: 1-second average, mW
FI_POWER_INSTANT = 186  # NVML_FI_DEV_POWER_INSTANT: instantaneous, mW

# nvmlReturn codes that mean "this reading does not exist here" rather than "something broke":
# the device or driver does not offer it, the installed libnvidia-ml lacks the symbol, or
# the device has no data yet. Names, because older bindings lack some of them.
_ABSENT_ERROR_NAMES = (
    "NVML_ERROR_NOT_SUPPORTED",
    "NVML_ERROR_FUNCTION_NOT_FOUND",
    "NVML_ERROR_NO_DATA",
)
# nvmlReturn codes that mean the GPU or the driver under us is gone: the agent must
# re-enumerate (or restart), not retry the same handle.
_LOST_ERROR_NAMES = (
    "NVML_ERROR_GPU_IS_LOST",
    "NVML_ERROR_UNINITIALIZED",
    "NVML_ERROR_DRIVER_NOT_LOADED",
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH",  # driver replaced (reloaded) under a running process
    "NVML_ERROR_RESET_REQUIRED",
    "NVML_ERROR_GPU_NOT_FOUND",
)
# nvmlInit failures that mean "no NVIDIA driver on this machine" (as opposed to a broken one).
_NO_DRIVER_ERROR_NAMES = ("NVML_ERROR_LIBRARY_NOT_FOUND", "NVML_ERROR_DRIVER_NOT_LOADED")


def _codes(nvml: ModuleType, names: tuple[str, ...]) -> frozenset[int]:
    """Resolve error names to codes, skipping names this binding does not know."""
    return frozenset(getattr(nvml, n) for n in names if isinstance(getattr(nvml, n, None), int))


def _text(value: str | bytes) -> str:
    """Older bindings return ``bytes`` where newer ones return ``str``; accept both."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _mw_to_w(milliwatts: float | None) -> float | None:
    return None if milliwatts is None else milliwatts / 1000.0


def _nvml_message(err: Exception) -> str:
    """The NVML text of an error; ``str()`` may itself call into NVML, so never let it raise."""
    try:
        return str(err)
    except Exception:  # the library may be half-gone when the driver was pulled
        return f"NVML error code {getattr(err, 'value', '?')}"


@dataclass
class _Device:
    """What this backend keeps per GPU between calls (NVML handles are stable per process)."""

    index: int
    uuid: str
    handle: Any
    info: GpuInfo | None = None
    original: OriginalSettings | None = None
    changed_power_limit: bool = False
    locked_sm_clocks_mhz: tuple[int, int] | None = None
    last_energy_j: float | None = None
    energy_resets: int = 0


class NvmlBackend:
    """Real GPUs through NVML; see the module docstring for the rules it keeps."""

    name = "nvml"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        """Initialise NVML and learn every GPU's UUID.

        ``clock`` stamps samples; it is wall time in production and injectable so tests are
        deterministic.
        """
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError as err:
            raise BackendUnavailableError(
                "the nvidia-ml-py package (module pynvml) is not installed: "
                "install it, or run with --simulate to use simulated GPUs"
            ) from err
        self._nvml = nvml
        self._absent = _codes(nvml, _ABSENT_ERROR_NAMES)
        self._lost = _codes(nvml, _LOST_ERROR_NAMES)
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            if err.value in _codes(nvml, _NO_DRIVER_ERROR_NAMES):
                raise BackendUnavailableError(NO_DRIVER_MESSAGE) from None
            raise BackendUnavailableError(
                f"NVML failed to initialise: {_nvml_message(err)}; "
                "run with --simulate to use simulated GPUs"
            ) from None
        try:
            self._devices = self._enumerate()
        except BaseException:
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()
            raise

    # ---- error mapping (the one place an NVMLError becomes a GpuError) ----

    def _translate(
        self,
        err: Exception,
        action: str,
        uuid: str | None,
        *,
        setter: bool = False,
        capability: str | None = None,
    ) -> GpuError:
        """Map one NVML error to the project's exceptions; the only such mapping there is."""
        nvml = self._nvml
        code = getattr(err, "value", None)
        where = f" on {uuid}" if uuid else ""
        message = f"{action}{where}: {_nvml_message(err)}"
        if code == nvml.NVML_ERROR_NOT_SUPPORTED or code in self._absent:
            return GpuNotSupportedError(f"{action} is not supported{where} ({_nvml_message(err)})")
        if code == nvml.NVML_ERROR_NO_PERMISSION:
            need = capability or "this operation needs root or CAP_SYS_ADMIN"
            return GpuPermissionError(f"{action}{where} was refused: {need}")
        if code in self._lost:
            return GpuLostError(
                f"{message} (the GPU fell off the bus or the driver was reloaded; "
                "re-enumerate GPUs)"
            )
        if setter and code == nvml.NVML_ERROR_INVALID_ARGUMENT:
            return GpuValueError(f"{message} (the device rejected the value)")
        return GpuError(message)

    @contextlib.contextmanager
    def _mapped(
        self,
        action: str,
        uuid: str | None = None,
        *,
        setter: bool = False,
        capability: str | None = None,
    ) -> Iterator[None]:
        """Run NVML calls so that no ``pynvml.NVMLError`` escapes, translated or not."""
        try:
            yield
        except self._nvml.NVMLError as err:
            raise self._translate(err, action, uuid, setter=setter, capability=capability) from None

    def _read(self, action: str, uuid: str, fn: Callable[..., T], *args: Any) -> T | None:
        """A reading the device does not offer is ``None``; a real failure still raises."""
        try:
            with self._mapped(action, uuid):
                return fn(*args)
        except GpuNotSupportedError:
            return None

    # ---- enumeration ----

    def _enumerate(self) -> dict[str, _Device]:
        """Key GPUs by UUID: indices change with CUDA_VISIBLE_DEVICES and PCI rescans."""
        nvml = self._nvml
        with self._mapped("counting GPUs"):
            count = nvml.nvmlDeviceGetCount()
        devices: dict[str, _Device] = {}
        for index in range(count):
            try:
                with self._mapped(f"opening GPU {index}"):
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except GpuError as err:
                # A GPU without a readable UUID has no stable id to key samples or targets by;
                # skip it loudly rather than refuse to manage the healthy ones.
                log.warning("skipping GPU %d: %s", index, err)
                continue
            devices[uuid] = _Device(index=index, uuid=uuid, handle=handle)
        return devices

    def _device(self, uuid: str) -> _Device:
        if self._closed:
            raise GpuError("the NVML backend is closed")
        try:
            return self._devices[uuid]
        except KeyError:
            raise GpuNotFoundError(
                f"no GPU with UUID {uuid} (NVML sees {len(self._devices)})"
            ) from None

    def _info(self, dev: _Device) -> GpuInfo:
        """Static facts, read once: they do not change while the driver stays loaded."""
        if dev.info is None:
            dev.info = self._read_info(dev)
        return dev.info

    def _read_info(self, dev: _Device) -> GpuInfo:
        nvml, h, uuid = self._nvml, dev.handle, dev.uuid
        name = self._read("reading the GPU name", uuid, nvml.nvmlDeviceGetName, h)
        pci = self._read("reading PCI info", uuid, nvml.nvmlDeviceGetPciInfo, h)
        memory = self._read("reading memory info", uuid, nvml.nvmlDeviceGetMemoryInfo, h)
        return GpuInfo(
            uuid=uuid,
            index=dev.index,
            name=_text(name) if name is not None else "unknown",
            pci_bus_id=_text(pci.busId) if pci is not None else "",
            memory_total_bytes=int(memory.total) if memory is not None else 0,
            power_limits=self._read_constraints(dev),
            supported_sm_clocks_mhz=self._read_supported_sm_clocks(dev),
            max_sm_clock_mhz=self._read(
                "reading the max SM clock",
                uuid,
                nvml.nvmlDeviceGetMaxClockInfo,
                h,
                nvml.NVML_CLOCK_SM,
            ),
        )

    def _read_constraints(self, dev: _Device) -> PowerLimitConstraints:
        """Limits in watts; NaN where unreadable, so every check refuses rather than guesses."""
        nvml, h, uuid = self._nvml, dev.handle, dev.uuid
        bounds = self._read(
            "reading power limit constraints",
            uuid,
            nvml.nvmlDeviceGetPowerManagementLimitConstraints,
            h,
        )
        default = self._read(
            "reading the default power limit",
            uuid,
            nvml.nvmlDeviceGetPowerManagementDefaultLimit,
            h,
        )
        nan = float("nan")
        min_mw, max_mw = bounds if bounds is not None else (nan, nan)
        return PowerLimitConstraints(
            min_w=min_mw / 1000.0,
            max_w=max_mw / 1000.0,
            default_w=default / 1000.0 if default is not None else nan,
        )

    def _read_supported_sm_clocks(self, dev: _Device) -> tuple[int, ...]:
        """Graphics clocks at the highest memory clock, ascending.

        The highest memory clock is the one the GPU runs at under load; the current one may be
        an idle P-state whose graphics list is much shorter.
        """
        nvml, h, uuid = self._nvml, dev.handle, dev.uuid
        mem_clocks = self._read(
            "reading supported memory clocks", uuid, nvml.nvmlDeviceGetSupportedMemoryClocks, h
        )
        if not mem_clocks:
            return ()
        graphics = self._read(
            "reading supported graphics clocks",
            uuid,
            nvml.nvmlDeviceGetSupportedGraphicsClocks,
            h,
            max(mem_clocks),
        )
        return tuple(sorted({int(c) for c in graphics or ()}))

    # ---- GpuBackend: reading ----

    def gpus(self) -> list[GpuInfo]:
        """Every GPU NVML sees (with a readable UUID), in index order."""
        return [self._info(d) for d in sorted(self._devices.values(), key=lambda d: d.index)]

    def sample(self, uuid: str) -> GpuSample:
        """Read one GPU now; absent readings are ``None``, a lost GPU raises ``GpuLostError``."""
        dev = self._device(uuid)
        nvml, h = self._nvml, dev.handle
        timestamp = self._clock()
        fields = self._read_power_fields(dev)
        power_avg_mw = fields.get(FI_POWER_AVERAGE)
        if power_avg_mw is None:
            # Field 185 is the unambiguous 1-second average. Without it, nvmlDeviceGetPowerUsage
            # is that same average on Ampere (except GA100) and newer, instantaneous before.
            power_avg_mw = self._read("reading power", uuid, nvml.nvmlDeviceGetPowerUsage, h)
        energy_mj = self._read(
            "reading the energy counter", uuid, nvml.nvmlDeviceGetTotalEnergyConsumption, h
        )
        energy_j = energy_mj / 1000.0 if energy_mj is not None else None
        utilization = self._read("reading utilization", uuid, nvml.nvmlDeviceGetUtilizationRates, h)
        enforced_mw = self._read(
            "reading the enforced power limit", uuid, nvml.nvmlDeviceGetEnforcedPowerLimit, h
        )
        requested_mw = self._read(
            "reading the power limit", uuid, nvml.nvmlDeviceGetPowerManagementLimit, h
        )
        reasons = self._read_clock_event_reasons(dev)
        sm_clock = self._read(
            "reading the SM clock", uuid, nvml.nvmlDeviceGetClockInfo, h, nvml.NVML_CLOCK_SM
        )
        mem_clock = self._read(
            "reading the memory clock", uuid, nvml.nvmlDeviceGetClockInfo, h, nvml.NVML_CLOCK_MEM
        )
        temperature = self._read(
            "reading the temperature",
            uuid,
            nvml.nvmlDeviceGetTemperature,
            h,
            nvml.NVML_TEMPERATURE_GPU,
        )
        with self._lock:
            reset = self._note_energy(dev, energy_j)
            locked = dev.locked_sm_clocks_mhz
        return GpuSample(
            uuid=uuid,
            timestamp=timestamp,
            power_w=_mw_to_w(power_avg_mw),
            power_instant_w=_mw_to_w(fields.get(FI_POWER_INSTANT)),
            energy_j=energy_j,
            sm_clock_mhz=float(sm_clock) if sm_clock is not None else None,
            mem_clock_mhz=float(mem_clock) if mem_clock is not None else None,
            utilization_gpu_ratio=utilization.gpu / 100.0 if utilization is not None else None,
            utilization_mem_ratio=utilization.memory / 100.0 if utilization is not None else None,
            temperature_c=float(temperature) if temperature is not None else None,
            power_limit_w=_mw_to_w(enforced_mw),
            power_limit_requested_w=_mw_to_w(requested_mw),
            # NVML cannot read a lock back: this is the lock this backend applied, if any.
            locked_sm_clocks_mhz=locked,
            throttle_reasons=decode_throttle_reasons(reasons) if reasons is not None else (),
            energy_counter_reset=reset,
        )

    def energy_resets(self, uuid: str) -> int:
        """How often this GPU's energy counter went backwards (driver reload, GPU reset)."""
        return self._device(uuid).energy_resets

    def _note_energy(self, dev: _Device, energy_j: float | None) -> bool:
        """Flag a counter that went backwards, so no caller differences across a reset."""
        reset = (
            energy_j is not None and dev.last_energy_j is not None and energy_j < dev.last_energy_j
        )
        if reset:
            dev.energy_resets += 1
            log.warning(
                "energy counter of GPU %s went backwards (%.3f J -> %.3f J): driver reloaded "
                "or GPU reset; reset #%d",
                dev.uuid,
                dev.last_energy_j,
                energy_j,
                dev.energy_resets,
            )
        if energy_j is not None:
            dev.last_energy_j = energy_j
        return reset

    def _read_power_fields(self, dev: _Device) -> dict[int, float]:
        """Fields 185/186 in one NVML call; a field whose own return is not success is left out.

        ``nvmlDeviceGetFieldValues`` succeeds as a whole even when single fields fail, so each
        field's ``nvmlReturn`` has to be checked: otherwise an unsupported field reads as 0 mW.
        """
        nvml = self._nvml
        ids = [
            getattr(nvml, "NVML_FI_DEV_POWER_AVERAGE", FI_POWER_AVERAGE),
            getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", FI_POWER_INSTANT),
        ]
        values = self._read(
            "reading power fields", dev.uuid, nvml.nvmlDeviceGetFieldValues, dev.handle, ids
        )
        out: dict[int, float] = {}
        for fv in values or ():
            if fv.nvmlReturn != nvml.NVML_SUCCESS:
                if fv.nvmlReturn not in self._absent:
                    log.debug("GPU %s field %d: nvmlReturn %d", dev.uuid, fv.fieldId, fv.nvmlReturn)
                continue
            value = self._field_value(fv)
            if value is not None:
                out[int(fv.fieldId)] = value
        return out

    def _field_value(self, fv: Any) -> float | None:
        """Pick the union member the field says it filled."""
        nvml = self._nvml
        member = {
            nvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
            nvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
            nvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
            nvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
            nvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
            getattr(nvml, "NVML_VALUE_TYPE_SIGNED_INT", 5): "siVal",
            getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_SHORT", 6): "usVal",
        }.get(fv.valueType)
        return None if member is None else float(getattr(fv.value, member))

    def _read_clock_event_reasons(self, dev: _Device) -> int | None:
        """Prefer the current name; fall back for bindings or drivers that only have the old one."""
        nvml, h, uuid = self._nvml, dev.handle, dev.uuid
        action = "reading clock event reasons"
        if hasattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons"):
            mask = self._read(action, uuid, nvml.nvmlDeviceGetCurrentClocksEventReasons, h)
            if mask is not None:
                return int(mask)
        if hasattr(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons"):
            mask = self._read(action, uuid, nvml.nvmlDeviceGetCurrentClocksThrottleReasons, h)
            if mask is not None:
                return int(mask)
        return None

    # ---- GpuBackend: actuation ----

    def set_power_limit(self, uuid: str, watts: float) -> None:
        """Apply a limit within the device's constraints; refused values never reach NVML."""
        dev = self._device(uuid)
        limits = self._info(dev).power_limits
        if math.isnan(limits.min_w) or math.isnan(limits.max_w):
            raise GpuNotSupportedError(
                f"GPU {uuid} does not report power limit constraints; refusing to set a limit"
            )
        limits.check(watts)
        milliwatts = round(watts * 1000)
        with self._lock:
            original = self._snapshot(dev)
            with self._mapped(
                f"setting the power limit to {watts:.0f} W",
                uuid,
                setter=True,
                capability=POWER_LIMIT_CAPABILITY,
            ):
                self._nvml.nvmlDeviceSetPowerManagementLimit(dev.handle, milliwatts)
            self._commit(dev, original)
            dev.changed_power_limit = True

    def lock_sm_clocks(self, uuid: str, min_mhz: int, max_mhz: int) -> None:
        """Lock within the supported clocks; refused ranges never reach NVML."""
        dev = self._device(uuid)
        info = self._info(dev)
        if info.supported_sm_clocks_mhz:
            info.check_clock_range(min_mhz, max_mhz)
        elif info.max_sm_clock_mhz is not None:
            # No list to check against; the max clock still bounds what is safe to ask for.
            if not (0 < min_mhz <= max_mhz <= info.max_sm_clock_mhz):
                raise GpuValueError(
                    f"clock range {min_mhz}-{max_mhz} MHz is outside the device's "
                    f"1-{info.max_sm_clock_mhz} MHz"
                )
        else:
            raise GpuNotSupportedError(
                f"GPU {uuid} reports neither supported nor max SM clocks; refusing to lock"
            )
        with self._lock:
            original = self._snapshot(dev)
            with self._mapped(
                f"locking SM clocks to {min_mhz}-{max_mhz} MHz",
                uuid,
                setter=True,
                capability=CLOCK_LOCK_CAPABILITY,
            ):
                self._nvml.nvmlDeviceSetGpuLockedClocks(dev.handle, int(min_mhz), int(max_mhz))
            self._commit(dev, original)
            dev.locked_sm_clocks_mhz = (int(min_mhz), int(max_mhz))

    def reset_sm_clocks(self, uuid: str) -> None:
        """Undo a clock lock (ours or anyone's): NVML has no way to restore a previous lock."""
        dev = self._device(uuid)
        with self._lock:
            original = self._snapshot(dev)
            with self._mapped(
                "resetting SM clocks", uuid, setter=True, capability=CLOCK_LOCK_CAPABILITY
            ):
                self._nvml.nvmlDeviceResetGpuLockedClocks(dev.handle)
            self._commit(dev, original)
            dev.locked_sm_clocks_mhz = None

    def original_settings(self, uuid: str) -> OriginalSettings | None:
        """Settings before this backend's first change; clocks are always ``None`` (unreadable)."""
        return self._device(uuid).original

    def restore(self, uuid: str) -> None:
        """Put back the original power limit and undo our clock lock; touch nothing else.

        Only what this backend changed is put back, so a limit an administrator set after our
        first clock lock survives. Both are attempted even if one fails; the first error
        is raised afterwards.
        """
        dev = self._device(uuid)
        with self._lock:
            original = dev.original
            if original is None:
                return
            errors: list[GpuError] = []
            if dev.changed_power_limit and original.power_limit_w is not None:
                try:
                    with self._mapped(
                        f"restoring the power limit to {original.power_limit_w:.0f} W",
                        uuid,
                        setter=True,
                        capability=POWER_LIMIT_CAPABILITY,
                    ):
                        self._nvml.nvmlDeviceSetPowerManagementLimit(
                            dev.handle, round(original.power_limit_w * 1000)
                        )
                    dev.changed_power_limit = False
                except GpuError as err:
                    errors.append(err)
            if dev.locked_sm_clocks_mhz is not None:
                try:
                    with self._mapped(
                        "resetting SM clocks", uuid, setter=True, capability=CLOCK_LOCK_CAPABILITY
                    ):
                        self._nvml.nvmlDeviceResetGpuLockedClocks(dev.handle)
                    dev.locked_sm_clocks_mhz = None
                except GpuError as err:
                    errors.append(err)
            if errors:
                raise errors[0]

    def _snapshot(self, dev: _Device) -> OriginalSettings | None:
        """Read what must be restorable, before the first change (``None`` once we have it)."""
        if dev.original is not None:
            return None
        requested_mw = self._read(
            "reading the power limit",
            dev.uuid,
            self._nvml.nvmlDeviceGetPowerManagementLimit,
            dev.handle,
        )
        return OriginalSettings(power_limit_w=_mw_to_w(requested_mw), locked_sm_clocks_mhz=None)

    @staticmethod
    def _commit(dev: _Device, original: OriginalSettings | None) -> None:
        """Keep the snapshot only once a change went through: a refused call changed nothing."""
        if dev.original is None and original is not None:
            dev.original = original

    def close(self) -> None:
        """Shut NVML down once; a second close is a no-op (NVML counts inits)."""
        if self._closed:
            return
        self._closed = True
        with self._mapped("shutting NVML down"):
            self._nvml.nvmlShutdown()
