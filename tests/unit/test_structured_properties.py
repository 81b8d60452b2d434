"""Property tests: random JSON schemas, regexes and choice lists through the
real engine (built-in tiny model); every output parses and validates
(``jsonschema``), full-matches (``re``) or is one of the choices.

Random weights never decide to end a string or an array, so every
generated schema is bounded (string lengths, array sizes, integer ranges;
objects closed with ``disable_additional_properties``; whitespace off or at
most one space) and ``max_tokens`` is an upper bound of the output's length
in bytes (the tokenizer is byte-level, a token is at least one byte): so
every output must finish with "stop". Examples are derandomised (the same
in every run)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structured_fixtures import text_prompts

from splitserve.engine import LLM, SamplingParams
from splitserve.engine.structured import Constraint
from splitserve.engine.tiny_model import write_tiny_model

MAX_MODEL_LEN = 1024
PROMPTS = [{"prompt_token_ids": ids} for ids in ([7, 8, 9], [100, 33, 200, 12, 5])]
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
WORD = st.text(alphabet="abcdefxyz", min_size=1, max_size=5)


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path: Path = write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    return LLM(str(path), device="cpu", block_size=16, max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=512)


def _generate(llm: LLM, constraint: Constraint, max_tokens: int, seed: int) -> list[tuple[str, str | None]]:
    runs = [SamplingParams(temperature=0.0, max_tokens=max_tokens, constraint=constraint),
            SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, constraint=constraint)]
    out: list[tuple[str, str | None]] = []
    for params in runs:
        for result in llm.generate(PROMPTS + text_prompts(1, seed), params):
            out.append((result.outputs[0].text, result.outputs[0].finish_reason))
    llm.engine_core.check_no_leaks()
    return out


# -- JSON schemas -----------------------------------------------------------

def _integer(lo: int, span: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": lo + span}


def _string(lo: int, extra: int) -> dict[str, Any]:
    return {"type": "string", "minLength": lo, "maxLength": lo + extra}


LEAVES = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(_integer, st.integers(-1000, 1000), st.integers(0, 5000)),
    st.builds(_string, st.integers(0, 3), st.integers(0, 5)),
    st.lists(st.one_of(WORD, st.integers(-50, 50), st.booleans(), st.none()), min_size=1, max_size=4,
             unique_by=lambda v: json.dumps(v)).map(lambda values: {"enum": values}),
)


def _array(items: dict[str, Any], lo: int, extra: int) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": lo + extra}


@st.composite
def _objects(draw: st.DrawFn, children: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    properties = draw(st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), children, min_size=1, max_size=3))
    required = draw(st.lists(st.sampled_from(sorted(properties)), unique=True))
    return {"type": "object", "properties": properties, "required": required}


SCHEMAS = st.recursive(
    LEAVES,
    lambda children: st.one_of(st.builds(_array, children, st.integers(0, 2), st.integers(0, 2)), _objects(children)),
    max_leaves=6,
)


def max_bytes(schema: dict[str, Any]) -> int:
    """Longest JSON text (no whitespace) of an instance: strings as \\uXXXX
    escapes (6 bytes a character)."""
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])
    kind = schema["type"]
    if kind == "boolean":
        return 5
    if kind == "null":
        return 4
    if kind == "integer":
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if kind == "string":
        return 2 + 6 * schema["maxLength"]
    if kind == "array":
        return 2 + schema["maxItems"] * (max_bytes(schema["items"]) + 1)
    return 2 + sum(len(json.dumps(k)) + 2 + max_bytes(v) for k, v in schema["properties"].items())


@SETTINGS
@given(schema=SCHEMAS, spaces=st.booleans(), seed=st.integers(0, 2**31))
def test_random_json_schemas_always_validate(llm: LLM, schema: dict[str, Any], spaces: bool, seed: int) -> None:
    options = {"whitespace_pattern": "[ ]?"} if spaces else {"disable_any_whitespace": True}
    constraint = Constraint.json_schema(schema, disable_additional_properties=True, **options)
    # With spaces, at most one between any two bytes of the text.
    bound = max_bytes(schema) * (2 if spaces else 1) + 1
    assert bound < MAX_MODEL_LEN - 64
    for text, reason in _generate(llm, constraint, bound, seed):
        assert reason == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


# -- regular expressions ------------------------------------------------------

ATOMS = st.one_of(st.sampled_from(list("abcxyz019")), st.just(r"\-"), st.sampled_from(["[a-c]", "[0-9]", "[xyz]"]))


@st.composite
def _quantified(draw: st.DrawFn, atom: st.SearchStrategy[str]) -> str:
    piece = draw(atom)
    lo = draw(st.integers(0, 2))
    return piece + draw(st.sampled_from(["", "?", f"{{{lo},{lo + draw(st.integers(1, 2))}}}"]))


def _alternation(branches: list[str]) -> str:
    return "(?:" + "|".join(branches) + ")"


REGEXES = st.recursive(
    st.lists(_quantified(ATOMS), min_size=1, max_size=4).map("".join),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(_alternation),
        st.lists(st.one_of(inner, _quantified(inner.map(_alternation.__call__ and (lambda r: f"(?:{r})")))),
                 min_size=1, max_size=3).map("".join),
    ),
    max_leaves=5,
)


@SETTINGS
@given(pattern=REGEXES, seed=st.integers(0, 2**31))
def test_random_regexes_always_full_match(llm: LLM, pattern: str, seed: int) -> None:
    # Every construct is bounded: the longest match is shorter than the pattern text times 4.
    for text, reason in _generate(llm, Constraint.regex(pattern), 4 * len(pattern) + 8, seed):
        assert reason == "stop" and re.fullmatch(pattern, text), (pattern, text)


# -- choices ----------------------------------------------------------------------

@SETTINGS
@given(choices=st.lists(st.text(alphabet="abc xyz019", min_size=1, max_size=8), min_size=1, max_size=5, unique=True),
       seed=st.integers(0, 2**31))
def test_random_choices_are_one_of_them(llm: LLM, choices: list[str], seed: int) -> None:
    for text, reason in _generate(llm, Constraint.choice(choices), 16, seed):
        assert reason == "stop" and text in choices, (choices, text)
