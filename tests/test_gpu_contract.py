"""One contract, two backends: the simulated GPUs and NVML (through an autospec'd fake).

Whatever the agent relies on must hold for both, so it cannot tell them apart.
"""

import math

import pytest
from nvml_fake import install_fake_pynvml

from wattkeeper.clock import SimClock
from wattkeeper.collectors.gpu import GpuBackend, GpuNotFoundError, GpuValueError


@pytest.fixture(params=["sim", "nvml"])
def backend(request, monkeypatch):
    if request.param == "sim":
        from wattkeeper.collectors.sim_gpu import SimGpuBackend
        from wattkeeper.simulator.facility import FacilitySpec, SimFacility

        clock = SimClock(1000.0)
        facility = SimFacility.simple(FacilitySpec(1, 2), start_ts=clock.now())
        b = SimGpuBackend(facility, 0, clock.now)
        clock.set(1005.0)
    else:
        from wattkeeper.collectors.nvml import NvmlBackend

        install_fake_pynvml(monkeypatch, n_gpus=2)
        b = NvmlBackend(clock=lambda: 1000.0)
    yield b
    b.close()


def test_is_a_gpu_backend(backend):
    assert isinstance(backend, GpuBackend)
    assert backend.name in {"sim", "nvml"}


def test_enumerates_with_stable_ids_and_sane_constraints(backend):
    gpus = backend.gpus()
    assert len(gpus) == 2
    assert [g.index for g in gpus] == [0, 1]
    assert len({g.uuid for g in gpus}) == 2
    assert all(g.uuid.startswith("GPU-") for g in gpus)
    for g in gpus:
        lim = g.power_limits
        assert 0 < lim.min_w <= lim.default_w <= lim.max_w
        assert g.supported_sm_clocks_mhz
    assert [g.uuid for g in backend.gpus()] == [g.uuid for g in gpus]


def test_sample_has_base_units(backend):
    g = backend.gpus()[0]
    s = backend.sample(g.uuid)
    assert s.uuid == g.uuid
    assert s.power_w is not None and 0 < s.power_w <= g.power_limits.max_w * 1.1
    assert s.energy_j is not None and s.energy_j > 0
    assert s.utilization_gpu_ratio is None or 0 <= s.utilization_gpu_ratio <= 1
    assert s.power_limit_w is not None
    assert all(isinstance(r, str) for r in s.throttle_reasons)
    assert s.sm_clock_mhz is None or s.sm_clock_mhz > 10  # MHz, not Hz or GHz


def test_power_limit_within_constraints_is_applied_and_remembered(backend):
    g = backend.gpus()[0]
    before = backend.sample(g.uuid).power_limit_requested_w
    assert backend.original_settings(g.uuid) is None
    target = math.floor((g.power_limits.min_w + g.power_limits.max_w) / 2)
    backend.set_power_limit(g.uuid, target)
    assert backend.sample(g.uuid).power_limit_requested_w == pytest.approx(target)
    assert backend.original_settings(g.uuid).power_limit_w == pytest.approx(before)
    backend.restore(g.uuid)
    assert backend.sample(g.uuid).power_limit_requested_w == pytest.approx(before)


@pytest.mark.parametrize("where", ["below", "above"])
def test_power_limit_outside_constraints_is_refused_and_changes_nothing(backend, where):
    g = backend.gpus()[1]
    before = backend.sample(g.uuid).power_limit_requested_w
    bad = g.power_limits.min_w - 1 if where == "below" else g.power_limits.max_w + 1
    with pytest.raises(GpuValueError, match="outside"):
        backend.set_power_limit(g.uuid, bad)
    assert backend.sample(g.uuid).power_limit_requested_w == pytest.approx(before)
    assert backend.original_settings(g.uuid) is None


def test_clock_lock_checked_against_supported_clocks(backend):
    g = backend.gpus()[0]
    clocks = sorted(g.supported_sm_clocks_mhz)
    with pytest.raises(GpuValueError):
        backend.lock_sm_clocks(g.uuid, clocks[0], clocks[-1] + 100)
    with pytest.raises(GpuValueError):
        backend.lock_sm_clocks(g.uuid, clocks[-1], clocks[0])
    backend.lock_sm_clocks(g.uuid, clocks[0], clocks[len(clocks) // 2])
    backend.reset_sm_clocks(g.uuid)


def test_unknown_gpu(backend):
    with pytest.raises(GpuNotFoundError):
        backend.sample("GPU-00000000-dead-beef-0000-000000000000")
    with pytest.raises(GpuNotFoundError):
        backend.set_power_limit("GPU-00000000-dead-beef-0000-000000000000", 300)
