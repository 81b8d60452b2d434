"""KV event batches that queue up at a pod leave as one (``kv_event_hub``),
and the router's prefix index ends the same as if it had applied them one by
one."""
from __future__ import annotations

import asyncio
import random

from splitserve.engine.block_pool import KVCacheEvents
from splitserve.pod.kv_event_hub import KVEventHub, coalesce
from splitserve.router.prefix_index import PrefixIndexMap


def _index_after(batches: list[KVCacheEvents]) -> tuple[dict, list]:
    """Apply ``batches`` as the router does (``PodRouter.on_kv_events``):
    the holders table and the pod's blocks in LRU order."""
    indexes = PrefixIndexMap()
    index = indexes.for_pod("pod")
    index.stored([999, 998])  # blocks from before: a clear must drop them
    for batch in batches:
        if batch.all_cleared:
            index.clear()
        index.evicted(batch.removed_block_hashes)
        index.stored(batch.stored_block_hashes)
    return dict(indexes._holders), list(index._blocks)


def _random_batches(rng: random.Random) -> list[KVCacheEvents]:
    hashes = list(range(12))  # few, so that blocks come, go and come back
    return [KVCacheEvents(stored_block_hashes=rng.sample(hashes, rng.randint(0, 4)),
                          removed_block_hashes=rng.sample(hashes, rng.randint(0, 3)),
                          all_cleared=rng.random() < 0.1)
            for _ in range(rng.randint(1, 6))]


def test_a_coalesced_batch_leaves_the_index_as_the_batches_one_by_one() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        batches = _random_batches(rng)
        # A batch that both stores and evicts one block is ambiguous in the
        # protocol itself (the router applies evictions first, whatever the
        # order on the pod), so these leave that case out.
        batches = [KVCacheEvents([h for h in b.stored_block_hashes if h not in b.removed_block_hashes],
                                 b.removed_block_hashes, b.all_cleared) for b in batches]
        merged = coalesce(batches)
        assert not set(merged.stored_block_hashes) & set(merged.removed_block_hashes)
        holders, blocks = _index_after(batches)
        merged_holders, merged_blocks = _index_after([merged])
        assert merged_holders == holders
        assert set(merged_blocks) == set(blocks)
        # Recency: the blocks stored last stay last (evicted last).
        stored = [h for h in merged_blocks if h in merged.stored_block_hashes]
        assert stored == [h for h in blocks if h in merged.stored_block_hashes]


def test_coalescing_a_clear_keeps_only_what_followed_it() -> None:
    merged = coalesce([KVCacheEvents([1, 2], [3]), KVCacheEvents([4], [], all_cleared=True),
                       KVCacheEvents([5], [4])])
    assert merged == KVCacheEvents([5], [4], all_cleared=True)


def test_batches_queued_behind_a_slow_reader_arrive_as_one() -> None:
    async def run() -> list[KVCacheEvents]:
        hub = KVEventHub()
        stream = hub.subscribe()
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)  # subscribed
        hub.publish(KVCacheEvents([1]))
        got = [await first]
        for batch in (KVCacheEvents([2, 3]), KVCacheEvents([4], [2]), KVCacheEvents([5])):
            hub.publish(batch)  # the reader is busy: these queue up
        await asyncio.sleep(0.01)
        got.append(await anext(stream))
        hub.publish(KVCacheEvents([6]))
        hub.close()
        got += [batch async for batch in stream]
        return got

    got = asyncio.run(run())
    assert got == [KVCacheEvents([1]), KVCacheEvents([3, 4, 5], [2]), KVCacheEvents([6])]


def test_a_close_queued_behind_batches_ends_the_stream_after_them() -> None:
    async def run() -> list[KVCacheEvents]:
        hub = KVEventHub()
        stream = hub.subscribe()
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        hub.publish(KVCacheEvents([1]))
        hub.publish(KVCacheEvents([2]))
        hub.close()
        await asyncio.sleep(0.01)
        return [await first] + [batch async for batch in stream]

    assert asyncio.run(run()) == [KVCacheEvents([1, 2])]
