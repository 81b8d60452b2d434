"""A request's structured-output constraint: read from ``response_format``,
vLLM's ``structured_outputs`` or a tool-call schema, and compiled once here
so that a bad one is a 400 before any pod sees it."""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.structured import Constraint, compile_check
from splitserve.router.errors import bad_request

T = TypeVar("T")

# structured_outputs fields that qualify a constraint rather than being one.
_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern", "disable_fallback")


def request_constraint(response_format: dict[str, Any] | None, structured_outputs: dict[str, Any] | None,
                       tool_schema: dict[str, Any] | None = None) -> tuple[Constraint | None, str | None]:
    """The constraint of a request and the field it came from (for 400s).

    As vLLM: ``response_format`` (other than ``text``) or the tool-call
    schema gives the kind and ``structured_outputs`` may add only options to it
    (``disable_any_whitespace``, ``whitespace_pattern``, ...); at most one of
    ``response_format``, a kind in ``structured_outputs`` and a tool-call
    schema may constrain the output. Raises a 400 naming the field whose
    shape is wrong."""
    options = {k: v for k, v in (structured_outputs or {}).items() if k in _OPTIONS and v is not None}
    own_kind = bool(structured_outputs) and any(k not in _OPTIONS for k in structured_outputs or {})
    found: list[tuple[Constraint, str]] = []
    from_format = _as_400("response_format", Constraint.from_response_format, response_format)
    if from_format is not None:
        found.append((from_format, "response_format"))
    if tool_schema is not None:
        found.append((_as_400("tools", Constraint.json_schema, tool_schema), "tool_choice"))
    if own_kind or (structured_outputs and not found):
        constraint = _as_400("structured_outputs", Constraint.from_structured_outputs, structured_outputs)
        if constraint is not None:
            found.append((constraint, "structured_outputs"))
    if len(found) > 1:
        names = " and ".join(param for _, param in found)
        raise bad_request(f"only one kind of structured-output constraint per request: got {names}", found[1][1])
    if not found:
        return None, None
    constraint, param = found[0]
    if param != "structured_outputs" and options:
        extra = {k: v for k, v in options.items() if k != "disable_fallback"}
        constraint = _as_400("structured_outputs", replace, constraint, **extra)
    return constraint, param


def _as_400(param: str, build: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``build(*args, **kwargs)``, its ``InvalidRequestError`` a 400 naming ``param``."""
    try:
        return build(*args, **kwargs)
    except InvalidRequestError as exc:
        raise bad_request(str(exc), param) from None


class ConstraintChecker:
    """Compiles constraints with llguidance (grammar only, no vocabulary) and
    remembers the ones that compiled, so a schema sent on every request is
    compiled once per router. Thread-safe; bounded."""

    def __init__(self, max_cached: int = 512) -> None:
        self.max_cached = max_cached
        self._lock = threading.Lock()
        self._good: OrderedDict[Constraint, None] = OrderedDict()

    def check(self, constraint: Constraint, param: str | None) -> None:
        """Return when ``constraint`` compiles; else raise a 400 naming the
        problem (and ``param``, the request field it came from)."""
        with self._lock:
            if constraint in self._good:
                self._good.move_to_end(constraint)
                return
        try:
            compile_check(constraint)
        except InvalidRequestError as exc:
            raise bad_request(f"{param}: {exc}" if param else str(exc), param) from None
        with self._lock:
            self._good[constraint] = None
            while len(self._good) > self.max_cached:
                self._good.popitem(last=False)


def checked_constraint(checker: ConstraintChecker | None, response_format: dict[str, Any] | None,
                       structured_outputs: dict[str, Any] | None,
                       tool_schema: dict[str, Any] | None = None) -> Constraint | None:
    """``request_constraint`` then ``check`` (a fresh checker when None)."""
    constraint, param = request_constraint(response_format, structured_outputs, tool_schema)
    if constraint is not None:
        (checker or ConstraintChecker()).check(constraint, param)
    return constraint
