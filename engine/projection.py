"""Linear projections of the decoder, fused and (on CPU) prepacked for oneDNN.

A ``Projection`` computes ``x @ W.T + b`` for one or more ``nn.Linear``s
concatenated along the output dim (q/k/v, gate/up), so each is one matmul.

On CPU, ``F.linear`` goes to the BLAS torch was built with, which on this
class of machine reaches well under half of what oneDNN does with a weight
reordered once into its blocked layout (measured 2-3x in fp32, 1.1-1.5x in
bf16 at decode batch sizes). So when ``can_pack_linears`` says oneDNN serves
the dtype, the weight is reordered at load time and every call goes through
``torch.ops.mkldnn._linear_pointwise``; elsewhere (CUDA, fp16, a torch without
oneDNN) the fused dense weight is used with ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def can_pack_linears(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch can run ``dtype`` linears on ``device`` through
    oneDNN with prepacked weights."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(ops._is_mkldnn_bf16_supported())
    return False


class Projection:
    """``x [T, in] -> [T, sum(out)]`` through the weights of ``linears``.

    With ``packed``, the weights are reordered for oneDNN (``batch_size_hint``:
    the row count the blocking is tuned for; any row count works) and the
    Linears' own dense weights are released unless ``keep_dense`` (a weight
    shared with the embedding, say): the Linears must not be called after.
    Without ``packed``, the Linears' parameters become views of the fused
    weight, so memory is not doubled.
    """

    def __init__(self, linears: list[nn.Linear], *, packed: bool, batch_size_hint: int = 64,
                 keep_dense: bool = False) -> None:
        if not linears:
            raise ValueError("a Projection needs at least one Linear")
        with torch.no_grad():
            weight = linears[0].weight if len(linears) == 1 else torch.cat([m.weight for m in linears])
            has_bias = linears[0].bias is not None
            bias = None
            if has_bias:
                bias = linears[0].bias if len(linears) == 1 else torch.cat([m.bias for m in linears])
            self.packed = packed
            self.out_features = weight.shape[0]
            if packed:
                self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(),
                                                                      batch_size_hint)
                self.bias = None if bias is None else bias.detach().clone()
                if not keep_dense:
                    for m in linears:
                        m.weight = nn.Parameter(m.weight.new_empty(0), requires_grad=False)
                        if m.bias is not None:
                            m.bias = nn.Parameter(m.bias.new_empty(0), requires_grad=False)
            else:
                self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
                start = 0
                for m in linears:
                    n = m.weight.shape[0]
                    m.weight = nn.Parameter(self.weight[start:start + n], requires_grad=False)
                    if bias is not None:
                        m.bias = nn.Parameter(self.bias[start:start + n], requires_grad=False)
                    start += n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
