"""Constrained decoding (structured outputs) with llguidance.

The router's side is light (no torch, llguidance only when checking)::

    from splitserve.engine.structured import Constraint, compile_check

    constraint = Constraint.from_response_format(body.get("response_format"))  # or
    constraint = Constraint.from_structured_outputs(body.get("structured_outputs"))
    if constraint is not None:
        compile_check(constraint)  # InvalidRequestError -> HTTP 400
    params = SamplingParams(..., constraint=constraint)

The engine's side: ``manager.StructuredOutputManager`` (one per engine core:
tokenizer and compiled grammars, loaded on the first constrained request),
``matcher.RequestMatcher`` (one per request, replaying its output tokens so
far), ``bitmask`` (masks filled while the forward runs, applied in one op).
"""
from __future__ import annotations

from splitserve.engine.structured.constraint import Constraint, ConstraintKind
from splitserve.engine.structured.grammar import build_grammar, compile_check, ll_tokenizer

__all__ = ["Constraint", "ConstraintKind", "build_grammar", "compile_check", "ll_tokenizer"]
