"""Known-answer vectors of docs/block-hash.md, and the hash's contract."""
from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from splitserve.engine.block_hash import (
    BLOCK_HASH_VERSION,
    hash_block,
    hash_prompt_blocks,
    root_hash,
)

SPEC = Path(__file__).resolve().parents[2] / "docs" / "block-hash.md"

ROOT_NONE = "3996d059eca926475b400b5417ff8f1097dab6d45b50fc512737148fd92e5334"
ROOT_TENANT = "06e5137b8e0235f150667496f6d348eaf34781576b447ad5701803d4d5f8aab9"
V1 = [
    "033bf940e2338acc86d1de8ff2d6409a25481b65a9324ba12e089e96e78a18ea",
    "fbe63a64954525aebe9103498cb0ca86f9b725477c5d226db94de2fdf9a57238",
]
V2 = ["2a0f08bb86470e23ed67864f0f5eb696ff2864f43d30df3a888f60a5fa4b25fd"]
V3 = ["0a467b815fa9db73a01af990f14ddb6bb60aaf555712bb2b773f6c45ee94a50e"]


def test_known_answer_vectors() -> None:
    assert BLOCK_HASH_VERSION == 1
    assert root_hash().hex() == ROOT_NONE
    assert root_hash("tenant-a").hex() == ROOT_TENANT
    assert root_hash(b"tenant-a").hex() == ROOT_TENANT
    assert [h.hex() for h in hash_prompt_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)] == V1
    assert [h.hex() for h in hash_prompt_blocks([0, 2**32 - 1, 128000, 7], 4)] == V2
    assert [h.hex() for h in hash_prompt_blocks([1, 2, 3, 4], 4, salt="tenant-a")] == V3


def test_spec_document_lists_the_same_vectors() -> None:
    text = SPEC.read_text()
    for value in [ROOT_NONE, ROOT_TENANT, *V1, *V2, *V3]:
        assert value in text


def test_matches_the_formula_written_in_the_spec() -> None:
    root = hashlib.sha256(b"splitserve.block_hash.v1\x00").digest()
    h0 = hashlib.sha256(root + struct.pack("<4I", 5, 6, 7, 8)).digest()
    h1 = hashlib.sha256(h0 + struct.pack("<4I", 9, 10, 11, 12)).digest()
    assert hash_prompt_blocks([5, 6, 7, 8, 9, 10, 11, 12, 13], 4) == [h0, h1]


def test_chain_continues_from_parent() -> None:
    tokens = list(range(40))
    full = hash_prompt_blocks(tokens, 8)
    assert hash_prompt_blocks(tokens[16:], 8, parent_hash=full[1]) == full[2:]
    assert hash_block(full[0], tokens[8:16]) == full[1]


def test_same_hash_in_a_fresh_process() -> None:
    code = (
        "from splitserve.engine.block_hash import hash_prompt_blocks;"
        "print(hash_prompt_blocks(list(range(100)), 16, salt='s')[-1].hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hash_prompt_blocks(list(range(100)), 16, salt="s")[-1].hex()


def test_prefix_sharing_and_isolation() -> None:
    a = hash_prompt_blocks([1] * 32 + [2] * 16, 16)
    b = hash_prompt_blocks([1] * 32 + [3] * 16, 16)
    assert a[:2] == b[:2] and a[2] != b[2]
    assert hash_prompt_blocks([1] * 16, 16, salt="x") != hash_prompt_blocks([1] * 16, 16)
    assert hash_prompt_blocks([1] * 15, 16) == []


@pytest.mark.parametrize("bad", [[-1, 0, 0, 0], [2**32, 0, 0, 0]])
def test_out_of_range_token_ids_are_rejected(bad: list[int]) -> None:
    with pytest.raises(ValueError, match="token ids"):
        hash_prompt_blocks(bad, 4)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="block_size"):
        hash_prompt_blocks([1], 0)
    with pytest.raises(ValueError, match="parent hash"):
        hash_block(b"short", [1])
