"""Tool calling for ``/v1/chat/completions`` (OpenAI's ``tools`` / ``tool_choice``).

Three ways a request can call tools, as vLLM implements them:

- ``tool_choice: {"type": "function", "function": {"name": F}}`` (named): the output is
  constrained to F's ``parameters`` JSON schema and becomes one call of F.
- ``tool_choice: "required"``: the output is constrained to a JSON array of
  ``{"name": ..., "parameters": ...}`` objects, one ``anyOf`` branch per tool (at most one
  element when ``parallel_tool_calls`` is false), each becoming a call.
- ``tool_choice: "auto"`` (the default when ``tools`` is given): the model decides; its
  text is parsed for calls by the ``--tool-call-parser`` (needs
  ``--enable-auto-tool-choice``): ``hermes`` (Hermes 2 Pro / Qwen 2.5:
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks) or ``llama3_json``
  (Llama 3.x: an optional ``<|python_tag|>`` then ``{"name": ..., "parameters": {...}}``
  objects separated by ``;``).

Every call gets an id ``chatcmpl-tool-<32 hex>``; ``arguments`` is a JSON string. In a
stream, a named call's arguments are sent as they are generated; ``required`` and
``auto`` calls are sent whole, each as soon as its JSON (or ``</tool_call>``) is complete,
and text outside calls streams as ``content``. ``finish_reason`` is ``tool_calls`` when
calls were made (``required``, ``auto``) and the request stopped normally; a forced named
call keeps ``stop`` as OpenAI does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .tool_parsers import ToolCall, ToolParser, call_from_obj, json_values, tool_call_id

__all__ = ["ToolCalls", "ToolMode", "complete_array_items", "named_schema", "required_schema"]


def _parameters(tool: dict) -> dict:
    params = tool["function"].get("parameters")
    return params if params else {"type": "object", "properties": {}}


def named_schema(tool: dict) -> dict:
    """The JSON schema a named ``tool_choice`` constrains the output to: the function's
    ``parameters`` (an empty object schema when it has none)."""
    return _parameters(tool)


def _hoist_defs(params: dict, prefix: str, defs: dict) -> dict:
    """``params`` with its ``$defs`` moved into ``defs`` under ``prefix``-ed names and its
    ``#/$defs/X`` references rewritten to them (a schema nested inside another no longer
    resolves refs against its own root)."""
    local = params.get("$defs") or params.get("definitions") or {}
    names = {k: f"{prefix}{k}" for k in local}

    def rewrite(node):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k in ("$defs", "definitions") and node is params:
                    continue
                if k == "$ref" and isinstance(v, str):
                    for head in ("#/$defs/", "#/definitions/"):
                        if v.startswith(head) and v[len(head):] in names:
                            v = "#/$defs/" + names[v[len(head):]]
                out[k] = rewrite(v)
            return out
        if isinstance(node, list):
            return [rewrite(x) for x in node]
        return node

    for k, v in local.items():
        defs[names[k]] = rewrite(v)
    return rewrite(params)


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """The JSON schema for ``tool_choice: "required"``: a non-empty array of
    ``{"name": <one tool>, "parameters": <its schema>}`` (one element at most when
    ``parallel`` is false). Each tool's ``$defs`` move to the root (renamed per tool),
    where its ``$ref``s then resolve."""
    defs: dict = {}
    branches = [{"type": "object",
                 "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                "parameters": _hoist_defs(_parameters(t), f"{t['function']['name']}__", defs)},
                 "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": branches[0] if len(branches) == 1 else {"anyOf": branches}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def complete_array_items(text: str) -> tuple[list, bool]:
    """The complete elements of a (possibly unfinished) JSON array text, and whether the
    array itself is closed. ``'[{"a": 1}, {"b"'`` -> ``([{"a": 1}], False)``."""
    i = len(text) - len(text.lstrip())
    if i >= len(text) or text[i] != "[":
        return [], False
    items, how = json_values(text, i + 1, " \t\r\n,", stop="]")
    return items, how == "stop"


@dataclass
class ToolMode:
    """How one request uses tools: ``kind`` is ``named``, ``required`` or ``auto``."""

    kind: str
    function: Optional[str] = None  # the named function
    parser: Optional[ToolParser] = None  # auto
    names: frozenset = frozenset()  # auto: the request's tools; a call of anything else is text


@dataclass
class _StreamState:
    sent_content: int = 0  # characters of text sent as content
    sent_calls: int = 0  # whole calls sent
    named_id: Optional[str] = None  # the named call's id once its first delta went out


class ToolCalls:
    """Turns one request's generated text into tool calls, for whole responses and
    for streams (per-choice state keyed by the choice index)."""

    def __init__(self, mode: ToolMode):
        self.mode = mode
        self._streams: dict[int, _StreamState] = {}

    # ------------------------------------------------------------ whole response
    def message(self, text: str, finish_reason: Optional[str]) -> tuple[dict, Optional[str]]:
        """``(message, finish_reason)`` of a finished choice."""
        mode = self.mode
        if mode.kind == "named":  # the whole output is the arguments (cut short with "length")
            call = ToolCall(mode.function, text)
            return {"role": "assistant", "content": None, "tool_calls": [call.to_message()]}, finish_reason
        if mode.kind == "required":
            items, closed = complete_array_items(text)
            if closed and items:
                calls = [call_from_obj(o, ("parameters",)) for o in items]
                return ({"role": "assistant", "content": None, "tool_calls": [c.to_message() for c in calls]},
                        "tool_calls" if finish_reason == "stop" else finish_reason)
            return {"role": "assistant", "content": text, "tool_calls": []}, finish_reason
        content, calls = self._auto_extract(text)
        if calls:
            return ({"role": "assistant", "content": content, "tool_calls": [c.to_message() for c in calls]},
                    "tool_calls" if finish_reason == "stop" else finish_reason)
        return {"role": "assistant", "content": text, "tool_calls": []}, finish_reason

    def _auto_extract(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        content, calls = self.mode.parser.extract(text)
        if calls and any(c.name not in self.mode.names for c in calls):
            return text, []  # e.g. a JSON answer with a "name" field: not a call of these tools
        return content, calls

    # ------------------------------------------------------------ stream
    def delta(self, index: int, text: str, finished: bool, finish_reason: Optional[str]) -> tuple[dict, Optional[str]]:
        """The next stream delta for choice ``index`` given all its ``text`` so far:
        ``(delta, finish_reason)`` (an empty delta when nothing is ready)."""
        st = self._streams.setdefault(index, _StreamState())
        mode = self.mode
        if mode.kind == "named":
            new = text[st.sent_content:]
            st.sent_content = len(text)
            if st.named_id is None:
                st.named_id = tool_call_id()
                fn = {"name": mode.function, "arguments": new}
                return {"tool_calls": [{"index": 0, "id": st.named_id, "type": "function", "function": fn}]}, \
                    finish_reason
            return ({"tool_calls": [{"index": 0, "function": {"arguments": new}}]} if new else {}), finish_reason
        delta: dict = {}
        if mode.kind == "required":
            items, _ = complete_array_items(text)
            calls = [call_from_obj(o, ("parameters",)) for o in items]
        else:
            if finished:  # the whole text decides: calls (even an unclosed last block) or content
                content, calls = self._auto_extract(text)
                if not calls and not st.sent_calls:
                    rest = text[st.sent_content:]
                else:  # what the whole response's content holds beyond what went out already
                    sent = text[:st.sent_content]
                    full = content or ""
                    rest = full[len(sent):] if full.startswith(sent) else ""
                    calls = calls if calls else []
                if rest:
                    delta["content"] = rest
                st.sent_content = len(text)
            else:
                calls = [c for c in mode.parser.complete_calls(text) if c.name in mode.names]
                end = mode.parser.content_end(text)
                if end > st.sent_content:
                    delta["content"] = text[st.sent_content:end]
                    st.sent_content = end
        new_calls = calls[st.sent_calls:]
        if new_calls:
            delta["tool_calls"] = [c.to_delta(st.sent_calls + i) for i, c in enumerate(new_calls)]
            st.sent_calls = len(calls)
        if finished and st.sent_calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return delta, finish_reason
