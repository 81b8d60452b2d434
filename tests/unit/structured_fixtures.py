"""Shared pieces of the constrained-decoding tests: the deployment guide's
schema, prompts, and an independent matcher to check outputs with."""
from __future__ import annotations

import random
from pathlib import Path

from splitserve.engine.structured import Constraint
from splitserve.engine.structured.manager import StructuredOutputManager
from splitserve.engine.tiny_model import BEGIN_OF_TEXT, END_OF_TEXT, IM_END, tokenizer_vocab
from splitserve.engine.tokenizer import load_tokenizer

# The example of the deployment guide (tool-calling / agent workloads).
GUIDE_SCHEMA = {
    "type": "object",
    "properties": {"entities": {"type": "array", "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "type": {"type": "string"}},
        "required": ["name", "type"]}}},
    "required": ["entities"],
}

# The same schema with bounds, so that random-weight models (which never
# decide to close a string) finish: every instance of it is an instance of
# GUIDE_SCHEMA.
BOUNDED_GUIDE_SCHEMA = {
    "type": "object",
    "properties": {"entities": {"type": "array", "maxItems": 2, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 6}, "type": {"type": "string", "maxLength": 6}},
        "required": ["name", "type"]}}},
    "required": ["entities"],
}

_IDS = tokenizer_vocab()
TINY_EOS = frozenset({_IDS[END_OF_TEXT], _IDS[IM_END]})
TINY_BOS = _IDS[BEGIN_OF_TEXT]
_WORDS = ("Ada", "Lovelace", "wrote", "notes", "on", "the", "Analytical", "Engine", "in", "London", "Paris",
          "Acme", "Corp", "hired", "Grace", "Hopper", "at", "Harvard", "IBM", "built", "a", "compiler", "Linus",
          "released", "Linux", "from", "Helsinki", "Marie", "Curie", "won", "prizes", "Warsaw", "Turing")


def text_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` different extraction prompts (short sentences of names and places)."""
    rng = random.Random(seed)
    prompts: list[str] = []
    while len(prompts) < n:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9)))
        prompt = f"Extract the entities as JSON: {sentence}."
        if prompt not in prompts:
            prompts.append(prompt)
    return prompts


def manager_for(model_dir: Path, vocab_size: int, eos: frozenset[int] = TINY_EOS) -> StructuredOutputManager:
    """A manager of its own (not the engine's) for checking outputs."""
    return StructuredOutputManager(lambda: load_tokenizer(model_dir), vocab_size, eos)


def is_valid_prefix(manager: StructuredOutputManager, constraint: Constraint, tokens: list[int]) -> bool:
    """Every token accepted by a fresh matcher (the output may be unfinished)."""
    matcher = manager.new_matcher(constraint)
    return all(matcher.accept(t) for t in tokens)
