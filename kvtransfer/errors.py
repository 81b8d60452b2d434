"""Exceptions raised by the KV transfer layer.

Every error says what was wrong and what the caller can do about it; the
engine maps them to its fallbacks (recompute the prompt, retry elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass


class KVTransferError(Exception):
    """Base class of every error raised by ``splitserve.kvtransfer``."""


@dataclass(frozen=True)
class FieldMismatch:
    """One field on which a local and a remote peer disagree."""

    field: str
    local: object
    remote: object

    def __str__(self) -> str:
        return f"{self.field}: local={self.local!r} remote={self.remote!r}"


class IncompatiblePeerError(KVTransferError):
    """A peer's transfer metadata cannot be used with ours.

    Raised by the handshake; ``mismatches`` names every disagreeing field with
    both values. Pulling from such a peer would copy garbage into the cache,
    so the decoder must recompute the prompt or pick another prefill pool.
    """

    def __init__(self, peer: str, mismatches: tuple[FieldMismatch, ...]) -> None:
        self.peer = peer
        self.mismatches = mismatches
        detail = "; ".join(str(m) for m in mismatches)
        super().__init__(
            f"KV peer {peer!r} is incompatible ({detail}); both pods must serve the same "
            "model with the same --block-size, --dtype and splitserve version"
        )


class InvalidMetadataError(KVTransferError):
    """Transfer metadata bytes or dict are malformed (truncated, wrong types)."""


class UnknownPeerError(KVTransferError):
    """A transfer names a peer that was never added or has been removed.

    Call ``add_peer`` with fresh metadata (a new handshake) first.
    """


class StalePeerError(KVTransferError):
    """A ``PeerHandle`` belongs to an older incarnation of its peer.

    The peer restarted; its blocks and NIXL registration are gone. Re-run the
    handshake and treat the old KV handle as lost (recompute).
    """


class LeaseNotFoundError(KVTransferError):
    """No live lease for this request id (never reserved, released or expired).

    The decoder should recompute the prompt instead of pulling.
    """


class UnknownTransferError(KVTransferError):
    """A ``TransferHandle`` is not (or no longer) known to this transport."""
