"""The deployment guide's structured-outputs example and prompts for it,
shared by the engine, router and e2e tests (plain data, no imports of the
package)."""
from __future__ import annotations

import random

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

# Upper bound of an instance of BOUNDED_GUIDE_SCHEMA in bytes (so in tokens:
# the tokenizer is byte-level): 2 items of two 6-character strings (<= 6
# bytes a character as \uXXXX escapes), keys and punctuation, plus one
# optional space (whitespace_pattern "[ ]?") at each of the <= 30 places
# whitespace may go.
BOUNDED_MAX_BYTES = 13 + 2 * (8 + 38 + 8 + 38 + 1) + 1 + 2 + 30

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
