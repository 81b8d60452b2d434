"""Triton RMSNorm (optionally fused with the residual add) against the torch reference.

The interpreter's fp32 -> bf16 cast does not round to nearest even as torch and
the GPU do, so bf16 is compared with a tolerance there and bit-exactly elsewhere.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from paged_batch import TOLERANCE, kernel_device  # noqa: E402

from splitserve.kernels._triton import interpreting  # noqa: E402

from splitserve.kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96])
@pytest.mark.parametrize("fused_residual", [False, True])
def test_matches_reference(dtype, hidden, fused_residual) -> None:
    gen = torch.Generator().manual_seed(0)
    device = kernel_device()
    x = torch.randn(5, 2 * hidden, generator=gen).to(device=device, dtype=dtype)[:, :hidden]  # strided rows
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device=device, dtype=dtype)
    residual = torch.randn(5, hidden, generator=gen).to(device=device, dtype=dtype) if fused_residual else None
    expected_residual = residual.clone() if residual is not None else None
    expected = rms_norm_reference(x, weight, 1e-6, expected_residual)
    got = rms_norm(x, weight, 1e-6, residual=residual)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    if residual is not None:
        if dtype == torch.bfloat16 and interpreting():
            torch.testing.assert_close(residual, expected_residual, atol=tol, rtol=tol)
        else:
            assert torch.equal(residual, expected_residual)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"x": torch.zeros(2, 8, dtype=torch.int32)}, TypeError, "x must be float16"),
        ({"weight": torch.zeros(8, dtype=torch.float16)}, TypeError, "weight dtype"),
        ({"weight": torch.zeros(4)}, ValueError, "weight must have shape"),
        ({"residual": torch.zeros(3, 8)}, ValueError, "residual must have shape"),
        ({"x": torch.zeros(8, 2).t()}, ValueError, "x must be contiguous"),
        ({"x": torch.zeros(2, 2, 8)}, ValueError, r"x must be \[num_tokens, hidden\]"),
    ],
)
def test_bad_input_raises(kwargs, error, match) -> None:
    args = {"x": torch.zeros(2, 8), "weight": torch.ones(8), "residual": None} | kwargs
    with pytest.raises(error, match=match):
        rms_norm(args["x"], args["weight"], 1e-6, residual=args["residual"])
