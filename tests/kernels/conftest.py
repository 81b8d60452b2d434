"""Fixtures shared by the kernel tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cpu_levels import RUNNABLE_LEVELS


@pytest.fixture(scope="session")
def cpu_kernels_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir holding a fresh native build of the CPU kernels (compiled once per session)."""
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    from splitserve.kernels.cpu_library import build_library

    cache_dir = tmp_path_factory.mktemp("cpu-kernels")
    build_library(cache_dir)
    return cache_dir


@pytest.fixture(scope="session")
def portable_kernels_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir with every portable level of this ISA built (``build_portable``, as
    the image does; no native build), compiled once per session."""
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    from splitserve.kernels.cpu_library import build_portable

    cache_dir = tmp_path_factory.mktemp("portable")
    build_portable(cache_dir)
    return cache_dir


@pytest.fixture(scope="session", params=RUNNABLE_LEVELS)
def cpu_level(request: pytest.FixtureRequest) -> str:
    """Each build this CPU runs, by name (see ``cpu_levels``)."""
    return request.param


@pytest.fixture(scope="session")
def cpu_level_dir(cpu_level: str, request: pytest.FixtureRequest) -> Path:
    """The cache dir holding ``cpu_level``'s build."""
    return request.getfixturevalue("cpu_kernels_dir" if cpu_level == "native" else "portable_kernels_dir")
