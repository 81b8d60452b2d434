"""Where a running ``splitserve up`` keeps its state: the router's pods file
and ``control.json`` (the address of its control endpoint), so ``splitserve
scale|rollout|status`` find it from the up's ``--port`` alone.

Default folder: ``$TMPDIR/splitserve-<uid>/up-<port>/`` (``--state-dir``
overrides it on both sides).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

PODS_FILE = "pods.json"
CONTROL_FILE = "control.json"


def default_state_dir(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"splitserve-{os.getuid()}" / f"up-{port}"


@dataclass(frozen=True)
class ControlInfo:
    """``control.json``: the control endpoint's URL and the up's pid."""

    url: str
    pid: int
    router_port: int

    def write(self, state_dir: Path) -> None:
        tmp = state_dir / f".{CONTROL_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self)) + "\n", encoding="utf-8")
        os.replace(tmp, state_dir / CONTROL_FILE)

    @classmethod
    def read(cls, state_dir: Path) -> ControlInfo | None:
        """The info of a live up in ``state_dir``; None if none is there (or it died)."""
        try:
            data = json.loads((state_dir / CONTROL_FILE).read_text(encoding="utf-8"))
            info = cls(str(data["url"]), int(data["pid"]), int(data["router_port"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return info if _alive(info.pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
