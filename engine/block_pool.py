"""The paged KV cache's bookkeeping: which block holds what, and who uses it.

Pure Python, no tensors: the model runner owns the cache tensor and indexes it
by the block ids handed out here. Blocks are fixed-size (``block_size``
tokens), reference counted, and kept on a free list in LRU order: a freed block
goes to the tail, allocation pops from the head. A full block whose KV is
computed is *committed* under its chained block hash (``block_hash``), so a
later request with the same prefix (same tokens, same salt) reuses it. A freed
committed block keeps its hash until it is reallocated (lazy eviction), which
is what lets a preempted or finished request's prefix be hit again.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from splitserve.engine.block_hash import BlockHash


@dataclass
class Block:
    """One KV block's metadata; ``block_hash`` is set only while committed."""

    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] = ()


@dataclass
class KVCacheEvents:
    """Prefix-cache changes since the last ``BlockPool.take_events()``, for the
    router's per-pod prefix index (proto ``KVEventBatch``)."""

    stored_block_hashes: list[BlockHash] = field(default_factory=list)
    removed_block_hashes: list[BlockHash] = field(default_factory=list)
    all_cleared: bool = False

    @property
    def is_empty(self) -> bool:
        return not (self.stored_block_hashes or self.removed_block_hashes or self.all_cleared)


class BlockLeakError(RuntimeError):
    """``check_no_leaks`` found a block still referenced or off the free list."""


class BlockPool:
    """Allocates KV blocks and serves the prefix cache.

    Called only by the scheduler (one thread). ``allocate`` raises
    ``RuntimeError`` when asked for more blocks than are free: callers check
    ``num_free_blocks`` first. Every block is either on the free list with
    ``ref_count == 0`` or off it with ``ref_count >= 1``; cached-but-free blocks
    count as free.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least 1 block, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # An OrderedDict is a free list with O(1) removal from the middle,
        # needed when a prefix hit revives a cached block that is free.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_to_block: dict[BlockHash, int] = {}
        self._events = KVCacheEvents()
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    # -- capacity ---------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request (0..1)."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block)

    # -- allocation -------------------------------------------------------

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks from the head of the free list (least
        recently freed first), evicting their cache entries; ref count 1 each."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"asked for {num_blocks} KV blocks, only {len(self._free)} free")
        block_ids: list[int] = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_count = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Sequence[int]) -> None:
        """Add a reference to each block (prefix hits), reviving free ones."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block. Blocks reaching zero go to the
        free list's tail, keeping their hash. Pass a request's blocks in order:
        they are freed last-first so a prefix's tail is evicted before its head,
        which keeps shorter shared prefixes alive longer."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"KV block {block_id} freed more often than it was allocated")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    # -- prefix cache -----------------------------------------------------

    def find_cached_prefix(
        self, block_hashes: Sequence[BlockHash], token_ids: Sequence[int], max_blocks: int
    ) -> list[int]:
        """Return the ids of the longest run of leading blocks already cached,
        at most ``max_blocks``. Takes no references (call ``touch``) and
        records no statistics (call ``record_query``). A hash hit whose stored
        token ids differ from ``token_ids`` is a miss."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        size = self.block_size
        for index, block_hash in enumerate(block_hashes[:max_blocks]):
            block_id = self._hash_to_block.get(block_hash)
            if block_id is None:
                break
            expected = tuple(token_ids[index * size : (index + 1) * size])
            if self.blocks[block_id].token_ids != expected:
                break
            hits.append(block_id)
        return hits

    def record_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_query_tokens
        self.prefix_cache_hits += num_hit_tokens

    def commit(self, block_id: int, block_hash: BlockHash, token_ids: Sequence[int]) -> None:
        """Publish a full, computed block under its hash. A no-op when caching
        is off, when the block is already committed, or when another block
        already holds this hash (two requests computed the same prefix at once;
        the first copy stays the cached one)."""
        if not self.enable_prefix_caching:
            return
        if len(token_ids) != self.block_size:
            raise ValueError(f"only full blocks of {self.block_size} tokens are cached, got {len(token_ids)}")
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self._hash_to_block:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._hash_to_block[block_hash] = block_id
        self._events.stored_block_hashes.append(block_hash)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; refused (False) while any block is in use,
        since running requests' committed blocks would lose their identity."""
        if self.num_used_blocks:
            return False
        for block in self.blocks:
            block.block_hash, block.token_ids = None, ()
        self._hash_to_block.clear()
        self._events = KVCacheEvents(all_cleared=True)
        return True

    def take_events(self) -> KVCacheEvents:
        """Return and clear the cache events gathered since the last call."""
        events, self._events = self._events, KVCacheEvents()
        return events

    def _evict(self, block: Block) -> None:
        if block.block_hash is None:
            return
        if self._hash_to_block.get(block.block_hash) == block.block_id:
            del self._hash_to_block[block.block_hash]
            self._events.removed_block_hashes.append(block.block_hash)
        block.block_hash, block.token_ids = None, ()

    # -- invariants -------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise ``BlockLeakError`` if the free list and ref counts disagree."""
        for block in self.blocks:
            on_free_list = block.block_id in self._free
            if block.ref_count < 0:
                raise BlockLeakError(f"block {block.block_id} has ref count {block.ref_count}")
            if on_free_list != (block.ref_count == 0):
                raise BlockLeakError(
                    f"block {block.block_id}: ref count {block.ref_count}, on free list: {on_free_list}"
                )
        for block_hash, block_id in self._hash_to_block.items():
            if self.blocks[block_id].block_hash != block_hash:
                raise BlockLeakError(f"cache entry for block {block_id} does not match the block")

    def check_no_leaks(self) -> None:
        """Raise ``BlockLeakError`` unless every block is free with ref count 0.
        Tests call this after draining an engine."""
        self.check_invariants()
        used = [b.block_id for b in self.blocks if b.ref_count != 0]
        if used or len(self._free) != self.num_blocks:
            raise BlockLeakError(f"{len(used)} KV block(s) still referenced: {used[:16]}")
