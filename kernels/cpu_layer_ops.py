"""ctypes front of ``cpu_layer_ops.c``: rotary + K/V store in one call per layer; greedy argmax;
bf16 RMSNorm and SwiGLU in one pass each."""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from splitserve.kernels.cpu_library import open_library

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


class CPULayerOps:
    """The per-layer glue of the CPU decoder; see ``rope_store``."""

    def __init__(self, library: ctypes.CDLL) -> None:
        fn = library.splitserve_rope_store
        i64, vp = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [vp, ctypes.c_int, i64, i64, i64, i64, i64, vp, vp, i64, vp, vp, vp, i64, vp, i64, i64,
                       ctypes.c_int]
        fn.restype = ctypes.c_int
        self._rope_store = fn
        argmax = library.splitserve_argmax_rows
        argmax.argtypes = [vp, i64, i64, i64, vp, ctypes.c_int]
        argmax.restype = None
        self._argmax = argmax
        norm = library.splitserve_rms_norm
        norm.argtypes = [vp, ctypes.c_int, i64, i64, i64, vp, ctypes.c_float, vp, ctypes.c_int]
        norm.restype = ctypes.c_int
        self._rms_norm = norm
        silu_mul = library.splitserve_silu_mul
        silu_mul.argtypes = [vp, ctypes.c_int, i64, i64, i64, vp, ctypes.c_int]
        silu_mul.restype = ctypes.c_int
        self._silu_mul = silu_mul

    @classmethod
    def load(cls, cache_dir: Path | None = None, level: str | None = None) -> CPULayerOps | None:
        """Load a prebuilt library this CPU runs, else build (once) and load; None, with the
        reason logged, if neither works. ``level`` as in ``CPUPagedAttention.load``."""
        library = open_library("CPU layer ops", cache_dir, level)
        return None if library is None else cls(library)

    def rope_store(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos_cache: torch.Tensor,
                   sin_cache: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                   cache_rows: torch.Tensor, layer: int) -> torch.Tensor:
        """Rotate q and k of ``qkv`` [T, (H + 2 * KVH) * D] (rows of q | k | v,
        unit stride inside a row) by ``positions`` [T] int64, store k and v at
        ``cache_rows`` [T] int64 (rows of the cache viewed as [-1, KVH * D],
        layer 0's K) for ``layer``; returns the rotated query [T, H, D].
        Equals Hugging Face's rotary ops bit for bit; ``cos_cache``/``sin_cache``
        are the fp32 [max_positions, D] tables. Raises ValueError on bad input."""
        head_dim = kv_cache.shape[5]
        num_tokens = qkv.shape[0]
        if qkv.dtype not in _DTYPE_CODES or kv_cache.dtype != qkv.dtype:
            raise ValueError(f"rope_store takes float32/bfloat16 activations and a cache of the same dtype, "
                             f"got {qkv.dtype} / {kv_cache.dtype}")
        if qkv.dim() != 2 or qkv.stride(1) != 1 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
            raise ValueError(f"qkv must be [T, (H + 2 * KVH) * D] rows, got {tuple(qkv.shape)}")
        if kv_cache.shape[4] != num_kv_heads or not kv_cache.is_contiguous():
            raise ValueError("the cache must be contiguous with the model's KV heads")
        for name, t in (("positions", positions), ("cache_rows", cache_rows)):
            if t.dtype != torch.int64 or not t.is_contiguous() or t.shape != (num_tokens,):
                raise ValueError(f"{name} must be a contiguous int64 [T] tensor")
        for t in (cos_cache, sin_cache):
            if t.dtype != torch.float32 or not t.is_contiguous() or t.shape[1] != head_dim:
                raise ValueError("cos/sin tables must be contiguous fp32 [max_positions, head_dim]")
        query = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype)
        num_cache_rows = kv_cache.numel() // (num_kv_heads * head_dim)
        status = self._rope_store(
            qkv.data_ptr(), _DTYPE_CODES[qkv.dtype], num_tokens, qkv.stride(0), num_heads, num_kv_heads,
            head_dim, cos_cache.data_ptr(), sin_cache.data_ptr(), cos_cache.shape[0], positions.data_ptr(),
            query.data_ptr(), kv_cache.data_ptr(), num_cache_rows, cache_rows.data_ptr(), layer,
            kv_cache.shape[3], torch.get_num_threads(),
        )
        if status != 0:
            raise ValueError("rope_store: a position outside the rotary table or a row outside the cache")
        return query

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits.argmax(dim=-1)`` for fp32 CPU [B, V] rows (unit stride inside a
        row), the same indices (first on ties, first NaN); int64 [B]. torch's
        reduction tracks indices element by element, ~28 us for a 32k-token
        row here; this is one vector pass plus a scan. Raises ValueError on
        other input."""
        if (logits.dtype != torch.float32 or logits.dim() != 2 or logits.device.type != "cpu"
                or logits.stride(1) != 1 or logits.shape[1] == 0):
            raise ValueError("argmax takes fp32 CPU [B, V] rows with unit stride and V > 0")
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        self._argmax(logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0), out.data_ptr(),
                     torch.get_num_threads())
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Hugging Face Llama's RMSNorm of bf16 ``x`` [..., N] (unit stride in a
        row) with bf16 ``weight`` [N]: fp32 math, the normalised value rounded
        to bf16 before the weight multiplies it. Equal to torch's ops but for
        an occasional one-ulp difference (another summation order). Raises
        ValueError on other input."""
        n = weight.shape[0]
        if (x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.shape[-1] != n
                or not weight.is_contiguous() or x.stride(-1) != 1):
            raise ValueError("rms_norm takes bf16 [..., N] rows with unit stride and a contiguous bf16 [N] weight")
        rows = x.reshape(-1, n)  # a view for contiguous activations and row slices
        out = torch.empty(rows.shape, dtype=torch.bfloat16)
        self._rms_norm(rows.data_ptr(), _DTYPE_CODES[torch.bfloat16], rows.shape[0], n, rows.stride(0),
                       weight.data_ptr(), float(eps), out.data_ptr(), torch.get_num_threads())
        return out.view(x.shape)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of bf16 rows ``gate_up`` [T, 2 * I] (gate then up,
        unit stride in a row) -> [T, I], with torch's roundings (see
        ``rms_norm`` for the one-ulp caveat). Raises ValueError on other input."""
        if (gate_up.dtype != torch.bfloat16 or gate_up.dim() != 2 or gate_up.shape[1] % 2
                or gate_up.stride(1) != 1):
            raise ValueError("silu_mul takes bf16 [T, 2 * I] rows with unit stride")
        inter = gate_up.shape[1] // 2
        out = torch.empty(gate_up.shape[0], inter, dtype=torch.bfloat16)
        self._silu_mul(gate_up.data_ptr(), _DTYPE_CODES[torch.bfloat16], gate_up.shape[0], inter,
                       gate_up.stride(0), out.data_ptr(), torch.get_num_threads())
        return out
