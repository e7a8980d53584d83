"""A fake ``pynvml`` for tests: autospec'd from the real binding, driven by plain state.

Why autospec: a fake written by hand drifts from the binding; one built with
``create_autospec(pynvml)`` rejects a misspelt function or a wrong argument count exactly as the
real module would. Constants, exception classes and ctypes structures are the real ones, so
``except pynvml.NVMLError`` and field-value structs behave as on a real machine.

Usage (``NvmlBackend`` imports ``pynvml`` lazily in its constructor, so put the fake into
``sys.modules`` before constructing it)::

    import pytest
    from nvml_fake import install_fake_pynvml  # tests/ is on sys.path under pytest

    @pytest.fixture
    def fake_nvml(monkeypatch):
        return install_fake_pynvml(monkeypatch, n_gpus=2)   # (fake, state)

    @pytest.fixture
    def nvml_backend(fake_nvml):
        from wattkeeper.collectors.nvml import NvmlBackend
        backend = NvmlBackend(clock=lambda: 1000.0)
        yield backend
        backend.close()

    def test_something(nvml_backend, fake_nvml):
        fake, state = fake_nvml
        state.gpus[0].power_average_mw = 123_000
        assert nvml_backend.sample(state.gpus[0].uuid).power_w == 123.0
        state.gpus[1].fail("nvmlDeviceGetPowerUsage", pynvml.NVML_ERROR_NOT_SUPPORTED)
        fake.nvmlDeviceSetPowerManagementLimit.assert_not_called()

Without pytest's monkeypatch: ``fake, state = make_fake_pynvml(2)`` then
``mock.patch.dict(sys.modules, {"pynvml": fake})``.

State knobs (all on ``FakeNvmlState`` / ``FakeGpu``): readings in NVML's own units (mW, mJ,
MHz, percent), ``gpu.fail(function_name, code)`` makes that function raise
``NVMLError(code)`` for that GPU until ``gpu.heal(function_name)``; ``gpu.unsupported_fields``
makes single field values return ``NVML_ERROR_NOT_SUPPORTED`` in their own ``nvmlReturn``;
``gpu.lost = True`` makes every call on the GPU raise ``NVML_ERROR_GPU_IS_LOST``;
``state.is_root = False`` makes setters raise ``NVML_ERROR_NO_PERMISSION``;
``state.init_error`` makes ``nvmlInit`` raise. Setters change the state as a driver would
(including ``NVML_ERROR_INVALID_ARGUMENT`` outside the constraints), and every call is
recorded on the mock (``fake.nvmlDeviceSetPowerManagementLimit.assert_called_once_with(...)``).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn
from unittest import mock

import pynvml


@dataclass(eq=False)
class FakeHandle:
    """Stands in for ``c_nvmlDevice_t``: opaque to the backend, identifies one GPU."""

    index: int

    def __repr__(self) -> str:
        return f"FakeHandle({self.index})"


@dataclass
class FakeGpu:
    """One fake GPU, shaped like an H100 SXM by default (calibration/README.md)."""

    index: int
    uuid: str
    handle: FakeHandle
    name: str = "NVIDIA H100 80GB HBM3"
    pci_bus_id: str = "00000000:18:00.0"
    memory_total_bytes: int = 85_520_809_984
    min_limit_mw: int = 200_000
    max_limit_mw: int = 700_000
    default_limit_mw: int = 700_000
    limit_mw: int = 700_000  # requested (nvmlDeviceGetPowerManagementLimit)
    enforced_limit_mw: int | None = None  # None: same as the requested limit
    power_usage_mw: int = 312_500  # nvmlDeviceGetPowerUsage
    power_average_mw: int = 312_000  # field 185
    power_instant_mw: int = 330_250  # field 186
    energy_mj: int = 123_456_789
    sm_clock_mhz: int = 1_755
    mem_clock_mhz: int = 2_619
    util_gpu_pct: int = 87
    util_mem_pct: int = 41
    temperature_c: int = 54
    clock_event_reasons: int = 0x4  # sw_power_cap
    memory_clocks_mhz: list[int] = field(default_factory=lambda: [2_619])
    graphics_clocks_mhz: list[int] = field(
        default_factory=lambda: list(range(1_980, 344, -15))  # descending, as NVML returns
    )
    max_sm_clock_mhz: int = 1_980
    locked_clocks_mhz: tuple[int, int] | None = None
    errors: dict[str, int] = field(default_factory=dict)
    unsupported_fields: set[int] = field(default_factory=set)
    lost: bool = False

    def fail(self, function: str, code: int) -> None:
        """Make ``function`` raise ``NVMLError(code)`` for this GPU until healed."""
        if not hasattr(pynvml, function):
            raise AttributeError(f"pynvml has no {function}")
        self.errors[function] = code

    def heal(self, function: str) -> None:
        self.errors.pop(function, None)


@dataclass
class FakeNvmlState:
    """Everything the fake driver knows; tests change it between calls."""

    gpus: list[FakeGpu]
    is_root: bool = True
    init_error: int | None = None
    initialized: int = 0  # nvmlInit minus nvmlShutdown, as NVML counts
    errors: dict[str, int] = field(default_factory=dict)  # for calls without a handle

    def gpu(self, handle: Any) -> FakeGpu:
        if not isinstance(handle, FakeHandle) or not 0 <= handle.index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[handle.index]


def _raise(code: int) -> NoReturn:
    raise pynvml.NVMLError(code)


def make_fake_pynvml(n_gpus: int = 2) -> tuple[mock.MagicMock, FakeNvmlState]:
    """An autospec'd ``pynvml`` whose functions act on the returned state."""
    fake = mock.create_autospec(pynvml)
    # Real constants, exception classes and structures: only functions are faked.
    for name, value in vars(pynvml).items():
        if not name.startswith("__") and not inspect.isfunction(value):
            setattr(fake, name, value)

    state = FakeNvmlState(
        gpus=[
            FakeGpu(
                index=i,
                uuid=f"GPU-{i:08x}-0000-4000-8000-{i:012x}",
                handle=FakeHandle(i),
                pci_bus_id=f"00000000:{0x18 + 0x10 * i:02X}:00.0",
            )
            for i in range(n_gpus)
        ]
    )

    def check(name: str, handle: Any = None) -> FakeGpu | None:
        if state.initialized <= 0:
            _raise(pynvml.NVML_ERROR_UNINITIALIZED)
        if name in state.errors:
            _raise(state.errors[name])
        if handle is None:
            return None
        g = state.gpu(handle)
        if g.lost:
            _raise(pynvml.NVML_ERROR_GPU_IS_LOST)
        if name in g.errors:
            _raise(g.errors[name])
        return g

    def gpu_of(name: str, handle: Any) -> FakeGpu:
        g = check(name, handle)
        assert g is not None
        return g

    def need_root() -> None:
        if not state.is_root:
            _raise(pynvml.NVML_ERROR_NO_PERMISSION)

    def nvml_init() -> None:
        if state.init_error is not None:
            _raise(state.init_error)
        state.initialized += 1

    def nvml_shutdown() -> None:
        check("nvmlShutdown")
        state.initialized -= 1

    def get_count() -> int:
        check("nvmlDeviceGetCount")
        return len(state.gpus)

    def handle_by_index(index: int) -> FakeHandle:
        check("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(state.gpus):
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        g = state.gpus[index]
        if g.lost:
            _raise(pynvml.NVML_ERROR_GPU_IS_LOST)
        return g.handle

    def handle_by_uuid(uuid: str) -> FakeHandle:
        check("nvmlDeviceGetHandleByUUID")
        for g in state.gpus:
            if g.uuid == uuid:
                return g.handle
        _raise(pynvml.NVML_ERROR_NOT_FOUND)

    def pci_info(handle: Any) -> Any:
        g = gpu_of("nvmlDeviceGetPciInfo", handle)
        info = pynvml.nvmlPciInfo_t()
        info.busId = g.pci_bus_id.encode()
        info.busIdLegacy = g.pci_bus_id.encode()
        return info

    def memory_info(handle: Any, version: Any = None) -> Any:
        g = gpu_of("nvmlDeviceGetMemoryInfo", handle)
        mem = pynvml.c_nvmlMemory_t()
        mem.total = g.memory_total_bytes
        mem.used = 0
        mem.free = g.memory_total_bytes
        return mem

    def supported_graphics(handle: Any, memory_clock_mhz: int) -> list[int]:
        g = gpu_of("nvmlDeviceGetSupportedGraphicsClocks", handle)
        if memory_clock_mhz not in g.memory_clocks_mhz:
            _raise(pynvml.NVML_ERROR_NOT_FOUND)
        return list(g.graphics_clocks_mhz)

    def clock_info(handle: Any, clock_type: int) -> int:
        g = gpu_of("nvmlDeviceGetClockInfo", handle)
        if clock_type == pynvml.NVML_CLOCK_SM:
            return g.sm_clock_mhz
        if clock_type == pynvml.NVML_CLOCK_MEM:
            return g.mem_clock_mhz
        _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def max_clock_info(handle: Any, clock_type: int) -> int:
        g = gpu_of("nvmlDeviceGetMaxClockInfo", handle)
        if clock_type == pynvml.NVML_CLOCK_SM:
            return g.max_sm_clock_mhz
        if clock_type == pynvml.NVML_CLOCK_MEM:
            return max(g.memory_clocks_mhz)
        _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def utilization(handle: Any) -> Any:
        g = gpu_of("nvmlDeviceGetUtilizationRates", handle)
        util = pynvml.c_nvmlUtilization_t()
        util.gpu = g.util_gpu_pct
        util.memory = g.util_mem_pct
        return util

    def temperature(handle: Any, sensor: int) -> int:
        g = gpu_of("nvmlDeviceGetTemperature", handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return g.temperature_c

    def field_values(handle: Any, field_ids: list[Any]) -> Any:
        g = gpu_of("nvmlDeviceGetFieldValues", handle)
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        readings = {
            pynvml.NVML_FI_DEV_POWER_AVERAGE: g.power_average_mw,
            pynvml.NVML_FI_DEV_POWER_INSTANT: g.power_instant_mw,
            pynvml.NVML_FI_DEV_POWER_MIN_LIMIT: g.min_limit_mw,
            pynvml.NVML_FI_DEV_POWER_MAX_LIMIT: g.max_limit_mw,
            pynvml.NVML_FI_DEV_POWER_DEFAULT_LIMIT: g.default_limit_mw,
        }
        for slot, field_id in zip(values, field_ids, strict=True):
            slot.fieldId = field_id[0] if isinstance(field_id, tuple) else field_id
            if slot.fieldId in g.unsupported_fields or slot.fieldId not in readings:
                slot.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
                # A real driver leaves garbage or zero here: the backend must not read it.
                slot.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                slot.value.uiVal = 0
                continue
            slot.nvmlReturn = pynvml.NVML_SUCCESS
            slot.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
            slot.value.uiVal = readings[slot.fieldId]
        return values

    def set_power_limit(handle: Any, limit_mw: int) -> None:
        g = gpu_of("nvmlDeviceSetPowerManagementLimit", handle)
        need_root()
        if not g.min_limit_mw <= limit_mw <= g.max_limit_mw:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        g.limit_mw = limit_mw

    def set_locked_clocks(handle: Any, min_mhz: int, max_mhz: int) -> None:
        g = gpu_of("nvmlDeviceSetGpuLockedClocks", handle)
        need_root()
        if min_mhz > max_mhz:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        g.locked_clocks_mhz = (min_mhz, max_mhz)

    def reset_locked_clocks(handle: Any) -> None:
        g = gpu_of("nvmlDeviceResetGpuLockedClocks", handle)
        need_root()
        g.locked_clocks_mhz = None

    def reading(name: str, attr: Callable[[FakeGpu], Any]) -> Any:
        def read(handle: Any) -> Any:
            return attr(gpu_of(name, handle))

        return read

    fake.nvmlInit.side_effect = nvml_init
    fake.nvmlShutdown.side_effect = nvml_shutdown
    fake.nvmlDeviceGetCount.side_effect = get_count
    fake.nvmlDeviceGetHandleByIndex.side_effect = handle_by_index
    fake.nvmlDeviceGetHandleByUUID.side_effect = handle_by_uuid
    fake.nvmlDeviceGetPciInfo.side_effect = pci_info
    fake.nvmlDeviceGetMemoryInfo.side_effect = memory_info
    fake.nvmlDeviceGetSupportedGraphicsClocks.side_effect = supported_graphics
    fake.nvmlDeviceGetClockInfo.side_effect = clock_info
    fake.nvmlDeviceGetMaxClockInfo.side_effect = max_clock_info
    fake.nvmlDeviceGetUtilizationRates.side_effect = utilization
    fake.nvmlDeviceGetTemperature.side_effect = temperature
    fake.nvmlDeviceGetFieldValues.side_effect = field_values
    fake.nvmlDeviceSetPowerManagementLimit.side_effect = set_power_limit
    fake.nvmlDeviceSetGpuLockedClocks.side_effect = set_locked_clocks
    fake.nvmlDeviceResetGpuLockedClocks.side_effect = reset_locked_clocks
    simple_readings: dict[str, Callable[[FakeGpu], Any]] = {
        "nvmlDeviceGetUUID": lambda g: g.uuid,
        "nvmlDeviceGetName": lambda g: g.name,
        "nvmlDeviceGetIndex": lambda g: g.index,
        "nvmlDeviceGetPowerManagementLimitConstraints": lambda g: [
            g.min_limit_mw,
            g.max_limit_mw,
        ],
        "nvmlDeviceGetPowerManagementDefaultLimit": lambda g: g.default_limit_mw,
        "nvmlDeviceGetPowerManagementLimit": lambda g: g.limit_mw,
        "nvmlDeviceGetEnforcedPowerLimit": lambda g: (
            g.enforced_limit_mw if g.enforced_limit_mw is not None else g.limit_mw
        ),
        "nvmlDeviceGetPowerUsage": lambda g: g.power_usage_mw,
        "nvmlDeviceGetTotalEnergyConsumption": lambda g: g.energy_mj,
        "nvmlDeviceGetSupportedMemoryClocks": lambda g: list(g.memory_clocks_mhz),
        "nvmlDeviceGetCurrentClocksEventReasons": lambda g: g.clock_event_reasons,
        "nvmlDeviceGetCurrentClocksThrottleReasons": lambda g: g.clock_event_reasons,
    }
    for name, attr in simple_readings.items():
        getattr(fake, name).side_effect = reading(name, attr)
    return fake, state


def install_fake_pynvml(monkeypatch: Any, n_gpus: int = 2) -> tuple[mock.MagicMock, FakeNvmlState]:
    """Put a fresh fake into ``sys.modules['pynvml']`` for one test (undone by monkeypatch)."""
    fake, state = make_fake_pynvml(n_gpus)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake, state
