"""The model-serving engine shared by prefill, decode and unified pods.

``from splitserve.engine import LLM, SamplingParams`` is the offline API.
Heavy modules (torch) load lazily so that light users -- the router importing
``splitserve.engine.block_hash`` -- do not pay for them.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY_EXPORTS = {
    "LLM": "splitserve.engine.llm",
    "SamplingParams": "splitserve.engine.sampling_params",
    "EngineArgs": "splitserve.engine.engine_args",
    "AsyncEngine": "splitserve.engine.async_engine",
}

__all__ = sorted(_LAZY_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'splitserve.engine' has no attribute {name!r}")
    return getattr(import_module(module), name)
