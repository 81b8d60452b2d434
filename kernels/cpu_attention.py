"""The CPU paged-attention kernel (``cpu_paged_attention.c``).

The torch path gathers every sequence's context into a dense copy per layer
and step; on a CPU that copy (and its transpose) costs more than the
attention math. The C kernel reads K/V blocks where they lie in the cache.
``CPUPagedAttention.load()`` loads a prebuilt library or builds it on first
use (``cpu_library``; ``$SPLITSERVE_CPU_KERNEL_LEVEL`` forces a build) and
returns None (saying why in the log) when neither works; callers then keep
the torch path.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from splitserve.kernels.cpu_library import level_of, open_library

logger = logging.getLogger(__name__)

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_ERRORS = {-1: "bad shape arguments (a context longer than max_seq_len, or a bad layer)",
           -2: "out of memory", -3: "a block table entry outside the cache",
           -4: "shapes this build cannot tile (see can_tile)"}
SUPPORTED_DTYPES = tuple(_DTYPE_CODES)


class CPUPagedAttention:
    """ctypes front of the compiled kernel; see ``forward``. ``level`` is the
    build loaded (``native`` or a portable level, e.g. ``x86-64-v3``) and
    ``simd`` the code path that build compiled (``avx512``, ``avx2`` or
    ``generic``)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.level = level_of(Path(library._name))
        simd = library.splitserve_kernel_simd
        simd.argtypes = []
        simd.restype = ctypes.c_char_p
        self.simd: str = simd().decode()
        fn = library.splitserve_paged_attention
        i64, i32p = ctypes.c_int64, ctypes.POINTER(ctypes.c_int32)
        fn.argtypes = [
            ctypes.c_void_p, ctypes.c_int, i64, i64,
            ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_int, i64, i64, i64,
            i64, i64, i64, i64,
            i32p, i64,
            i32p, i32p, i64,
            i64, i64, ctypes.c_float, ctypes.c_int,
        ]
        fn.restype = ctypes.c_int
        self._fn = fn
        tiled = library.splitserve_paged_attention_tiled
        tiled.argtypes = fn.argtypes[:19] + [i64, ctypes.c_float, ctypes.c_int]
        tiled.restype = ctypes.c_int
        self._tiled = tiled
        can_tile = library.splitserve_can_tile
        can_tile.argtypes = [i64, i64]
        can_tile.restype = ctypes.c_int
        self._can_tile = can_tile

    def can_tile(self, head_dim: int, block_size: int) -> bool:
        """Whether ``forward_tiled`` takes these shapes in this build (AVX-512, head_dim % 16 == 0, ...)."""
        return bool(self._can_tile(head_dim, block_size))

    @classmethod
    def load(cls, cache_dir: Path | None = None, level: str | None = None) -> CPUPagedAttention | None:
        """Load a prebuilt library this CPU runs, else build (once per source, flags and CPU)
        and load; None if neither works. ``level`` (default
        ``$SPLITSERVE_CPU_KERNEL_LEVEL``) forces a build; a forced one that
        cannot be had raises (``cpu_library.open_library``)."""
        library = open_library("CPU attention kernel", cache_dir, level)
        if library is None:
            return None
        kernel = cls(library)
        logger.info("CPU kernels: %s build (%s path), %s", kernel.level, kernel.simd, library._name)
        return kernel

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, max_seq_len: int,
                out: torch.Tensor, max_rows_per_seq: int | None = None) -> torch.Tensor:
        """Causal paged attention of ``query`` [T, H, D] into ``out`` (contiguous, query's dtype).

        ``block_tables`` [S, W], ``seq_lens`` [S] and ``query_start_loc``
        [S + 1] are int32 CPU tensors, contiguous; ``max_seq_len`` bounds
        ``seq_lens``. Sequences with more than ``max_rows_per_seq`` query rows
        are skipped (their ``out`` rows untouched). Raises ValueError on
        arguments the kernel cannot take.
        """
        args = _common_args(query, kv_cache, layer, block_tables, seq_lens, query_start_loc, out)
        status = self._fn(*args, query.shape[0] if max_rows_per_seq is None else max_rows_per_seq,
                          max(1, max_seq_len), float(scale), torch.get_num_threads())
        if status != 0:
            raise ValueError(f"CPU attention kernel: {_ERRORS.get(status, status)}")
        return out

    def forward_tiled(self, query: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, out: torch.Tensor,
                      min_rows: int = 1) -> torch.Tensor:
        """``forward`` for prefill chunks: flash attention over tiles of rows,
        for the sequences with at least ``min_rows`` rows (the others' ``out``
        rows untouched). Needs ``can_tile``; same arguments and errors."""
        args = _common_args(query, kv_cache, layer, block_tables, seq_lens, query_start_loc, out)
        status = self._tiled(*args, max(1, min_rows), float(scale), torch.get_num_threads())
        if status != 0:
            raise ValueError(f"CPU attention kernel: {_ERRORS.get(status, status)}")
        return out


def _common_args(query: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, query_start_loc: torch.Tensor, out: torch.Tensor) -> list:
    """Check the tensors both kernels share and lay them out as their first 19 C arguments."""
    if query.dtype not in _DTYPE_CODES or kv_cache.dtype not in _DTYPE_CODES:
        raise ValueError(f"CPU attention supports {SUPPORTED_DTYPES}, got {query.dtype} / {kv_cache.dtype}")
    if query.device.type != "cpu" or kv_cache.device.type != "cpu":
        raise ValueError("CPU attention needs CPU tensors")
    if query.stride(2) != 1 or not kv_cache.is_contiguous() or not out.is_contiguous():
        raise ValueError("CPU attention needs head_dim-contiguous query rows and contiguous cache and out")
    if out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError("out must match the query's shape and dtype")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens),
                    ("query_start_loc", query_start_loc)):
        if t.dtype != torch.int32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous int32 CPU tensor")
    num_blocks, num_layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_seqs + 1 or block_tables.shape[0] != num_seqs:
        raise ValueError("block_tables, seq_lens and query_start_loc disagree on the number of sequences")
    if query.shape[2] != head_dim or query.shape[1] % num_kv_heads:
        raise ValueError(f"query {tuple(query.shape)} does not fit the cache's {num_kv_heads} KV heads "
                         f"of size {head_dim}")
    i32p = ctypes.POINTER(ctypes.c_int32)
    return [
        query.data_ptr(), _DTYPE_CODES[query.dtype], query.stride(0), query.stride(1),
        out.data_ptr(),
        kv_cache.data_ptr(), _DTYPE_CODES[kv_cache.dtype], num_blocks, num_layers, layer,
        block_size, num_kv_heads, head_dim, query.shape[1],
        ctypes.cast(block_tables.data_ptr(), i32p), block_tables.shape[1],
        ctypes.cast(seq_lens.data_ptr(), i32p), ctypes.cast(query_start_loc.data_ptr(), i32p), num_seqs,
    ]
