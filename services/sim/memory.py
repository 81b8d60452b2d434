"""This process's resident memory, for the "what one sim pod costs" figure."""
from __future__ import annotations

import resource
import sys


def process_rss_bytes() -> int:
    """Current RSS from /proc (Linux); elsewhere the peak RSS, the closest
    portable figure."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
