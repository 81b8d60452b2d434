"""The pods file ``splitserve up`` writes for the router's file discovery:
the contract's format, atomic replacement, clear errors for a bad file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitserve.local.pods_file import PodsFileEntry, read_pods_file, write_pods_file


def test_round_trip_in_the_contract_format(tmp_path: Path) -> None:
    path = tmp_path / "pods.json"
    entries = [PodsFileEntry("prefill", "127.0.0.1:50051"), PodsFileEntry("decode", "127.0.0.1:50052", "draining")]
    write_pods_file(path, entries)
    assert json.loads(path.read_text()) == {"version": 1, "pods": [
        {"role": "prefill", "address": "127.0.0.1:50051", "state": "ready"},
        {"role": "decode", "address": "127.0.0.1:50052", "state": "draining"}]}
    assert read_pods_file(path) == entries
    write_pods_file(path, [])
    assert read_pods_file(path) == [] and [p.name for p in tmp_path.iterdir()] == ["pods.json"]  # no temp left


def test_bad_entries_and_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="role"):
        PodsFileEntry("router", "h:1")
    with pytest.raises(ValueError, match="state"):
        PodsFileEntry("decode", "h:1", "gone")
    with pytest.raises(ValueError, match="HOST:PORT"):
        PodsFileEntry("decode", "nohost")
    path = tmp_path / "pods.json"
    for body, words in (("{", "not JSON"), ('{"version": 2, "pods": []}', "version"),
                        ('{"version": 1, "pods": [{"role": "decode"}]}', "lacks 'address'")):
        path.write_text(body)
        with pytest.raises(ValueError, match=words):
            read_pods_file(path)
