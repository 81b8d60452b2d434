"""Prefill-side lease table: reserve / claim / release / expire."""
from __future__ import annotations

import pytest

from splitserve.kvtransfer import LeaseNotFoundError, LeaseTable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(clock: Clock) -> LeaseTable:
    return LeaseTable(claim_timeout_s=60.0, clock=clock)


def _assert_empty(table: LeaseTable) -> None:
    assert len(table) == 0
    assert table.num_leased_blocks == 0


def test_reserve_claim_release(table: LeaseTable) -> None:
    table.reserve("r1", [3, 4, 9], ttl_seconds=5)
    table.reserve("r2", [1], ttl_seconds=5)
    assert table.num_leased_blocks == 4
    assert table.claim("r1") == (3, 4, 9)
    assert table.release("r1") == (3, 4, 9)
    assert table.release("r2") == (1,)
    assert table.leases_released == 2 and table.leases_expired == 0
    _assert_empty(table)


def test_unclaimed_lease_expires_at_ttl(table: LeaseTable, clock: Clock) -> None:
    table.reserve("r1", [1, 2], ttl_seconds=5)
    table.reserve("r2", [3], ttl_seconds=50)
    clock.now += 4.9
    assert table.expire() == []
    clock.now += 0.1
    assert table.expire() == [("r1", (1, 2))]
    assert table.leases_expired == 1 and table.num_leased_blocks == 1
    with pytest.raises(LeaseNotFoundError):
        table.claim("r1")
    assert table.expire(now=clock.now + 100) == [("r2", (3,))]
    _assert_empty(table)


def test_claim_after_ttl_is_refused_even_before_sweep(table: LeaseTable, clock: Clock) -> None:
    table.reserve("r1", [7], ttl_seconds=5)
    clock.now += 6
    with pytest.raises(LeaseNotFoundError, match="r1"):
        table.claim("r1")
    assert table.expire() == [("r1", (7,))]
    _assert_empty(table)


def test_claimed_lease_never_expires_at_ttl(table: LeaseTable, clock: Clock) -> None:
    table.reserve("r1", [5, 6], ttl_seconds=5)
    clock.now += 4
    table.claim("r1")
    for step in (2, 10, 40, 63.9):  # far past the TTL, still inside the claim timeout
        assert table.expire(now=1000.0 + step) == [], step
    assert table.num_leased_blocks == 2
    assert table.expire(now=clock.now + 60) == [("r1", (5, 6))]
    assert table.claimed_leases_expired == 1 and table.leases_expired == 1
    _assert_empty(table)


def test_retried_claim_does_not_extend(table: LeaseTable, clock: Clock) -> None:
    table.reserve("r1", [1], ttl_seconds=5)
    table.claim("r1")
    clock.now += 30
    assert table.claim("r1") == (1,)
    assert table.expire(now=1000.0 + 60) == [("r1", (1,))]
    _assert_empty(table)


def test_abort_releases_at_once(table: LeaseTable) -> None:
    table.reserve("r1", [1, 2, 3], ttl_seconds=3600)
    table.claim("r1")
    assert table.release("r1") == (1, 2, 3)  # no waiting for TTL or claim timeout
    with pytest.raises(LeaseNotFoundError):
        table.release("r1")
    with pytest.raises(LeaseNotFoundError):
        table.claim("r1")
    _assert_empty(table)


def test_unknown_ids(table: LeaseTable) -> None:
    with pytest.raises(LeaseNotFoundError, match="nope"):
        table.claim("nope")
    with pytest.raises(LeaseNotFoundError, match="nope"):
        table.release("nope")
    _assert_empty(table)


@pytest.mark.parametrize(
    ("args", "message"),
    [(("r", [1], 0), "TTL"), (("r", [], 5), "at least one block")],
)
def test_reserve_checks_input(table: LeaseTable, args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        table.reserve(*args)
    _assert_empty(table)


def test_duplicate_reserve_refused(table: LeaseTable) -> None:
    table.reserve("r", [1], 5)
    with pytest.raises(ValueError, match="already"):
        table.reserve("r", [2], 5)
    assert table.num_leased_blocks == 1
    table.release("r")
    _assert_empty(table)


def test_claim_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="claim_timeout_s"):
        LeaseTable(claim_timeout_s=0)
