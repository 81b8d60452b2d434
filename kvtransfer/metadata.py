"""Handshake message: what a decoder learns about a prefill peer before pulling.

The control plane (``GetTransferMetadata``) carries it as opaque bytes
(``to_bytes``/``from_bytes``) or maps ``to_dict`` onto protobuf fields; both
round-trip exactly.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from .errors import FieldMismatch, IncompatiblePeerError, InvalidMetadataError
from .layout import KVCacheLayout

# Bump when the meaning of a descriptor, notification or lease message changes.
PROTOCOL_VERSION = 1
MEM_TYPES = ("DRAM", "VRAM")


@dataclass(frozen=True)
class TransferMetadata:
    """Identity and memory of one transfer agent (one per pod, one per start).

    ``incarnation_id`` is a fresh uuid every time the agent starts: a peer
    whose name is known but whose incarnation changed has lost its blocks and
    registrations, so every cached handle to it is stale.
    ``base_address``/``region_bytes``/``device_id``/``mem_type`` describe the
    registered KV cache region (block ``i`` starts at
    ``base_address + i * layout.block_bytes``).
    """

    protocol_version: int
    incarnation_id: str
    agent_name: str
    agent_metadata: bytes
    base_address: int
    region_bytes: int
    device_id: int
    mem_type: str
    layout: KVCacheLayout
    model_fingerprint: str
    block_hash_version: int

    def __post_init__(self) -> None:
        if not self.agent_name:
            raise InvalidMetadataError("transfer metadata needs a non-empty agent_name")
        if not self.incarnation_id:
            raise InvalidMetadataError("transfer metadata needs a non-empty incarnation_id")
        if self.mem_type not in MEM_TYPES:
            raise InvalidMetadataError(f"mem_type must be one of {MEM_TYPES}, got {self.mem_type!r}")
        if self.region_bytes < self.layout.total_bytes:
            raise InvalidMetadataError(
                f"registered region of {self.region_bytes} bytes is smaller than the layout's "
                f"{self.layout.num_blocks} blocks x {self.layout.block_bytes} bytes"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (bytes stay bytes, the layout is a nested dict)."""
        return {
            "protocol_version": self.protocol_version,
            "incarnation_id": self.incarnation_id,
            "agent_name": self.agent_name,
            "agent_metadata": self.agent_metadata,
            "base_address": self.base_address,
            "region_bytes": self.region_bytes,
            "device_id": self.device_id,
            "mem_type": self.mem_type,
            "layout": self.layout.to_dict(),
            "model_fingerprint": self.model_fingerprint,
            "block_hash_version": self.block_hash_version,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransferMetadata:
        """Inverse of ``to_dict``; raises ``InvalidMetadataError`` on missing or
        mistyped fields."""
        expected: dict[str, type] = {
            "protocol_version": int, "incarnation_id": str, "agent_name": str,
            "agent_metadata": bytes, "base_address": int, "region_bytes": int,
            "device_id": int, "mem_type": str, "layout": dict,
            "model_fingerprint": str, "block_hash_version": int,
        }
        missing = sorted(set(expected) - set(data))
        if missing:
            raise InvalidMetadataError(f"transfer metadata lacks field(s): {', '.join(missing)}")
        for name, kind in expected.items():
            if not isinstance(data[name], kind) or (kind is int and isinstance(data[name], bool)):
                raise InvalidMetadataError(
                    f"transfer metadata field {name} must be {kind.__name__}, "
                    f"got {type(data[name]).__name__}"
                )
        try:
            layout = KVCacheLayout.from_dict(data["layout"])
        except ValueError as exc:
            raise InvalidMetadataError(str(exc)) from None
        return cls(**{**{k: data[k] for k in expected}, "layout": layout})

    def to_bytes(self) -> bytes:
        """UTF-8 JSON with the NIXL blob base64-encoded; stable field names."""
        data = self.to_dict()
        data["agent_metadata"] = base64.b64encode(self.agent_metadata).decode("ascii")
        return json.dumps(data, sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, blob: bytes) -> TransferMetadata:
        try:
            data = json.loads(blob.decode("utf-8"))
            data["agent_metadata"] = base64.b64decode(data["agent_metadata"], validate=True)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InvalidMetadataError(f"cannot decode transfer metadata: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidMetadataError("transfer metadata must encode a JSON object")
        return cls.from_dict(data)


def check_compatible(local: TransferMetadata, remote: TransferMetadata) -> None:
    """Refuse a peer whose blocks we cannot copy byte-for-byte into ours.

    Called by ``KVTransport.add_peer`` before the NIXL agent is loaded.
    Raises ``IncompatiblePeerError`` naming every mismatched field with both
    values. ``num_blocks`` and the addresses may differ.
    """
    pairs: list[tuple[str, object, object]] = [
        ("protocol_version", local.protocol_version, remote.protocol_version),
        ("model_fingerprint", local.model_fingerprint, remote.model_fingerprint),
        ("block_hash_version", local.block_hash_version, remote.block_hash_version),
        ("layout.order", local.layout.order, remote.layout.order),
        ("block_size", local.layout.block_size, remote.layout.block_size),
        ("dtype", local.layout.dtype, remote.layout.dtype),
        ("num_layers", local.layout.num_layers, remote.layout.num_layers),
        ("num_kv_heads", local.layout.num_kv_heads, remote.layout.num_kv_heads),
        ("head_dim", local.layout.head_dim, remote.layout.head_dim),
    ]
    mismatches = tuple(FieldMismatch(name, a, b) for name, a, b in pairs if a != b)
    if mismatches:
        raise IncompatiblePeerError(remote.agent_name, mismatches)
