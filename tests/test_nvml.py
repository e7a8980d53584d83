"""NvmlBackend against an autospec'd fake pynvml (tests/nvml_fake.py); no driver needed."""

from __future__ import annotations

import logging
import sys

import pynvml
import pytest
from nvml_fake import install_fake_pynvml

from wattkeeper.collectors.gpu import (
    BackendUnavailableError,
    GpuBackend,
    GpuError,
    GpuLostError,
    GpuNotFoundError,
    GpuNotSupportedError,
    GpuPermissionError,
    GpuValueError,
    OriginalSettings,
)
from wattkeeper.collectors.nvml import NvmlBackend


@pytest.fixture
def fake_nvml(monkeypatch):
    return install_fake_pynvml(monkeypatch, n_gpus=2)


@pytest.fixture
def nvml_backend(fake_nvml):
    backend = NvmlBackend(clock=lambda: 1000.0)
    yield backend
    backend.close()


@pytest.fixture
def state(fake_nvml):
    return fake_nvml[1]


@pytest.fixture
def fake(fake_nvml):
    return fake_nvml[0]


def uuid_of(state, i: int = 0) -> str:
    return state.gpus[i].uuid


# ---- start-up and enumeration ----


def test_is_a_gpu_backend(nvml_backend):
    assert isinstance(nvml_backend, GpuBackend)
    assert nvml_backend.name == "nvml"


def test_enumerates_gpus_by_uuid_with_static_facts(nvml_backend, state):
    gpus = nvml_backend.gpus()
    assert [g.uuid for g in gpus] == [state.gpus[0].uuid, state.gpus[1].uuid]
    assert [g.index for g in gpus] == [0, 1]
    g = gpus[1]
    assert g.name == "NVIDIA H100 80GB HBM3"
    assert g.pci_bus_id == "00000000:28:00.0"
    assert g.memory_total_bytes == 85_520_809_984
    assert (g.power_limits.min_w, g.power_limits.max_w, g.power_limits.default_w) == (
        200.0,
        700.0,
        700.0,
    )
    assert g.max_sm_clock_mhz == 1980
    assert g.supported_sm_clocks_mhz[0] == 345
    assert g.supported_sm_clocks_mhz[-1] == 1980
    assert list(g.supported_sm_clocks_mhz) == sorted(g.supported_sm_clocks_mhz)


def test_supported_clocks_are_read_at_the_highest_memory_clock(fake, state, monkeypatch):
    state.gpus[0].memory_clocks_mhz = [405, 2619, 810]
    backend = NvmlBackend()
    backend.gpus()
    calls = [c.args for c in fake.nvmlDeviceGetSupportedGraphicsClocks.call_args_list]
    assert (state.gpus[0].handle, 2619) in calls
    backend.close()


def test_unreadable_constraints_refuse_every_limit_without_calling_nvml(fake, state):
    state.gpus[0].fail(
        "nvmlDeviceGetPowerManagementLimitConstraints", pynvml.NVML_ERROR_NOT_SUPPORTED
    )
    backend = NvmlBackend()
    with pytest.raises(GpuNotSupportedError):
        backend.set_power_limit(uuid_of(state), 300)
    fake.nvmlDeviceSetPowerManagementLimit.assert_not_called()
    backend.close()


def test_library_not_found_is_backend_unavailable_mentioning_simulate(state):
    state.init_error = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    with pytest.raises(BackendUnavailableError, match="--simulate") as info:
        NvmlBackend()
    assert "no NVIDIA driver" in str(info.value)
    assert not isinstance(info.value.__cause__, pynvml.NVMLError)


def test_driver_not_loaded_is_backend_unavailable(state):
    state.init_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    with pytest.raises(BackendUnavailableError, match="--simulate"):
        NvmlBackend()


def test_missing_binding_is_backend_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    with pytest.raises(BackendUnavailableError, match="--simulate"):
        NvmlBackend()


def test_close_shuts_nvml_down_once(fake, state):
    backend = NvmlBackend()
    backend.close()
    backend.close()
    fake.nvmlShutdown.assert_called_once_with()
    assert state.initialized == 0


# ---- sampling ----


def test_full_sample_converts_units(nvml_backend, state):
    g = state.gpus[0]
    g.limit_mw = 450_000
    g.enforced_limit_mw = 400_000
    s = nvml_backend.sample(g.uuid)
    assert s.uuid == g.uuid
    assert s.timestamp == 1000.0
    assert s.power_w == pytest.approx(312.0)  # field 185, mW -> W
    assert s.power_instant_w == pytest.approx(330.25)  # field 186
    assert s.energy_j == pytest.approx(123_456.789)  # mJ -> J
    assert s.sm_clock_mhz == 1755
    assert s.mem_clock_mhz == 2619
    assert s.utilization_gpu_ratio == pytest.approx(0.87)  # percent -> ratio
    assert s.utilization_mem_ratio == pytest.approx(0.41)
    assert s.temperature_c == 54
    assert s.power_limit_w == pytest.approx(400.0)  # enforced
    assert s.power_limit_requested_w == pytest.approx(450.0)
    assert s.throttle_reasons == ("sw_power_cap",)
    assert s.locked_sm_clocks_mhz is None
    assert s.energy_counter_reset is False


def test_unsupported_field_is_none_not_zero(nvml_backend, state):
    state.gpus[0].unsupported_fields = {pynvml.NVML_FI_DEV_POWER_INSTANT}
    s = nvml_backend.sample(uuid_of(state))
    assert s.power_instant_w is None
    assert s.power_w == pytest.approx(312.0)


def test_average_field_missing_falls_back_to_power_usage(nvml_backend, state):
    state.gpus[0].unsupported_fields = {pynvml.NVML_FI_DEV_POWER_AVERAGE}
    s = nvml_backend.sample(uuid_of(state))
    assert s.power_w == pytest.approx(312.5)  # nvmlDeviceGetPowerUsage
    assert s.power_instant_w == pytest.approx(330.25)


def test_power_usage_not_supported_is_none(nvml_backend, state):
    g = state.gpus[0]
    g.unsupported_fields = {pynvml.NVML_FI_DEV_POWER_AVERAGE, pynvml.NVML_FI_DEV_POWER_INSTANT}
    g.fail("nvmlDeviceGetPowerUsage", pynvml.NVML_ERROR_NOT_SUPPORTED)
    s = nvml_backend.sample(g.uuid)
    assert s.power_w is None
    assert s.power_instant_w is None
    assert s.energy_j is not None  # the rest of the sample survives


def test_field_values_call_not_supported_at_all(nvml_backend, state):
    g = state.gpus[0]
    g.fail("nvmlDeviceGetFieldValues", pynvml.NVML_ERROR_NOT_SUPPORTED)
    s = nvml_backend.sample(g.uuid)
    assert s.power_instant_w is None
    assert s.power_w == pytest.approx(312.5)


def test_every_unsupported_reading_is_none(nvml_backend, state):
    g = state.gpus[1]
    for fn in (
        "nvmlDeviceGetFieldValues",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetTotalEnergyConsumption",
        "nvmlDeviceGetClockInfo",
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetPowerManagementLimit",
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetCurrentClocksThrottleReasons",
    ):
        g.fail(fn, pynvml.NVML_ERROR_NOT_SUPPORTED)
    s = nvml_backend.sample(g.uuid)
    assert s.power_w is None
    assert s.power_instant_w is None
    assert s.energy_j is None
    assert s.sm_clock_mhz is None
    assert s.mem_clock_mhz is None
    assert s.utilization_gpu_ratio is None
    assert s.utilization_mem_ratio is None
    assert s.temperature_c is None
    assert s.power_limit_w is None
    assert s.power_limit_requested_w is None
    assert s.throttle_reasons == ()


def test_energy_counter_going_backwards_is_detected(nvml_backend, state, caplog):
    g = state.gpus[0]
    first = nvml_backend.sample(g.uuid)
    g.energy_mj += 5_000
    second = nvml_backend.sample(g.uuid)
    assert second.energy_j - first.energy_j == pytest.approx(5.0)
    assert not second.energy_counter_reset
    assert nvml_backend.energy_resets(g.uuid) == 0

    g.energy_mj = 1_000  # driver reloaded: counter restarts
    with caplog.at_level(logging.WARNING, logger="wattkeeper.collectors.nvml"):
        third = nvml_backend.sample(g.uuid)
    assert third.energy_counter_reset is True
    assert third.energy_j == pytest.approx(1.0)
    assert nvml_backend.energy_resets(g.uuid) == 1
    assert any("went backwards" in r.message for r in caplog.records)

    g.energy_mj = 2_000
    assert nvml_backend.sample(g.uuid).energy_counter_reset is False
    assert nvml_backend.energy_resets(g.uuid) == 1
    assert nvml_backend.energy_resets(uuid_of(state, 1)) == 0  # per GPU


def test_throttle_reasons_are_decoded(nvml_backend, state):
    state.gpus[0].clock_event_reasons = 0x1 | 0x20 | 0x40 | 0x4000
    s = nvml_backend.sample(uuid_of(state))
    assert s.throttle_reasons == (
        "gpu_idle",
        "sw_thermal_slowdown",
        "hw_thermal_slowdown",
        "unknown_0x4000",
    )


def test_throttle_reasons_fall_back_to_the_old_function(nvml_backend, state, fake):
    g = state.gpus[0]
    g.fail("nvmlDeviceGetCurrentClocksEventReasons", pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    g.clock_event_reasons = 0x8
    assert nvml_backend.sample(g.uuid).throttle_reasons == ("hw_slowdown",)
    fake.nvmlDeviceGetCurrentClocksThrottleReasons.assert_called_with(g.handle)


def test_throttle_reasons_on_a_binding_without_the_new_name(fake, state):
    del fake.nvmlDeviceGetCurrentClocksEventReasons
    state.gpus[0].clock_event_reasons = 0x4
    backend = NvmlBackend()
    assert backend.sample(uuid_of(state)).throttle_reasons == ("sw_power_cap",)
    backend.close()


def test_unknown_uuid_is_not_found(nvml_backend):
    with pytest.raises(GpuNotFoundError):
        nvml_backend.sample("GPU-nope")
    with pytest.raises(GpuNotFoundError):
        nvml_backend.set_power_limit("GPU-nope", 300)
    with pytest.raises(GpuNotFoundError):
        nvml_backend.original_settings("GPU-nope")


def test_lost_gpu_raises_gpu_lost(nvml_backend, state):
    nvml_backend.gpus()
    state.gpus[1].lost = True
    with pytest.raises(GpuLostError) as info:
        nvml_backend.sample(uuid_of(state, 1))
    assert not isinstance(info.value, pynvml.NVMLError)
    assert info.value.__cause__ is None  # mapped "from None": no NVMLError in the chain
    nvml_backend.sample(uuid_of(state, 0))  # the other GPU still reads


def test_uninitialized_after_driver_reload_is_gpu_lost(nvml_backend, state):
    state.gpus[0].fail("nvmlDeviceGetTotalEnergyConsumption", pynvml.NVML_ERROR_UNINITIALIZED)
    with pytest.raises(GpuLostError):
        nvml_backend.sample(uuid_of(state))


def test_lost_gpu_on_a_setter_is_gpu_lost(nvml_backend, state):
    nvml_backend.gpus()
    state.gpus[0].fail("nvmlDeviceSetPowerManagementLimit", pynvml.NVML_ERROR_GPU_IS_LOST)
    with pytest.raises(GpuLostError):
        nvml_backend.set_power_limit(uuid_of(state), 300)


def test_other_nvml_errors_are_gpu_errors_with_nvml_message(nvml_backend, state):
    state.gpus[0].fail("nvmlDeviceGetTemperature", pynvml.NVML_ERROR_TIMEOUT)
    with pytest.raises(GpuError, match="Timeout") as info:
        nvml_backend.sample(uuid_of(state))
    assert type(info.value) is GpuError


def test_a_gpu_without_uuid_is_skipped_not_fatal(fake, state):
    state.gpus[0].fail("nvmlDeviceGetUUID", pynvml.NVML_ERROR_UNKNOWN)
    backend = NvmlBackend()
    assert [g.uuid for g in backend.gpus()] == [uuid_of(state, 1)]
    backend.close()


# ---- actuation ----


def test_set_power_limit_calls_nvml_in_milliwatts(nvml_backend, state, fake):
    g = state.gpus[1]
    nvml_backend.set_power_limit(g.uuid, 350.5)
    fake.nvmlDeviceSetPowerManagementLimit.assert_called_once_with(g.handle, 350_500)
    assert g.limit_mw == 350_500
    assert nvml_backend.sample(g.uuid).power_limit_requested_w == pytest.approx(350.5)


@pytest.mark.parametrize("watts", [199.0, 700.5, -1.0])
def test_power_limit_outside_constraints_never_reaches_nvml(nvml_backend, state, fake, watts):
    with pytest.raises(GpuValueError):
        nvml_backend.set_power_limit(uuid_of(state), watts)
    fake.nvmlDeviceSetPowerManagementLimit.assert_not_called()
    assert nvml_backend.original_settings(uuid_of(state)) is None


def test_power_limit_at_the_bounds_is_accepted(nvml_backend, state, fake):
    nvml_backend.set_power_limit(uuid_of(state), 200)
    nvml_backend.set_power_limit(uuid_of(state), 700)
    assert fake.nvmlDeviceSetPowerManagementLimit.call_count == 2


def test_nvml_invalid_argument_on_a_setter_is_gpu_value_error(nvml_backend, state):
    nvml_backend.gpus()
    state.gpus[0].max_limit_mw = 300_000  # the device changed its mind after enumeration
    with pytest.raises(GpuValueError):
        nvml_backend.set_power_limit(uuid_of(state), 500)


def test_no_permission_names_the_capability(nvml_backend, state):
    state.is_root = False
    with pytest.raises(GpuPermissionError, match="CAP_SYS_ADMIN") as info:
        nvml_backend.set_power_limit(uuid_of(state), 300)
    assert "power limit" in str(info.value)
    with pytest.raises(GpuPermissionError, match="CAP_SYS_ADMIN"):
        nvml_backend.lock_sm_clocks(uuid_of(state), 900, 1500)
    with pytest.raises(GpuPermissionError, match="CAP_SYS_ADMIN"):
        nvml_backend.reset_sm_clocks(uuid_of(state))
    assert nvml_backend.original_settings(uuid_of(state)) is None  # nothing changed


def test_not_supported_setter_is_gpu_not_supported(nvml_backend, state):
    state.gpus[0].fail("nvmlDeviceSetGpuLockedClocks", pynvml.NVML_ERROR_NOT_SUPPORTED)
    with pytest.raises(GpuNotSupportedError):
        nvml_backend.lock_sm_clocks(uuid_of(state), 900, 1500)


def test_lock_sm_clocks_calls_nvml_and_is_reported(nvml_backend, state, fake):
    g = state.gpus[0]
    nvml_backend.lock_sm_clocks(g.uuid, 900, 1500)
    fake.nvmlDeviceSetGpuLockedClocks.assert_called_once_with(g.handle, 900, 1500)
    assert g.locked_clocks_mhz == (900, 1500)
    assert nvml_backend.sample(g.uuid).locked_sm_clocks_mhz == (900, 1500)


@pytest.mark.parametrize(("lo", "hi"), [(300, 1500), (900, 2100), (1500, 900)])
def test_clock_lock_outside_supported_never_reaches_nvml(nvml_backend, state, fake, lo, hi):
    with pytest.raises(GpuValueError):
        nvml_backend.lock_sm_clocks(uuid_of(state), lo, hi)
    fake.nvmlDeviceSetGpuLockedClocks.assert_not_called()


def test_clock_lock_without_any_clock_list_is_refused(fake, state):
    g = state.gpus[0]
    g.fail("nvmlDeviceGetSupportedMemoryClocks", pynvml.NVML_ERROR_NOT_SUPPORTED)
    g.fail("nvmlDeviceGetMaxClockInfo", pynvml.NVML_ERROR_NOT_SUPPORTED)
    backend = NvmlBackend()
    with pytest.raises(GpuNotSupportedError):
        backend.lock_sm_clocks(g.uuid, 900, 1500)
    fake.nvmlDeviceSetGpuLockedClocks.assert_not_called()
    backend.close()


def test_reset_sm_clocks(nvml_backend, state, fake):
    g = state.gpus[0]
    nvml_backend.lock_sm_clocks(g.uuid, 900, 1500)
    nvml_backend.reset_sm_clocks(g.uuid)
    fake.nvmlDeviceResetGpuLockedClocks.assert_called_once_with(g.handle)
    assert g.locked_clocks_mhz is None
    assert nvml_backend.sample(g.uuid).locked_sm_clocks_mhz is None


def test_original_settings_remembered_on_first_change_and_restored(nvml_backend, state, fake):
    g = state.gpus[0]
    g.limit_mw = 650_000
    assert nvml_backend.original_settings(g.uuid) is None
    nvml_backend.set_power_limit(g.uuid, 300)
    nvml_backend.lock_sm_clocks(g.uuid, 900, 1500)
    nvml_backend.set_power_limit(g.uuid, 250)  # later changes do not overwrite the original
    assert nvml_backend.original_settings(g.uuid) == OriginalSettings(
        power_limit_w=650.0, locked_sm_clocks_mhz=None
    )
    assert nvml_backend.original_settings(uuid_of(state, 1)) is None

    nvml_backend.restore(g.uuid)
    assert fake.nvmlDeviceSetPowerManagementLimit.call_args.args == (g.handle, 650_000)
    fake.nvmlDeviceResetGpuLockedClocks.assert_called_once_with(g.handle)
    assert g.limit_mw == 650_000
    assert g.locked_clocks_mhz is None
    assert nvml_backend.sample(g.uuid).locked_sm_clocks_mhz is None


def test_restore_touches_only_what_this_backend_changed(nvml_backend, state, fake):
    g = state.gpus[0]
    nvml_backend.lock_sm_clocks(g.uuid, 900, 1500)
    nvml_backend.restore(g.uuid)
    fake.nvmlDeviceResetGpuLockedClocks.assert_called_once_with(g.handle)
    fake.nvmlDeviceSetPowerManagementLimit.assert_not_called()


def test_restore_without_changes_does_nothing(nvml_backend, state, fake):
    nvml_backend.restore(uuid_of(state))
    fake.nvmlDeviceSetPowerManagementLimit.assert_not_called()
    fake.nvmlDeviceResetGpuLockedClocks.assert_not_called()


def test_restore_attempts_everything_and_raises_the_first_error(nvml_backend, state, fake):
    g = state.gpus[0]
    nvml_backend.set_power_limit(g.uuid, 300)
    nvml_backend.lock_sm_clocks(g.uuid, 900, 1500)
    g.fail("nvmlDeviceSetPowerManagementLimit", pynvml.NVML_ERROR_UNKNOWN)
    with pytest.raises(GpuError):
        nvml_backend.restore(g.uuid)
    assert g.locked_clocks_mhz is None  # the clock reset still ran
    g.heal("nvmlDeviceSetPowerManagementLimit")
    nvml_backend.restore(g.uuid)  # retrying finishes the job
    assert g.limit_mw == 700_000


def test_callers_never_see_nvml_errors(nvml_backend, state):
    """Every public call under every NVML error code raises a GpuError, never an NVMLError."""
    g = state.gpus[0]
    nvml_backend.gpus()
    codes = [v for k, v in vars(pynvml).items() if k.startswith("NVML_ERROR_")]
    calls = [
        lambda: nvml_backend.sample(g.uuid),
        lambda: nvml_backend.set_power_limit(g.uuid, 300),
        lambda: nvml_backend.lock_sm_clocks(g.uuid, 900, 1500),
        lambda: nvml_backend.reset_sm_clocks(g.uuid),
        lambda: nvml_backend.restore(g.uuid),
    ]
    functions = [
        "nvmlDeviceGetFieldValues",
        "nvmlDeviceGetPowerManagementLimit",
        "nvmlDeviceSetPowerManagementLimit",
        "nvmlDeviceSetGpuLockedClocks",
        "nvmlDeviceResetGpuLockedClocks",
    ]
    for code in codes:
        for fn in functions:
            g.errors = {fn: code}
            for call in calls:
                try:
                    call()
                except GpuError:
                    pass
                except pynvml.NVMLError as err:  # pragma: no cover - the failure we test for
                    pytest.fail(f"{fn} raising {code} leaked {err!r}")
    g.errors = {}


def test_clock_lock_accepts_whole_float_mhz(nvml_backend, state, fake):
    g = state.gpus[0]
    nvml_backend.lock_sm_clocks(g.uuid, 900.0, 1500.0)
    fake.nvmlDeviceSetGpuLockedClocks.assert_called_once_with(g.handle, 900, 1500)


def test_use_after_close_is_a_gpu_error(fake, state):
    backend = NvmlBackend()
    backend.close()
    with pytest.raises(GpuError, match="closed"):
        backend.sample(uuid_of(state))


def test_an_agent_records_the_original_limit_when_that_ticks_sample_failed(
    nvml_backend, state, tmp_path, sqlite_url
):
    """The first cap lands on a tick whose sample of the GPU failed, so the agent did
    not see the limit it replaces. The backend read it on the way in; the agent must
    still put it in its originals file before anything else can go wrong, or a crash
    leaves the next run taking the cap for the original."""
    import json

    from wattkeeper.agent import Agent
    from wattkeeper.store.db import make_engine, upgrade
    from wattkeeper.store.repository import Store, TargetSpec

    engine = make_engine(sqlite_url)
    upgrade(engine)
    store = Store(engine)
    originals = tmp_path / "originals.json"
    agent = Agent("n1", nvml_backend, store, originals_path=originals)
    agent.tick(1000.0)
    uuid = uuid_of(state, 0)
    store.write_targets([TargetSpec(uuid, 450.0, reason="test")], 1000.0, 60.0)
    state.gpus[0].fail("nvmlDeviceGetTemperature", pynvml.NVML_ERROR_UNKNOWN)
    agent.tick(1001.0)
    assert uuid not in agent.state.samples  # the sample did fail
    assert state.gpus[0].limit_mw == 450_000
    assert json.loads(originals.read_text())["power_limit_w"] == {uuid: 700.0}
    # The agent dies here. The next run finds the GPU at 450 W, and puts back 700 W.
    state.gpus[0].heal("nvmlDeviceGetTemperature")
    again = Agent(
        "n1",
        NvmlBackend(clock=lambda: 1000.0),
        store,
        originals_path=originals,
        agent_id=agent.agent_id,
    )
    again.tick(1002.0)
    again.shutdown(1003.0)
    assert state.gpus[0].limit_mw == 700_000
    assert not originals.exists()
