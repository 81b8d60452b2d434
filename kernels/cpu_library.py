"""Builds the CPU kernels' shared library (``cpu_*.c``, ``cpu_*.h``) on first use.

The sources are compiled with the system C compiler (``$CC``, else ``cc``)
into ``<cache dir>/cpu-kernels/``, keyed by the sources, the flags and this
CPU's feature flags (the build uses ``-march=native``), so a shared home
directory never hands one machine another's binary. Load it after torch so
that its OpenMP runtime is torch's (same soname, so the loader reuses it).

Flags differ per source: the attention kernel may reassociate its sums
(``-ffast-math``; its results are compared with a tolerance), the layer ops
must equal torch's elementwise math bit for bit (no fast-math, no FMA
contraction).
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

_HERE = Path(__file__).parent
COMMON_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c11")
SOURCES = {
    "cpu_paged_attention.c": ("-ffast-math",),
    "cpu_layer_ops.c": ("-ffp-contract=off", "-fno-fast-math"),
}


def build_library(cache_dir: Path | None = None) -> Path:
    """Compile the sources unless this sources/flags/CPU's build exists;
    returns the shared library's path. Building in a private temp dir and
    renaming makes concurrent builds (pods starting together) safe. Raises
    FileNotFoundError without a compiler, CalledProcessError on a failed build."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise FileNotFoundError(f"no C compiler ({compiler}) on PATH")
    parts = [compiler.encode(), " ".join(COMMON_FLAGS).encode(), platform.machine().encode(), _cpu_flags()]
    for name, flags in SOURCES.items():
        parts += [name.encode(), " ".join(flags).encode(), (_HERE / name).read_bytes()]
    for header in sorted(_HERE.glob("*.h")):
        parts += [header.name.encode(), header.read_bytes()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    root = (cache_dir or default_cache_dir()) / "cpu-kernels"
    target = root / f"splitserve_cpu-{key}.so"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as work:
        objects = []
        for name, flags in SOURCES.items():
            obj = str(Path(work) / (name + ".o"))
            _compile([compiler, *COMMON_FLAGS, *flags, "-c", str(_HERE / name), "-o", obj])
            objects.append(obj)
        linked = str(Path(work) / "lib.so")
        _compile([compiler, "-shared", "-fopenmp", *objects, "-o", linked, "-lm"])
        os.replace(linked, target)
    return target


def _compile(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)


def default_cache_dir() -> Path:
    """``$SPLITSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/splitserve`` or ``~/.cache/splitserve``."""
    explicit = os.environ.get("SPLITSERVE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "splitserve"


def _cpu_flags() -> bytes:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.encode()
    except OSError:
        pass
    return platform.processor().encode()
