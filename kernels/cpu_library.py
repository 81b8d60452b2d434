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
``cc``) on PATH and a writable cache dir. ``$SPLITSERVE_CPU_KERNEL_LEVEL``
(``auto``, the default; ``native``; or a portable level such as
``x86-64-v3``) forces one build instead, found or compiled, so every code path
of the kernels (AVX-512, AVX2 + FMA, generic C) can be run on a CPU that has
the best one. Load the library after torch so that its OpenMP runtime is
torch's (same soname, so the loader reuses it).

Flags differ per source: the attention kernel may reassociate its sums
(``-ffast-math``; its results are compared with a tolerance), the layer ops
must equal torch's elementwise math bit for bit (no fast-math, no FMA
contraction).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from splitserve.kernels.cpu_isa import CpuInfo, IsaLevel, best_levels_for, portable_levels

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
NATIVE = "native"
AUTO = "auto"
LEVEL_ENV = "SPLITSERVE_CPU_KERNEL_LEVEL"
COMMON_FLAGS = ("-O3", "-fopenmp", "-fPIC", "-std=c11")
SOURCES = {
    "cpu_paged_attention.c": ("-ffast-math",),
    "cpu_layer_ops.c": ("-ffp-contract=off", "-fno-fast-math"),
}


def library_path(cache_dir: Path | None = None, cpu: CpuInfo | None = None, level: str | None = None) -> Path:
    """A build this CPU runs. ``level`` (default ``$SPLITSERVE_CPU_KERNEL_LEVEL``,
    else auto) auto: present native, else present portable (best level first),
    else a fresh native build; ``native`` or a portable level's name: exactly
    that build, compiled if absent. Raises ValueError for a level name that is
    unknown or that this CPU cannot run (see ``forced_level``),
    FileNotFoundError when the build is absent and there is no compiler,
    CalledProcessError on a failed build, OSError when the cache dir is not
    writable."""
    cpu = cpu or CpuInfo.current()
    forced = forced_level(cpu, level)
    if forced is None:
        found = find_library(cache_dir, cpu, AUTO)
        return found if found is not None else build_library(cache_dir)
    return build_library(cache_dir, None if forced == NATIVE else forced)


def open_library(what: str, cache_dir: Path | None = None, level: str | None = None) -> ctypes.CDLL | None:
    """Load ``library_path``'s choice (``what`` names the caller in the log).
    In auto mode a build that cannot be had (no compiler, failed build,
    unwritable cache) is logged as a warning and gives None, so the caller
    keeps its torch path; a forced level never falls back: those errors
    propagate, as does ValueError for a bad level."""
    forced = forced_level(CpuInfo.current(), level)
    try:
        return ctypes.CDLL(str(library_path(cache_dir, level=level)))
    except (OSError, subprocess.CalledProcessError, FileNotFoundError) as exc:
        if forced is not None:
            raise
        logger.warning("%s unavailable, using the torch path: %s", what, getattr(exc, "stderr", None) or exc)
        return None


def find_library(cache_dir: Path | None = None, cpu: CpuInfo | None = None, level: str | None = None) -> Path | None:
    """The already-built library ``library_path`` would take, or None; needs no
    compiler. Raises ValueError as ``library_path``."""
    cpu = cpu or CpuInfo.current()
    forced = forced_level(cpu, level)
    root = _root(cache_dir)
    native = root / _file_name(NATIVE, _native_key(_compiler(), cpu))
    if forced == NATIVE:
        candidates = [native]
    elif isinstance(forced, IsaLevel):
        candidates = [root / _file_name(forced.name, _portable_key(forced))]
    else:
        candidates = [native] + [root / _file_name(lv.name, _portable_key(lv)) for lv in best_levels_for(cpu)]
    return next((path for path in candidates if path.exists()), None)


def forced_level(cpu: CpuInfo, level: str | None = None) -> IsaLevel | str | None:
    """The build ``level`` (default ``$SPLITSERVE_CPU_KERNEL_LEVEL``) forces on
    ``cpu``: None for auto (unset or empty too), ``NATIVE``, or a portable
    ``IsaLevel``. Raises ValueError, naming the valid names, for an unknown
    name, and for a level ``cpu`` cannot run, naming the /proc/cpuinfo flags
    it lacks."""
    name = (os.environ.get(LEVEL_ENV, "") if level is None else level).strip() or AUTO
    if name in (AUTO, NATIVE):
        return None if name == AUTO else NATIVE
    levels = {lv.name: lv for lv in portable_levels(cpu.machine)}
    valid = ", ".join([AUTO, NATIVE, *levels])
    runnable = ", ".join(lv.name for lv in best_levels_for(cpu)) or "none"
    if name not in levels:
        raise ValueError(f"{LEVEL_ENV}={name!r} is not a CPU kernel level of {cpu.machine}; "
                         f"valid names: {valid} (this CPU runs: {runnable})")
    chosen = levels[name]
    if not chosen.runs_on(cpu):
        missing = ", ".join(sorted(chosen.required_flags - cpu.flags))
        raise ValueError(f"{LEVEL_ENV}={name}: this CPU cannot run that level; its /proc/cpuinfo flags lack "
                         f"{missing}; valid names: {valid} (this CPU runs: {runnable})")
    return chosen


def level_of(path: Path) -> str:
    """The level a library file was built for (``native`` or a portable level's name)."""
    return path.name.removeprefix("splitserve_cpu-").rsplit("-", 1)[0]


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
