from __future__ import annotations

import pytest

from splitserve.engine.block_hash import hash_prompt_blocks
from splitserve.engine.block_pool import BlockLeakError, BlockPool

BS = 4


def commit_all(pool: BlockPool, block_ids: list[int], tokens: list[int], salt: str | None = None) -> None:
    for block_id, block_hash, start in zip(block_ids, hash_prompt_blocks(tokens, BS, salt), range(0, 99, BS)):
        pool.commit(block_id, block_hash, tokens[start : start + BS])


def test_allocate_and_free_lru_order() -> None:
    pool = BlockPool(4, BS)
    a = pool.allocate(2)
    assert a == [0, 1] and pool.num_free_blocks == 2 and pool.usage == 0.5
    pool.free(a)  # freed last-first: 1 then 0 go to the tail
    assert pool.allocate(4) == [2, 3, 1, 0]
    with pytest.raises(RuntimeError, match="only 0 free"):
        pool.allocate(1)
    pool.free([0, 1, 2, 3])
    pool.check_no_leaks()


def test_double_free_is_an_error() -> None:
    pool = BlockPool(2, BS)
    ids = pool.allocate(1)
    pool.free(ids)
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free(ids)
    pool.check_no_leaks()


def test_leak_check_catches_a_held_block() -> None:
    pool = BlockPool(2, BS)
    pool.allocate(1)
    with pytest.raises(BlockLeakError, match="still referenced"):
        pool.check_no_leaks()


def test_prefix_hit_requires_matching_hash_and_tokens() -> None:
    pool = BlockPool(8, BS)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    ids = pool.allocate(3)
    commit_all(pool, ids, tokens)
    hashes = hash_prompt_blocks(tokens, BS)
    assert pool.find_cached_prefix(hashes, tokens, 10) == ids[:2]
    assert pool.find_cached_prefix(hashes, tokens, 1) == ids[:1]
    # Another salt is another chain: no hit.
    assert pool.find_cached_prefix(hash_prompt_blocks(tokens, BS, "t"), tokens, 10) == []
    # Same hashes but different stored tokens (a forged collision): a miss.
    other = [1, 2, 3, 4, 0, 0, 0, 0]
    assert pool.find_cached_prefix(hashes, other, 10) == ids[:1]
    pool.free(ids)
    pool.check_no_leaks()


def test_lazy_eviction_keeps_freed_blocks_hittable_until_reused() -> None:
    pool = BlockPool(3, BS)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    hashes = hash_prompt_blocks(tokens, BS)
    ids = pool.allocate(2)
    commit_all(pool, ids, tokens)
    pool.free(ids)
    assert pool.num_free_blocks == 3 and pool.num_cached_blocks == 2
    hits = pool.find_cached_prefix(hashes, tokens, 2)
    assert hits == ids
    pool.touch(hits)  # revives free cached blocks
    assert pool.num_free_blocks == 1
    pool.free(hits)
    # Allocating everything evicts both cached blocks.
    fresh = pool.allocate(3)
    assert pool.num_cached_blocks == 0
    assert pool.find_cached_prefix(hashes, tokens, 2) == []
    events = pool.take_events()
    assert events.stored_block_hashes == hashes
    assert sorted(events.removed_block_hashes) == sorted(hashes)
    assert pool.take_events().is_empty
    pool.free(fresh)
    pool.check_no_leaks()


def test_shared_block_ref_counts() -> None:
    pool = BlockPool(2, BS)
    ids = pool.allocate(1)
    pool.touch(ids)
    assert pool.blocks[ids[0]].ref_count == 2
    pool.free(ids)
    assert pool.num_free_blocks == 1  # still referenced once
    pool.free(ids)
    pool.check_no_leaks()


def test_duplicate_hash_keeps_first_copy_and_disabled_cache_commits_nothing() -> None:
    pool = BlockPool(4, BS)
    tokens = [1, 2, 3, 4]
    a, b = pool.allocate(2)
    commit_all(pool, [a], tokens)
    commit_all(pool, [b], tokens)
    assert pool.find_cached_prefix(hash_prompt_blocks(tokens, BS), tokens, 1) == [a]
    assert pool.blocks[b].block_hash is None
    with pytest.raises(ValueError, match="only full blocks"):
        pool.commit(b, b"x" * 32, [1, 2])
    pool.free([a, b])
    pool.check_no_leaks()

    off = BlockPool(2, BS, enable_prefix_caching=False)
    ids = off.allocate(1)
    commit_all(off, ids, tokens)
    assert off.num_cached_blocks == 0
    assert off.find_cached_prefix(hash_prompt_blocks(tokens, BS), tokens, 1) == []
    off.free(ids)
    off.check_no_leaks()


def test_reset_prefix_cache_only_when_idle() -> None:
    pool = BlockPool(2, BS)
    ids = pool.allocate(1)
    commit_all(pool, ids, [1, 2, 3, 4])
    assert not pool.reset_prefix_cache()
    pool.free(ids)
    assert pool.reset_prefix_cache()
    assert pool.num_cached_blocks == 0 and pool.take_events().all_cleared
    pool.check_no_leaks()


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="at least 1 block"):
        BlockPool(0, BS)
