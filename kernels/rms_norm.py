"""RMSNorm, optionally fused with the residual add before it (Llama/Qwen2 decoder layers).

Rounding follows Hugging Face's ``LlamaRMSNorm`` so greedy outputs can match
``transformers``: the residual add happens in the model dtype, the mean of
squares and the scaling in fp32, the result is cast back to the model dtype
and only then multiplied by the weight.
"""
from __future__ import annotations

import torch

from splitserve.kernels._triton import FLOAT_DTYPES, check_device, jit, next_power_of_2, require_triton, tl

MAX_HIDDEN = 32768


@jit
def _rms_norm_kernel(
    out_ptr,  # [num_tokens, hidden]
    x_ptr,  # [num_tokens, hidden]
    residual_ptr,  # [num_tokens, hidden]; read and overwritten with x + residual when HAS_RESIDUAL
    weight_ptr,  # [hidden]
    stride_o, stride_x, stride_r,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    # Each op runs in fp32 and rounds to the model dtype where torch would: the same
    # bits as torch's fp16/bf16 arithmetic (which the interpreter cannot do natively).
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(dtype)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
        x = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(x * x, 0) / HIDDEN + eps)
    normed = (x * inv_rms).to(dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    *,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden], updated in place to x + residual
    out: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> torch.Tensor:  # [num_tokens, hidden]
    """Triton ``rms_norm_reference``: ``weight * normalize(x [+ residual])``.

    Contract: ``x``, ``weight``, ``residual`` and ``out`` share one float dtype
    (fp16/bf16/fp32) and device; rows may be strided but each row is
    contiguous; ``hidden <= MAX_HIDDEN``. With ``residual`` the sum
    ``x + residual`` is written back into ``residual`` (the next layer's
    residual stream) before it is normalised. Returns ``out`` (allocated when
    ``None``). Raises ``ValueError``/``TypeError`` before launching on bad input.
    """
    require_triton()
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be [num_tokens, hidden], got {tuple(x.shape)}")
    hidden = x.shape[1]
    if not 0 < hidden <= MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} unsupported (1..{MAX_HIDDEN})")
    if out is None:
        out = torch.empty_like(x)
    named = [("x", x, tuple(x.shape)), ("weight", weight, (hidden,)), ("out", out, tuple(x.shape))]
    if residual is not None:
        named.append(("residual", residual, tuple(x.shape)))
    for name, t, shape in named:
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match x dtype {x.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
        check_device(name, t, x.device)
    if x.shape[0] == 0:
        return out
    res = residual if residual is not None else x
    _rms_norm_kernel[(x.shape[0],)](
        out, x, res, weight, out.stride(0), x.stride(0), res.stride(0), eps,
        HIDDEN=hidden, BLOCK=next_power_of_2(hidden), HAS_RESIDUAL=residual is not None,
        num_warps=4 if hidden <= 4096 else 8,
    )
    return out


def rms_norm_reference(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden], updated in place to x + residual
) -> torch.Tensor:  # [num_tokens, hidden]
    """Torch reference, rounding as ``transformers``' LlamaRMSNorm."""
    if residual is not None:
        residual.add_(x)
        x = residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
