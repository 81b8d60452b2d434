"""Which builds of the CPU kernels a CPU can run: the portable ISA levels.

A library compiled with ``-march=native`` runs only on CPUs with the builder's
features, so an image built on one machine would recompile (or fall back to
torch) on another. The portable levels are fixed ``-march`` baselines per
instruction-set architecture; an image carries one build of each, and at run
time the loader takes the best level whose required ``/proc/cpuinfo`` flags
this CPU has. Compiling a level never runs it, so a build machine without
AVX-512 still makes the x86-64-v4 library.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

# psABI x86-64 micro-architecture levels, in /proc/cpuinfo spelling (LZCNT shows as "abm").
_X86_64_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"})
_X86_64_V3 = _X86_64_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_X86_64_V4 = _X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@dataclass(frozen=True)
class IsaLevel:
    """One ``-march`` baseline; ``required_flags`` are what a CPU must report to run it."""

    isa: str
    name: str
    march: str
    required_flags: frozenset[str]

    def runs_on(self, cpu: CpuInfo) -> bool:
        return isa_of(cpu.machine) == self.isa and self.required_flags <= cpu.flags


@dataclass(frozen=True)
class CpuInfo:
    """The running CPU as the loader sees it: ``platform.machine()`` and its
    feature flags (x86 ``flags`` / Arm ``Features`` of /proc/cpuinfo)."""

    machine: str
    flags: frozenset[str]
    flags_line: bytes = b""

    @classmethod
    def current(cls) -> CpuInfo:
        line = b""
        try:
            for text in Path("/proc/cpuinfo").read_text().splitlines():
                if text.startswith(("flags", "Features")):
                    line = text.encode()
                    break
        except OSError:
            pass
        if not line:
            line = platform.processor().encode()
        words = line.decode(errors="replace").partition(":")[2].split()
        return cls(platform.machine(), frozenset(words), line)


# Best first: the loader takes the first level the CPU runs.
_LEVELS: dict[str, tuple[IsaLevel, ...]] = {
    "x86_64": (
        IsaLevel("x86_64", "x86-64-v4", "-march=x86-64-v4", _X86_64_V4),
        IsaLevel("x86_64", "x86-64-v3", "-march=x86-64-v3", _X86_64_V3),
        IsaLevel("x86_64", "x86-64-v2", "-march=x86-64-v2", _X86_64_V2),
    ),
    # The kernels use no intrinsics on Arm; the base ISA already has NEON.
    "aarch64": (IsaLevel("aarch64", "armv8-a", "-march=armv8-a", frozenset()),),
}
_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def isa_of(machine: str) -> str:
    """``platform.machine()`` spelled as a key of the level table (amd64 -> x86_64)."""
    return _ALIASES.get(machine, machine)


def portable_levels(machine: str | None = None) -> tuple[IsaLevel, ...]:
    """The portable levels of ``machine`` (default: this one), best first; empty
    for an ISA without any (then only a native build exists)."""
    return _LEVELS.get(isa_of(machine or platform.machine()), ())


def best_levels_for(cpu: CpuInfo) -> tuple[IsaLevel, ...]:
    """The portable levels ``cpu`` can run, best first."""
    return tuple(level for level in portable_levels(cpu.machine) if level.runs_on(cpu))
