"""Shared pytest setup.

Triton kernels run under the interpreter on machines without CUDA; the switch
must be set before triton is first imported, so it lives here.
"""
from __future__ import annotations

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny random fp32 checkpoints by family name (see tests/checkpoints.py)."""
    import checkpoints

    return checkpoints.build_all(tmp_path_factory.mktemp("checkpoints"))
