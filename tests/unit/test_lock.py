"""The dependency lock: what every install path installs, and what the tests ran against."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DEV_LOCK = ROOT / "requirements" / "dev.txt"
MAIN_LOCK = ROOT / "requirements" / "main.txt"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# One locked requirement: `name==version [; marker]` followed by its `--hash=` lines.
_PINNED = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def _locked(path: Path) -> dict[str, tuple[str, Marker | None, int]]:
    """name -> (version, marker, number of hashes)."""
    found: dict[str, tuple[str, Marker | None, int]] = {}
    name = ""
    for line in path.read_text().splitlines():
        if match := _PINNED.match(line):
            name = canonicalize_name(match.group(1))
            marker = Marker(match.group(3)) if match.group(3) else None
            found[name] = (match.group(2), marker, 0)
        elif line.strip().startswith("--hash=sha256:") and name:
            version, marker, hashes = found[name]
            found[name] = (version, marker, hashes + 1)
    return found


DEV = _locked(DEV_LOCK)
MAIN = _locked(MAIN_LOCK)


def test_every_locked_package_has_an_exact_version_and_hashes() -> None:
    assert len(DEV) > 50
    for lock in (DEV, MAIN):
        for name, (_, _, hashes) in lock.items():
            assert hashes >= 1, name


@pytest.mark.parametrize(
    "requirement",
    PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"],
)
def test_each_declared_dependency_is_locked_within_its_range(requirement: str) -> None:
    wanted = Requirement(requirement)
    version, _, _ = DEV[canonicalize_name(wanted.name)]
    assert wanted.specifier.contains(version, prereleases=True), (requirement, version)


@pytest.mark.parametrize("requirement", PROJECT["dependencies"])
def test_the_runtime_lock_holds_each_runtime_dependency_at_the_dev_locks_version(
    requirement: str,
) -> None:
    name = canonicalize_name(Requirement(requirement).name)
    assert MAIN[name][0] == DEV[name][0]


def test_the_runtime_lock_is_the_dev_lock_less_the_dev_tools() -> None:
    assert set(MAIN) <= set(DEV)
    for name, (version, _, _) in MAIN.items():
        assert DEV[name][0] == version, name


def test_the_packages_the_tests_run_with_are_the_locked_ones() -> None:
    for name, (version, marker, _) in DEV.items():
        if marker is not None and not marker.evaluate():
            continue
        assert metadata.version(name) == version, name


@pytest.mark.parametrize("package", ["celery", "kombu", "billiard"])
def test_packages_whose_internals_are_overridden_are_capped_below_the_next_minor(
    package: str,
) -> None:
    requirement = next(
        Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == package
    )
    version = DEV[package][0]
    major, minor = (int(part) for part in version.split(".")[:2])
    assert not requirement.specifier.contains(f"{major}.{minor + 1}.0"), requirement


def test_every_install_path_installs_from_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "DEV_LOCK := requirements/dev.txt" in makefile
    for text in (makefile, dockerfile):
        installs = [
            line
            for line in text.splitlines()
            if "pip install" in line and not line.lstrip().startswith("#")
        ]
        assert installs
        for line in installs:
            # Either the lock itself, checked against its hashes, or refundsync alone.
            assert "--no-deps" in line, line
            assert "--require-hashes" in line or "--no-build-isolation" in line, line
    assert "requirements/main.txt" in dockerfile
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    assert "pip install" not in ci
