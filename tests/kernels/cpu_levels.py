"""The builds of the CPU kernels this machine runs, and what each must have compiled.

Every kernel test that takes the ``cpu_level`` fixture runs once per build:
``native`` and each portable level of ``kernels/cpu_isa.py`` this CPU runs
(on an AVX-512 machine: x86-64-v4, v3 and v2, so the AVX-512, AVX2 and
generic C paths all run here).
"""
from __future__ import annotations

from splitserve.kernels.cpu_isa import CpuInfo, best_levels_for
from splitserve.kernels.cpu_library import NATIVE

RUNNABLE_LEVELS = [NATIVE, *(level.name for level in best_levels_for(CpuInfo.current()))]
_PORTABLE_SIMD = {"x86-64-v4": "avx512", "x86-64-v3": "avx2", "x86-64-v2": "generic", "armv8-a": "generic"}
_VECTOR_WIDTH = {"avx512": 16, "avx2": 8}


def expected_simd(level: str, cpu: CpuInfo | None = None) -> str:
    """The vector path a build of ``level`` must report (``native``: the best ``cpu`` has)."""
    if level != NATIVE:
        return _PORTABLE_SIMD[level]
    flags = (cpu or CpuInfo.current()).flags
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "generic"


def expected_can_tile(simd: str, head_dim: int, block_size: int) -> bool:
    """Whether a build with vector path ``simd`` must tile these shapes: head_dim
    a multiple of its width (up to 256), blocks a multiple or divisor of it."""
    width = _VECTOR_WIDTH.get(simd)
    if width is None:
        return False
    fits = block_size % width == 0 if block_size > width else width % block_size == 0
    return head_dim % width == 0 and head_dim <= 256 and fits
