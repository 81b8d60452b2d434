"""The package as a user gets it: sdist -> wheel -> a fresh venv, run from
outside the checkout.

``python -m build`` makes the sdist and then the wheel *from the sdist*, so a
file the sdist forgets, a stub only ``make proto`` made, or a path read
relative to the repository breaks this test. The venv gets the local CPU
torch first (as the Makefile does), then the wheel with its dependencies.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from splitserve.local.launcher import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")


def _run(argv: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(REPO)))
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], cwd=out)
    sdist, = out.glob("splitserve-*.tar.gz")
    wheel, = out.glob("splitserve-*.whl")
    return {"sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="module")
def venv(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    base_python = getattr(sys, "_base_executable", sys.executable)
    _run([base_python, "-m", "venv", str(root)], cwd=root)
    # --no-compile: byte-compiling every installed file (torch's thousands) was half the install's time;
    # what the pod imports is compiled when it first imports it, as after any install.
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile"]
    _run([*pip, TORCH_SPEC], cwd=root)
    _run([*pip, str(dist["wheel"])], cwd=root)
    return root


def test_sdist_carries_the_sources_and_the_wheel_the_stubs(dist: dict[str, Path]) -> None:
    with tarfile.open(dist["sdist"]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {"setup.py", "pyproject.toml", "proto/splitserve_v1.proto", "proto/stub_builder.py",
            "kernels/cpu_paged_attention.c"} <= names
    assert not any(n.endswith("_pb2.py") for n in names), "generated stubs must be built, not shipped"
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        files = set(wheel.namelist())
        metadata = wheel.read(next(f for f in files if f.endswith(".dist-info/METADATA"))).decode()
    assert {"splitserve/proto/splitserve_v1_pb2.py", "splitserve/proto/splitserve_v1_pb2_grpc.py",
            "splitserve/proto/splitserve_v1.proto", "splitserve/kernels/cpu_paged_attention.c",
            "splitserve/pod/server.py", "splitserve/cli/__init__.py"} <= files
    runtime = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert any("grpcio" in line for line in runtime) and any("protobuf" in line for line in runtime)
    assert not any("grpcio-tools" in line for line in runtime), "grpcio-tools is a build requirement only"


def test_installed_wheel_serves_from_outside_the_checkout(venv: Path, tiny_checkpoints: dict,
                                                          tmp_path: Path) -> None:
    splitserve = str(venv / "bin" / "splitserve")
    help_text = _run([splitserve, "--help"], cwd=tmp_path).stdout
    assert "serve" in help_text and "up" in help_text
    where = _run([str(venv / "bin" / "python"), "-c", "import splitserve.pod.server as m; print(m.__file__)"],
                 cwd=tmp_path).stdout.strip()
    assert where.startswith(str(venv)), f"imported from {where}, not the venv"

    port, http_port = free_port(), free_port()
    env = {**_clean_env(), "HOME": str(tmp_path)}  # a fresh kernel cache, as on a new machine
    pod = subprocess.Popen([splitserve, "serve", "unified", "--model", str(tiny_checkpoints["llama"]),
                            "--port", str(port), "--http-port", str(http_port), "--kv-cache-memory", "8000000"],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = _wait_ready(pod, http_port, timeout_s=180)
        assert health == "ok"
    finally:
        pod.send_signal(signal.SIGTERM)
        try:
            output, _ = pod.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pod.kill()
            output, _ = pod.communicate()
    assert pod.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def _wait_ready(pod: subprocess.Popen[str], http_port: int, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if pod.poll() is not None:
            output = pod.stdout.read() if pod.stdout else ""
            raise AssertionError(f"the pod exited with {pod.returncode}:\n{output[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2) as response:
                last = response.read().decode()
                if response.status == 200 and "ok" in last:
                    return "ok"
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not ready after {timeout_s}s (last /health: {last!r})")
