"""Chained prefix-block hashes, shared by the engines and the router.

Spec: ``docs/block-hash.md`` (version 1). Every process -- engines computing
their prefix cache, routers computing KV affinity -- must produce identical
bytes for identical token ids, so nothing here depends on Python's ``hash()``,
the process, the platform's endianness or the tokenizer.

    root   = SHA-256(b"splitserve.block_hash.v1" || 0x00 || salt)
    h_i    = SHA-256(h_{i-1} || u32le(token_ids of block i))

Only full blocks are hashed; a trailing partial block has no hash.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BLOCK_HASH_VERSION = 1
BLOCK_HASH_DOMAIN = b"splitserve.block_hash.v1"
BLOCK_HASH_BYTES = 32
MAX_TOKEN_ID = 2**32 - 1

BlockHash = bytes


def root_hash(salt: str | bytes | None = None) -> BlockHash:
    """Return the chain's root: the parent hash of block 0.

    ``salt`` isolates tenants: two salts never share cached blocks. A ``str``
    salt is encoded as UTF-8; ``None`` and empty salts are the same.
    """
    if isinstance(salt, str):
        salt = salt.encode("utf-8")
    return hashlib.sha256(BLOCK_HASH_DOMAIN + b"\x00" + (salt or b"")).digest()


def hash_block(parent_hash: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """Return the hash of one block given its parent's hash and its token ids."""
    if len(parent_hash) != BLOCK_HASH_BYTES:
        raise ValueError(
            f"parent hash must be {BLOCK_HASH_BYTES} bytes, got {len(parent_hash)}"
        )
    try:
        encoded = struct.pack(f"<{len(token_ids)}I", *token_ids)
    except struct.error as exc:
        raise ValueError(
            f"token ids must be integers in [0, {MAX_TOKEN_ID}]: {exc}"
        ) from None
    return hashlib.sha256(parent_hash + encoded).digest()


def hash_prompt_blocks(
    token_ids: Sequence[int],
    block_size: int,
    salt: str | bytes | None = None,
    parent_hash: BlockHash | None = None,
) -> list[BlockHash]:
    """Return the chained hashes of every *full* block of ``token_ids``.

    ``parent_hash`` continues an existing chain (e.g. hashing newly filled
    blocks of a running request); by default the chain starts at
    ``root_hash(salt)``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if parent_hash is not None and salt is not None:
        raise ValueError("pass either salt (new chain) or parent_hash (continued chain)")
    parent = root_hash(salt) if parent_hash is None else parent_hash
    if len(parent) != BLOCK_HASH_BYTES:
        raise ValueError(f"parent hash must be {BLOCK_HASH_BYTES} bytes, got {len(parent)}")
    num_full = len(token_ids) // block_size * block_size
    # One pack for the whole prompt, then one SHA-256 per block over a slice
    # of it: the same bytes as hash_block, block by block, at a third of the cost.
    try:
        encoded = memoryview(struct.pack(f"<{num_full}I", *token_ids[:num_full]))
    except struct.error as exc:
        raise ValueError(f"token ids must be integers in [0, {MAX_TOKEN_ID}]: {exc}") from None
    step = block_size * 4
    sha256 = hashlib.sha256
    hashes: list[BlockHash] = []
    append = hashes.append
    for offset in range(0, num_full * 4, step):
        parent = sha256(parent + encoded[offset:offset + step]).digest()
        append(parent)
    return hashes
