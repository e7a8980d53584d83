"""Host collector against a fixture powercap tree and a controlled psutil."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import psutil
import pytest

from wattkeeper.collectors import host
from wattkeeper.collectors.host import (
    HostCollector,
    HostPowerModel,
    HostSample,
    discover_rapl_zones,
    energy_delta_uj,
)

CpuTimes = namedtuple(
    "CpuTimes",
    ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice"],
)
Memory = namedtuple("Memory", ["total", "available", "used"])

MODEL = HostPowerModel(idle_w=180.0, per_cpu_util_w=220.0)
MAX_RANGE_UJ = 262_143_328_850  # a real package max_energy_range_uj


def write_zone(
    root: Path, name: str, zone_name: str, energy_uj: int, max_range: int | None
) -> Path:
    zone = root / name
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "name").write_text(f"{zone_name}\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    if max_range is not None:
        (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return zone


def set_energy(zone: Path, energy_uj: int) -> None:
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def powercap(tmp_path: Path) -> dict[str, Path]:
    """Two packages with DRAM, plus zones that must not be counted."""
    root = tmp_path / "powercap"
    zones = {
        "pkg0": write_zone(root, "intel-rapl:0", "package-0", 1_000_000, MAX_RANGE_UJ),
        "pkg1": write_zone(root, "intel-rapl:1", "package-1", 2_000_000, MAX_RANGE_UJ),
        "dram0": write_zone(root, "intel-rapl:0:0", "dram", 500_000, 65_712_999_613),
        # inside the package already, or overlapping it: never summed
        "core": write_zone(root, "intel-rapl:1:0", "core", 9_000_000, MAX_RANGE_UJ),
        "psys": write_zone(root, "intel-rapl:2", "psys", 9_000_000, MAX_RANGE_UJ),
        "mmio": write_zone(root, "intel-rapl-mmio:0", "package-0", 9_000_000, MAX_RANGE_UJ),
    }
    (root / "intel-rapl").mkdir()  # the control-type directory itself
    zones["root"] = root
    return zones


class FakeCpu:
    """cpu_times that advance as the test says: busy and idle seconds, summed over CPUs."""

    def __init__(self) -> None:
        self.busy = 1000.0
        self.idle = 3000.0

    def advance(self, busy_s: float, idle_s: float) -> None:
        self.busy += busy_s
        self.idle += idle_s

    def __call__(self) -> CpuTimes:
        # 10 s of guest inside user must not be counted twice
        return CpuTimes(
            self.busy - 50.0, 0.0, 40.0, self.idle - 20.0, 20.0, 5.0, 5.0, 0.0, 10.0, 0.0
        )


@pytest.fixture
def fake_cpu(monkeypatch: pytest.MonkeyPatch) -> FakeCpu:
    cpu = FakeCpu()
    monkeypatch.setattr(host.psutil, "cpu_times", cpu)
    monkeypatch.setattr(
        host.psutil,
        "virtual_memory",
        lambda: Memory(total=256 * 2**30, available=200 * 2**30, used=40 * 2**30),
    )
    return cpu


def test_discovers_packages_and_dram_only(powercap: dict[str, Path]) -> None:
    zones = discover_rapl_zones(powercap["root"])
    assert [zone.path.name for zone in zones] == ["intel-rapl:0", "intel-rapl:0:0", "intel-rapl:1"]
    assert [zone.name for zone in zones] == ["package-0", "dram", "package-1"]
    assert zones[0].max_energy_range_uj == MAX_RANGE_UJ


def test_energy_delta_wraps() -> None:
    assert energy_delta_uj(100, 350, 1000) == 250
    assert energy_delta_uj(900, 50, 1000) == 150
    assert energy_delta_uj(900, 50, None) is None


def test_rapl_power_from_energy_differences(powercap: dict[str, Path], fake_cpu: FakeCpu) -> None:
    collector = HostCollector(MODEL, powercap_root=powercap["root"])
    assert collector.power_source == "rapl"
    first = collector.sample(100.0)
    assert first.power_source == "rapl"
    assert first.non_gpu_power_w is None  # a rate needs two readings

    # 10 s later: pkg0 +1500 J, pkg1 +1200 J, dram0 +300 J -> 3000 J / 10 s
    set_energy(powercap["pkg0"], 1_000_000 + 1_500_000_000)
    set_energy(powercap["pkg1"], 2_000_000 + 1_200_000_000)
    set_energy(powercap["dram0"], 500_000 + 300_000_000)
    set_energy(powercap["core"], 1)  # not counted, even though it "went down"
    fake_cpu.advance(busy_s=30.0, idle_s=10.0)
    second = collector.sample(110.0)
    assert second == HostSample(
        timestamp=110.0,
        cpu_util_ratio=0.75,
        memory_used_bytes=56 * 2**30,
        memory_total_bytes=256 * 2**30,
        non_gpu_power_w=pytest.approx(300.0),
        power_source="rapl",
    )


def test_rapl_energy_counter_wraps_around(powercap: dict[str, Path], fake_cpu: FakeCpu) -> None:
    set_energy(powercap["pkg0"], MAX_RANGE_UJ - 400_000_000)  # 400 J before the wrap
    collector = HostCollector(MODEL, powercap_root=powercap["root"])
    collector.sample(0.0)
    set_energy(powercap["pkg0"], 600_000_000)  # wrapped: 400 J + 600 J = 1000 J
    set_energy(powercap["pkg1"], 2_000_000 + 500_000_000)  # +500 J
    set_energy(powercap["dram0"], 500_000 + 100_000_000)  # +100 J
    fake_cpu.advance(1.0, 1.0)
    sample = collector.sample(4.0)
    assert sample.power_source == "rapl"
    assert sample.non_gpu_power_w == pytest.approx((1000 + 500 + 100) / 4.0)


def test_energy_going_up_over_several_samples(powercap: dict[str, Path], fake_cpu: FakeCpu) -> None:
    collector = HostCollector(MODEL, powercap_root=powercap["root"])
    collector.sample(0.0)
    energy = {"pkg0": 1_000_000, "pkg1": 2_000_000, "dram0": 500_000}
    for step, watts in enumerate([250.0, 410.0, 90.0], start=1):
        # split the joules over the three zones: 50 % / 40 % / 10 %
        for zone, share in (("pkg0", 0.5), ("pkg1", 0.4), ("dram0", 0.1)):
            energy[zone] += int(watts * 2.0 * share * 1e6)
            set_energy(powercap[zone], energy[zone])
        fake_cpu.advance(1.0, 1.0)
        assert collector.sample(step * 2.0).non_gpu_power_w == pytest.approx(watts)


def test_model_when_rapl_is_absent(tmp_path: Path, fake_cpu: FakeCpu) -> None:
    collector = HostCollector(MODEL, powercap_root=tmp_path / "no-such-dir")
    assert collector.power_source == "model"
    fake_cpu.advance(busy_s=10.0, idle_s=30.0)
    sample = collector.sample(5.0)
    assert sample.power_source == "model"
    assert sample.cpu_util_ratio == pytest.approx(0.25)
    assert sample.non_gpu_power_w == pytest.approx(180.0 + 220.0 * 0.25)


def test_model_when_rapl_is_disabled(powercap: dict[str, Path], fake_cpu: FakeCpu) -> None:
    collector = HostCollector(MODEL, powercap_root=powercap["root"], use_rapl=False)
    fake_cpu.advance(busy_s=40.0, idle_s=0.0)
    sample = collector.sample(1.0)
    assert sample.power_source == "model"
    assert sample.non_gpu_power_w == pytest.approx(400.0)


def test_unreadable_energy_falls_back_to_the_model(
    powercap: dict[str, Path], fake_cpu: FakeCpu
) -> None:
    """Unprivileged agents cannot read energy_uj (root-only since CVE-2020-8694)."""
    for zone in ("pkg0", "pkg1", "dram0"):
        (powercap[zone] / "energy_uj").write_text("Permission denied\n")
    collector = HostCollector(MODEL, powercap_root=powercap["root"])
    assert collector.power_source == "model"
    assert collector.sample(1.0).power_source == "model"


def test_rapl_failing_later_uses_the_model_for_that_sample(
    powercap: dict[str, Path], fake_cpu: FakeCpu
) -> None:
    collector = HostCollector(MODEL, powercap_root=powercap["root"])
    collector.sample(0.0)
    (powercap["pkg1"] / "energy_uj").unlink()
    fake_cpu.advance(0.0, 10.0)
    failed = collector.sample(1.0)
    assert failed.power_source == "model"
    assert failed.non_gpu_power_w == pytest.approx(180.0)
    set_energy(powercap["pkg1"], 2_000_000)
    again = collector.sample(2.0)
    assert again.power_source == "rapl" and again.non_gpu_power_w is None  # new baseline


def test_counter_going_down_without_a_range_gives_no_power(
    tmp_path: Path, fake_cpu: FakeCpu
) -> None:
    root = tmp_path / "powercap"
    zone = write_zone(root, "intel-rapl:0", "package-0", 5_000_000, None)
    collector = HostCollector(MODEL, powercap_root=root)
    collector.sample(0.0)
    set_energy(zone, 1_000_000)
    sample = collector.sample(1.0)
    assert sample.power_source == "rapl" and sample.non_gpu_power_w is None


def test_cpu_ratio_uses_differences_between_samples(tmp_path: Path, fake_cpu: FakeCpu) -> None:
    collector = HostCollector(MODEL, powercap_root=tmp_path, use_rapl=False)
    fake_cpu.advance(busy_s=5.0, idle_s=15.0)
    assert collector.sample(1.0).cpu_util_ratio == pytest.approx(0.25)
    fake_cpu.advance(busy_s=18.0, idle_s=2.0)
    assert collector.sample(2.0).cpu_util_ratio == pytest.approx(0.9)
    # no time passed at all: the average since boot instead of 0/0
    since_boot = collector.sample(2.0).cpu_util_ratio
    assert 0.0 < since_boot < 1.0


def test_model_validation_and_clamping() -> None:
    with pytest.raises(ValueError, match="idle_w"):
        HostPowerModel(idle_w=-1.0, per_cpu_util_w=10.0)
    with pytest.raises(ValueError, match="per_cpu_util_w"):
        HostPowerModel(idle_w=1.0, per_cpu_util_w=float("nan"))
    assert MODEL.power_w(1.7) == pytest.approx(400.0)


def test_real_host_sample_is_sane(tmp_path: Path) -> None:
    """Against the real psutil: ranges only, the numbers are this machine's."""
    collector = HostCollector(MODEL, powercap_root=tmp_path, use_rapl=False)
    sample = collector.sample(0.0)
    assert 0.0 <= sample.cpu_util_ratio <= 1.0
    assert 0 < sample.memory_used_bytes <= sample.memory_total_bytes
    assert sample.memory_total_bytes == psutil.virtual_memory().total
    assert sample.power_source == "model"
    assert 180.0 <= sample.non_gpu_power_w <= 400.0
