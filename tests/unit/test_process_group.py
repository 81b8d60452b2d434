from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from process_probe import alive

from splitserve.local.parent_watch import main as parent_watch_main
from splitserve.local.process_group import ProcessGroup



def test_stop_all_kills_children_and_their_children(tmp_path) -> None:
    group = ProcessGroup()
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time;"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid));"
        "time.sleep(60)"
    )
    child = group.start("worker", [sys.executable, "-c", script], log_path=tmp_path / "w.log")
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert alive(child.pid) and alive(grandchild)
    group.stop_all(grace_seconds=5)
    time.sleep(0.2)
    assert not alive(child.pid)
    assert not alive(grandchild)
    assert group.processes == []


def test_children_die_when_the_launcher_is_killed(tmp_path) -> None:
    pid_file = tmp_path / "child.pid"
    launcher = (
        "import sys, time;"
        "from splitserve.local.process_group import ProcessGroup;"
        "g = ProcessGroup();"
        "p = g.start('c', [sys.executable, '-c', 'import time; time.sleep(60)']);"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid));"
        "time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher])
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_first_exited_reports_a_dead_child() -> None:
    group = ProcessGroup()
    group.start("quick", [sys.executable, "-c", "pass"])
    group.start("slow", [sys.executable, "-c", "import time; time.sleep(30)"])
    deadline = time.monotonic() + 10
    while group.first_exited() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert group.first_exited().name == "quick"
    group.stop_all(grace_seconds=2)


def test_signal_reaches_one_child_and_reap_returns_it_once() -> None:
    group = ProcessGroup()
    script = ("import signal, sys, time;"
              "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7));"
              "time.sleep(30)")
    target = group.start("target", [sys.executable, "-c", script])
    other = group.start("other", [sys.executable, "-c", "import time; time.sleep(30)"])
    time.sleep(0.5)  # let the handler be installed
    group.signal(target, signal.SIGTERM)
    deadline = time.monotonic() + 10
    reaped: list = []
    while not reaped:
        assert time.monotonic() < deadline
        reaped = group.reap()
        time.sleep(0.05)
    assert [p.name for p in reaped] == ["target"] and target.returncode == 7
    assert group.reap() == [] and group.processes == [other] and other.is_running()
    group.stop_all(grace_seconds=2)
    assert not alive(other.pid)


def test_children_start_beside_live_grpc_threads(tmp_path: Path) -> None:
    server = grpc.server(ThreadPoolExecutor(2))
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
