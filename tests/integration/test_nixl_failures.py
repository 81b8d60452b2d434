"""Real-NIXL failure paths: a bad UCX_TLS, and a prefill peer that dies."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("nixl")

from nixl_peer_process import PeerProcess  # noqa: E402

from splitserve.kvtransfer import KVTransferError, StalePeerError, TransferState  # noqa: E402
from splitserve.kvtransfer.nixl_transport import NixlTransport  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SHAPE = (16, 2, 2, 16, 2, 32)


@pytest.fixture
def peers() -> Iterator[list[PeerProcess]]:
    started: list[PeerProcess] = []
    yield started
    for peer in started:
        peer.stop()
    assert all(p.proc.poll() is not None for p in started)


def test_ucx_tls_without_wireup_transport_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCX_TLS", "self")
    with pytest.raises(KVTransferError, match="UCX_TLS"):
        NixlTransport("lonely", torch.zeros(SHAPE), model_fingerprint="m", ucx_tls="self")


def test_read_from_killed_peer_fails_and_holds_nothing(peers: list[PeerProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UCX_TLS", raising=False)
    peers.append(PeerProcess("prefill-dead", SHAPE, seed=3))
    cache = torch.zeros(SHAPE)
    with NixlTransport("decode-x", cache, model_fingerprint="test-model", default_timeout_s=3) as decode:
        peer = decode.add_peer(peers[0].metadata)
        peers[0].proc.kill()
        peers[0].proc.wait(timeout=5)
        handle = decode.start_read(peer, [1, 2, 3], [4, 5, 6], notification=b"release:x")
        state = decode.wait(handle, timeout=10)
        assert state is TransferState.FAILED
        assert decode.error(handle)
        decode.release(handle)
        assert decode.metrics.reads_in_flight == 0 and decode.metrics.transfers_done == 0
        decode.remove_peer("prefill-dead")
        with pytest.raises(KVTransferError):
            decode.start_read(peer, [1], [1])
    assert decode.metrics.reads_in_flight == 0
