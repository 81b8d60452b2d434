"""The pods file of ``splitserve up``: the router's ``--discovery file`` source.

Format (the runtime contract shared with the router)::

    {"version": 1, "pods": [{"role": "prefill", "address": "127.0.0.1:50051", "state": "ready"}, ...]}

``state`` "ready": eligible once its GetLoad answers; "draining": no new work,
what it runs finishes; a pod absent from the file is removed. The launcher
rewrites the file whenever a pod is added, drained or removed, always by
write-to-temp + ``os.replace`` so the router never reads half a file.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

PODS_FILE_VERSION = 1
POD_STATES = ("ready", "draining")
ROLES = ("prefill", "decode", "unified")


@dataclass(frozen=True)
class PodsFileEntry:
    role: str
    address: str
    state: str = "ready"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"pods file: role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.state not in POD_STATES:
            raise ValueError(f"pods file: state must be one of {', '.join(POD_STATES)}, got {self.state!r}")
        if not self.address or ":" not in self.address:
            raise ValueError(f"pods file: address must be HOST:PORT, got {self.address!r}")


def write_pods_file(path: Path, entries: Iterable[PodsFileEntry]) -> None:
    """Replace ``path`` atomically with ``entries`` (the parent folder must exist)."""
    body = json.dumps({"version": PODS_FILE_VERSION, "pods": [asdict(e) for e in entries]}, indent=1)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(body + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def read_pods_file(path: Path) -> list[PodsFileEntry]:
    """The entries of a pods file; ``ValueError`` with the reason if it is malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != PODS_FILE_VERSION:
        raise ValueError(f"{path}: expected an object with \"version\": {PODS_FILE_VERSION}")
    pods = data.get("pods")
    if not isinstance(pods, list) or not all(isinstance(p, dict) for p in pods):
        raise ValueError(f"{path}: \"pods\" must be a list of objects")
    try:
        return [PodsFileEntry(str(p["role"]), str(p["address"]), str(p.get("state", "ready"))) for p in pods]
    except KeyError as exc:
        raise ValueError(f"{path}: a pod lacks {exc}") from None
