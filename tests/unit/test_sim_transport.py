"""SimTransport: a READ takes the modelled time and moves nothing; it then
notifies the peer (in-process, or through ``remote_notify``), fails when a
failure is drawn, when the peer is gone or restarted, or past its deadline."""
from __future__ import annotations

import pytest

from splitserve.kvtransfer import IncompatiblePeerError, TransferState
from splitserve.kvtransfer.sim_transport import SimFabric, SimTransport, sim_layout, sim_peer_address

LAYOUT = sim_layout(num_blocks=64, num_layers=4, block_size=16, num_kv_heads=2, head_dim=64, dtype="float32")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _pair(clock: Clock, seconds_per_byte: float = 1e-9, **kwargs: object) -> tuple[SimTransport, SimTransport]:
    fabric = SimFabric()
    prefill = SimTransport(fabric, "prefill-0", LAYOUT, lambda n: 0.0, address="127.0.0.1:1", clock=clock)
    decode = SimTransport(fabric, "decode-0", LAYOUT, lambda n: 0.001 + n * seconds_per_byte, clock=clock,
                          **kwargs)  # type: ignore[arg-type]
    return prefill, decode


def test_read_takes_the_modelled_time_then_notifies() -> None:
    clock = Clock()
    prefill, decode = _pair(clock)
    peer = decode.add_peer(prefill.local_metadata())
    handle = decode.start_read(peer, [3, 4, 5, 9], [0, 1, 2, 3], notification=b"release:r1")
    assert handle.num_bytes == 4 * LAYOUT.block_bytes and handle.num_descriptors == 2
    seconds = 0.001 + handle.num_bytes * 1e-9
    clock.now += seconds * 0.99
    assert decode.poll(handle) is TransferState.TRANSFERRING
    assert prefill.get_notifications() == []
    clock.now += seconds * 0.02
    assert decode.poll(handle) is TransferState.DONE
    assert prefill.get_notifications() == [("decode-0", b"release:r1")]
    decode.release(handle)
    assert decode.metrics.bytes_transferred == handle.num_bytes and decode.metrics.transfers_done == 1
    assert decode.metrics.reads_in_flight == 0
    assert sim_peer_address(prefill.local_metadata()) == "127.0.0.1:1"


def test_injected_failure_and_runtime_rate_change() -> None:
    clock = Clock()
    prefill, decode = _pair(clock, failure_rate=1.0)
    peer = decode.add_peer(prefill.local_metadata())
    handle = decode.start_read(peer, [1], [1], notification=b"release:r")
    assert decode.poll(handle) is TransferState.TRANSFERRING  # fails only when it would have completed
    clock.now += 1.0
    assert decode.poll(handle) is TransferState.FAILED
    assert "injected" in (decode.error(handle) or "")
    assert prefill.get_notifications() == []
    decode.failure_rate = 0.0
    ok = decode.start_read(peer, [2], [2])
    clock.now += 1.0
    assert decode.poll(ok) is TransferState.DONE
    assert decode.metrics.transfers_failed == 1


def test_gone_or_restarted_peer_fails_the_read() -> None:
    clock = Clock()
    fabric = SimFabric()
    prefill = SimTransport(fabric, "p", LAYOUT, lambda n: 0.0, clock=clock)
    decode = SimTransport(fabric, "d", LAYOUT, lambda n: 0.01, clock=clock)
    peer = decode.add_peer(prefill.local_metadata())
    handle = decode.start_read(peer, [1], [1])
    SimTransport(fabric, "p", LAYOUT, lambda n: 0.0, clock=clock)  # the pod restarted: new incarnation
    clock.now += 1.0
    assert decode.poll(handle) is TransferState.FAILED
    assert "restarted" in (decode.error(handle) or "")


def test_deadline_and_peer_in_another_process() -> None:
    clock = Clock()
    sent: list[tuple[str, bytes]] = []
    remote_fabric, local_fabric = SimFabric(), SimFabric()
    prefill = SimTransport(remote_fabric, "p", LAYOUT, lambda n: 0.0, address="10.0.0.5:50051", clock=clock)
    decode = SimTransport(local_fabric, "d", LAYOUT, lambda n: 0.5, clock=clock,
                          remote_notify=lambda address, payload: sent.append((address, payload)))
    peer = decode.add_peer(prefill.local_metadata())
    slow = decode.start_read(peer, [1], [1], notification=b"release:a", timeout_s=0.2)
    clock.now += 0.3
    assert decode.poll(slow) is TransferState.FAILED and decode.metrics.transfers_timed_out == 1
    ok = decode.start_read(peer, [1], [1], notification=b"release:b")
    clock.now += 0.6
    assert decode.poll(ok) is TransferState.DONE
    assert sent == [("10.0.0.5:50051", b"release:b")]


def test_incompatible_layout_is_refused() -> None:
    fabric = SimFabric()
    other = sim_layout(64, 8, 16, 2, 64, "float32")
    prefill = SimTransport(fabric, "p", other, lambda n: 0.0)
    decode = SimTransport(fabric, "d", LAYOUT, lambda n: 0.0)
    with pytest.raises(IncompatiblePeerError, match="num_layers"):
        decode.add_peer(prefill.local_metadata())
