"""Chat tool calls as vLLM serves them.

``tool_choice: "required"`` and a named function are answered through a JSON
schema of the tools (the output is constrained to it, then turned into
``tool_calls``); ``"auto"`` leaves the output free and a parser (Hermes style,
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, as the
Qwen2.5-family chat templates emit) picks the calls out of the text.
``"none"`` or no tools: plain text.
"""
from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from splitserve.router.errors import bad_request
from splitserve.router.protocol import ChatTool, NamedToolChoice

ToolMode = Literal["named", "required", "auto"]
HERMES = "hermes"
TOOL_CALL_PARSERS = (HERMES,)

_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
_HERMES_START = "<tool_call>"


@dataclass(frozen=True)
class ToolCallPlan:
    """How a chat request's output becomes ``tool_calls``: ``named`` (the whole
    output is the arguments of ``name``), ``required`` (the output is a JSON
    list of ``{"name", "parameters"}``) or ``auto`` (Hermes tags in free text).
    ``schema`` is the JSON schema the output is constrained to (None: auto)."""

    mode: ToolMode
    name: str | None = None
    schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class ParsedOutput:
    """A choice's text split into content (None when there is none) and calls."""

    content: str | None
    tool_calls: tuple[dict[str, Any], ...] = ()


def tool_call_plan(tools: Sequence[ChatTool] | None, tool_choice: str | NamedToolChoice | None,
                   parser: str | None) -> ToolCallPlan | None:
    """The plan for a chat request's ``tools`` / ``tool_choice`` (None: plain
    text), as vLLM decides it; raises a 400 naming the field otherwise."""
    if tool_choice is not None and not tools and tool_choice != "none":
        raise bad_request("tool_choice needs tools: send the tools the model may call", "tool_choice")
    if not tools or tool_choice == "none":
        return None
    if tool_choice is None:
        tool_choice = "auto"  # vLLM's default when tools are given
    if isinstance(tool_choice, NamedToolChoice):
        name = tool_choice.function.name
        match = [t for t in tools if t.function.name == name]
        if not match:
            raise bad_request(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
        return ToolCallPlan("named", name, _parameters(match[0]))
    if tool_choice == "required":
        return ToolCallPlan("required", None, required_schema(tools))
    if parser is None:
        raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                          "to be set (or send tool_choice \"required\", a named function or \"none\")",
                          "tool_choice")
    return ToolCallPlan("auto")


def required_schema(tools: Sequence[ChatTool]) -> dict[str, Any]:
    """vLLM's schema for ``tool_choice: "required"``: a non-empty list of
    ``{"name": <one tool's name>, "parameters": <its parameters>}``; the tools'
    ``$defs`` merged at the top (a name defined twice differently is a 400)."""
    defs: dict[str, Any] = {}
    variants = []
    for tool in tools:
        params = _parameters(tool)
        for name, sub in params.pop("$defs", {}).items():
            if name in defs and defs[name] != sub:
                raise bad_request(f"tool definition {name!r} has multiple schemas, which is not supported",
                                  "tools")
            defs[name] = sub
        variants.append({"properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                        "parameters": params},
                         "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    if defs:
        schema["$defs"] = defs
    return schema


def parse_output(plan: ToolCallPlan, text: str) -> ParsedOutput:
    """Turn a finished choice's text into content and tool calls. Output that
    does not parse (a constrained one cut by ``max_tokens``) stays content."""
    if plan.mode == "named":
        return ParsedOutput("", (tool_call(plan.name or "", text),))
    if plan.mode == "required":
        try:
            calls = json.loads(text)
            return ParsedOutput("", tuple(tool_call(c["name"], _dumps(c.get("parameters", {}))) for c in calls))
        except (ValueError, TypeError, KeyError):
            return ParsedOutput(text)
    return parse_hermes(text)


def parse_hermes(text: str) -> ParsedOutput:
    """vLLM's Hermes parser: every ``<tool_call>`` JSON object is a call, the
    text before the first one is the content; any call that does not parse
    leaves the whole text as content."""
    if _HERMES_START not in text:
        return ParsedOutput(text)
    try:
        calls = []
        for closed, open_ in _HERMES_CALL.findall(text):
            value = json.loads(closed or open_)
            calls.append(tool_call(value["name"], _dumps(value.get("arguments", {}))))
    except (ValueError, TypeError, KeyError):
        return ParsedOutput(text)
    content = text[:text.index(_HERMES_START)]
    return ParsedOutput(content or None, tuple(calls))


def hermes_safe_prefix(text: str) -> int:
    """How many leading characters of ``text`` are content for sure while
    streaming under ``auto``: everything before a ``<tool_call>`` tag or
    before a tail that may still become one."""
    start = text.find(_HERMES_START)
    if start >= 0:
        return start
    for keep in range(min(len(_HERMES_START) - 1, len(text)), 0, -1):
        if _HERMES_START.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)


def tool_call(name: str, arguments: str) -> dict[str, Any]:
    """One ``tool_calls`` entry (vLLM's id form ``chatcmpl-tool-<hex>``)."""
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _parameters(tool: ChatTool) -> dict[str, Any]:
    params = tool.function.parameters
    return copy.deepcopy(params) if params else {"type": "object", "properties": {}}


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


class ToolCallStream:
    """One streamed chat choice under a tool plan: text in, delta bodies out.

    ``feed`` returns the delta to send (None: nothing yet) and the finish
    reason to report instead of the engine's (None: keep it; as vLLM, only
    calls found by the auto parser finish with "tool_calls"). Named: the
    text streams as the call's ``arguments`` (as vLLM). Required: the calls
    are sent whole when the choice ends. Auto: content streams until a
    ``<tool_call>`` may begin; the calls are sent when the choice ends.
    """

    def __init__(self, plan: ToolCallPlan) -> None:
        self.plan = plan
        self._text = ""
        self._sent = 0
        self._call: dict[str, Any] | None = None

    def feed(self, text: str, finished: bool) -> tuple[dict[str, Any] | None, str | None]:
        self._text += text
        if self.plan.mode == "named":
            return self._named(text, finished), None
        if not finished:
            if self.plan.mode == "required":
                return None, None
            safe = hermes_safe_prefix(self._text)
            fresh, self._sent = self._text[self._sent:safe], max(self._sent, safe)
            return ({"content": fresh} if fresh else None), None
        parsed = parse_output(self.plan, self._text)
        if not parsed.tool_calls:
            return {"content": self._text[self._sent:]}, None
        delta: dict[str, Any] = {"tool_calls": [{"index": i, **call} for i, call in enumerate(parsed.tool_calls)]}
        rest = (parsed.content or "")[self._sent:]
        if rest:
            delta["content"] = rest
        return delta, "tool_calls" if self.plan.mode == "auto" else None

    def _named(self, text: str, finished: bool) -> dict[str, Any] | None:
        if not text:
            return {} if finished else None
        if self._call is None:
            self._call = tool_call(self.plan.name or "", text)
            return {"tool_calls": [{"index": 0, **self._call}]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
