"""Shared pieces of the constrained-decoding tests: the deployment guide's
schema and prompts (from ``structured_examples``), and an independent
matcher to check outputs with."""
from __future__ import annotations

from pathlib import Path

from structured_examples import BOUNDED_GUIDE_SCHEMA, GUIDE_SCHEMA, text_prompts

from splitserve.engine.structured import Constraint
from splitserve.engine.structured.manager import StructuredOutputManager
from splitserve.engine.tiny_model import BEGIN_OF_TEXT, END_OF_TEXT, IM_END, tokenizer_vocab
from splitserve.engine.tokenizer import load_tokenizer

_IDS = tokenizer_vocab()
TINY_EOS = frozenset({_IDS[END_OF_TEXT], _IDS[IM_END]})
TINY_BOS = _IDS[BEGIN_OF_TEXT]
__all__ = ["BOUNDED_GUIDE_SCHEMA", "GUIDE_SCHEMA", "TINY_BOS", "TINY_EOS", "is_valid_prefix", "manager_for",
           "text_prompts"]


def manager_for(model_dir: Path, vocab_size: int, eos: frozenset[int] = TINY_EOS) -> StructuredOutputManager:
    """A manager of its own (not the engine's) for checking outputs."""
    return StructuredOutputManager(lambda: load_tokenizer(model_dir), vocab_size, eos)


def is_valid_prefix(manager: StructuredOutputManager, constraint: Constraint, tokens: list[int]) -> bool:
    """Every token accepted by a fresh matcher (the output may be unfinished)."""
    matcher = manager.new_matcher(constraint)
    return all(matcher.accept(t) for t in tokens)
