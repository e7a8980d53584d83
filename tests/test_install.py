"""What a user installs: the wheel holds every module and data file, and a command whose
optional extra is missing says how to install it instead of printing a traceback.

The whole install (a wheel in a fresh virtual environment outside the checkout, then the
README's commands) is `.ci/wheel-smoke`, run by `.ci/run`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = {
    "daemon": "wattkeeper",
    "collectors": "wattkeeper/collectors",
    "policies": "wattkeeper/policies",
    "simulator": "wattkeeper/simulator",
    "migrations": "wattkeeper/migrations",
}
"""The top-level folders and where their files land in the wheel."""


def _source_files() -> set[str]:
    """Every file under the mapped folders that git tracks, as its path in the wheel."""
    tracked = subprocess.run(
        ["git", "ls-files", *LAYOUT], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    out = set()
    for path in tracked:
        folder, _, rest = path.partition("/")
        out.add(f"{LAYOUT[folder]}/{rest}")
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a clean copy of the tracked tree, as CI's fresh clone has it."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (built,) = out.glob("wattkeeper-*.whl")
    return built


def test_wheel_holds_every_tracked_module_and_data_file(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    missing = sorted(_source_files() - names)
    assert not missing, f"not in the wheel: {missing}"
    assert "wattkeeper/store/repository.py" in names
    assert any(n.startswith("wattkeeper/simulator/scenarios/") for n in names)
    assert not any("__pycache__" in n or n.startswith(("tests/", "bench/")) for n in names)


def test_wheel_installs_no_generic_top_level_module(wheel):
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist() if not n.endswith(".dist-info/RECORD")}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"wattkeeper"}


def _without(modules: list[str], tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the CLI in a Python where ``modules`` cannot be imported, as in an install
    without the extra that brings them."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    )
    return subprocess.run(
        [sys.executable, "-m", "wattkeeper", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)},
        cwd=tmp_path,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["simulate", "mixed", "--compare"],
        ["simulate", "steady-decode", "--policy", "oracle", "--duration", "1m"],
        ["simulate", "mixed", "--policy", "nocap", "--duration", "1m", "--report", "out"],
    ],
)
def test_a_missing_extra_is_one_line_naming_the_install_command(tmp_path, args):
    r = _without(["scipy", "matplotlib"], tmp_path, *args)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "pip install 'wattkeeper[sim]'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_commands_without_an_extra_work_without_it(tmp_path):
    r = _without(["scipy", "matplotlib"], tmp_path, "simulate", "list")
    assert r.returncode == 0, r.stderr
    assert "steady-decode" in r.stdout
