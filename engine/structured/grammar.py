"""Constraint -> llguidance grammar, and the compile check every entry point runs.

The translation follows vLLM's llguidance backend, so a request behaves the
same here and there: JSON kinds get flexible whitespace unless
``disable_any_whitespace``; ``disable_additional_properties`` closes every
object schema that lists ``properties``; choice is an alternation of the
literal strings; grammar text is Lark or GBNF.
"""
from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.structured.constraint import Constraint, ConstraintKind

if TYPE_CHECKING:
    import llguidance

# Keywords whose value maps names to subschemas / holds subschemas (JSON Schema 2020-12).
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = ("additionalProperties", "unevaluatedProperties", "propertyNames", "contains", "additionalItems",
               "unevaluatedItems", "not", "if", "then", "else", "items", "prefixItems", "allOf", "anyOf", "oneOf")


def build_grammar(constraint: Constraint) -> str:
    """The llguidance grammar (serialised) for ``constraint``.

    Raises ``InvalidRequestError`` for input llguidance cannot even parse; a
    grammar that parses but does not compile is caught by ``compile_check``
    (or by the matcher the engine builds)."""
    import llguidance

    kind = constraint.kind
    try:
        if kind in (ConstraintKind.JSON_SCHEMA, ConstraintKind.JSON_OBJECT):
            schema: Any = {"type": "object"} if kind is ConstraintKind.JSON_OBJECT else json.loads(constraint.spec)
            if constraint.disable_additional_properties:
                schema = close_objects(schema)
            options: dict[str, Any] = {"whitespace_flexible": not constraint.disable_any_whitespace}
            if constraint.whitespace_pattern is not None:
                options["whitespace_pattern"] = constraint.whitespace_pattern
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)  # type: ignore[arg-type]
        if kind is ConstraintKind.CHOICE:
            return llguidance.grammar_from("choice", json.dumps(list(constraint.spec)))
        if kind is ConstraintKind.REGEX:
            return llguidance.grammar_from("regex", str(constraint.spec))
        return llguidance.grammar_from("grammar", str(constraint.spec))
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidRequestError(f"invalid {kind.value} constraint: {exc}") from None


def compile_check(constraint: Constraint, tokenizer: llguidance.LLTokenizer | None = None) -> None:
    """Raise ``InvalidRequestError`` naming the problem when ``constraint`` does
    not compile (bad schema keyword, bad regex, bad grammar); return None when
    it does. The router calls it before picking pods; engines run the same
    compile when the request arrives. ``tokenizer`` (from
    ``ll_tokenizer``) also checks the grammar against the vocabulary; without
    one only the grammar itself is checked. Holds nothing afterwards."""
    import llguidance

    grammar = build_grammar(constraint)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        summary = error_summary(messages[0], constraint)
        raise InvalidRequestError(f"invalid {constraint.kind.value} constraint: {summary}")


def ll_tokenizer(hf_tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int] = ()) -> llguidance.LLTokenizer:
    """llguidance's view of a Hugging Face fast tokenizer, masks ``vocab_size``
    wide (the model's logits, which may be padded past the tokenizer). EOS
    (allowed once the constraint is satisfied) is every id of
    ``eos_token_ids``, else the tokenizer's own. Costs up to ~1 s for a large
    vocabulary: build it once per process. Raises ``InvalidRequestError`` for
    a tokenizer llguidance cannot use (a slow, Python-only one)."""
    import llguidance.hf

    eos = sorted(set(eos_token_ids)) or None
    try:
        return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=max(vocab_size, len(hf_tokenizer)), eos_token=eos)
    except ValueError as exc:
        raise InvalidRequestError(f"constrained decoding cannot use this model's tokenizer: {exc}") from None


def close_objects(schema: Any) -> Any:
    """A copy of ``schema`` where every object schema naming ``properties`` or
    ``patternProperties`` without an ``additionalProperties`` gets
    ``additionalProperties: false`` (vLLM's ``disable_additional_properties``)."""
    schema = copy.deepcopy(schema)
    _close(schema)
    return schema


def _close(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _close(item)
        return
    if not isinstance(node, dict):
        return
    for key in _SCHEMA_MAPS:
        value = node.get(key)
        if isinstance(value, dict):
            for sub in value.values():
                _close(sub)
    for key in _SUBSCHEMAS:
        value = node.get(key)
        if isinstance(value, (dict, list)):
            _close(value)
    if "additionalProperties" not in node and (
        isinstance(node.get("properties"), dict) or isinstance(node.get("patternProperties"), dict)
    ):
        node["additionalProperties"] = False


def error_summary(message: str, constraint: Constraint | None = None) -> str:
    """One line of an llguidance error message. Positions ("at 1(8): ") point
    into the grammar llguidance was given, which is the user's text only for
    the grammar kind; for the others they are dropped."""
    # llguidance errors carry a caret diagram over several lines; the first
    # line names the problem and the position.
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    head = lines[0]
    if constraint is not None and constraint.kind is not ConstraintKind.GRAMMAR:
        head = re.sub(r"^at \d+\(\d+\): ", "", head)
    detail = next((line for line in lines[1:] if line.startswith("error:")), None)
    return f"{head} ({detail})" if detail else head
