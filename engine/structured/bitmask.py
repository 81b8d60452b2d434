"""Next-token masks for a step's constrained rows: filled by llguidance while
the forward runs, applied to the logits in one batched op.

A bitmask row holds ``ceil(V / 32)`` int32 words; bit ``t % 32`` of word
``t // 32`` set means token ``t`` is allowed (llguidance's layout).
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from splitserve.engine.structured.matcher import RequestMatcher

if TYPE_CHECKING:
    import llguidance


@dataclass(frozen=True)
class TokenBitmask:
    """Allowed next tokens of some rows of a step's sampling batch."""

    rows: torch.Tensor  # [C] int64, on the logits' device: which sampling rows
    bits: torch.Tensor  # [C, ceil(V/32)] int32, on the logits' device


class PendingBitmask:
    """A fill in flight; ``result`` waits for it (and re-raises its error)."""

    def __init__(self, rows: list[int], device: torch.device, future: Future[torch.Tensor] | None = None,
                 bits: torch.Tensor | None = None) -> None:
        self._rows = rows
        self._device = device
        self._future = future
        self._bits = bits

    def result(self) -> TokenBitmask:
        bits = self._future.result() if self._future is not None else self._bits
        assert bits is not None
        rows = torch.tensor(self._rows, dtype=torch.int64)
        if self._device.type != "cpu":
            return TokenBitmask(rows.to(self._device, non_blocking=True), bits.to(self._device, non_blocking=True))
        return TokenBitmask(rows, bits)

    def wait_quietly(self) -> None:
        """Wait for the fill without raising (the step failed anyway)."""
        if self._future is not None:
            self._future.exception()


class BitmaskFiller:
    """Fills the bitmasks of a step's constrained rows for one model runner.

    ``start`` is called on the engine thread before the forward is launched;
    with ``overlap`` the masks are computed by llguidance's thread pool from
    a worker thread (llguidance drops the GIL) while the forward runs, else
    at once. Nothing is created before the first constrained step.
    """

    def __init__(self, device: torch.device, overlap: bool = True) -> None:
        self.device = device
        self.overlap = overlap
        self._executor: llguidance.LLExecutor | None = None
        self._worker: ThreadPoolExecutor | None = None

    def start(self, rows: Sequence[int], matchers: Sequence[RequestMatcher]) -> PendingBitmask:
        """Begin filling one mask per (row, matcher)."""
        rows = list(rows)
        matchers = list(matchers)
        if not self.overlap:
            return PendingBitmask(rows, self.device, bits=self._fill(matchers))
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitserve-masks")
        return PendingBitmask(rows, self.device, future=self._worker.submit(self._fill, matchers))

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def _fill(self, matchers: list[RequestMatcher]) -> torch.Tensor:
        import llguidance

        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        words = matchers[0].mask_words  # one tokenizer per engine: every matcher agrees
        pinned = self.device.type == "cuda"
        bits = torch.empty((len(matchers), words), dtype=torch.int32, pin_memory=pinned)
        pairs = [(m.ll_matcher, i) for i, m in enumerate(matchers)]
        self._executor.unsafe_compute_mask_ptr(pairs, bits.data_ptr(), words * 4, len(matchers))
        return bits


def unpack_bitmask(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[C, W] int32 words -> [C, vocab_size] bool, True where allowed
    (``W * 32 >= vocab_size``: masks cover the model's whole vocabulary)."""
    if bits.device.type == "cpu":
        as_bytes = bits.contiguous().numpy().view(np.uint8)
        unpacked = np.unpackbits(as_bytes, axis=1, count=vocab_size, bitorder="little")
        return torch.from_numpy(unpacked).bool()
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    unpacked = (bits.unsqueeze(-1) >> shifts) & 1
    return unpacked.flatten(1)[:, :vocab_size].bool()


def apply_token_bitmask(logits: torch.Tensor, mask: TokenBitmask) -> torch.Tensor:
    """``logits`` [B, V] with every token a mask row disallows set to -inf
    (in place; returned for chaining). Rows without a mask are untouched."""
    allowed = unpack_bitmask(mask.bits, logits.shape[-1])
    if mask.rows.numel() == logits.shape[0]:
        # Every row is constrained, and rows are listed in order.
        logits.masked_fill_(~allowed, float("-inf"))
        return logits
    logits[mask.rows] = logits[mask.rows].masked_fill(~allowed, float("-inf"))
    return logits
