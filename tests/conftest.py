"""Shared pytest setup.

Triton kernels run under the interpreter on machines without CUDA; the switch
must be set before triton is first imported, so it lives here.
"""
from __future__ import annotations

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
