"""Child processes that never outlive their parent.

Each child runs in its own process group (so a stop reaches its own children
too) and asks the kernel to SIGTERM it if the parent dies, so even a
``kill -9`` of the launcher leaves no orphans on Linux.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


def _watched(argv: Sequence[str]) -> list[str]:
    """``argv`` behind the exec shim that SIGTERMs it when we die."""
    return [sys.executable, "-m", "splitserve.local.parent_watch", str(os.getpid()), *argv]


@dataclass
class ManagedProcess:
    """One started child: its name, Popen, and where its log goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def is_running(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()


@dataclass
class ProcessGroup:
    """Starts children and stops all of them, by pid, in reverse start order."""

    processes: list[ManagedProcess] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> ManagedProcess:
        log: IO[bytes] | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        try:
            popen = subprocess.Popen(
                _watched(argv),
                env={**os.environ, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT if log is not None else None,
                start_new_session=True,
            )
        finally:
            if log is not None:
                log.close()
        process = ManagedProcess(name=name, popen=popen, log_path=log_path)
        self.processes.append(process)
        return process

    def first_exited(self) -> ManagedProcess | None:
        return next((p for p in self.processes if not p.is_running()), None)

    def signal(self, process: ManagedProcess, sig: signal.Signals) -> None:
        """Send ``sig`` to one child's process group (SIGTERM: drain; SIGKILL)."""
        if process.is_running():
            _signal_group(process, sig)

    def reap(self) -> list[ManagedProcess]:
        """Children that exited since the last call, removed from the group
        (anything they left in their process group is killed)."""
        gone = [p for p in self.processes if not p.is_running()]
        for process in gone:
            _signal_group(process, signal.SIGKILL)
            self.processes.remove(process)
        return gone

    def stop_all(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM every child's process group, wait, then SIGKILL stragglers."""
        for process in reversed(self.processes):
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for process in reversed(self.processes):
            remaining = max(0.0, deadline - time.monotonic())
            try:
                process.popen.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.popen.wait()
        for process in self.processes:
            # The group leader is gone; take down anything it left in its group.
            _signal_group(process, signal.SIGKILL)
        self.processes.clear()


def _signal_group(process: ManagedProcess, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
