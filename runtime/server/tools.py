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

import abc
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Optional

#: ``--tool-call-parser`` names (vLLM's).
TOOL_PARSERS = ("hermes", "llama3_json")


def tool_call_id() -> str:
    """A fresh tool call id (``chatcmpl-tool-`` + 32 hex digits, vLLM's form)."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


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


@dataclass
class ToolCall:
    """One call: ``name`` and ``arguments`` (a JSON string)."""

    name: str
    arguments: str
    id: str = field(default_factory=tool_call_id)

    def to_message(self) -> dict:
        """The ``tool_calls`` entry of a response message."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def to_delta(self, index: int) -> dict:
        """The ``tool_calls`` entry of a stream delta (the whole call at once)."""
        return {"index": index, **self.to_message()}


def _call_from_obj(obj, args_keys: tuple[str, ...]) -> Optional[ToolCall]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for k in args_keys:
        if k in obj:
            args = obj[k]
            return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
    return ToolCall(obj["name"], "{}")


def _json_values(text: str, i: int, separators: str, stop: Optional[str] = None) -> tuple[list, str]:
    """The complete JSON values in ``text[i:]``, separated by any of ``separators``, and how
    the scan ended: ``"end"`` (text exhausted), ``"stop"`` (the ``stop`` character met) or
    ``"partial"`` (a value that does not parse, e.g. still being generated)."""
    dec, items = json.JSONDecoder(), []
    while True:
        while i < len(text) and text[i] in separators:
            i += 1
        if i >= len(text):
            return items, "end"
        if stop is not None and text[i] == stop:
            return items, "stop"
        try:
            obj, i = dec.raw_decode(text, i)
        except ValueError:
            return items, "partial"
        items.append(obj)


def complete_array_items(text: str) -> tuple[list, bool]:
    """The complete elements of a (possibly unfinished) JSON array text, and whether the
    array itself is closed. ``'[{"a": 1}, {"b"'`` -> ``([{"a": 1}], False)``."""
    i = len(text) - len(text.lstrip())
    if i >= len(text) or text[i] != "[":
        return [], False
    items, how = _json_values(text, i + 1, " \t\r\n,", stop="]")
    return items, how == "stop"


class ToolParser(abc.ABC):
    """Finds tool calls in a model's free text (``tool_choice: "auto"``)."""

    name = ""

    @abc.abstractmethod
    def extract(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        """``(content, calls)``: the text outside calls (None when empty) and the calls."""

    @abc.abstractmethod
    def content_end(self, text: str) -> int:
        """How much of a stream's text so far is certainly content (cannot be the start
        of a call): characters from the start."""

    @abc.abstractmethod
    def complete_calls(self, text: str) -> list[ToolCall]:
        """The calls whose text is complete so far (a prefix of ``extract``'s calls)."""


class HermesToolParser(ToolParser):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks (Hermes 2
    Pro's and Qwen 2.5's chat templates); content is the text outside the blocks."""

    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)$", re.S)

    @staticmethod
    def _block_call(body: str) -> Optional[ToolCall]:
        try:
            return _call_from_obj(json.loads(body.strip()), ("arguments", "parameters"))
        except ValueError:
            return None

    def extract(self, text):
        calls = []
        for m in self._BLOCK.finditer(text):
            call = self._block_call(m.group(1) if m.group(1) is not None else m.group(2))
            if call is None:  # not a call after all: the whole text is content
                return text, []
            calls.append(call)
        if not calls:
            return text, []
        content = self._BLOCK.sub("", text).strip()
        return content or None, calls

    def content_end(self, text):
        k = text.find(self.START)
        if k >= 0:
            return k
        for n in range(min(len(self.START) - 1, len(text)), 0, -1):  # a partial "<tool_call"
            if self.START.startswith(text[-n:]):
                return len(text) - n
        return len(text)

    def complete_calls(self, text):
        out = []
        for m in re.finditer(r"<tool_call>(.*?)</tool_call>", text, re.S):
            call = self._block_call(m.group(1))
            if call is None:
                break
            out.append(call)
        return out


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON tool calls: optional ``<|python_tag|>``, then one or more
    ``{"name": ..., "parameters": {...}}`` objects separated by ``;``. Text that does not
    start that way is content."""

    name = "llama3_json"
    TAG = "<|python_tag|>"

    def _body(self, text: str) -> Optional[str]:
        s = text.lstrip()
        if s.startswith(self.TAG):
            s = s[len(self.TAG):].lstrip()
        return s if s.startswith("{") else None

    def _objects(self, text: str) -> tuple[list, bool]:
        body = self._body(text)
        if body is None:
            return [], False
        objs, how = _json_values(body, 0, " \t\r\n;")
        return objs, how == "end"

    def extract(self, text):
        objs, whole = self._objects(text)
        calls = [_call_from_obj(o, ("parameters", "arguments")) for o in objs]
        if not whole or not calls or any(c is None for c in calls):
            return text, []
        return None, calls

    def content_end(self, text):
        s = text.lstrip()
        if not s:
            return 0
        if s.startswith("{") or s.startswith(self.TAG) or self.TAG.startswith(s):
            return 0
        return len(text)

    def complete_calls(self, text):
        # text after the objects ("... thanks") makes it all content: decided at the end only
        return []


def get_parser(name: str) -> ToolParser:
    """The parser for ``--tool-call-parser NAME``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    for cls in (HermesToolParser, Llama3JsonToolParser):
        if cls.name == name:
            return cls()
    raise ValueError(f"unknown tool call parser {name!r} (known: {', '.join(TOOL_PARSERS)})")


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
                calls = [_call_from_obj(o, ("parameters",)) for o in items]
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
            calls = [_call_from_obj(o, ("parameters",)) for o in items]
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
