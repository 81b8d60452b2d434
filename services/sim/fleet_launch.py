"""Start a sim fleet process and router processes for benches and tests,
and stop them (SIGTERM, then SIGKILL after a timeout; each in its own
session so nothing is orphaned on its own)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (another process may take it
    before it is bound: good enough for local benches and tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        """User + system CPU of the process so far (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def rss_bytes(self) -> int:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def tail(self, lines: int = 30) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def spawn(name: str, argv: Sequence[str], log_dir: Path | None) -> Proc:
    log = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"{name}.log"
        out = open(log, "wb")  # noqa: SIM115 - handed to the child
    else:
        out = subprocess.DEVNULL  # type: ignore[assignment]
    popen = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Proc(name, popen, log)


def wait_http(proc: Proc, url: str, timeout_s: float = 120.0) -> None:
    """Until ``url`` answers 200; raises ``RuntimeError`` (with the log tail)
    if the process exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} not healthy at {url} after {timeout_s:.0f}s:\n{proc.tail()}")


@dataclass(frozen=True)
class FleetSpec:
    """Arguments of one ``splitserve serve sim`` process."""

    num_prefill: int
    num_decode: int
    base_port: int
    http_port: int
    num_blocks: int = 2048
    max_model_len: int = 16384
    extra_args: tuple[str, ...] = ()
    discovery_file: str | None = None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "splitserve", "serve", "sim", "--base-port", str(self.base_port),
                "--http-port", str(self.http_port), "--num-gpu-blocks-override", str(self.num_blocks),
                "--max-model-len", str(self.max_model_len), "--shutdown-grace-seconds", "2"]
        for role, count in (("prefill", self.num_prefill), ("decode", self.num_decode)):
            if count:
                argv += ["--sim-role", role, "--num-pods", str(count)]
        if self.discovery_file:
            argv += ["--discovery-file", self.discovery_file]
        return argv + list(self.extra_args)


def start_fleet(spec: FleetSpec, log_dir: Path | None, name: str = "sim-fleet") -> Proc:
    proc = spawn(name, spec.argv(), log_dir)
    try:
        wait_http(proc, f"http://127.0.0.1:{spec.http_port}/health", timeout_s=180.0)
    except BaseException:
        proc.stop(5.0)
        raise
    return proc


@dataclass(frozen=True)
class RouterSpec:
    model: str
    port: int
    policy: str = "kv_affinity"
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    discovery_file: str | None = None
    poll_interval_s: float = 1.0
    max_prompt_tokens: int = 16384
    pd_threshold_tokens: int = 0
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "splitserve", "router", "--model", self.model, "--port", str(self.port),
                "--policy", self.policy, "--poll-interval", str(self.poll_interval_s),
                "--max-prompt-tokens", str(self.max_prompt_tokens),
                "--pd-threshold-tokens", str(self.pd_threshold_tokens), "--log-level", "warning"]
        if self.discovery_file:
            argv += ["--discovery", "file", "--discovery-file", self.discovery_file]
        else:
            argv += ["--prefill", ",".join(self.prefill), "--decode", ",".join(self.decode)]
        return argv + list(self.extra_args)


def start_router(spec: RouterSpec, log_dir: Path | None, name: str) -> Proc:
    proc = spawn(name, spec.argv(), log_dir)
    try:
        wait_http(proc, f"http://127.0.0.1:{spec.port}/health", timeout_s=120.0)
    except BaseException:
        proc.stop(5.0)
        raise
    return proc


def router_ready_pods(port: int) -> int | None:
    """Sum of the router's ``splitserve:router_pods{state="ready"}`` (None
    if the router does not export it)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0).text
    except httpx.HTTPError:
        return None
    found, total = False, 0.0
    for line in text.splitlines():
        if line.startswith("splitserve:router_pods{") and 'state="ready"' in line:
            found = True
            total += float(line.rsplit(" ", 1)[1])
    return int(total) if found else None


def wait_router_pods(port: int, expected: int, timeout_s: float = 60.0) -> bool:
    """Until the router counts ``expected`` ready pods; False on timeout
    (or when it exports no pod gauge: then after ``timeout_s`` / 10)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = router_ready_pods(port)
        if ready is None:
            time.sleep(timeout_s / 10)
            return False
        if ready >= expected:
            return True
        time.sleep(0.2)
    return False


def router_supports_file_discovery() -> bool:
    """Whether this checkout's router has ``--discovery file`` (asks its
    argument parser, in this process)."""
    import argparse

    from splitserve.cli import router_command

    parser = argparse.ArgumentParser()
    router_command.register(parser.add_subparsers())
    return any("--discovery-file" in action.option_strings
               for sub in parser._subparsers._group_actions  # noqa: SLF001 - argparse keeps them there
               for child in sub.choices.values() for action in child._actions)  # noqa: SLF001


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
