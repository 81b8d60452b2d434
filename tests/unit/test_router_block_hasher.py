"""The router's remembered block hashes equal hash_prompt_blocks'."""
from __future__ import annotations

import random

import pytest

from splitserve.engine.block_hash import hash_prompt_blocks
from splitserve.router.block_hasher import PromptBlockHasher


def test_hashes_equal_the_spec_for_shared_prefixes_salts_and_partial_blocks() -> None:
    rng = random.Random(5)
    hasher = PromptBlockHasher(block_size=4, capacity=64)
    systems = [[rng.randrange(2**32) for _ in range(rng.randrange(0, 30))] for _ in range(5)]
    for _ in range(400):
        prompt = rng.choice(systems) + [rng.randrange(1000) for _ in range(rng.randrange(0, 9))]
        salt = rng.choice([None, "", "tenant-a", "tenant-b"])
        as_list_or_tuple = prompt if rng.random() < 0.5 else tuple(prompt)
        assert hasher.hashes(as_list_or_tuple, salt) == tuple(hash_prompt_blocks(prompt, 4, salt=salt or None))
        assert len(hasher) <= 64  # the oldest blocks were forgotten, and hashed again when met


def test_a_remembered_block_is_not_hashed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from splitserve.router import block_hasher

    hashed: list[int] = []
    real = block_hasher.hash_prompt_blocks

    def counting(tokens, size, salt=None, parent_hash=None):  # type: ignore[no-untyped-def]
        hashed.append(len(tokens) // size)
        return real(tokens, size, salt=salt, parent_hash=parent_hash)

    monkeypatch.setattr(block_hasher, "hash_prompt_blocks", counting)
    hasher = PromptBlockHasher(block_size=2)
    hasher.hashes((1, 2, 3, 4, 5))
    hasher.hashes((1, 2, 3, 4, 9, 9))
    hasher.hashes((1, 2, 3, 4), salt="other")
    assert hashed == [2, 1, 2]
    assert PromptBlockHasher(2, capacity=0).hashes((1, 2)) == tuple(real((1, 2), 2))
    with pytest.raises(ValueError, match="block_size"):
        PromptBlockHasher(0)
    with pytest.raises(ValueError, match="out of range|integers"):
        PromptBlockHasher(2).hashes((1, -1))
