"""Tool calling without a model (issue 14 item 2): the ``auto`` parsers (hermes,
llama3_json), the ``required`` array reader, and that stream deltas, fed the text in
arbitrary pieces, reassemble to exactly the calls and content of the whole response."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from argosy.runtime.server.tool_parsers import HermesToolParser, Llama3JsonToolParser, get_parser
from argosy.runtime.server.tools import ToolCalls, ToolMode, complete_array_items, named_schema, required_schema

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
NAMES = frozenset({"get_weather", "get_time"})


def test_hermes_parser():
    p = HermesToolParser()
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    content, calls = p.extract(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("chatcmpl-tool-") for c in calls)
    assert p.extract("no calls here") == ("no calls here", [])
    # a block that is not a call leaves everything as content
    assert p.extract("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    # an unclosed last block (the stream ended in it) still counts
    assert [c.name for c in p.extract('<tool_call>{"name": "get_time", "arguments": {}}')[1]] == ["get_time"]
    assert p.content_end("Hi <tool_") == 3 and p.content_end("Hi <b>") == 6


def test_llama3_json_parser():
    p = Llama3JsonToolParser()
    content, calls = p.extract('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
                               '{"name": "get_time", "parameters": {}}')
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert p.extract("Plain answer.") == ("Plain answer.", [])
    assert p.extract('{"name": "x", "parameters": {') == ('{"name": "x", "parameters": {', [])  # cut short
    assert p.content_end("Plain") == 5 and p.content_end('  {"na') == 0 and p.content_end("<|py") == 0
    with pytest.raises(ValueError, match="known: hermes, llama3_json"):
        get_parser("mistral")


def test_required_schema_accepts_calls_and_refuses_others():
    schema = required_schema([WEATHER, TIME], parallel=True)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Rome"}}, {"name": "get_time", "parameters": {}}],
                        schema)
    for bad in ([], [{"name": "nope", "parameters": {}}], [{"name": "get_weather", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    one = required_schema([WEATHER, TIME], parallel=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "parameters": {}}] * 2, one)
    assert named_schema(TIME) == {"type": "object", "properties": {}}


def test_required_schema_keeps_defs_resolvable():
    """Pydantic-style parameters with $defs/$ref stay valid once nested in the required
    array (the refs are moved to the root, renamed per tool)."""
    tool = {"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "properties": {"when": {"$ref": "#/$defs/Slot"}}, "required": ["when"],
        "$defs": {"Slot": {"type": "object", "properties": {"day": {"enum": ["mon", "tue"]}}, "required": ["day"]}}}}}
    schema = required_schema([tool, TIME], parallel=True)
    assert "Slot" not in json.dumps(schema["items"]["anyOf"][0]).replace("book__Slot", "")
    jsonschema.validate([{"name": "book", "parameters": {"when": {"day": "mon"}}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "book", "parameters": {"when": {"day": "sun"}}}], schema)


def test_complete_array_items():
    assert complete_array_items('[{"a": 1}, {"b"') == ([{"a": 1}], False)
    assert complete_array_items(' [ {"a": 1} , {"b": [2]} ] ') == ([{"a": 1}, {"b": [2]}], True)
    assert complete_array_items("") == ([], False)


def _stream(tc: ToolCalls, text: str, finish: str, seed: int):
    """Feed ``text`` in random pieces; return (content, calls as (name, args), finish_reason)."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 12))) + [len(text)]
    content, calls, last = "", {}, None
    for k, cut in enumerate(cuts):
        done = k == len(cuts) - 1
        d, fr = tc.delta(0, text[:cut], done, finish if done else None)
        content += d.get("content", "")
        for c in d.get("tool_calls", []):
            slot = calls.setdefault(c["index"], {"id": None, "name": "", "arguments": ""})
            slot["id"] = slot["id"] or c.get("id")
            fn = c.get("function", {})
            slot["name"] += fn.get("name", "")
            slot["arguments"] += fn.get("arguments", "")
        last = fr
    return content, [(v["name"], v["arguments"]) for _, v in sorted(calls.items())], last, [v["id"] for v in calls.values()]


@pytest.mark.parametrize("mode, text, want_finish", [
    (ToolMode("auto", parser=HermesToolParser(), names=NAMES),
     'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', "tool_calls"),
    (ToolMode("auto", parser=HermesToolParser(), names=NAMES), "Just text, no <tools> here.", "stop"),
    (ToolMode("auto", parser=Llama3JsonToolParser(), names=NAMES),
     '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {}}', "tool_calls"),
    (ToolMode("auto", parser=Llama3JsonToolParser(), names=NAMES), "A plain answer.", "stop"),
    (ToolMode("required"), '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": '
                           '{"city": "Rome"}}]', "tool_calls"),
    (ToolMode("named", function="get_weather"), '{"city": "Lima", "unit": "c"}', "stop"),
    # text after a call is content, streamed too
    (ToolMode("auto", parser=HermesToolParser(), names=NAMES),
     'Sure.<tool_call>{"name": "get_time", "arguments": {}}</tool_call> Done.', "tool_calls"),
    # a JSON answer after llama3-style objects: all of it is text, in the stream as well
    (ToolMode("auto", parser=Llama3JsonToolParser(), names=NAMES), '{"name": "get_time", "parameters": {}} thanks',
     "stop"),
    # a "name" that is not one of the tools is not a call
    (ToolMode("auto", parser=Llama3JsonToolParser(), names=NAMES), '{"name": "Alice", "parameters": {"age": 3}}',
     "stop"),
])
def test_stream_deltas_reassemble_to_the_whole_response(mode, text, want_finish):
    whole_msg, whole_finish = ToolCalls(mode).message(text, "stop")
    assert whole_finish == want_finish
    for seed in range(5):
        content, calls, finish, ids = _stream(ToolCalls(mode), text, "stop", seed)
        assert finish == want_finish
        assert (content or None) == (whole_msg["content"] if whole_msg["tool_calls"] else text) or (
            not content and whole_msg["content"] is None)
        assert calls == [(c["function"]["name"], c["function"]["arguments"]) for c in whole_msg["tool_calls"]]
        assert all(i and i.startswith("chatcmpl-tool-") for i in ids)
