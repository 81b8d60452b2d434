"""Coalescing block-id pairs into runs and runs into descriptors."""
from __future__ import annotations

import random

import pytest

from splitserve.kvtransfer import BlockRun, coalesce_runs, run_descriptors


def test_consecutive_on_both_sides_is_one_run() -> None:
    assert coalesce_runs([4, 5, 6, 7], [10, 11, 12, 13]) == [BlockRun(4, 10, 4)]


def test_run_breaks_when_either_side_jumps() -> None:
    runs = coalesce_runs([1, 2, 3, 9, 10, 11, 12], [5, 6, 20, 21, 22, 30, 31])
    assert runs == [BlockRun(1, 5, 2), BlockRun(3, 20, 1), BlockRun(9, 21, 2), BlockRun(11, 30, 2)]


def test_descending_ids_are_not_merged() -> None:
    assert coalesce_runs([3, 2], [3, 2]) == [BlockRun(3, 3, 1), BlockRun(2, 2, 1)]


def test_empty() -> None:
    assert coalesce_runs([], []) == []


@pytest.mark.parametrize(
    ("remote", "local", "message"),
    [([1, 2], [1], "exactly one local"), ([1, -2], [1, 2], ">= 0"), ([1, 2], [4, 4], "distinct")],
)
def test_bad_inputs(remote: list[int], local: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        coalesce_runs(remote, local)


def test_runs_expand_back_to_the_pairs() -> None:
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 40)
        remote = rng.sample(range(64), n) if rng.random() < 0.5 else list(range(3, 3 + n))
        local = rng.sample(range(64), n) if rng.random() < 0.5 else list(range(10, 10 + n))
        runs = coalesce_runs(remote, local)
        pairs = [(r.remote_start + i, r.local_start + i) for r in runs for i in range(r.length)]
        assert pairs == list(zip(remote, local))
        for a, b in zip(runs, runs[1:]):  # maximal: no two neighbours could merge
            assert not (b.remote_start == a.remote_start + a.length and b.local_start == a.local_start + a.length)


def test_descriptors_of_each_side() -> None:
    runs = [BlockRun(2, 7, 3), BlockRun(10, 0, 1)]
    assert run_descriptors(runs, base_address=1000, block_bytes=100, device_id=1, remote=True) == [
        (1200, 300, 1), (2000, 100, 1)]
    assert run_descriptors(runs, base_address=5000, block_bytes=100, device_id=0, remote=False) == [
        (5700, 300, 0), (5000, 100, 0)]
