"""What a constrained request's output must match, as one frozen value.

Pure Python (no llguidance, no torch): the router builds a ``Constraint``
from the OpenAI request (``response_format``) or vLLM's ``structured_outputs``
extension, calls ``compile_check`` (``grammar.py``) and sends it to the pods
in ``SamplingParams.constraint``. The engine compiles it into a per-request
matcher (``manager.py``).
"""
from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from splitserve.engine.errors import InvalidRequestError


class ConstraintKind(str, enum.Enum):
    """The five forms vLLM's ``structured_outputs`` accepts (structural tags aside)."""

    JSON_SCHEMA = "json_schema"  # spec: the schema as JSON text (an object)
    REGEX = "regex"  # spec: a regular expression (Rust ``regex`` syntax), matched in full
    CHOICE = "choice"  # spec: a tuple of strings; the output is exactly one of them
    GRAMMAR = "grammar"  # spec: a Lark grammar (llguidance's dialect) or GBNF
    JSON_OBJECT = "json_object"  # spec: "" -- any JSON object


_JSON_KINDS = (ConstraintKind.JSON_SCHEMA, ConstraintKind.JSON_OBJECT)


@dataclass(frozen=True)
class Constraint:
    """A constraint on the whole output text (hashable: engines cache compiled
    grammars by it).

    Options, as vLLM's: ``disable_any_whitespace`` emits JSON without
    whitespace between tokens; ``disable_additional_properties`` treats every
    object schema that names ``properties`` as ``additionalProperties: false``;
    ``whitespace_pattern`` is the regex JSON whitespace must match. The three
    concern the JSON kinds and are ignored by the others. The constructor
    checks the shape only (raising ``InvalidRequestError``); whether the
    schema, regex or grammar compiles is ``compile_check``'s business.
    """

    kind: ConstraintKind
    spec: str | tuple[str, ...] = ""
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        try:
            kind = ConstraintKind(self.kind)
        except ValueError:
            raise InvalidRequestError(
                f"unknown constraint kind {self.kind!r}; use one of {', '.join(k.value for k in ConstraintKind)}"
            ) from None
        object.__setattr__(self, "kind", kind)
        if kind is ConstraintKind.CHOICE:
            spec = self.spec
            if isinstance(spec, str) or not isinstance(spec, Sequence):
                raise InvalidRequestError("a choice constraint needs a list of strings")
            spec = tuple(spec)
            if not spec or not all(isinstance(c, str) and c for c in spec):
                raise InvalidRequestError(f"choice must be a non-empty list of non-empty strings, got {list(spec)!r}")
            object.__setattr__(self, "spec", spec)
        elif kind is ConstraintKind.JSON_OBJECT:
            object.__setattr__(self, "spec", "")
        else:
            if not isinstance(self.spec, str) or not self.spec:
                raise InvalidRequestError(f"a {kind.value} constraint needs a non-empty string")
            if kind is ConstraintKind.JSON_SCHEMA:
                _schema_object(self.spec)
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        if self.whitespace_pattern is not None:
            if not isinstance(self.whitespace_pattern, str) or not self.whitespace_pattern:
                raise InvalidRequestError("whitespace_pattern must be a non-empty string")
            if self.disable_any_whitespace:
                raise InvalidRequestError("disable_any_whitespace and whitespace_pattern cannot both be set")

    @property
    def is_json(self) -> bool:
        return self.kind in _JSON_KINDS

    # -- constructors -------------------------------------------------------

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str, **options: Any) -> Constraint:
        """A JSON Schema given as a mapping or as JSON text (key order is kept:
        it is the order properties are generated in)."""
        text = schema if isinstance(schema, str) else _dumps(schema)
        return cls(ConstraintKind.JSON_SCHEMA, text, **options)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls(ConstraintKind.REGEX, pattern)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> Constraint:
        return cls(ConstraintKind.CHOICE, tuple(choices))

    @classmethod
    def grammar(cls, grammar: str) -> Constraint:
        return cls(ConstraintKind.GRAMMAR, grammar)

    @classmethod
    def json_object(cls, **options: Any) -> Constraint:
        return cls(ConstraintKind.JSON_OBJECT, "", **options)

    # -- from the OpenAI API -------------------------------------------------

    @classmethod
    def from_response_format(cls, response_format: Mapping[str, Any] | None) -> Constraint | None:
        """OpenAI's ``response_format``: ``{"type": "text"}`` (or None) -> None;
        ``{"type": "json_object"}``; ``{"type": "json_schema", "json_schema":
        {"name": ..., "schema": {...}, "strict": ...}}``. Raises
        ``InvalidRequestError`` naming the bad part."""
        if response_format is None:
            return None
        if not isinstance(response_format, Mapping):
            raise InvalidRequestError("response_format must be an object")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object()
        if kind == "json_schema":
            body = response_format.get("json_schema")
            if not isinstance(body, Mapping):
                raise InvalidRequestError("response_format.json_schema must be an object with a 'schema'")
            schema = body.get("schema")
            if schema is None:
                raise InvalidRequestError("response_format.json_schema.schema is missing")
            if not isinstance(schema, (Mapping, str)):
                raise InvalidRequestError("response_format.json_schema.schema must be a JSON Schema object")
            return cls.json_schema(schema)
        raise InvalidRequestError(
            f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}"
        )

    @classmethod
    def from_structured_outputs(cls, values: Mapping[str, Any] | None) -> Constraint | None:
        """vLLM's ``structured_outputs`` request field: exactly one of ``json``
        (schema object or text), ``regex``, ``choice``, ``grammar``,
        ``json_object`` (true), plus the options ``disable_any_whitespace``,
        ``disable_additional_properties``, ``whitespace_pattern``
        (``disable_fallback`` is accepted and has no effect: there is one
        backend). None or ``{}`` -> None."""
        if not values:
            return None
        if not isinstance(values, Mapping):
            raise InvalidRequestError("structured_outputs must be an object")
        known = {"json", "regex", "choice", "grammar", "json_object", "structural_tag",
                 "disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                 "whitespace_pattern"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidRequestError(f"unknown structured_outputs field(s): {', '.join(unknown)}")
        if values.get("structural_tag") is not None:
            raise InvalidRequestError("structured_outputs.structural_tag is not supported")
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object")
                 if values.get(k) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, json_object; "
                f"got {given or 'none'}"
            )
        options = {k: values[k] for k in ("disable_any_whitespace", "disable_additional_properties",
                                          "whitespace_pattern") if values.get(k) is not None}
        key = given[0]
        value = values[key]
        if key == "json":
            if not isinstance(value, (Mapping, str)):
                raise InvalidRequestError("structured_outputs.json must be a JSON Schema object or its JSON text")
            return cls.json_schema(value, **options)
        if key == "json_object":
            if value is not True:
                raise InvalidRequestError("structured_outputs.json_object must be true")
            return cls.json_object(**options)
        if key == "choice":
            return cls(ConstraintKind.CHOICE, value if isinstance(value, (list, tuple)) else "", **options)
        kind = ConstraintKind.REGEX if key == "regex" else ConstraintKind.GRAMMAR
        return cls(kind, value, **options)


def _dumps(schema: Mapping[str, Any]) -> str:
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"the JSON schema is not serialisable as JSON: {exc}") from None


def _schema_object(text: str) -> dict[str, Any]:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    return schema
