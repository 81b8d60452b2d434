"""Finds, or builds on first use, the CPU kernels' shared library (``cpu_*.c``, ``cpu_*.h``).

Two kinds of build live in ``<cache dir>/cpu-kernels/``:

- **portable** (``splitserve_cpu-<level>-<key>.so``): one per ISA level of
  ``cpu_isa`` (x86-64-v4/v3/v2, armv8-a), keyed by the sources and flags
  only, so any CPU of that level finds it. ``build_portable`` makes them
  (the container image does, into a read-only ``/opt/splitserve-cache``).
- **native** (``splitserve_cpu-native-<key>.so``): ``-march=native``, keyed
  also by the compiler's name and this CPU's feature flags, so a shared home
  directory never hands one machine another's binary.

``library_path`` (what the kernels' ``load()`` calls) takes a native build of
this CPU if one exists, else the best portable level this CPU runs, and only
when neither exists compiles the native build, which needs ``$CC`` (else
``cc``) on PATH and a writable cache dir. Load the library after torch so that
its OpenMP runtime is torch's (same soname, so the loader reuses it).

Flags differ per source: the attention kernel may reassociate its sums
(``-ffast-math``; its results are compared with a tolerance), the layer ops
must equal torch's elementwise math bit for bit (no fast-math, no FMA
contraction).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from splitserve.kernels.cpu_isa import CpuInfo, IsaLevel, best_levels_for, portable_levels

_HERE = Path(__file__).parent
NATIVE = "native"
COMMON_FLAGS = ("-O3", "-fopenmp", "-fPIC", "-std=c11")
SOURCES = {
    "cpu_paged_attention.c": ("-ffast-math",),
    "cpu_layer_ops.c": ("-ffp-contract=off", "-fno-fast-math"),
}


def library_path(cache_dir: Path | None = None, cpu: CpuInfo | None = None) -> Path:
    """A build this CPU runs: present native, else present portable (best
    level first), else a fresh native build. Raises FileNotFoundError when
    nothing is built and there is no compiler, CalledProcessError on a failed
    build, OSError when the cache dir is not writable."""
    found = find_library(cache_dir, cpu)
    return found if found is not None else build_library(cache_dir)


def find_library(cache_dir: Path | None = None, cpu: CpuInfo | None = None) -> Path | None:
    """The already-built library ``library_path`` would take, or None; needs no compiler."""
    cpu = cpu or CpuInfo.current()
    root = _root(cache_dir)
    candidates = [root / _file_name(NATIVE, _native_key(_compiler(), cpu))]
    candidates += [root / _file_name(level.name, _portable_key(level)) for level in best_levels_for(cpu)]
    return next((path for path in candidates if path.exists()), None)


def build_library(cache_dir: Path | None = None, level: IsaLevel | None = None) -> Path:
    """Compile the native build (``level`` None) or a portable ``level`` unless
    it exists; returns its path. Never loads or runs what it compiles, so any
    level of this ISA builds here. Building in a private temp dir and renaming
    makes concurrent builds (pods starting together) safe. Raises
    FileNotFoundError without a compiler, CalledProcessError on a failed build."""
    compiler = _compiler()
    if level is None:
        target = _root(cache_dir) / _file_name(NATIVE, _native_key(compiler, CpuInfo.current()))
        march = "-march=native"
    else:
        target = _root(cache_dir) / _file_name(level.name, _portable_key(level))
        march = level.march
    if target.exists():
        return target
    if shutil.which(compiler) is None:
        raise FileNotFoundError(f"no C compiler ({compiler}) on PATH and no prebuilt CPU kernels in {target.parent}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        objects = []
        for name, flags in SOURCES.items():
            obj = str(Path(work) / (name + ".o"))
            _compile([compiler, *COMMON_FLAGS, march, *flags, "-c", str(_HERE / name), "-o", obj])
            objects.append(obj)
        linked = Path(work) / "lib.so"
        _compile([compiler, "-shared", "-fopenmp", *objects, "-o", str(linked), "-lm"])
        linked.chmod(0o755)  # readable by other uids: an image builds as root, runs as uid 1000
        os.replace(linked, target)
    return target


def build_portable(cache_dir: Path | None = None, machine: str | None = None) -> list[Path]:
    """Build every portable level of this ISA (the image build calls this);
    returns their paths, best level first. Raises as ``build_library``, and
    ValueError for an ISA without portable levels."""
    levels = portable_levels(machine)
    if not levels:
        raise ValueError(f"no portable CPU kernel levels for {machine or CpuInfo.current().machine}; "
                         f"only the native build exists there")
    return [build_library(cache_dir, level) for level in levels]


def default_cache_dir() -> Path:
    """``$SPLITSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/splitserve`` or ``~/.cache/splitserve``."""
    explicit = os.environ.get("SPLITSERVE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "splitserve"


def _root(cache_dir: Path | None) -> Path:
    return (cache_dir or default_cache_dir()) / "cpu-kernels"


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def _file_name(level_name: str, key: str) -> str:
    return f"splitserve_cpu-{level_name}-{key}.so"


def _source_parts() -> list[bytes]:
    parts = [" ".join(COMMON_FLAGS).encode()]
    for name, flags in SOURCES.items():
        parts += [name.encode(), " ".join(flags).encode(), (_HERE / name).read_bytes()]
    for header in sorted(_HERE.glob("*.h")):
        parts += [header.name.encode(), header.read_bytes()]
    return parts


def _portable_key(level: IsaLevel) -> str:
    return _digest([level.isa.encode(), level.march.encode(), *_source_parts()])


def _native_key(compiler: str, cpu: CpuInfo) -> str:
    return _digest([compiler.encode(), b"-march=native", cpu.machine.encode(), cpu.flags_line, *_source_parts()])


def _digest(parts: list[bytes]) -> str:
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _compile(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
