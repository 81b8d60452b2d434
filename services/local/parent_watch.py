"""Exec shim that ties a child to its parent's life: ``python -m
splitserve.local.parent_watch PPID ARGV...`` asks the kernel to SIGTERM it
when the parent dies, checks the parent is still ``PPID`` (it may have died
already), then execs ``ARGV``.

A ``preexec_fn`` would do the same without the extra exec, but it forces
``fork()`` without exec in a parent whose gRPC threads hold locks, and the
child can abort in gRPC's fork handlers before it ever runs its program."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        raise SystemExit("usage: python -m splitserve.local.parent_watch PARENT_PID PROGRAM [ARGS...]")
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(argv[0]):
        raise SystemExit(143)  # the parent is already gone: as if SIGTERMed
    os.execvp(argv[1], argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
