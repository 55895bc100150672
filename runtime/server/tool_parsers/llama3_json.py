"""``--tool-call-parser llama3_json``: Llama 3.x's JSON tool calls (``<|python_tag|>``,
``{"name": ..., "parameters": {...}}`` objects separated by ``;``)."""

from __future__ import annotations

from typing import Optional

from .base import ToolParser, call_from_obj, json_values


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
        objs, how = json_values(body, 0, " \t\r\n;")
        return objs, how == "end"

    def extract(self, text):
        objs, whole = self._objects(text)
        calls = [call_from_obj(o, ("parameters", "arguments")) for o in objs]
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
