"""Constraint values, the OpenAI / vLLM request shapes they come from, the
compile check the router and engines run, and the wire format."""
from __future__ import annotations

import json

import pytest

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.structured import Constraint, ConstraintKind, compile_check
from splitserve.engine.structured.grammar import close_objects
from splitserve.pod.proto_convert import constraint_from_proto, sampling_from_proto, sampling_to_proto
from splitserve.proto import splitserve_v1_pb2 as pb

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "required": ["b"]}


def test_constructors_normalise_and_are_hashable() -> None:
    from_dict = Constraint.json_schema(SCHEMA)
    assert from_dict.kind is ConstraintKind.JSON_SCHEMA
    assert list(json.loads(from_dict.spec)["properties"]) == ["b", "a"]  # key order is kept
    assert Constraint(ConstraintKind.JSON_SCHEMA, from_dict.spec) == from_dict
    assert Constraint("regex", "[0-9]+").kind is ConstraintKind.REGEX  # type: ignore[arg-type]
    assert Constraint.choice(["x", "y"]).spec == ("x", "y")
    assert Constraint.json_object().spec == ""
    assert len({from_dict, Constraint.json_schema(SCHEMA), Constraint.choice(["x", "y"])}) == 2


@pytest.mark.parametrize(("make", "words"), [
    (lambda: Constraint("yaml", "x"), "unknown constraint kind"),  # type: ignore[arg-type]
    (lambda: Constraint.json_schema("{not json"), "not valid JSON"),
    (lambda: Constraint.json_schema("[1, 2]"), "must be a JSON object"),
    (lambda: Constraint.regex(""), "non-empty string"),
    (lambda: Constraint.choice([]), "non-empty list"),
    (lambda: Constraint.choice(["a", ""]), "non-empty strings"),
    (lambda: Constraint(ConstraintKind.CHOICE, "ab"), "list of strings"),
    (lambda: Constraint.json_object(disable_any_whitespace=True, whitespace_pattern=" "), "cannot both"),
    (lambda: Constraint.json_object(disable_any_whitespace="yes"), "must be a boolean"),
])
def test_bad_shapes_raise_invalid_request(make, words: str) -> None:
    with pytest.raises(InvalidRequestError, match=words):
        make()


def test_from_response_format() -> None:
    assert Constraint.from_response_format(None) is None
    assert Constraint.from_response_format({"type": "text"}) is None
    assert Constraint.from_response_format({"type": "json_object"}) == Constraint.json_object()
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    assert Constraint.from_response_format(rf) == Constraint.json_schema(SCHEMA)
    for bad, words in [({"type": "xml"}, "response_format.type"), ({"type": "json_schema"}, "json_schema"),
                       ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema is missing")]:
        with pytest.raises(InvalidRequestError, match=words):
            Constraint.from_response_format(bad)


def test_from_structured_outputs_is_vllms_field() -> None:
    assert Constraint.from_structured_outputs(None) is None and Constraint.from_structured_outputs({}) is None
    assert Constraint.from_structured_outputs({"json": SCHEMA, "disable_any_whitespace": True}) == \
        Constraint.json_schema(SCHEMA, disable_any_whitespace=True)
    assert Constraint.from_structured_outputs({"regex": "a+", "disable_fallback": True}) == Constraint.regex("a+")
    assert Constraint.from_structured_outputs({"choice": ["p", "n"]}) == Constraint.choice(["p", "n"])
    assert Constraint.from_structured_outputs({"grammar": "start: \"x\""}).kind is ConstraintKind.GRAMMAR
    assert Constraint.from_structured_outputs({"json_object": True, "whitespace_pattern": " ?"}) == \
        Constraint.json_object(whitespace_pattern=" ?")
    for bad, words in [({"regex": "a", "choice": ["b"]}, "exactly one"), ({"colour": 1}, "unknown"),
                       ({"structural_tag": {}, "regex": "a"}, "not supported"), ({"choice": "ab"}, "list"),
                       ({"json_object": 1}, "must be true"), ({"json": 3}, "JSON Schema")]:
        with pytest.raises(InvalidRequestError, match=words):
            Constraint.from_structured_outputs(bad)
    # SamplingParams reads a mapping the same way.
    assert SamplingParams(constraint={"regex": "a+"}).constraint == Constraint.regex("a+")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="constraint must be"):
        SamplingParams(constraint="a+")  # type: ignore[arg-type]


@pytest.mark.parametrize(("constraint", "words"), [
    (Constraint.json_schema({"type": "strng"}), "json_schema constraint: .*strng"),
    (Constraint.json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/none"}}}), "none"),
    (Constraint.regex("a(b"), "regex constraint: .*unclosed group"),
    (Constraint.grammar("start: foo"), "grammar constraint: .*foo"),
])
def test_compile_check_names_the_problem(constraint: Constraint, words: str) -> None:
    with pytest.raises(InvalidRequestError, match=words) as info:
        compile_check(constraint)
    assert "\n" not in str(info.value)


def test_compile_check_passes_good_constraints() -> None:
    for good in (Constraint.json_schema(SCHEMA), Constraint.regex(r"\d{3}-[a-z]+"), Constraint.choice(["a", "b"]),
                 Constraint.grammar('start: "x" NUM\nNUM: /[0-9]+/'), Constraint.json_object(),
                 Constraint.json_schema(SCHEMA, disable_additional_properties=True, whitespace_pattern=" ?")):
        assert compile_check(good) is None


def test_close_objects_only_adds_missing_additional_properties() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "object", "properties": {"y": {}}},
                                               "z": {"type": "array", "items": {"properties": {}}}},
              "$defs": {"d": {"properties": {}, "additionalProperties": True}}}
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["x"]["additionalProperties"] is False
    assert closed["properties"]["z"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["additionalProperties"] is True
    assert "additionalProperties" not in schema  # a copy


@pytest.mark.parametrize("constraint", [
    Constraint.json_schema(SCHEMA, disable_additional_properties=True),
    Constraint.regex("[ab]{2}"),
    Constraint.choice(["yes", "no"]),
    Constraint.grammar('start: "x"'),
    Constraint.json_object(disable_any_whitespace=True),
    Constraint.json_object(whitespace_pattern="[ ]?"),
])
def test_wire_round_trip(constraint: Constraint) -> None:
    params = SamplingParams(temperature=0.0, constraint=constraint)
    message = sampling_to_proto(params)
    assert message.HasField("constraint")
    assert sampling_from_proto(pb.SamplingParams.FromString(message.SerializeToString())) == params


def test_wire_unconstrained_and_empty_constraint() -> None:
    assert not sampling_to_proto(SamplingParams()).HasField("constraint")
    assert sampling_from_proto(sampling_to_proto(SamplingParams())).constraint is None
    with pytest.raises(InvalidRequestError, match="needs one of"):
        constraint_from_proto(pb.Constraint(disable_any_whitespace=True))
    with pytest.raises(InvalidRequestError, match="non-empty list"):
        constraint_from_proto(pb.Constraint(choice=pb.ChoiceList()))
