"""Layout, handshake serialisation and compatibility checks."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from splitserve.kvtransfer import (
    PROTOCOL_VERSION,
    IncompatiblePeerError,
    InvalidMetadataError,
    KVCacheLayout,
    TransferMetadata,
    check_compatible,
)


def _layout(**kw: object) -> KVCacheLayout:
    base = dict(num_blocks=32, num_layers=4, block_size=16, num_kv_heads=2, head_dim=8, dtype="float32")
    base.update(kw)
    return KVCacheLayout(**base)  # type: ignore[arg-type]


def _metadata(layout: KVCacheLayout | None = None, **kw: object) -> TransferMetadata:
    layout = layout or _layout()
    base = dict(
        protocol_version=PROTOCOL_VERSION, incarnation_id="inc-1", agent_name="prefill-0",
        agent_metadata=b"\x00\x01nixl\xff", base_address=0x7F0000001000,
        region_bytes=layout.total_bytes, device_id=0, mem_type="DRAM", layout=layout,
        model_fingerprint="llama-56m@abc", block_hash_version=1,
    )
    base.update(kw)
    return TransferMetadata(**base)  # type: ignore[arg-type]


def test_block_bytes_and_from_tensor() -> None:
    cache = torch.zeros(10, 3, 2, 16, 4, 64, dtype=torch.bfloat16)
    layout = KVCacheLayout.from_tensor(cache)
    assert layout == KVCacheLayout(10, 3, 16, 4, 64, "bfloat16")
    assert layout.block_bytes == cache[0].numel() * 2
    assert layout.total_bytes == cache.numel() * 2


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.zeros(4, 2, 2, 16, 8), "shape"),
        (torch.zeros(4, 2, 3, 16, 2, 8), "shape"),
        (torch.zeros(4, 2, 2, 16, 2, 8).transpose(0, 1), "contiguous"),
        (torch.zeros(4, 2, 2, 16, 2, 8, dtype=torch.int32), "dtype"),
    ],
)
def test_from_tensor_rejects_non_block_major(tensor: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KVCacheLayout.from_tensor(tensor)


def test_metadata_round_trips_through_bytes_and_dict() -> None:
    meta = _metadata()
    assert TransferMetadata.from_bytes(meta.to_bytes()) == meta
    assert TransferMetadata.from_dict(meta.to_dict()) == meta


@pytest.mark.parametrize(
    "blob", [b"", b"not json", b"[1, 2]", b'{"agent_name": "x"}', b'{"agent_metadata": "!!"}']
)
def test_malformed_metadata_is_refused(blob: bytes) -> None:
    with pytest.raises(InvalidMetadataError):
        TransferMetadata.from_bytes(blob)


def test_mistyped_field_is_named() -> None:
    data = _metadata().to_dict()
    data["base_address"] = "0x1000"
    with pytest.raises(InvalidMetadataError, match="base_address"):
        TransferMetadata.from_dict(data)


def test_region_smaller_than_layout_is_refused() -> None:
    with pytest.raises(InvalidMetadataError, match="smaller"):
        _metadata(region_bytes=100)


def test_compatible_peers_may_differ_in_blocks_and_addresses() -> None:
    local = _metadata()
    remote = _metadata(_layout(num_blocks=999), base_address=1 << 40, incarnation_id="other",
                       agent_name="prefill-1", device_id=3)
    check_compatible(local, remote)


@pytest.mark.parametrize(
    ("field", "remote"),
    [
        ("block_size", _metadata(_layout(block_size=32))),
        ("dtype", _metadata(_layout(dtype="float16"))),
        ("num_layers", _metadata(_layout(num_layers=5))),
        ("num_kv_heads", _metadata(_layout(num_kv_heads=4))),
        ("head_dim", _metadata(_layout(head_dim=16))),
        ("layout.order", _metadata(_layout(order="layers,blocks,kv,tokens,heads,dim"))),
        ("model_fingerprint", _metadata(model_fingerprint="qwen2.5-0.5b@def")),
        ("protocol_version", _metadata(protocol_version=PROTOCOL_VERSION + 1)),
        ("block_hash_version", _metadata(block_hash_version=2)),
    ],
)
def test_each_mismatch_is_refused_naming_field_and_values(field: str, remote: TransferMetadata) -> None:
    local = _metadata()
    with pytest.raises(IncompatiblePeerError) as info:
        check_compatible(local, remote)
    assert [m.field for m in info.value.mismatches] == [field]
    mismatch = info.value.mismatches[0]
    assert field in str(info.value)
    assert repr(mismatch.local) in str(info.value) and repr(mismatch.remote) in str(info.value)
    assert mismatch.local != mismatch.remote


def test_all_mismatches_reported_together() -> None:
    remote = dataclasses.replace(_metadata(_layout(block_size=8, dtype="float16")), model_fingerprint="x")
    with pytest.raises(IncompatiblePeerError) as info:
        check_compatible(_metadata(), remote)
    assert {m.field for m in info.value.mismatches} == {"block_size", "dtype", "model_fingerprint"}
