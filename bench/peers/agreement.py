"""Greedy agreement between two systems' output token ids (same workload, same order)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Agreement:
    """How far two greedy runs agree.

    ``exact`` counts requests whose outputs are identical; ``prefix_fraction``
    is the mean, over requests, of the length of the common prefix divided by
    the reference length (1.0 = all identical). The first divergence in fp32
    is usually a near-tie between two logits, after which outputs differ.
    """

    requests: int
    exact: int
    prefix_fraction: float
    first_mismatch: int | None  # index of the first request that differs

    @property
    def all_exact(self) -> bool:
        return self.exact == self.requests


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def token_agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> Agreement:
    """Compare per-request output ids; raises if the two runs have different request counts."""
    if len(reference) != len(other):
        raise ValueError(
            f"runs have {len(reference)} and {len(other)} requests; compare outputs of the same workload"
        )
    exact, fractions, first = 0, [], None
    for i, (a, b) in enumerate(zip(reference, other)):
        same = list(a) == list(b)
        exact += same
        if not same and first is None:
            first = i
        fractions.append(common_prefix(a, b) / len(a) if a else float(not b))
    return Agreement(
        requests=len(reference),
        exact=exact,
        prefix_fraction=sum(fractions) / len(fractions) if fractions else 1.0,
        first_mismatch=first,
    )
