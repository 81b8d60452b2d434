"""``splitserve up``'s Deployment controller over real child processes that
are pod doubles (a few lines of Python answering /health; on SIGTERM they
note what the pods file said about them, answer 503 and exit after a short
drain), driven through the control endpoint and the CLI commands: crash
replacement with back-off, scale (also to 0), rolling restart, the pods file
at every step, static discovery's limits."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitserve.cli import main as cli_main
from splitserve.local.control_client import ControlClient, ControlClientError
from splitserve.local.control_server import ControlServer
from splitserve.local.controller import ControlError, DeploymentController, DrainTiming, PodCrashedError, PodLaunch
from splitserve.local.pod_pool import CrashBackoff, LocalPod, PodPool
from splitserve.local.pods_file import read_pods_file
from splitserve.local.process_group import ProcessGroup

pytestmark = pytest.mark.timeout(120)

POD_DOUBLE = r"""
import json, os, signal, sys, threading
from http.server import BaseHTTPRequestHandler, HTTPServer
http_port, address, pods_file, notes, drain_s = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
state = {"status": 200}
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(state["status"]); self.end_headers()
    def log_message(self, *a): pass
server = HTTPServer(("127.0.0.1", http_port), H)
def term(*_):
    state["status"] = 503
    try:
        pods = json.load(open(pods_file))["pods"]
        seen = next((p["state"] for p in pods if p["address"] == address), "absent")
    except OSError:
        seen = "no file"
    open(notes, "a").write(f"{address} {seen}\n")
    threading.Timer(drain_s, lambda: os._exit(0)).start()
signal.signal(signal.SIGTERM, term)
server.serve_forever()
"""


class Harness:
    def __init__(self, tmp: Path, pools: list[PodPool], *, scalable: bool = True, drain_s: float = 0.3) -> None:
        self.tmp = tmp
        self.pods_file = tmp / "pods.json"
        self.notes = tmp / "sigterm-notes.txt"
        self.lines: list[str] = []
        self.group = ProcessGroup()
        self.controller = DeploymentController(
            pools, self.group, PodLaunch(self._argv, tmp / "logs"), "127.0.0.1",
            self.pods_file if scalable else None, DrainTiming(notice_s=0.3, grace_s=10.0),
            scalable=scalable, log=self.lines.append)
        self._drain_s = drain_s
        self.file_history: list[list[tuple[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.error: BaseException | None = None

    def _argv(self, pod: LocalPod) -> list[str]:
        return [sys.executable, "-c", POD_DOUBLE, str(pod.http_port), pod.address, str(self.pods_file),
                str(self.notes), str(self._drain_s)]

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.controller.reconcile()
            except BaseException as exc:  # noqa: BLE001 - surfaced by the test
                self.error = exc
                return
            if self.pods_file.exists():
                entries = [(e.address, e.state) for e in read_pods_file(self.pods_file)]
                if not self.file_history or self.file_history[-1] != entries:
                    self.file_history.append(entries)

    def start(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.controller.converged():
            self.controller.reconcile()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        self.controller.fail_fast = False
        self._thread.start()

    def wait_converged(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.controller.converged():
            assert self.error is None, self.error
            assert time.monotonic() < deadline, self.controller.status()
            time.sleep(0.05)

    def wait_gone(self, pod: LocalPod, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while pod in self.controller.pools[pod.role].pods:
            assert time.monotonic() < deadline, f"{pod.name} still listed"
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.group.stop_all(grace_seconds=5)

    def addresses(self, role: str) -> list[str]:
        return [p.address for p in self.controller.pools[role].pods]

    def sigterm_notes(self) -> dict[str, str]:
        if not self.notes.exists():
            return {}
        return dict(line.split() for line in self.notes.read_text().splitlines())


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path, [PodPool("prefill", 1, min_ready_seconds=0.3, backoff=CrashBackoff(base_s=0.5)),
                           PodPool("decode", 2, min_ready_seconds=0.3, backoff=CrashBackoff(base_s=0.5))])
    h.start()
    yield h
    h.stop()
    assert h.group.processes == []


def test_a_killed_pod_is_replaced_with_back_off_and_the_file_follows(harness: Harness) -> None:
    before = set(harness.addresses("decode"))
    assert {e.address for e in read_pods_file(harness.pods_file) if e.state == "ready"} >= before
    victim = harness.controller.pools["decode"].pods[0]
    os.kill(victim.pid, signal.SIGKILL)
    harness.wait_gone(victim)
    harness.wait_converged()
    after = set(harness.addresses("decode"))
    assert victim.address not in after and len(after) == 2 and (before - {victim.address}) <= after
    status = harness.controller.status()["pools"]["decode"]
    assert status["restarts"] == 1
    assert any("replacing it in 0.5s" in line for line in harness.lines)
    entries = {e.address for e in read_pods_file(harness.pods_file)}
    assert victim.address not in entries and after <= entries
    # The killed pod left the file before its replacement joined it.
    gone_at = next(i for i, f in enumerate(harness.file_history) if victim.address not in dict(f))
    new = (after - before).pop()
    assert all(new not in dict(f) for f in harness.file_history[:gone_at])


def test_scale_through_the_control_endpoint_and_the_cli(harness: Harness, capsys) -> None:
    server = ControlServer(harness.controller)
    server.start()
    try:
        assert cli_main(["scale", "decode=3", "prefill=0", "--control", server.url, "--wait", "--timeout", "30"]) == 0
        assert len(harness.addresses("decode")) == 3 and harness.addresses("prefill") == []
        assert "decode" in capsys.readouterr().out
        assert cli_main(["scale", "decode=1", "--control", server.url, "--wait", "--timeout", "30"]) == 0
        assert [p.name for p in harness.controller.pools["decode"].pods] == ["decode-0"]  # newest drained
        capsys.readouterr()
        assert cli_main(["status", "--control", server.url, "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["pools"]["decode"]["replicas"] == 1 and status["pools"]["prefill"]["ready"] == 0
        client = ControlClient(server.url)
        for bad, words in (({"unified": 1}, "no pool unified"), ({"decode": -1}, "replicas")):
            with pytest.raises(ControlClientError, match=words):
                client.scale(bad)
        with pytest.raises(SystemExit, match="write POOL=N"):
            cli_main(["scale", "decode", "--control", server.url])
    finally:
        server.close()
    # Every drained pod was listed "draining" before it got SIGTERM; none was left listed.
    notes = harness.sigterm_notes()
    assert len(notes) == 3 and set(notes.values()) == {"draining"}
    assert {e.address for e in read_pods_file(harness.pods_file)} == set(harness.addresses("decode"))


def test_rollout_restart_replaces_every_pod_without_losing_capacity(harness: Harness) -> None:
    old = set(harness.addresses("decode"))
    harness.file_history.clear()
    harness.controller.rollout_restart("decode")
    harness.wait_converged()
    new = set(harness.addresses("decode"))
    assert not old & new and len(new) == 2
    decode = old | new
    for snapshot in harness.file_history:
        listed = dict(snapshot)
        ready = [a for a in decode if listed.get(a) == "ready"]
        assert len(ready) >= 2, snapshot  # maxUnavailable 0
        assert sum(a in listed for a in decode) <= 3, snapshot  # maxSurge 1
    assert set(harness.sigterm_notes()) == old and set(harness.sigterm_notes().values()) == {"draining"}
    with pytest.raises(ControlError, match="no pool"):
        harness.controller.rollout_restart("unified")


def test_static_discovery_refuses_scale_and_brings_a_crashed_pod_back_on_its_address(tmp_path: Path) -> None:
    h = Harness(tmp_path, [PodPool("unified", 1, min_ready_seconds=0.0, backoff=CrashBackoff(base_s=0.2))],
                scalable=False)
    h.start()
    try:
        address = h.addresses("unified")[0]
        with pytest.raises(ControlError, match="static"):
            h.controller.scale({"unified": 2})
        victim = h.controller.pools["unified"].pods[0]
        os.kill(victim.pid, signal.SIGKILL)
        h.wait_gone(victim)
        h.wait_converged()
        assert h.addresses("unified") == [address] and not h.pods_file.exists()
    finally:
        h.stop()


def test_a_pod_exiting_before_up_is_ready_fails_fast(tmp_path: Path) -> None:
    group = ProcessGroup()
    controller = DeploymentController([PodPool("decode", 1)], group,
                                      PodLaunch(lambda pod: [sys.executable, "-c", "raise SystemExit(3)"],
                                                tmp_path), "127.0.0.1", tmp_path / "pods.json")
    with pytest.raises(PodCrashedError, match="decode-0 exited with code 3"):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            controller.reconcile()
            time.sleep(0.05)
    group.stop_all()
