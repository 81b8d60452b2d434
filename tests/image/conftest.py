"""Fixtures of the image tests: the container engine and the image (built by
scripts/image/build.sh when missing; `make test-image` builds it first)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from image_support import DEFAULT_IMAGE, REPO, engine_command


@pytest.fixture(scope="session")
def engine() -> list[str]:
    command = engine_command()
    if command is None:
        pytest.skip("no container engine (podman, or docker with a daemon): scripts/image/engine.sh installs podman")
    return command


@pytest.fixture(scope="session")
def image(engine: list[str]) -> str:
    """``$SPLITSERVE_IMAGE`` (default localhost/splitserve:0.1.0), built if missing."""
    name = os.environ.get("SPLITSERVE_IMAGE", DEFAULT_IMAGE)
    present = subprocess.run([*engine, "image", "inspect", name], capture_output=True).returncode == 0
    if not present:
        subprocess.run([str(REPO / "scripts/image/build.sh")], env={**os.environ, "IMAGE": name}, check=True,
                       timeout=1800)
    return name


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the containers' logs are saved (``$SPLITSERVE_IMAGE_LOGS`` if set, to keep them)."""
    kept = os.environ.get("SPLITSERVE_IMAGE_LOGS")
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        return Path(kept)
    return tmp_path_factory.mktemp("container-logs")
