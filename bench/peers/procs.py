"""Start children in their own process groups and stop them by pid.

Each child gets a new session (so its pgid is its pid and a stop reaches the
grandchildren it spawns, e.g. vLLM's engine core) and asks the kernel to
SIGTERM it if this process dies. :func:`stop_process_group` sends SIGTERM to
the group, waits, then SIGKILLs whatever is left.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start_process_group(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as the leader of a new process group (pgid == pid).

    ``env`` replaces the environment if given; stdout+stderr go to
    ``log_path`` (appended) or are inherited.
    """
    log = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    finally:
        if log is not None:
            log.close()


def group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes whose process group is ``pgid`` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop_process_group(proc: subprocess.Popen[bytes], term_timeout_s: float = 15.0) -> int | None:
    """Stop ``proc`` and every process in its group: SIGTERM, wait, then SIGKILL.

    The group is addressed by the leader's pid (it was started with
    :func:`start_process_group`). Returns the leader's exit code.
    """
    pgid = proc.pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + term_timeout_s
    while time.monotonic() < deadline:
        proc.poll()
        if proc.returncode is not None and not group_members(pgid):
            break
        time.sleep(0.1)
    if group_members(pgid) or proc.poll() is None:
        _signal_group(pgid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL did not land
        raise RuntimeError(f"process {pgid} survived SIGKILL; check `ps -g {pgid}`") from None
    deadline = time.monotonic() + 5
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc.returncode
