"""Prints requirement lines from pyproject.toml for the image build's cached layers.

    python requirements.py runtime [EXTRA ...]   project.dependencies (+ optional extras)
    python requirements.py build                 build-system.requires

The Dockerfile installs these before it copies the source, so a source edit
does not reinstall torch and the dependencies. Needs Python 3.11+ (tomllib).
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: dict, kind: str, extras: list[str]) -> list[str]:
    if kind == "build":
        return list(pyproject["build-system"]["requires"])
    if kind != "runtime":
        raise ValueError(f"unknown kind {kind!r}: runtime or build")
    project = pyproject["project"]
    lines = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise ValueError(f"no optional dependency group {extra!r} (have {', '.join(optional)})")
        lines += optional[extra]
    return lines


def _pyproject_path() -> Path:
    """Beside this script (where the Dockerfile copies both), else the repository's."""
    here = Path(__file__).resolve()
    beside = here.with_name("pyproject.toml")
    return beside if beside.exists() else here.parents[2] / "pyproject.toml"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    pyproject = tomllib.loads(_pyproject_path().read_text())
    extras = [e for arg in argv[1:] for e in arg.split(",") if e]
    try:
        print("\n".join(requirements(pyproject, argv[0], extras)))
    except ValueError as exc:
        print(f"requirements.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
