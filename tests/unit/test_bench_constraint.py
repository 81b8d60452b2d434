"""The tokenizer ``bench/engine_throughput.py --constraint json`` measures
with: a byte-level BPE of the bench model's full vocabulary that llguidance
accepts, whose first JSON mask allows an object's opening and refuses text."""
from __future__ import annotations

from bench.bpe_tokenizer import EOS, byte_level_tokenizer
from bench.engine_throughput import GUIDE_SCHEMA

from splitserve.engine.structured import Constraint
from splitserve.engine.structured.manager import StructuredOutputManager


def test_bench_tokenizer_serves_the_guide_schema() -> None:
    vocab = 32000
    tok = byte_level_tokenizer(vocab)
    assert len(tok) == vocab and tok.convert_tokens_to_ids(EOS) == 0 == tok.eos_token_id
    manager = StructuredOutputManager(lambda: tok, vocab, [tok.eos_token_id])
    matcher = manager.new_matcher(Constraint.json_schema(GUIDE_SCHEMA))
    brace, word = tok.encode("{")[0], tok.encode("hello")[0]
    assert matcher.ll_matcher.validate_tokens([brace]) == 1
    assert matcher.ll_matcher.validate_tokens([word]) == 0
    assert matcher.accept(brace) and not matcher.is_stopped()
