"""Finding and building the CPU kernels' library (splitserve.kernels.cpu_library, cpu_isa).

Portable builds are found by any CPU of their ISA level, whatever its other
flags; a present library loads without a compiler; with neither a compiler
nor a build the engine keeps the torch path. ``SPLITSERVE_CPU_KERNEL_LEVEL``
forces one build, refuses unknown and unrunnable levels, and never falls back.
Other CPUs are described by ``CpuInfo`` values: a level is compiled on any
machine of its ISA but loaded only where the CPU runs it.
"""
from __future__ import annotations

import logging
import platform
import shutil
from pathlib import Path

import pytest
import torch

from cpu_levels import expected_simd
from paged_batch import TOLERANCE, make_batch
from splitserve.engine.attention import CPUAttentionBackend, TorchAttentionBackend, select_backend
from splitserve.kernels.cpu_attention import CPUPagedAttention
from splitserve.kernels.cpu_isa import CpuInfo, best_levels_for, portable_levels
from splitserve.kernels.cpu_layer_ops import CPULayerOps
from splitserve.kernels.cpu_library import (
    LEVEL_ENV,
    find_library,
    forced_level,
    level_of,
    library_path,
)
from splitserve.kernels.paged_attention import paged_attention_reference

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 levels")

_V2 = "fpu sse sse2 ssse3 sse4_1 sse4_2 cx16 lahf_lm popcnt"
_V3 = _V2 + " avx avx2 bmi1 bmi2 f16c fma abm movbe xsave"
_V4 = _V3 + " avx512f avx512bw avx512cd avx512dq avx512vl"


def _cpu(flags: str, machine: str = "x86_64") -> CpuInfo:
    return CpuInfo(machine, frozenset(flags.split()), f"flags\t\t: {flags}".encode())


@pytest.fixture(autouse=True)
def auto_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests set the level themselves; one exported by whoever runs them must not leak in."""
    monkeypatch.delenv(LEVEL_ENV, raising=False)


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")


@x86_only
def test_levels_a_cpu_runs_best_first() -> None:
    assert [lv.name for lv in portable_levels("x86_64")] == ["x86-64-v4", "x86-64-v3", "x86-64-v2"]
    assert [lv.name for lv in best_levels_for(_cpu(_V4 + " sha_ni"))] == ["x86-64-v4", "x86-64-v3", "x86-64-v2"]
    assert [lv.name for lv in best_levels_for(_cpu(_V3))] == ["x86-64-v3", "x86-64-v2"]
    assert best_levels_for(_cpu("fpu sse sse2")) == ()
    assert best_levels_for(_cpu(_V4, machine="aarch64")) == (portable_levels("aarch64")[0],)
    assert portable_levels("riscv64") == ()


@x86_only
@needs_cc
def test_portable_build_is_found_by_another_cpu_of_its_level(tmp_path: Path) -> None:
    built = library_path(tmp_path, cpu=_cpu(_V3), level="x86-64-v3")  # a forced level that is absent: built
    assert [f.name for f in (tmp_path / "cpu-kernels").iterdir()] == [built.name]
    # Other CPUs of level v3 or better: other flags lines, same file.
    assert find_library(tmp_path, _cpu(_V3 + " sha_ni rdrand")) == built
    assert find_library(tmp_path, _cpu(_V4)) == built  # no v4 build here: v3 is the best present
    assert find_library(tmp_path, _cpu(_V2)) is None
    assert find_library(tmp_path, _cpu(_V3, machine="aarch64")) is None


@x86_only
def test_each_level_builds_without_running_it_and_the_best_is_taken(portable_kernels_dir: Path) -> None:
    files = sorted((portable_kernels_dir / "cpu-kernels").iterdir())
    assert sorted(level_of(f) for f in files) == ["x86-64-v2", "x86-64-v3", "x86-64-v4"]
    assert all(f.stat().st_mode & 0o005 == 0o005 for f in files), "other uids must read the prebuilt files"
    assert level_of(find_library(portable_kernels_dir, _cpu(_V4))) == "x86-64-v4"  # found, not loaded
    assert level_of(find_library(portable_kernels_dir, _cpu(_V3))) == "x86-64-v3"


def test_a_present_native_build_comes_first(cpu_kernels_dir: Path, portable_kernels_dir: Path, tmp_path: Path) -> None:
    native = find_library(cpu_kernels_dir)
    assert native is not None and level_of(native) == "native"
    for src in (cpu_kernels_dir, portable_kernels_dir):
        for f in (src / "cpu-kernels").iterdir():
            (tmp_path / "cpu-kernels").mkdir(exist_ok=True)
            shutil.copy2(f, tmp_path / "cpu-kernels" / f.name)
    assert level_of(library_path(tmp_path)) == "native"


@pytest.mark.usefixtures("no_compiler")
def test_prebuilt_portable_library_loads_without_a_compiler(portable_kernels_dir: Path) -> None:
    assert shutil.which("/nonexistent/cc") is None
    kernel = CPUPagedAttention.load(portable_kernels_dir)
    assert kernel is not None and CPULayerOps.load(portable_kernels_dir) is not None
    batch = make_batch([1, 5], [9, 20], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32)
    args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in batch.args()]
    query, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale = args
    out = kernel.forward(query, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale,
                         int(seq_lens.max()), torch.zeros_like(query))
    expected = paged_attention_reference(*args)
    torch.testing.assert_close(out, expected, atol=TOLERANCE[torch.float32], rtol=TOLERANCE[torch.float32])


@pytest.mark.usefixtures("no_compiler")
def test_no_compiler_and_nothing_built_keeps_the_torch_path(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="no C compiler"):
        library_path(tmp_path)
    assert CPUPagedAttention.load(tmp_path) is None and CPULayerOps.load(tmp_path) is None
    monkeypatch.setenv("SPLITSERVE_CACHE_DIR", str(tmp_path))
    backend = select_backend("auto", torch.device("cpu"), head_dim=64, block_size=16)
    assert type(backend) is TorchAttentionBackend  # CPUAttentionBackend is its subclass
    assert not (tmp_path / "cpu-kernels").exists() or not any((tmp_path / "cpu-kernels").iterdir())


@pytest.mark.usefixtures("no_compiler")
def test_auto_backend_takes_the_prebuilt_library(portable_kernels_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSERVE_CACHE_DIR", str(portable_kernels_dir))
    assert isinstance(select_backend("auto", torch.device("cpu"), head_dim=64, block_size=16), CPUAttentionBackend)


def test_cli_shows_the_library_a_pod_would_load(portable_kernels_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from splitserve.cli import main as cli_main

    assert cli_main(["kernels", "show", "--cache-dir", str(portable_kernels_dir)]) == 0
    assert Path(capsys.readouterr().out.strip()) == find_library(portable_kernels_dir)
    assert cli_main(["kernels", "show", "--cache-dir", str(tmp_path)]) == 1
    assert "no prebuilt CPU kernels" in capsys.readouterr().err


def _copy_builds(dst: Path, *sources: Path) -> None:
    (dst / "cpu-kernels").mkdir(exist_ok=True)
    for src in sources:
        for f in (src / "cpu-kernels").iterdir():
            shutil.copy2(f, dst / "cpu-kernels" / f.name)


def test_forced_level_loads_exactly_that_build(cpu_kernels_dir: Path, portable_kernels_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    lowest = best_levels_for(CpuInfo.current())[-1].name  # x86-64-v2 here: never auto's choice
    _copy_builds(tmp_path, cpu_kernels_dir, portable_kernels_dir)
    assert level_of(library_path(tmp_path)) == "native"
    monkeypatch.setenv(LEVEL_ENV, lowest)
    assert level_of(library_path(tmp_path)) == lowest and level_of(find_library(tmp_path)) == lowest
    with caplog.at_level(logging.INFO, logger="splitserve.kernels.cpu_attention"):
        kernel = CPUPagedAttention.load(tmp_path)
    assert kernel is not None and kernel.level == lowest and kernel.simd == expected_simd(lowest)
    assert f"CPU kernels: {lowest} build ({kernel.simd} path)" in caplog.text
    assert CPULayerOps.load(tmp_path) is not None
    monkeypatch.setenv(LEVEL_ENV, "native")
    assert level_of(library_path(tmp_path)) == "native"


def test_auto_and_empty_force_nothing() -> None:
    cpu = CpuInfo.current()
    assert forced_level(cpu, "auto") is None and forced_level(cpu, "") is None
    assert forced_level(cpu, " native ") == "native"


@x86_only
def test_an_unknown_level_is_refused_naming_the_valid_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LEVEL_ENV, "x86-64-v5")
    valid = "valid names: auto, native, x86-64-v4, x86-64-v3, x86-64-v2"
    with pytest.raises(ValueError, match=f"{LEVEL_ENV}='x86-64-v5' is not a CPU kernel level of x86_64; {valid}"):
        library_path(tmp_path, cpu=_cpu(_V4))
    with pytest.raises(ValueError, match="x86-64-v5"):  # the loaders do not swallow it into the torch path
        CPUPagedAttention.load(tmp_path)
    with pytest.raises(ValueError, match="x86-64-v5"):
        CPULayerOps.load(tmp_path)
    assert not (tmp_path / "cpu-kernels").exists()


@x86_only
def test_a_level_the_cpu_cannot_run_is_refused_naming_the_missing_flags(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"x86-64-v4: this CPU cannot run that level; its /proc/cpuinfo flags "
                                         r"lack avx512bw, avx512cd, avx512dq, avx512f, avx512vl; valid names: "
                                         r"auto, native, x86-64-v4, x86-64-v3, x86-64-v2 \(this CPU runs: "
                                         r"x86-64-v3, x86-64-v2\)"):
        library_path(tmp_path, cpu=_cpu(_V3), level="x86-64-v4")
    monkeypatch.setenv(LEVEL_ENV, "x86-64-v3")
    v3_extras = "abm, avx, avx2, bmi1, bmi2, f16c, fma, movbe, xsave"
    with pytest.raises(ValueError, match=rf"lack {v3_extras};.*runs: x86-64-v2\)"):
        find_library(tmp_path, _cpu(_V2))
    with pytest.raises(ValueError, match=r"runs: none"):
        find_library(tmp_path, _cpu("fpu sse sse2"))
    assert not (tmp_path / "cpu-kernels").exists()  # refused before anything was built


@pytest.mark.usefixtures("no_compiler")
def test_a_forced_level_never_falls_back_to_the_torch_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LEVEL_ENV, "native")
    with pytest.raises(FileNotFoundError, match="no C compiler"):
        CPUPagedAttention.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no C compiler"):
        CPULayerOps.load(tmp_path)
    monkeypatch.setenv(LEVEL_ENV, "auto")
    assert CPUPagedAttention.load(tmp_path) is None  # auto: warned, torch path
