"""KV block transfer between pods (NIXL).

``NixlTransport`` is imported lazily by callers that need it
(``from splitserve.kvtransfer.nixl_transport import NixlTransport``) so that
importing this package never loads NIXL.
"""
from __future__ import annotations

from .descriptors import BlockRun, coalesce_runs, run_descriptors
from .errors import (
    FieldMismatch,
    IncompatiblePeerError,
    InvalidMetadataError,
    KVTransferError,
    LeaseNotFoundError,
    StalePeerError,
    UnknownPeerError,
    UnknownTransferError,
)
from .fake import FakeFabric, FakeTransport
from .layout import KVCacheLayout
from .leases import Lease, LeaseTable
from .metadata import PROTOCOL_VERSION, TransferMetadata, check_compatible
from .transport import KVTransport, PeerHandle, TransferHandle, TransferMetrics, TransferState

__all__ = [
    "PROTOCOL_VERSION", "BlockRun", "FakeFabric", "FakeTransport", "FieldMismatch",
    "IncompatiblePeerError", "InvalidMetadataError", "KVCacheLayout", "KVTransferError",
    "KVTransport", "Lease", "LeaseNotFoundError", "LeaseTable", "PeerHandle",
    "StalePeerError", "TransferHandle", "TransferMetadata", "TransferMetrics",
    "TransferState", "UnknownPeerError", "UnknownTransferError", "check_compatible",
    "coalesce_runs", "run_descriptors",
]
