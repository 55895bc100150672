"""Tool-call parsers for ``tool_choice: "auto"``, one file each, registered by their
``--tool-call-parser`` name (vLLM's names): ``hermes`` (:mod:`.hermes`) and ``llama3_json``
(:mod:`.llama3_json`). Torch-free: ``argosy serve``'s argument parser reads the names."""

from __future__ import annotations

from .base import ToolCall, ToolParser, call_from_obj, json_values, tool_call_id
from .hermes import HermesToolParser
from .llama3_json import Llama3JsonToolParser

#: ``--tool-call-parser`` name -> parser class.
PARSERS: dict[str, type[ToolParser]] = {cls.name: cls for cls in (HermesToolParser, Llama3JsonToolParser)}
#: ``--tool-call-parser`` names (vLLM's).
TOOL_PARSERS = tuple(PARSERS)

__all__ = ["PARSERS", "TOOL_PARSERS", "HermesToolParser", "Llama3JsonToolParser", "ToolCall", "ToolParser",
           "call_from_obj", "get_parser", "json_values", "tool_call_id"]


def get_parser(name: str) -> ToolParser:
    """The parser for ``--tool-call-parser NAME``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    cls = PARSERS.get(name)
    if cls is not None:
        return cls()
    raise ValueError(f"unknown tool call parser {name!r} (known: {', '.join(TOOL_PARSERS)})")
