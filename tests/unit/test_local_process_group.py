"""ProcessGroup children die with their parent (through the parent_watch exec
shim) and start cleanly from a parent that runs gRPC threads."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest

from splitserve.local.parent_watch import main as parent_watch_main
from splitserve.local.process_group import ProcessGroup

pytestmark = pytest.mark.timeout(60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_a_child_is_terminated_when_its_parent_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from splitserve.local.process_group import ProcessGroup
        child = ProcessGroup().start("sleeper", ["sleep", "300"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(300)
    """)])
    try:
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pid_file.read_text())
        time.sleep(0.3)  # let the shim exec
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its killed parent"
    finally:
        parent.kill()


def test_children_start_beside_live_grpc_threads(tmp_path: Path) -> None:
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    group = ProcessGroup()
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
        started = [group.start(f"c{i}", [sys.executable, "-c", "print('ok')"], log_path=tmp_path / f"c{i}.log")
                   for i in range(8)]
        for process in started:
            assert process.popen.wait(timeout=30) == 0, (tmp_path / f"{process.name}.log").read_text()
    finally:
        group.stop_all(1.0)
        channel.close()
        server.stop(0)


def test_the_shim_refuses_a_bad_command_line() -> None:
    with pytest.raises(SystemExit, match="usage"):
        parent_watch_main(["not-a-pid", "sleep", "1"])
