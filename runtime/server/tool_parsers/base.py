"""What every ``--tool-call-parser`` shares: the :class:`ToolParser` interface, the
:class:`ToolCall` it finds, and the JSON scanning the parsers use."""

from __future__ import annotations

import abc
import json
import uuid
from dataclasses import dataclass, field
from typing import Optional


def tool_call_id() -> str:
    """A fresh tool call id (``chatcmpl-tool-`` + 32 hex digits, vLLM's form)."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


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


def call_from_obj(obj, args_keys: tuple[str, ...]) -> Optional[ToolCall]:
    """A :class:`ToolCall` from a decoded ``{"name": ..., <args key>: ...}`` object (the first
    of ``args_keys`` present; ``"{}"`` when none is), or None when ``obj`` is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for k in args_keys:
        if k in obj:
            args = obj[k]
            return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
    return ToolCall(obj["name"], "{}")


def json_values(text: str, i: int, separators: str, stop: Optional[str] = None) -> tuple[list, str]:
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
