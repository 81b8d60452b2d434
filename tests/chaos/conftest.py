"""Chaos fixtures: the e2e helpers (tests/e2e/e2e_support.py) on the path, and
the tiny random Llama of tests/checkpoints.py (varied greedy text, so a
token-exact comparison means something), written once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))


@pytest.fixture(scope="session")
def llama_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import checkpoints

    return checkpoints.llama(tmp_path_factory.mktemp("llama"))
