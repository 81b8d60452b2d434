"""Fixtures shared by the kernel tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cpu_kernels_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir holding a fresh build of the CPU kernels (compiled once per session)."""
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    from splitserve.kernels.cpu_library import build_library

    cache_dir = tmp_path_factory.mktemp("cpu-kernels")
    build_library(cache_dir)
    return cache_dir
