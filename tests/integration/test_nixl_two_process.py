"""Real NIXL between two OS processes: a prefill-like peer and this test as decoder.

Runs once over UCX's default transports (shared memory on one host) and once
with ``UCX_TLS=tcp``.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("nixl")

from nixl_peer_process import PeerProcess  # noqa: E402
from nixl_prefill_peer import known_cache  # noqa: E402

from splitserve.kvtransfer import StalePeerError, TransferState  # noqa: E402
from splitserve.kvtransfer.nixl_transport import NixlTransport  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PREFILL_SHAPE = (48, 4, 2, 16, 2, 32)  # 32 KiB blocks
DECODE_SHAPE = (40, 4, 2, 16, 2, 32)   # fewer blocks: num_blocks may differ


@pytest.fixture(params=[None, "tcp"], ids=["ucx-default", "ucx-tcp"])
def ucx_tls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    # NixlTransport writes UCX_TLS into os.environ; monkeypatch restores it.
    if request.param is None:
        monkeypatch.delenv("UCX_TLS", raising=False)
    else:
        monkeypatch.setenv("UCX_TLS", request.param)
    return request.param


@pytest.fixture
def peers() -> Iterator[list[PeerProcess]]:
    started: list[PeerProcess] = []
    yield started
    for peer in started:
        peer.stop()
    assert all(p.proc.poll() is not None for p in started)


def _pull(decode: NixlTransport, peer_proc: PeerProcess, request_id: str,
          remote: list[int], local: list[int], seed: int) -> None:
    peer = decode.add_peer(peer_proc.metadata)
    peer_proc.send(f"reserve {request_id} {','.join(map(str, remote))} 30")
    peer_proc.expect("RESERVED", 10)
    peer_proc.send(f"claim {request_id}")
    assert peer_proc.expect("CLAIMED", 10) == [request_id, ",".join(map(str, remote))]
    handle = decode.start_read(peer, remote, local, notification=f"release:{request_id}".encode())
    state = decode.wait(handle, timeout=15)
    assert state is TransferState.DONE, decode.error(handle)
    decode.release(handle)
    expected = known_cache(PREFILL_SHAPE, seed)
    assert torch.equal(decode.kv_cache[local], expected[remote])
    # The READ's notification released the lease on the prefill side.
    assert peer_proc.expect("RELEASED", 10) == [request_id, ",".join(map(str, remote))]
    peer_proc.send("status")
    assert peer_proc.expect("STATUS", 10)[0] == "0"


def test_pull_noncontiguous_blocks_and_release(ucx_tls: str | None, peers: list[PeerProcess]) -> None:
    peers.append(PeerProcess("prefill-0", PREFILL_SHAPE, seed=11, ucx_tls=ucx_tls))
    cache = torch.zeros(DECODE_SHAPE)
    with NixlTransport("decode-0", cache, model_fingerprint="test-model", ucx_tls=ucx_tls,
                       default_timeout_s=15) as decode:
        assert os.environ.get("UCX_TLS") == ucx_tls
        remote = [5, 6, 7, 20, 2, 3, 47]
        local = [0, 1, 2, 30, 10, 11, 39]
        _pull(decode, peers[0], "req-1", remote, local, seed=11)
        untouched = [i for i in range(DECODE_SHAPE[0]) if i not in local]
        assert not cache[untouched].any()
        m = decode.metrics
        assert (m.transfers_done, m.transfers_failed, m.reads_in_flight) == (1, 0, 0)
        assert m.bytes_transferred == len(remote) * peers[0].metadata.layout.block_bytes
        assert m.transfer_seconds > 0


def test_restarted_peer_is_rehandshaked(ucx_tls: str | None, peers: list[PeerProcess]) -> None:
    peers.append(PeerProcess("prefill-0", PREFILL_SHAPE, seed=1, ucx_tls=ucx_tls))
    cache = torch.zeros(DECODE_SHAPE)
    with NixlTransport("decode-0", cache, model_fingerprint="test-model", ucx_tls=ucx_tls,
                       default_timeout_s=15) as decode:
        _pull(decode, peers[0], "a", [1, 2], [3, 4], seed=1)
        old = decode.add_peer(peers[0].metadata)
        peers[0].stop()
        # Same agent name, new process: new incarnation, new memory, new contents.
        peers.append(PeerProcess("prefill-0", PREFILL_SHAPE, seed=2, ucx_tls=ucx_tls))
        assert peers[1].metadata.incarnation_id != old.incarnation_id
        new = decode.add_peer(peers[1].metadata)
        assert new != old and decode.metrics.peers_rehandshaked == 1
        with pytest.raises(StalePeerError):
            decode.start_read(old, [1], [1])
        started = time.monotonic()
        _pull(decode, peers[1], "b", [1, 2, 40], [3, 4, 5], seed=2)
        assert time.monotonic() - started < 15
        assert decode.metrics.reads_in_flight == 0 and decode.metrics.transfers_failed == 0
