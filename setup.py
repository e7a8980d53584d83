"""Package discovery for the folder-per-role layout.

The import namespace is ``wattkeeper`` while the code lives in top-level folders named
after their role (``daemon/``, ``collectors/``, ...). setuptools' own discovery cannot
map several folders into one namespace, and a hand-written package list forgets the
next subpackage. So every folder below a mapped root that holds an ``__init__.py`` is a
package, and every data file below it (scenario files, calibration data, Alembic's
template) ships as that package's data: nothing added to the tree can be left out of
the wheel. Metadata stays in ``pyproject.toml``.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
ROOTS = {
    "wattkeeper": "daemon",
    "wattkeeper.collectors": "collectors",
    "wattkeeper.policies": "policies",
    "wattkeeper.simulator": "simulator",
    "wattkeeper.migrations": "migrations",
}
SKIP_DIRS = {"__pycache__"}
DATA_SUFFIXES = {".toml", ".csv", ".json", ".mako", ".txt", ".md"}
"""Kinds of data file that ship. An allow-list, so that what a working tree collects
(editor swap files, a local ``.db``) never lands in a wheel built from it; a tracked
file of another kind fails ``tests/test_install.py`` until it is added here."""


def discover() -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    package_data: dict[str, list[str]] = {}
    for root_pkg, root_dir in ROOTS.items():
        base = HERE / root_dir
        for init in sorted(base.rglob("__init__.py")):
            folder = init.parent
            rel = folder.relative_to(base)
            if any(part in SKIP_DIRS for part in rel.parts):
                continue
            name = ".".join((root_pkg, *rel.parts))
            packages.append(name)
            package_dir[name] = folder.relative_to(HERE).as_posix()
    for pkg in packages:
        folder = HERE / package_dir[pkg]
        data = [
            path.relative_to(folder).as_posix()
            for path in sorted(folder.rglob("*"))
            if path.is_file()
            and path.suffix in DATA_SUFFIXES
            and not path.name.startswith(".")
            and not SKIP_DIRS & set(path.relative_to(folder).parts)
            and _owner(path, folder) == folder
        ]
        if data:
            package_data[pkg] = data
    return packages, package_dir, package_data


def _owner(path: Path, stop: Path) -> Path:
    """The nearest folder above ``path`` that is a package (has an ``__init__.py``)."""
    folder = path.parent
    while folder != stop and not (folder / "__init__.py").exists():
        folder = folder.parent
    return folder


PACKAGES, PACKAGE_DIR, PACKAGE_DATA = discover()

setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA)
