"""``--tool-call-parser hermes``: Hermes 2 Pro's and Qwen 2.5's ``<tool_call>`` blocks."""

from __future__ import annotations

import json
import re
from typing import Optional

from .base import ToolCall, ToolParser, call_from_obj


class HermesToolParser(ToolParser):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks (Hermes 2
    Pro's and Qwen 2.5's chat templates); content is the text outside the blocks."""

    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)$", re.S)

    @staticmethod
    def _block_call(body: str) -> Optional[ToolCall]:
        try:
            return call_from_obj(json.loads(body.strip()), ("arguments", "parameters"))
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
