"""Structured outputs and tool calling (issue 14): JSON schema / json_object / regex /
choice / grammar constraints enforced while decoding, through the engine and through
``argosy serve`` with the real ``openai`` SDK; forced tool calls (named, required) and
the tool-result round trip. Answers are checked with ``jsonschema`` and ``re`` (independent
of the grammar engine)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import openai
import pytest
import torch

from argosy.runtime.core.sampling_params import SamplingParams, StructuredOutputsParams
from argosy.runtime.core.structured_output import StructuredOutputManager
from argosy.runtime.loader import default_model_path
from argosy.runtime.loader.tokenizer import load_model_tokenizer

from .serving import API_KEY, ServerProcess, assert_error_body, http_request, open_stream, read_events

MODEL = Path(default_model_path()).name.removesuffix(".gguf")
VOCAB = 49152
EOS = 2

#: Bounded schemas (a 135M model left to an unbounded array or string can loop until
#: max_tokens); every constraint kind the issue names: nesting, arrays, enums, required
#: fields, numbers with bounds.
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        },
        "required": ["name", "age", "role"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 99999},
            "items": {
                "type": "array", "minItems": 1, "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                                   "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
            },
            "total": {"type": "number", "minimum": 0, "maximum": 1000},
            "paid": {"type": "boolean"},
        },
        "required": ["id", "items", "total", "paid"],
        "additionalProperties": False,
    },
    "city": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "location": {
                "type": "object",
                "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                               "lon": {"type": "number", "minimum": -180, "maximum": 180}},
                "required": ["lat", "lon"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["coastal", "capital", "historic"]}},
        },
        "required": ["city", "location", "tags"],
        "additionalProperties": False,
    },
}
QUESTIONS = ["Describe one example as JSON.", "Give me the data for a typical case.", "Answer in JSON, please."]


# --------------------------------------------------------------------- units
@pytest.fixture(scope="module")
def tokenizer():
    return load_model_tokenizer()


@pytest.fixture(scope="module")
def manager(tokenizer):
    return StructuredOutputManager(tokenizer, VOCAB, [EOS])


def test_params_need_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{nope")
    assert StructuredOutputsParams(choice=["a", "b"]).kind == "choice"


@pytest.mark.parametrize("spec, needle", [
    (StructuredOutputsParams(json={"type": "bogus"}), "JSON schema"),
    (StructuredOutputsParams(json="[1, 2]"), "JSON object"),
    (StructuredOutputsParams(regex="([a-z"), "regex"),
    (StructuredOutputsParams(grammar="root ::= undefined_rule"), "grammar"),
])
def test_invalid_constraints_are_value_errors(manager, spec, needle):
    with pytest.raises(ValueError, match=needle) as e:
        manager.compile(spec)
    assert "/project/" not in str(e.value)  # the engine's source location is stripped


def test_mask_touches_only_constrained_rows_and_allows_the_grammar(manager, tokenizer):
    choices = ['say "yes"', "no"]
    state = manager.new_state(StructuredOutputsParams(choice=choices))
    # a previous step had a constrained row 0: its mask must not leak into this step's row 0
    manager.apply_bitmask(torch.randn(3, VOCAB), [manager.new_state(StructuredOutputsParams(regex="x")), None, None])
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    manager.apply_bitmask(logits, [None, state, None])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert 0 < len(allowed) < 50
    # every allowed first token starts one of the choices; the choices' own first tokens are allowed
    for t in allowed:
        piece = tokenizer.decode([t])
        assert any(c.startswith(piece) for c in choices), piece
    for c in choices:
        assert tokenizer.encode(c, add_special_tokens=False)[0] in allowed
    # walking one choice to its end leaves only EOS, which terminates the matcher
    for t in tokenizer.encode(choices[0], add_special_tokens=False):
        assert state.accept(t)
    logits = torch.zeros(1, VOCAB)
    manager.apply_bitmask(logits, [state])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [EOS]
    assert state.accept(EOS) and state.is_terminated


def test_compiled_grammars_are_cached(manager):
    a = manager.compile(StructuredOutputsParams(json=SCHEMAS["person"]))
    b = manager.compile(StructuredOutputsParams(json=json.dumps(SCHEMAS["person"], indent=2)))
    assert a is b  # the same schema in another spelling is one cache entry


# ------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def llm():
    from argosy.runtime.core.llm import LLM

    return LLM(max_model_len=1024, kv_cache_memory=64 << 20)


def _chat(tokenizer, q: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                         return_dict=False)


def test_mixed_batch_keeps_unconstrained_rows_identical(llm):
    """Constrained and unconstrained requests share a batch; the unconstrained rows' greedy
    tokens equal those of running them alone, and the constrained rows validate."""
    tok = llm.engine.tokenizer
    free = [_chat(tok, "Tell me about the moon."), _chat(tok, "What is a river?")]
    greedy = SamplingParams(max_tokens=24, temperature=0)
    alone = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in free], greedy)]
    constrained = SamplingParams(max_tokens=160, temperature=0,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMAS["person"]))
    prompts = [{"prompt_token_ids": free[0]}, {"prompt_token_ids": _chat(tok, "A user as JSON.")},
               {"prompt_token_ids": free[1]}, {"prompt_token_ids": _chat(tok, "An admin as JSON.")}]
    outs = llm.generate(prompts, [greedy, constrained, greedy, constrained])
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == alone
    for o in (outs[1], outs[3]):
        assert o.outputs[0].finish_reason == "stop", o.outputs[0].text
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMAS["person"])
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks  # nothing leaked


# ------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("argosy_structured"), "structured",
                        ["--max-model-len", "2048", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
                        api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def _json_schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_response_format_json_schema_validates(client, name):
    """Every answer parses and validates, streamed and not (100% over the prompts). The
    six requests are sent at once (the engine batches them, each with its own grammar)."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(q: str, stream: bool) -> tuple[str, str]:
        kw = dict(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=300,
                  response_format=_json_schema_format(name), temperature=0.7, seed=len(q))
        if not stream:
            r = client.chat.completions.create(**kw)
            return r.choices[0].message.content, r.choices[0].finish_reason
        parts, finish = [], None
        for chunk in client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                parts.append(c.delta.content or "")
                finish = c.finish_reason or finish
        return "".join(parts), finish

    cases = [(q, stream) for q in QUESTIONS for stream in (False, True)]
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda c: ask(*c), cases))
    for (q, stream), (text, finish) in zip(cases, answers):
        assert finish == "stop", (name, q, stream, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_json_object_choice_regex_grammar(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi, JSON please."}],
                                       max_tokens=120, response_format={"type": "json_object"}, temperature=0)
    assert isinstance(json.loads(r.choices[0].message.content), dict)

    choices = ["positive", "negative", "neutral"]
    r = client.chat.completions.create(model=MODEL, max_tokens=10, temperature=0,
                                       messages=[{"role": "user", "content": "I love this film! Sentiment?"}],
                                       extra_body={"guided_choice": choices})
    assert r.choices[0].message.content in choices

    pattern = r"[0-9]{3}-[0-9]{3}-[0-9]{4}"
    r = client.completions.create(model=MODEL, prompt="Call me at ", max_tokens=20, temperature=0.9, seed=3,
                                  extra_body={"guided_regex": pattern})
    assert re.fullmatch(pattern, r.choices[0].text), r.choices[0].text

    grammar = 'root ::= "The answer is " [0-9]+ "."'
    r = client.completions.create(model=MODEL, prompt="2 + 2 = ?", max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"The answer is [0-9]+\.", r.choices[0].text), r.choices[0].text

    r = client.completions.create(model=MODEL, prompt="Pick: ", max_tokens=20, temperature=0, n=3,
                                  extra_body={"structured_outputs": {"choice": ['a "quoted" one', "b\\c"]}})
    assert {c.text for c in r.choices} <= {'a "quoted" one', "b\\c"}


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_regex": "([a-z"}, None),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_json"),
    ({"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend"),
    ({"guided_whitespace_pattern": " "}, None),
])
def test_bad_constraints_are_400(server, body, param):
    status, out = http_request(server, "POST", "/v1/chat/completions",
                               {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                **body})
    err = assert_error_body(out, 400)
    assert status == 400
    if param is not None:
        assert err["param"] == param, err


def test_abort_mid_constrained_stream_frees_everything(server):
    """A client that goes away mid-stream: the engine aborts the constrained request and
    the next one still works (matchers are per request)."""
    conn, resp = open_stream(server, "/v1/chat/completions", {
        "model": MODEL, "stream": True, "max_tokens": 200, "messages": [{"role": "user", "content": "JSON!"}],
        "response_format": _json_schema_format("order")})
    events = read_events(resp, limit=3)
    assert events
    conn.close()
    status, out = http_request(server, "POST", "/v1/chat/completions", {
        "model": MODEL, "max_tokens": 300, "temperature": 0, "messages": [{"role": "user", "content": "JSON!"}],
        "response_format": _json_schema_format("order")})
    assert status == 200, out
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), SCHEMAS["order"])


# -------------------------------------------------------------------- tools
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "minLength": 1, "maxLength": 20},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
            "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
            "required": ["a", "b"], "additionalProperties": False}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris? Also, what is 2 + 3?"}]


def _streamed_calls(stream) -> tuple[list[tuple[str, str]], list[str], str]:
    calls, finish = {}, None
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "args": ""})
                slot["id"] = slot["id"] or tc.id
                if tc.function is not None:
                    slot["name"] += tc.function.name or ""
                    slot["args"] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    ordered = [v for _, v in sorted(calls.items())]
    return [(v["name"], v["args"]) for v in ordered], [v["id"] for v in ordered], finish


def test_named_tool_choice(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=120, temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and msg.content is None
    (call,) = msg.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    jsonschema.validate(json.loads(call.function.arguments), PARAMS["get_weather"])
    calls, ids, finish = _streamed_calls(client.chat.completions.create(stream=True, **kw))
    assert calls == [("get_weather", call.function.arguments)] and finish == "stop" and ids[0]


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_choice(client, parallel):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200, temperature=0, tool_choice="required",
              parallel_tool_calls=parallel)
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "tool_calls"
    calls = r.choices[0].message.tool_calls
    assert calls and (parallel or len(calls) == 1)
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])
    streamed, ids, finish = _streamed_calls(client.chat.completions.create(stream=True, **kw))
    assert streamed == [(c.function.name, c.function.arguments) for c in calls] and finish == "tool_calls"
    assert len(set(ids)) == len(ids)


def test_tool_result_round_trip(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=120, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "add"}})
    call = r.choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "add", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": str(args["a"] + args["b"])},
    ]
    r2 = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                        max_tokens=20, temperature=0)
    assert r2.choices[0].message.content and not r2.choices[0].message.tool_calls
    # the tool result is in the prompt the model saw
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    assert r2.usage.prompt_tokens > plain.usage.prompt_tokens + 5


def test_auto_tool_choice_with_hermes_parser(client):
    """``auto`` (the default with tools) on a server started with the hermes parser: the
    bundled model's template has no tool section, so it answers in text; that text comes
    back as content with finish_reason stop (a parsed call is covered in test_tool_parsers)."""
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=16, temperature=0)
    msg = r.choices[0].message
    if msg.tool_calls:
        assert r.choices[0].finish_reason == "tool_calls"
    else:
        assert msg.content and r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
    ({"tool_choice": "required"}, None),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "required"},
     "tools.0.function.name"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, None),
])
def test_bad_tool_requests_are_400(server, body, param):
    status, out = http_request(server, "POST", "/v1/chat/completions",
                               {"model": MODEL, "messages": ASK, "max_tokens": 5, **body})
    err = assert_error_body(out, 400)
    assert status == 400
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("messages", [
    [{"role": "tool", "content": "42"}],  # no tool_call_id
    [{"role": "user"}],  # no content
    [{"role": "user", "content": "hi", "tool_calls": [{"id": "x", "type": "function",
                                                        "function": {"name": "f", "arguments": "{}"}}]}],
])
def test_bad_tool_messages_are_400(server, messages):
    status, out = http_request(server, "POST", "/v1/chat/completions",
                               {"model": MODEL, "messages": messages, "max_tokens": 5})
    assert_error_body(out, 400)
    assert status == 400
