"""Is a process still running? (For tests that kill, freeze or drain processes.)"""
from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie still answers
    ``kill(pid, 0)``; its state in ``/proc/PID/stat`` says ``Z``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
