"""Token bitmasks: the fill (inline and overlapped), the unpack, the batched
apply, and the matcher lifecycle of the manager (replay, refusal, cache,
lazy tokenizer)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from structured_fixtures import TINY_EOS, manager_for
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.structured import Constraint
from splitserve.engine.structured.bitmask import (
    BitmaskFiller,
    TokenBitmask,
    apply_token_bitmask,
    unpack_bitmask,
)
from splitserve.engine.structured.manager import StructuredOutputManager
from splitserve.engine.tiny_model import write_tokenizer
from splitserve.engine.tokenizer import load_tokenizer

V = 288  # the tiny checkpoints' padded vocabulary (276 tokenizer tokens)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(out)
    return out


@pytest.fixture
def manager(tokenizer_dir: Path) -> StructuredOutputManager:
    return manager_for(tokenizer_dir, V)


def _allowed(bits: torch.Tensor, row: int = 0) -> set[int]:
    return set(torch.nonzero(unpack_bitmask(bits, V)[row]).flatten().tolist())


def test_unpack_matches_a_bit_by_bit_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (3, 9), generator=gen, dtype=torch.int64).to(torch.int32)
    got = unpack_bitmask(bits, V)
    want = torch.tensor([[(int(bits[r, t // 32]) >> (t % 32)) & 1 for t in range(V)] for r in range(3)]).bool()
    assert got.shape == (3, V) and torch.equal(got, want)


def test_apply_masks_only_the_listed_rows() -> None:
    logits = torch.randn(4, V)
    bits = torch.zeros(2, 9, dtype=torch.int32)
    bits[0, 0] = 0b1010  # tokens 1 and 3
    bits[1, 1] = 1  # token 32
    masked = apply_token_bitmask(logits.clone(), TokenBitmask(torch.tensor([1, 3]), bits))
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    assert torch.isfinite(masked[1]).nonzero().flatten().tolist() == [1, 3]
    assert torch.isfinite(masked[3]).nonzero().flatten().tolist() == [32]
    everyone = apply_token_bitmask(logits[:2].clone(), TokenBitmask(torch.tensor([0, 1]), bits))
    assert torch.isfinite(everyone).nonzero().tolist() == [[0, 1], [0, 3], [1, 32]]


def test_masks_follow_the_matcher_and_allow_eos_only_when_complete(manager: StructuredOutputManager,
                                                                   tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    digits = {tok.convert_tokens_to_ids(str(d)) for d in range(10)}
    matcher = manager.new_matcher(Constraint.regex("[0-9]{1,2}"))
    filler = BitmaskFiller(CPU, overlap=False)
    assert _allowed(filler.start([0], [matcher]).result().bits) == digits  # no EOS before a digit
    assert matcher.accept(tok.convert_tokens_to_ids("7"))
    assert not matcher.is_stopped() and matcher.is_accepting()
    assert _allowed(filler.start([0], [matcher]).result().bits) == digits | TINY_EOS
    assert matcher.accept(tok.convert_tokens_to_ids("3")) and matcher.is_stopped()
    assert not matcher.accept(tok.convert_tokens_to_ids("1"))  # nothing follows a stopped matcher


def test_overlapped_fill_equals_inline_fill(manager: StructuredOutputManager, tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    constraints = [Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}),
                   Constraint.choice(["alpha", "beta"]), Constraint.regex("[a-c]+x")]
    matchers = [manager.new_matcher(c) for c in constraints]
    for m, text in zip(matchers, ['{"a"', "al", "ab"]):
        assert all(m.accept(t) for t in tok.encode(text))
    inline = BitmaskFiller(CPU, overlap=False).start([0, 2, 5], matchers).result()
    overlapped = BitmaskFiller(CPU, overlap=True)
    pending = overlapped.start([0, 2, 5], matchers)
    result = pending.result()
    overlapped.close()
    assert torch.equal(inline.bits, result.bits) and inline.rows.tolist() == [0, 2, 5]
    assert _allowed(inline.bits, 1) == {tok.convert_tokens_to_ids("p")}


def test_replay_refuse_and_complete(manager: StructuredOutputManager, tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    choice = Constraint.choice(["yes", "no"])
    resumed = manager.new_matcher(choice, tok.encode("ye"))
    assert resumed.accept(tok.encode("s")[0]) and resumed.is_stopped()
    with pytest.raises(InvalidRequestError, match="output token 1 .* does not follow its choice constraint"):
        manager.new_matcher(choice, tok.encode("yo"))
    with pytest.raises(InvalidRequestError, match="already complete"):
        manager.new_matcher(choice, tok.encode("no"))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        manager.new_matcher(choice, [V])


def test_templates_are_compiled_once_and_bounded(tokenizer_dir: Path) -> None:
    manager = StructuredOutputManager(lambda: load_tokenizer(tokenizer_dir), V, TINY_EOS, max_cached_grammars=2)
    a, b, c = Constraint.regex("a+"), Constraint.regex("b+"), Constraint.regex("c+")
    manager.prepare(a)
    first = manager._templates[a]
    manager.new_matcher(a)
    assert manager._templates[a] is first  # copied, not recompiled
    manager.prepare(b)
    manager.prepare(c)
    assert list(manager._templates) == [b, c]


def test_tokenizer_loads_lazily_once_and_failures_are_request_errors(tokenizer_dir: Path) -> None:
    calls: list[int] = []

    def load():
        calls.append(1)
        return load_tokenizer(tokenizer_dir)

    manager = StructuredOutputManager(load, V, TINY_EOS)
    assert not manager.tokenizer_loaded and not calls
    manager.prepare(Constraint.regex("a"))
    manager.prepare(Constraint.regex("b"))
    assert manager.tokenizer_loaded and calls == [1]

    def missing():
        raise FileNotFoundError("no tokenizer in '/m'")

    broken = StructuredOutputManager(missing, V)
    for _ in range(2):
        with pytest.raises(InvalidRequestError, match="needs the model's tokenizer: no tokenizer in"):
            broken.prepare(Constraint.regex("a"))
