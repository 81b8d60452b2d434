"""CPU speed of the C paged-attention kernels, per build level (``bench/attention_kernels.py --cpu``).

Each build (``native`` and the portable levels of ``kernels/cpu_isa.py``
this CPU runs, or those named by ``--level``; any library file by
``--library``) is loaded in this process and timed on the same data, through
the engine's ``CPUAttentionBackend.forward``, so a row measures what a layer's
attention costs in the engine with that build: decode rows take the per-row
kernel; prefill chunks (more than 16 rows) take the tiled kernel where the
build can tile (``path`` tiled), else the engine's fallback, per-sequence
torch SDPA over a gathered copy (``path`` sdpa).

Shapes: the engine bench model (``bench/bench_models.py``: 8 query heads,
4 KV heads, head_dim 64) and a Llama-3-8B-like layer (32/8, head_dim 128);
block size 16, a two-layer block-major cache on shuffled blocks, fp32 and
bf16. Timing: per shape the builds take turns, ``--rounds`` times (default
3), each turn a warm-up call then at least 5 calls and 0.2 s; a row is the
build's fastest call (``ms``), since on a shared machine other work only adds
time. ``--threads`` torch threads (default 2). Prints a table; ``--json PATH`` writes the rows with the
CPU's model name and flags.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from splitserve.engine.attention import AttentionMetadata, CPUAttentionBackend
from splitserve.kernels.cpu_attention import CPUPagedAttention
from splitserve.kernels.cpu_isa import CpuInfo, best_levels_for
from splitserve.kernels.cpu_library import NATIVE, level_of, library_path

BLOCK_SIZE, NUM_LAYERS = 16, 2
# (kind, num_heads, num_kv_heads, head_dim, num_seqs, q_len per sequence, cached prefix per sequence)
SHAPES = [
    ("decode", 8, 4, 64, 64, 1, 511),
    ("decode", 8, 4, 64, 8, 1, 2047),
    ("decode", 32, 8, 128, 16, 1, 1023),
    ("prefill", 8, 4, 64, 1, 512, 0),
    ("prefill", 8, 4, 64, 4, 256, 256),
    ("prefill", 32, 8, 128, 1, 512, 0),
]
QUICK_SHAPES = [SHAPES[0], SHAPES[3]]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class CpuRow:
    build: str  # "native", a portable level, or "file:<level>:<key>" for a --library file
    simd: str  # the build's vector path: avx512 | avx2 | generic
    kind: str  # decode | prefill
    path: str  # per-row | tiled | sdpa (the engine's fallback where the build cannot tile)
    dtype: str
    heads: str  # query heads / KV heads x head_dim
    num_seqs: int
    q_len: int
    context: int
    ms: float  # fastest call
    rows_per_s: float  # query rows attended per second


def _batch(num_heads: int, num_kv_heads: int, head_dim: int, num_seqs: int, q_len: int, prefix: int,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    context = prefix + q_len
    blocks_per_seq = -(-context // BLOCK_SIZE)
    gen = torch.Generator().manual_seed(0)
    num_blocks = num_seqs * blocks_per_seq
    cache = torch.randn(num_blocks, NUM_LAYERS, 2, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen).view(num_seqs, blocks_per_seq).to(torch.int32)
    query = torch.randn(num_seqs * q_len, num_heads, head_dim, generator=gen).to(dtype)
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(num_seqs * q_len, dtype=torch.int64), block_tables=tables,
        seq_lens=torch.full((num_seqs,), context, dtype=torch.int32),
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32) * q_len,
        max_query_len=q_len, max_seq_len=context, decode_only=q_len == 1)
    return query, cache, metadata


def _fastest_ms(fn: Callable[[], object], min_reps: int = 5, min_s: float = 0.2) -> float:
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def run_shapes(builds: list[tuple[str, CPUPagedAttention]], shapes: list[tuple], dtypes: list[str],
               rounds: int) -> list[CpuRow]:
    """Per shape, every build in turn, ``rounds`` times; a row keeps a build's
    fastest call: on a shared machine other work only ever adds time, and
    taking turns spreads its bursts over every build."""
    backends = [(name, kernel, CPUAttentionBackend(kernel)) for name, kernel in builds]
    rows = []
    for dtype_name in dtypes:
        for kind, num_heads, num_kv_heads, head_dim, num_seqs, q_len, prefix in shapes:
            query, cache, metadata = _batch(num_heads, num_kv_heads, head_dim, num_seqs, q_len, prefix,
                                            DTYPES[dtype_name])
            scale = head_dim**-0.5
            best = [float("inf")] * len(backends)  # by position: two files may share a label
            for _ in range(rounds):
                for i, (_, _, backend) in enumerate(backends):
                    ms = _fastest_ms(lambda: backend.forward(query, cache, 1, metadata, scale))
                    best[i] = min(best[i], ms)
            for i, (name, kernel, backend) in enumerate(backends):
                if q_len <= backend.max_kernel_rows:
                    path = "per-row"
                else:
                    path = "tiled" if kernel.can_tile(head_dim, BLOCK_SIZE) else "sdpa"
                ms = best[i]
                row = CpuRow(name, kernel.simd, kind, path, dtype_name, f"{num_heads}/{num_kv_heads}x{head_dim}",
                             num_seqs, q_len, prefix + q_len, ms, num_seqs * q_len / (ms * 1e-3))
                print(json.dumps(asdict(row)), flush=True)  # a run cut short keeps the rows measured so far
                rows.append(row)
    return rows


def print_table(rows: list[CpuRow]) -> None:
    header = (f"{'build':22} {'simd':7} {'kind':8} {'path':8} {'dtype':9} {'heads':9} {'seqs':>4} "
              f"{'q_len':>5} {'ctx':>5} {'ms':>9} {'rows/s':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.build:22} {r.simd:7} {r.kind:8} {r.path:8} {r.dtype:9} {r.heads:9} {r.num_seqs:>4} "
              f"{r.q_len:>5} {r.context:>5} {r.ms:>9.3f} {r.rows_per_s:>9.0f}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_main(ns: argparse.Namespace) -> int:
    """``bench/attention_kernels.py --cpu``: ``ns`` carries level, library, cache_dir, threads, rounds, quick, json."""
    torch.set_num_threads(ns.threads)
    cpu = CpuInfo.current()
    builds: list[tuple[str, CPUPagedAttention]] = []
    levels = ns.level or ([] if ns.library else [NATIVE, *(lv.name for lv in best_levels_for(cpu))])
    for name in levels:
        kernel = CPUPagedAttention(ctypes.CDLL(str(library_path(ns.cache_dir, level=name))))
        builds.append((name, kernel))
    for path in ns.library or []:
        # The file name's source key tells two builds of one level apart (before/after a change).
        key = Path(path).stem.rpartition("-")[2][:6]
        builds.append((f"file:{level_of(Path(path))}:{key}",
                       CPUPagedAttention(ctypes.CDLL(str(Path(path).resolve())))))
    shapes = QUICK_SHAPES if ns.quick else SHAPES
    rows = run_shapes(builds, shapes, list(DTYPES), ns.rounds)
    machine = f"{_cpu_model()}, {ns.threads} torch threads, {torch.__version__}"
    print(f"cpu: {machine}")
    print_table(rows)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"cpu": machine, "cpu_flags": sorted(cpu.flags), "rows": [asdict(r) for r in rows]},
                      f, indent=2)
    return 0
