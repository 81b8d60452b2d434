"""Helpers of the image tests (no tests here): the container engine, hardened
containers run the way the Helm chart runs them, and small HTTP/metrics reads."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_IMAGE = "localhost/splitserve:0.1.0"


def engine_command() -> list[str] | None:
    """The engine argv prefix from scripts/image/engine.sh (no install), or None."""
    result = subprocess.run([str(REPO / "scripts/image/engine.sh"), "--no-install"], capture_output=True,
                            text=True)
    return shlex.split(result.stdout.strip()) if result.returncode == 0 else None


def is_podman(engine: list[str]) -> bool:
    return "podman" in (Path(word).name for word in engine)


def hardened_flags(engine: list[str]) -> list[str]:
    """What the chart's securityContext and volumes amount to: read-only root
    (podman: no implicit tmpfs either, as in Kubernetes), uid 1000, no
    capabilities, no privilege gain, /tmp and /dev/shm as the emptyDirs."""
    flags = ["--network", "host", "--read-only", "--user", "1000", "--cap-drop", "ALL",
             "--security-opt", "no-new-privileges", "--tmpfs", "/tmp:rw,size=1g", "--tmpfs", "/dev/shm:rw,size=1g"]
    if is_podman(engine):
        flags.append("--read-only-tmpfs=false")
    return flags


@dataclass
class Container:
    """One detached container; ``logs()`` and ``exit_code()`` read it back."""

    engine: list[str]
    name: str
    log_dir: Path
    started: bool = field(default=False)

    def run(self, image: str, args: list[str], env_names: tuple[str, ...] = (),
            env: dict[str, str] | None = None) -> None:
        argv = [*self.engine, "run", "-d", "--name", self.name, *hardened_flags(self.engine)]
        for name in env_names:
            argv += ["--env", name]  # value from our environment, never on the command line
        result = subprocess.run([*argv, image, *args], capture_output=True, text=True, env=env, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{self.name} did not start: {result.stderr.strip()}")
        self.started = True

    def state(self) -> dict[str, Any]:
        out = subprocess.run([*self.engine, "inspect", "--format", "{{json .State}}", self.name],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return json.loads(out)

    def running(self) -> bool:
        return bool(self.state().get("Running"))

    def exit_code(self) -> int:
        return int(self.state()["ExitCode"])

    def logs(self) -> str:
        result = subprocess.run([*self.engine, "logs", self.name], capture_output=True, text=True, timeout=60)
        text = result.stdout + result.stderr
        (self.log_dir / f"{self.name}.log").write_text(text)
        return text

    def stop(self, grace_seconds: int) -> None:
        """SIGTERM, then SIGKILL after ``grace_seconds`` (exit code 137 then)."""
        subprocess.run([*self.engine, "stop", "-t", str(grace_seconds), self.name], capture_output=True,
                       text=True, timeout=grace_seconds + 60, check=True)

    def remove(self) -> None:
        if self.started:
            self.logs()
            subprocess.run([*self.engine, "rm", "-f", self.name], capture_output=True, timeout=120)


def run_once(engine: list[str], image: str, args: list[str], entrypoint: str | None = None) -> str:
    """Run a hardened throwaway container to completion; its stdout. Raises on a non-zero exit."""
    argv = [*engine, "run", "--rm", *hardened_flags(engine)]
    if entrypoint:
        argv += ["--entrypoint", entrypoint]
    result = subprocess.run([*argv, image, *args], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout


def wait_healthy(port: int, containers: list[Container], timeout: float = 240.0) -> None:
    """Poll ``/health`` on 127.0.0.1:port until 200; fail early if a container stopped."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        for container in containers:
            if not container.running():
                raise AssertionError(f"{container.name} exited ({container.exit_code()}):\n{container.logs()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing healthy on port {port} after {timeout:.0f}s")
        time.sleep(0.5)


def post_json(base_url: str, path: str, body: dict[str, Any], api_key: str | None) -> tuple[int, dict[str, Any]]:
    """POST ``body``; (status, JSON answer), error statuses included."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(base_url + path, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def post_stream(base_url: str, path: str, body: dict[str, Any], api_key: str) -> list[dict[str, Any]]:
    """POST a ``stream: true`` request; the SSE ``data:`` events (JSON) before ``[DONE]``."""
    request = urllib.request.Request(base_url + path, data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {api_key}"})
    events = []
    with urllib.request.urlopen(request, timeout=120) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data:") and line != "data: [DONE]":
                events.append(json.loads(line[len("data:"):]))
    return events


def metric_total(port: int, name: str) -> float:
    """Sum of the samples of ``name`` on http://127.0.0.1:port/metrics (0 if absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$")
    return sum(float(m.group(2)) for m in map(pattern.match, text.splitlines()) if m)
