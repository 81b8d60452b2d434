"""Finding and building the CPU kernels' library (splitserve.kernels.cpu_library, cpu_isa).

Portable builds are found by any CPU of their ISA level, whatever its other
flags; a present library loads without a compiler; with neither a compiler
nor a build the engine keeps the torch path. Other CPUs are described by
``CpuInfo`` values (this machine has AVX2, not AVX-512): the x86-64-v4 build
is compiled here but never loaded.
"""
from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest
import torch

from paged_batch import TOLERANCE, make_batch
from splitserve.engine.attention import CPUAttentionBackend, TorchAttentionBackend, select_backend
from splitserve.kernels.cpu_attention import CPUPagedAttention
from splitserve.kernels.cpu_isa import CpuInfo, best_levels_for, portable_levels
from splitserve.kernels.cpu_layer_ops import CPULayerOps
from splitserve.kernels.cpu_library import build_library, build_portable, find_library, library_path
from splitserve.kernels.paged_attention import paged_attention_reference

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 levels")

_V3 = "fpu sse sse2 ssse3 sse4_1 sse4_2 cx16 lahf_lm popcnt avx avx2 bmi1 bmi2 f16c fma abm movbe xsave"
_V4 = _V3 + " avx512f avx512bw avx512cd avx512dq avx512vl"


def _cpu(flags: str, machine: str = "x86_64") -> CpuInfo:
    return CpuInfo(machine, frozenset(flags.split()), f"flags\t\t: {flags}".encode())


@pytest.fixture(scope="module")
def portable_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir with every portable level of this ISA built (and no native build)."""
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    cache_dir = tmp_path_factory.mktemp("portable")
    build_portable(cache_dir)
    return cache_dir


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")


def _level_of(path: Path) -> str:
    return path.name.removeprefix("splitserve_cpu-").rsplit("-", 1)[0]


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
    v3 = next(lv for lv in portable_levels("x86_64") if lv.name == "x86-64-v3")
    built = build_library(tmp_path, v3)
    # Other CPUs of level v3 or better: other flags lines, same file.
    assert find_library(tmp_path, _cpu(_V3 + " sha_ni rdrand")) == built
    assert find_library(tmp_path, _cpu(_V4)) == built  # no v4 build here: v3 is the best present
    assert find_library(tmp_path, _cpu("fpu sse sse2 ssse3 sse4_1 sse4_2 cx16 lahf_lm popcnt")) is None
    assert find_library(tmp_path, _cpu(_V3, machine="aarch64")) is None


@x86_only
def test_each_level_builds_without_running_it_and_the_best_is_taken(portable_dir: Path) -> None:
    files = sorted((portable_dir / "cpu-kernels").iterdir())
    assert sorted(_level_of(f) for f in files) == ["x86-64-v2", "x86-64-v3", "x86-64-v4"]
    assert all(f.stat().st_mode & 0o005 == 0o005 for f in files), "other uids must read the prebuilt files"
    assert _level_of(find_library(portable_dir, _cpu(_V4))) == "x86-64-v4"  # found, not loaded
    assert _level_of(find_library(portable_dir, _cpu(_V3))) == "x86-64-v3"


def test_a_present_native_build_comes_first(cpu_kernels_dir: Path, portable_dir: Path, tmp_path: Path) -> None:
    native = find_library(cpu_kernels_dir)
    assert native is not None and _level_of(native) == "native"
    for src in (cpu_kernels_dir, portable_dir):
        for f in (src / "cpu-kernels").iterdir():
            (tmp_path / "cpu-kernels").mkdir(exist_ok=True)
            shutil.copy2(f, tmp_path / "cpu-kernels" / f.name)
    assert _level_of(library_path(tmp_path)) == "native"


@pytest.mark.usefixtures("no_compiler")
def test_prebuilt_portable_library_loads_without_a_compiler(portable_dir: Path) -> None:
    assert shutil.which("/nonexistent/cc") is None
    kernel = CPUPagedAttention.load(portable_dir)
    assert kernel is not None and CPULayerOps.load(portable_dir) is not None
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
def test_auto_backend_takes_the_prebuilt_library(portable_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSERVE_CACHE_DIR", str(portable_dir))
    assert isinstance(select_backend("auto", torch.device("cpu"), head_dim=64, block_size=16), CPUAttentionBackend)


def test_cli_shows_the_library_a_pod_would_load(portable_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from splitserve.cli import main as cli_main

    assert cli_main(["kernels", "show", "--cache-dir", str(portable_dir)]) == 0
    assert Path(capsys.readouterr().out.strip()) == find_library(portable_dir)
    assert cli_main(["kernels", "show", "--cache-dir", str(tmp_path)]) == 1
    assert "no prebuilt CPU kernels" in capsys.readouterr().err
