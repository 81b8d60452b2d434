"""The transport state machine, driven through FakeTransport (no NIXL, no wire)."""
from __future__ import annotations

import math

import pytest
import torch

from splitserve.kvtransfer import (
    FakeFabric,
    FakeTransport,
    IncompatiblePeerError,
    PeerHandle,
    StalePeerError,
    TransferState,
    UnknownPeerError,
    UnknownTransferError,
)

SHAPE = (16, 2, 2, 4, 2, 8)  # blocks, layers, kv, tokens, heads, dim


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _cache(seed: int | None) -> torch.Tensor:
    if seed is None:
        return torch.zeros(SHAPE)
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pods(clock: Clock) -> tuple[FakeFabric, FakeTransport, FakeTransport]:
    fabric = FakeFabric()
    prefill = FakeTransport(fabric, "prefill-0", _cache(1), clock=clock, default_timeout_s=5)
    decode = FakeTransport(fabric, "decode-0", _cache(None), clock=clock, default_timeout_s=5)
    return fabric, prefill, decode


def _no_reads_in_flight(*transports: FakeTransport) -> None:
    for t in transports:
        assert t.metrics.reads_in_flight == 0


def test_read_copies_exactly_the_named_blocks_and_notifies(pods) -> None:
    _, prefill, decode = pods
    peer = decode.add_peer(prefill.local_metadata())
    remote, local = [3, 4, 5, 9, 1], [0, 1, 2, 7, 12]
    handle = decode.start_read(peer, remote, local, notification=b"release:r1")
    assert handle.num_descriptors == 3
    assert decode.poll(handle) is TransferState.DONE
    assert torch.equal(decode.kv_cache[local], prefill.kv_cache[remote])
    untouched = [i for i in range(SHAPE[0]) if i not in local]
    assert not decode.kv_cache[untouched].any()
    assert prefill.get_notifications() == [("decode-0", b"release:r1")]
    assert prefill.get_notifications() == []
    assert decode.metrics.bytes_transferred == 5 * prefill.local_metadata().layout.block_bytes
    assert decode.metrics.transfers_done == 1
    decode.release(handle)
    with pytest.raises(UnknownTransferError):
        decode.poll(handle)
    _no_reads_in_flight(decode)


def test_states_progress_pending_transferring_done(pods, clock: Clock) -> None:
    _, prefill, decode = pods
    decode.start_delay_s, decode.read_delay_s = 1.0, 2.0
    peer = decode.add_peer(prefill.local_metadata())
    handle = decode.start_read(peer, [2], [3], notification=b"release:r")
    assert decode.poll(handle) is TransferState.PENDING
    clock.now = 1.5
    assert decode.poll(handle) is TransferState.TRANSFERRING
    assert decode.metrics.reads_in_flight == 1
    assert not decode.kv_cache[3].any() and prefill.get_notifications() == []
    clock.now = 3.0
    assert decode.poll(handle) is TransferState.DONE
    assert decode.poll(handle) is TransferState.DONE  # terminal states stick
    assert torch.equal(decode.kv_cache[3], prefill.kv_cache[2])
    assert decode.metrics.transfer_seconds == pytest.approx(3.0)
    decode.release(handle)
    _no_reads_in_flight(decode)


@pytest.mark.parametrize("knob", ["fail_post", "fail_transfer"])
def test_injected_failure_is_failed_without_notification(pods, knob: str) -> None:
    _, prefill, decode = pods
    setattr(decode, knob, True)
    peer = decode.add_peer(prefill.local_metadata())
    handle = decode.start_read(peer, [1, 2], [1, 2], notification=b"release:r")
    assert decode.poll(handle) is TransferState.FAILED
    assert "injected" in (decode.error(handle) or "")
    assert decode.metrics.transfers_failed == 1 and decode.metrics.transfers_done == 0
    assert prefill.get_notifications() == []
    decode.release(handle)
    _no_reads_in_flight(decode)


def test_hung_read_times_out(pods, clock: Clock) -> None:
    _, prefill, decode = pods
    decode.read_delay_s = math.inf
    peer = decode.add_peer(prefill.local_metadata())
    handle = decode.start_read(peer, [1], [1], notification=b"release:r", timeout_s=2.0)
    clock.now = 1.9
    assert decode.poll(handle) is TransferState.TRANSFERRING
    clock.now = 2.0
    assert decode.poll(handle) is TransferState.FAILED
    assert decode.error(handle) == "timed out"
    assert decode.metrics.transfers_timed_out == 1 and decode.metrics.transfers_failed == 1
    clock.now = 1e9  # an abandoned READ never completes later
    assert decode.poll(handle) is TransferState.FAILED
    assert not decode.kv_cache[1].any() and prefill.get_notifications() == []
    decode.release(handle)
    _no_reads_in_flight(decode)


def test_wait_gives_up_and_fails(pods) -> None:
    _, prefill, decode = pods  # fake clock never advances: only wait's own timeout ends it
    decode.read_delay_s = math.inf
    peer = decode.add_peer(prefill.local_metadata())
    handle = decode.start_read(peer, [0], [0])
    assert decode.wait(handle, timeout=0.02) is TransferState.FAILED
    assert decode.metrics.transfers_timed_out == 1
    decode.release(handle)
    _no_reads_in_flight(decode)


def test_cancel_and_release_while_running(pods) -> None:
    _, prefill, decode = pods
    decode.read_delay_s = math.inf
    peer = decode.add_peer(prefill.local_metadata())
    a = decode.start_read(peer, [0], [0])
    b = decode.start_read(peer, [1], [1])
    decode.cancel(a)
    assert decode.poll(a) is TransferState.FAILED and decode.error(a) == "cancelled"
    decode.release(b)  # release of a running READ cancels it
    decode.release(b)  # idempotent
    decode.release(a)
    assert decode.metrics.transfers_cancelled == 2 and decode.metrics.transfers_failed == 0
    _no_reads_in_flight(decode)


def test_incompatible_peer_refused(clock: Clock) -> None:
    fabric = FakeFabric()
    prefill = FakeTransport(fabric, "p", torch.zeros(8, 2, 2, 8, 2, 8), clock=clock)
    decode = FakeTransport(fabric, "d", _cache(None), clock=clock, model_fingerprint="other")
    with pytest.raises(IncompatiblePeerError) as info:
        decode.add_peer(prefill.local_metadata())
    assert {m.field for m in info.value.mismatches} == {"block_size", "model_fingerprint"}
    meta = prefill.local_metadata()
    never_added = PeerHandle(meta.agent_name, meta.incarnation_id, meta.layout)
    with pytest.raises(UnknownPeerError, match="add_peer"):
        decode.start_read(never_added, [0], [0])


def test_same_incarnation_is_cached(pods) -> None:
    _, prefill, decode = pods
    first = decode.add_peer(prefill.local_metadata())
    assert decode.add_peer(prefill.local_metadata()) is first
    assert decode.metrics.peers_added == 1 and decode.metrics.peers_rehandshaked == 0


def test_restarted_peer_is_rehandshaked_and_stale_handles_refused(pods, clock: Clock) -> None:
    fabric, prefill, decode = pods
    old_peer = decode.add_peer(prefill.local_metadata())
    decode.read_delay_s = 1.0
    inflight = decode.start_read(old_peer, [1], [1])
    prefill.close()
    restarted = FakeTransport(fabric, "prefill-0", _cache(2), clock=clock)
    assert restarted.local_metadata().incarnation_id != old_peer.incarnation_id
    # The old handle's READ fails rather than copying from the new pod's blocks.
    clock.now = 5.0
    assert decode.poll(inflight) is TransferState.FAILED
    new_peer = decode.add_peer(restarted.local_metadata())
    assert new_peer != old_peer and decode.metrics.peers_rehandshaked == 1
    with pytest.raises(StalePeerError, match="restarted"):
        decode.start_read(old_peer, [1], [1])
    decode.read_delay_s = 0.0
    handle = decode.start_read(new_peer, [4], [5])
    assert decode.poll(handle) is TransferState.DONE
    assert torch.equal(decode.kv_cache[5], restarted.kv_cache[4])
    for h in (inflight, handle):
        decode.release(h)
    _no_reads_in_flight(decode)


def test_rehandshake_fails_reads_of_the_old_incarnation(pods, clock: Clock) -> None:
    fabric, prefill, decode = pods
    decode.read_delay_s = math.inf
    handle = decode.start_read(decode.add_peer(prefill.local_metadata()), [1], [1])
    restarted = FakeTransport(fabric, "prefill-0", _cache(3), clock=clock)
    decode.add_peer(restarted.local_metadata())
    assert decode.poll(handle) is TransferState.FAILED
    assert "restarted" in (decode.error(handle) or "")
    decode.release(handle)
    _no_reads_in_flight(decode)


@pytest.mark.parametrize(
    ("remote", "local", "message"),
    [([16], [0], "remote block id"), ([0], [99], "local block id"), ([], [], "at least one"),
     ([1, 2], [3], "exactly one")],
)
def test_bad_block_ids_raise(pods, remote, local, message) -> None:
    _, prefill, decode = pods
    peer = decode.add_peer(prefill.local_metadata())
    with pytest.raises(ValueError, match=message):
        decode.start_read(peer, remote, local)
    assert decode.metrics.transfers_started == 0
    _no_reads_in_flight(decode)


def test_standalone_notification_and_close(pods) -> None:
    _, prefill, decode = pods
    decode.read_delay_s = math.inf
    peer = decode.add_peer(prefill.local_metadata())
    decode.send_notification(peer, b"release:r9")
    assert prefill.get_notifications() == [("decode-0", b"release:r9")]
    handle = decode.start_read(peer, [0], [0])
    decode.close()
    assert decode.poll(handle) is TransferState.FAILED
    decode.close()  # idempotent
    _no_reads_in_flight(decode)
