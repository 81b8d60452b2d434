"""Optional Triton import and the launch checks the kernel files share.

Triton is an optional dependency: the torch references in the kernel files must
import on a machine without it. Kernels are decorated with :func:`jit`, which
is ``triton.jit`` when Triton is present and leaves the function as plain
Python otherwise (it is then never launched: :func:`require_triton` raises
first). With ``from __future__ import annotations`` the ``tl.constexpr``
annotations are strings, so defining a kernel never touches ``tl``.
"""
from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the references stay usable without triton
    triton = None
    tl = None

F = TypeVar("F", bound=Callable[..., Any])

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def jit(fn: F) -> F:
    """``triton.jit`` when Triton is installed; the undecorated function otherwise."""
    if triton is None:
        return fn
    return triton.jit(fn)  # type: ignore[return-value]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require_triton() -> None:
    if triton is None:
        raise RuntimeError(
            "Triton is not installed; use the *_reference functions (the torch backend) "
            "or install splitserve[triton]"
        )


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    """Every tensor on ``device``; CPU only when the interpreter runs the kernels."""
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device} (all inputs on one device)")
    if tensor.device.type == "cpu" and not interpreting():
        raise ValueError(
            f"{name} is a CPU tensor: the Triton kernels need a GPU (or TRITON_INTERPRET=1); "
            "on CPU use the *_reference functions"
        )


def check_index(name: str, tensor: torch.Tensor, ndim: int) -> None:
    if tensor.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {tensor.dtype}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    if tensor.numel() > 0 and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {tensor.stride()}")


def check_kv_cache(kv_cache: torch.Tensor, layer: int, block_sizes: tuple[int, ...]) -> None:
    """The block-major cache ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``."""
    if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
        raise ValueError(
            "kv_cache must be [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], "
            f"got shape {tuple(kv_cache.shape)}"
        )
    if kv_cache.dtype not in FLOAT_DTYPES:
        raise TypeError(f"kv_cache must be float16, bfloat16 or float32, got {kv_cache.dtype}")
    if kv_cache.stride(-1) != 1:
        raise ValueError(f"kv_cache must be contiguous in head_dim, got strides {kv_cache.stride()}")
    if not 0 <= layer < kv_cache.shape[1]:
        raise ValueError(f"layer {layer} out of range for a cache with {kv_cache.shape[1]} layers")
    if kv_cache.shape[3] not in block_sizes:
        raise ValueError(f"block_size {kv_cache.shape[3]} unsupported; supported: {block_sizes}")
