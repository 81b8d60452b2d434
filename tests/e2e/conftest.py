"""e2e fixtures: the built-in tiny model (4096 positions; its random weights
mostly emit end tokens under a chat template) and a tiny random Llama from
tests/checkpoints.py (512 positions, peaked distributions: varied greedy text
for exactness checks), each written once per session."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from splitserve.engine.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def llama_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import checkpoints

    return checkpoints.llama(tmp_path_factory.mktemp("llama"))
