"""What the image holds, checked in hardened throwaway containers (read-only
root, uid 1000, no capabilities): its config and labels, no compiler but
prebuilt CPU kernels this CPU loads, one nixl build, the tiny model that the
host's ``splitserve model tiny`` writes byte for byte."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from image_support import run_once
from splitserve.kernels.cpu_isa import CpuInfo, best_levels_for

pytestmark = pytest.mark.image


def test_config_runs_splitserve_as_uid_1000_with_oci_labels(engine: list[str], image: str) -> None:
    out = subprocess.run([*engine, "image", "inspect", "--format", "{{json .Config}}", image],
                         capture_output=True, text=True, check=True).stdout
    config = json.loads(out)
    assert config["User"] == "1000"
    assert config["Entrypoint"] == ["splitserve"]
    assert "SPLITSERVE_CACHE_DIR=/opt/splitserve-cache" in config["Env"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "splitserve"
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert run_once(engine, image, ["--version"]).strip() == "splitserve 0.1.0"


def test_prebuilt_kernels_load_without_a_compiler(engine: list[str], image: str) -> None:
    script = "id -u; command -v cc gcc || echo no-compiler; splitserve kernels show"
    uid, compiler, library = run_once(engine, image, ["-c", script], entrypoint="sh").split()
    assert (uid, compiler) == ("1000", "no-compiler")
    best = best_levels_for(CpuInfo.current())
    expected = best[0].name if best else "none"
    assert library.startswith("/opt/splitserve-cache/cpu-kernels/splitserve_cpu-" + expected + "-"), library


def test_one_nixl_build_and_it_loads(engine: list[str], image: str) -> None:
    script = ("import importlib.metadata as m, nixl._api\n"
              "print(sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].startswith('nixl')))")
    assert run_once(engine, image, ["-c", script], entrypoint="python").strip() == "['nixl', 'nixl-cu13']"


def test_baked_tiny_model_equals_the_hosts(engine: list[str], image: str, tmp_path: Path) -> None:
    from splitserve.cli import main as cli_main

    assert cli_main(["model", "tiny", "--out", str(tmp_path / "tiny")]) == 0
    host = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((tmp_path / "tiny").iterdir())}
    out = run_once(engine, image, [*(f"/models/tiny/{name}" for name in host)], entrypoint="sha256sum")
    baked = {Path(path).name: digest for digest, path in (line.split() for line in out.splitlines())}
    assert baked == host
