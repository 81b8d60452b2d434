"""The test-only KV fault hook (``SPLITSERVE_KV_FAULTS``), through FakeTransport
(a test double of the NIXL wire: in-process copies)."""
from __future__ import annotations

import pytest
import torch

from splitserve.kvtransfer import FakeFabric, FakeTransport, TransferState
from splitserve.kvtransfer.fault_hook import FAULTS_ENV, TransferFaults

SHAPE = (8, 1, 2, 4, 1, 4)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _pair(faults: TransferFaults | None, clock: Clock) -> tuple[FakeTransport, FakeTransport]:
    fabric = FakeFabric()
    prefill = FakeTransport(fabric, "prefill-0", torch.randn(SHAPE), clock=clock, default_timeout_s=5)
    decode = FakeTransport(fabric, "decode-0", torch.zeros(SHAPE), clock=clock, default_timeout_s=5,
                           faults=faults)
    return prefill, decode


def test_unset_or_empty_means_no_hook() -> None:
    assert TransferFaults.from_env({}) is None
    assert TransferFaults.from_env({FAULTS_ENV: "  "}) is None
    assert TransferFaults.from_env({FAULTS_ENV: "fail=0.25, stall=1.5,seed=3"}) == TransferFaults(0.25, 1.5, 3)


@pytest.mark.parametrize("text", ["fail=2", "stall=-1", "fail", "drop=0.1", "seed=x", "fail=0.1;stall=1"])
def test_bad_settings_are_refused_at_start(text: str) -> None:
    with pytest.raises(ValueError, match=FAULTS_ENV):
        TransferFaults.parse(text)


def test_failed_reads_are_counted_and_follow_the_seed() -> None:
    clock = Clock()

    def fates(seed: int) -> list[TransferState]:
        prefill, decode = _pair(TransferFaults(fail_rate=0.5, seed=seed), clock)
        peer = decode.add_peer(prefill.local_metadata())
        out = []
        for _ in range(40):
            handle = decode.start_read(peer, [1], [2])
            out.append(decode.poll(handle))
            decode.release(handle)
        failed = out.count(TransferState.FAILED)
        assert decode.metrics.faults_injected_fail == decode.metrics.transfers_failed == failed
        assert decode.metrics.reads_in_flight == 0
        return out

    first = fates(7)
    assert 0 < first.count(TransferState.FAILED) < 40
    assert fates(7) == first
    assert set(first) == {TransferState.DONE, TransferState.FAILED}


def test_a_stalled_read_is_posted_only_after_the_stall_and_still_copies() -> None:
    clock = Clock()
    prefill, decode = _pair(TransferFaults(stall_s=1.5), clock)
    peer = decode.add_peer(prefill.local_metadata())
    handle = decode.start_read(peer, [3, 4], [0, 1], notification=b"release:r1")
    assert decode.poll(handle) is TransferState.PENDING
    assert prefill.get_notifications() == []
    clock.now = 1.5
    assert decode.poll(handle) is TransferState.DONE
    assert torch.equal(decode.kv_cache[[0, 1]], prefill.kv_cache[[3, 4]])
    assert prefill.get_notifications() == [("decode-0", b"release:r1")]
    assert decode.metrics.faults_injected_stall == 1


def test_a_stalled_read_whose_peer_left_fails_instead_of_posting() -> None:
    clock = Clock()
    prefill, decode = _pair(TransferFaults(stall_s=1.0), clock)
    peer = decode.add_peer(prefill.local_metadata())
    handle = decode.start_read(peer, [3], [0])
    decode.remove_peer("prefill-0")  # e.g. the prefill pod was killed and forgotten
    clock.now = 2.0
    assert decode.poll(handle) is TransferState.FAILED
    assert decode.metrics.reads_in_flight == 0
    assert not decode.kv_cache[0].any()


def test_a_stall_past_the_deadline_times_out() -> None:
    clock = Clock()
    prefill, decode = _pair(TransferFaults(stall_s=30.0), clock)
    handle = decode.start_read(decode.add_peer(prefill.local_metadata()), [3], [0])
    clock.now = 5.0
    assert decode.poll(handle) is TransferState.FAILED
    assert decode.metrics.transfers_timed_out == 1
