"""End-to-end tests of ``argosy serve``: a real server subprocess driven by the OpenAI SDK
and by raw HTTP (``http.client``) where the SDK cannot express a case.

Most tests share one module-scoped server (started with an API key, so every /v1 call
here also exercises auth). The queue-limit and SIGTERM-drain tests use a second,
single-sequence server; the bad-model test runs the CLI to its error exit.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai
import pytest

from .serving import (
    API_KEY, ServerProcess, assert_error_body, hard_close, http_request, open_stream, read_events,
    scrape, wait_for,
)

# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def server_main(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("argosy_server"), "main", [], api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server_client(server_main) -> openai.OpenAI:
    return server_main.client()


@pytest.fixture(scope="module")
def server_model(server_client) -> str:
    return server_client.models.list().data[0].id


CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]


def tokenize_count(server: ServerProcess, **body) -> int:
    status, out = http_request(server, "POST", "/tokenize", body)
    assert status == 200, out
    assert out["count"] == len(out["tokens"])
    return out["count"]


# ------------------------------------------------------------------------- basics
def test_health_models_version(server_main, server_client, server_model):
    assert http_request(server_main, "GET", "/health", auth=False)[0] == 200
    models = server_client.models.list().data
    assert [m.id for m in models] == [server_model]
    status, raw = http_request(server_main, "GET", "/v1/models")
    assert status == 200 and raw["object"] == "list"
    assert raw["data"][0]["max_model_len"] == 1024 and raw["data"][0]["object"] == "model"
    from argosy.runtime import __version__
    status, ver = http_request(server_main, "GET", "/version", auth=False)
    assert status == 200 and ver == {"version": __version__}


def test_tokenize_detokenize_roundtrip(server_main):
    status, tok = http_request(server_main, "POST", "/tokenize", {"prompt": "Hello, wörld! 🙂"})
    assert status == 200 and tok["max_model_len"] == 1024 and tok["count"] == len(tok["tokens"]) > 0
    status, detok = http_request(server_main, "POST", "/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and detok == {"prompt": "Hello, wörld! 🙂"}
    status, chat = http_request(server_main, "POST", "/tokenize", {"messages": CHAT})
    assert status == 200 and chat["count"] > tok["count"]
    status, body = http_request(server_main, "POST", "/detokenize", {"tokens": [10**9]})
    assert status == 400
    assert_error_body(body, 400)


# ------------------------------------------------------------------- chat completions
def test_chat_non_streaming(server_main, server_client, server_model):
    r = server_client.chat.completions.create(model=server_model, messages=CHAT, max_tokens=8,
                                              logprobs=True, top_logprobs=2, seed=1)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == server_model
    (c,) = r.choices
    assert c.index == 0 and c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    entries = c.logprobs.content
    assert r.usage.completion_tokens == len(entries) <= 8
    if c.finish_reason == "length":
        assert len(entries) == 8
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 and isinstance(e.bytes, list) for e in entries)
    assert r.usage.prompt_tokens == tokenize_count(server_main, messages=CHAT)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_matches_non_streaming(server_client, server_model):
    kw = dict(model=server_model, messages=CHAT, max_tokens=10, temperature=1.0, seed=42)
    full = server_client.chat.completions.create(**kw)
    chunks = list(server_client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}, logprobs=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.id == chunks[0].id and ch.object == "chat.completion.chunk" for ch in chunks)
    body = [ch for ch in chunks if ch.choices]
    text = "".join(ch.choices[0].delta.content or "" for ch in body)
    n_tokens = sum(len(ch.choices[0].logprobs.content) for ch in body if ch.choices[0].logprobs)
    finishes = [ch.choices[0].finish_reason for ch in body if ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == n_tokens == full.usage.completion_tokens
    assert last.usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_content_parts(server_client, server_model):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Write one sentence"},
                                         {"type": "text", "text": "about the sea."}]}]
    r = server_client.chat.completions.create(model=server_model, messages=msgs, max_tokens=3)
    assert r.usage.completion_tokens <= 3


# -------------------------------------------------------------------- completions
def test_completion_length_and_logprobs(server_main, server_client, server_model):
    prompt = "The capital of France is"
    r = server_client.completions.create(model=server_model, prompt=prompt, max_tokens=6, logprobs=2,
                                         extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    (c,) = r.choices
    assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 6 == len(c.logprobs.tokens) == len(c.logprobs.token_logprobs)
    assert len(c.logprobs.top_logprobs) == 6 and all(2 <= len(t) <= 3 for t in c.logprobs.top_logprobs)
    assert c.logprobs.text_offset[0] == 0 and c.logprobs.text_offset == sorted(c.logprobs.text_offset)
    assert r.usage.prompt_tokens == tokenize_count(server_main, prompt=prompt)


def test_completion_streaming(server_client, server_model):
    stream = server_client.completions.create(model=server_model, prompt="Once upon a time", max_tokens=7,
                                              stream=True, stream_options={"include_usage": True}, logprobs=0,
                                              extra_body={"ignore_eos": True})
    chunks = list(stream)
    body = [c for c in chunks if c.choices]
    assert sum(len(c.choices[0].logprobs.tokens) for c in body) == 7
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 7


def test_completion_token_prompt_and_echo(server_main, server_client, server_model):
    status, tok = http_request(server_main, "POST", "/tokenize", {"prompt": "One, two, three,"})
    r = server_client.completions.create(model=server_model, prompt=tok["tokens"], max_tokens=3, echo=True,
                                         temperature=0)
    assert r.usage.prompt_tokens == tok["count"]
    assert r.choices[0].text.startswith("One, two, three,")


def test_echo_with_logprobs_and_prompt_logprobs(server_main, server_client, server_model):
    """``echo`` + ``logprobs`` on completions: the prompt's tokens lead ``logprobs`` (the
    first one null, as OpenAI's); ``prompt_logprobs`` (vLLM's field) on completions and
    chat: one entry per prompt token, the first null, each holding the token itself with
    its rank and the top alternatives; streamed once."""
    status, tok = http_request(server_main, "POST", "/tokenize", {"prompt": "One, two, three,"})
    n = tok["count"]
    r = server_client.completions.create(model=server_model, prompt="One, two, three,", max_tokens=3, echo=True,
                                         logprobs=2, temperature=0, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == n + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and all(len(t) >= 1 for t in lp.top_logprobs[1:])
    assert "".join(lp.tokens) == r.choices[0].text and r.choices[0].text.startswith("One, two, three,")
    assert lp.text_offset[0] == 0 and lp.text_offset[n] == len("".join(lp.tokens[:n]))

    for _ in range(2):  # the second time the prompt is in the prefix cache: still every position
        status, body = http_request(server_main, "POST", "/v1/completions", {
            "model": server_model, "prompt": tok["tokens"], "max_tokens": 1, "prompt_logprobs": 3})
        assert status == 200, body
        plp = body["choices"][0]["prompt_logprobs"]
        assert len(plp) == n and plp[0] is None
        for j, entry in enumerate(plp[1:], start=1):
            own = entry[str(tok["tokens"][j])]
            assert own["rank"] >= 1 and own["logprob"] <= 0
            assert sorted(e["rank"] for e in entry.values())[:3] == [1, 2, 3]  # the top 3 (and the token)

    status, body = http_request(server_main, "POST", "/v1/chat/completions", {
        "model": server_model, "messages": CHAT, "max_tokens": 1, "prompt_logprobs": 0})
    assert status == 200 and len(body["prompt_logprobs"]) == tokenize_count(server_main, messages=CHAT)  # top level, as vLLM
    conn, resp = open_stream(server_main, "/v1/completions", {
        "model": server_model, "prompt": "One, two, three,", "max_tokens": 4, "stream": True, "prompt_logprobs": 1,
        "echo": True, "logprobs": 1})
    events = [e for e in read_events(resp) if isinstance(e, dict)]
    conn.close()
    with_plp = [e for e in events if e["choices"] and e["choices"][0].get("prompt_logprobs")]
    assert len(with_plp) == 1 and len(with_plp[0]["choices"][0]["prompt_logprobs"]) == n
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text.startswith("One, two, three,") and text.count("One, two, three,") == 1


def test_max_tokens_gives_length(server_client, server_model):
    r = server_client.chat.completions.create(model=server_model, messages=CHAT, max_tokens=2,
                                              extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_usage_reports_prefix_cache_hits_as_cached_tokens(server_client, server_model):
    """``usage.prompt_tokens_details.cached_tokens``: 0 for a prompt never seen, then the
    whole blocks the prefix cache served (block size 16) for the same prompt again, in
    plain and streamed answers (what ``argosy router`` bills as cached)."""
    prompt = "Cached tokens check: " + " ".join(f"word{i}" for i in range(120))
    first = server_client.completions.create(model=server_model, prompt=prompt, max_tokens=1)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = server_client.completions.create(model=server_model, prompt=prompt, max_tokens=1)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens and cached % 16 == 0
    assert cached >= again.usage.prompt_tokens - 16
    chunks = list(server_client.completions.create(model=server_model, prompt=prompt, max_tokens=1, stream=True,
                                                   stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached


def test_logit_bias_bans_and_forces_tokens(server_main, server_client, server_model):
    """OpenAI's ``logit_bias``: -100 on the greedy choice makes greedy pick another token,
    +100 on some token makes greedy pick it; a token id past the vocabulary is a 400."""
    kw = dict(model=server_model, prompt="The capital of France is", max_tokens=1, temperature=0)
    plain = server_client.completions.create(**kw, logprobs=1)
    top = http_request(server_main, "POST", "/tokenize", {"prompt": plain.choices[0].text,
                                                          "add_special_tokens": False})[1]["tokens"][0]
    banned = server_client.completions.create(**kw, logit_bias={str(top): -100})
    assert banned.choices[0].text != plain.choices[0].text
    forced_id = http_request(server_main, "POST", "/tokenize", {"prompt": " banana",
                                                                "add_special_tokens": False})[1]["tokens"][0]
    forced = server_client.completions.create(**kw, logit_bias={str(forced_id): 100})
    assert forced.choices[0].text == server_client.completions.create(
        **kw, logit_bias={str(forced_id): 100}).choices[0].text
    assert http_request(server_main, "POST", "/detokenize", {"tokens": [forced_id]})[1]["prompt"] == forced.choices[0].text
    status, body = http_request(server_main, "POST", "/v1/completions",
                                {**kw, "logit_bias": {"99999999": 5}})
    assert status == 400 and "logit_bias" in body["error"]["message"]
    status, body = http_request(server_main, "POST", "/v1/completions", {**kw, "logit_bias": {"5": 101}})
    assert status == 400 and "logit_bias" in body["error"]["message"]


@pytest.mark.parametrize("field,value", [
    ("functions", [{"name": "f"}]), ("guided_whitespace_pattern", " "), ("logits_processors", ["x"]),
    ("structural_tag", "x")])
def test_unsupported_features_are_a_400_not_a_silent_200(server_main, server_model, field, value):
    body = {"model": server_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, field: value}
    status, resp = http_request(server_main, "POST", "/v1/chat/completions", body)
    assert status == 400 and field in resp["error"]["message"], resp
    # the values that mean "not used" stay accepted
    ok = {"model": server_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
          "response_format": {"type": "text"}, "tool_choice": "none", "tools": []}
    assert http_request(server_main, "POST", "/v1/chat/completions", ok)[0] == 200


def test_tools_on_completions_are_a_400(server_main, server_model):
    """tools belong to chat; /v1/completions refuses them instead of ignoring them."""
    status, resp = http_request(server_main, "POST", "/v1/completions", {
        "model": server_model, "prompt": "hi", "max_tokens": 1,
        "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"})
    assert status == 400 and "chat completions field" in resp["error"]["message"], resp


def test_auto_tool_choice_needs_the_parser_flags(server_main, server_model):
    """Tools without tool_choice mean ``auto``, which (as in vLLM) needs
    --enable-auto-tool-choice and --tool-call-parser: a 400 saying so, not a 200 that
    ignores the tools."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra in ({}, {"tool_choice": "auto"}):
        status, resp = http_request(server_main, "POST", "/v1/chat/completions", {
            "model": server_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "tools": tools,
            **extra})
        assert status == 400 and "--enable-auto-tool-choice" in resp["error"]["message"], resp


# ---------------------------------------------------------------- n, seed and stop
def test_chat_n_choices(server_main, server_client, server_model):
    r = server_client.chat.completions.create(model=server_model, messages=CHAT, n=3, max_tokens=5,
                                              temperature=1.0, seed=7, logprobs=True)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    assert r.usage.prompt_tokens == tokenize_count(server_main, messages=CHAT)


def test_completion_prompts_times_n(server_main, server_client, server_model):
    prompts = ["The sky is", "My favourite food is"]
    r = server_client.completions.create(model=server_model, prompt=prompts, n=2, max_tokens=3,
                                         extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == sum(tokenize_count(server_main, prompt=p) for p in prompts)


def test_streaming_n_choices(server_client, server_model):
    chunks = list(server_client.completions.create(model=server_model, prompt="Hello", n=2, max_tokens=4,
                                                   stream=True, extra_body={"ignore_eos": True}))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}


def test_seed_reproducibility(server_client, server_model):
    def run(seed):
        r = server_client.completions.create(model=server_model, prompt="My favourite animal is", max_tokens=12,
                                             temperature=1.0, seed=seed, extra_body={"ignore_eos": True})
        return r.choices[0].text

    a = run(1234)
    assert run(1234) == a
    assert run(98765) != a


def test_stop_string(server_client, server_model):
    kw = dict(model=server_model, prompt="List some colors: red, green,", temperature=0)
    base = server_client.completions.create(**kw, max_tokens=24, extra_body={"ignore_eos": True}).choices[0].text
    words = base.split()
    assert len(words) >= 3, base
    stop = " " + words[2]
    r = server_client.completions.create(**kw, max_tokens=24, stop=[stop])
    c = r.choices[0]
    assert c.finish_reason == "stop", (base, c.text)
    assert stop not in c.text
    assert c.text == base[: base.index(stop)]


# -------------------------------------------------------------------- disconnects
def _engine_idle(server: ServerProcess):
    m = scrape(server)
    return m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0 \
        and m["vllm:kv_cache_usage_perc"] == 0


def test_disconnect_mid_stream_frees_blocks(server_main, server_model):
    wait_for(lambda: _engine_idle(server_main), 10, "an idle engine before the test")
    aborted_before = scrape(server_main)['vllm:request_success_total{finished_reason="abort",model_name="%s"}'
                                         % server_model]
    conn, resp = open_stream(server_main, "/v1/completions",
                             {"prompt": "Tell me a very long story.", "max_tokens": 600, "ignore_eos": True,
                              "stream": True})
    events = read_events(resp, limit=3)
    assert len(events) == 3 and all(isinstance(e, dict) for e in events)
    m = scrape(server_main)
    assert m["vllm:num_requests_running"] == 1 and m["vllm:kv_cache_usage_perc"] > 0
    hard_close(conn)
    wait_for(lambda: _engine_idle(server_main), 10, "running=0 and kv usage=0 after the disconnect")
    m = scrape(server_main)
    assert m['vllm:request_success_total{finished_reason="abort",model_name="%s"}' % server_model] == aborted_before + 1


def test_disconnect_during_non_streaming_request(server_main):
    wait_for(lambda: _engine_idle(server_main), 10, "an idle engine before the test")
    conn = http.client.HTTPConnection("127.0.0.1", server_main.port, timeout=60)
    conn.request("POST", "/v1/completions",
                 body=json.dumps({"prompt": "Tell me a story.", "max_tokens": 600, "ignore_eos": True}).encode(),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    wait_for(lambda: scrape(server_main)["vllm:num_requests_running"] == 1, 15, "the request to run")
    hard_close(conn)
    wait_for(lambda: _engine_idle(server_main), 10, "running=0 and kv usage=0 after the disconnect")


# ---------------------------------------------------------------------- bad input
_CHAT_OK = {"messages": CHAT, "max_tokens": 2}
BAD_REQUESTS = [
    ("invalid-json", "/v1/chat/completions", b'{"messages": [', 400, None),
    ("body-not-object", "/v1/chat/completions", [1, 2], 400, None),
    ("max-tokens-string", "/v1/chat/completions", {**_CHAT_OK, "max_tokens": "ten"}, 400, "max_tokens"),
    ("max-tokens-negative", "/v1/chat/completions", {**_CHAT_OK, "max_tokens": -5}, 400, "max_tokens"),
    ("temperature-string", "/v1/chat/completions", {**_CHAT_OK, "temperature": "hot"}, 400, "temperature"),
    ("temperature-negative", "/v1/chat/completions", {**_CHAT_OK, "temperature": -1}, 400, "temperature"),
    ("stream-not-bool", "/v1/chat/completions", {**_CHAT_OK, "stream": "yes"}, 400, "stream"),
    ("n-zero", "/v1/chat/completions", {**_CHAT_OK, "n": 0}, 400, "n"),
    ("empty-messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("missing-messages", "/v1/chat/completions", {"max_tokens": 2}, 400, "messages"),
    ("bad-role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("image-part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages.0.content"),
    ("seed-too-big", "/v1/chat/completions", {**_CHAT_OK, "seed": 2**70}, 400, "seed"),
    ("stop-token-out-of-vocab", "/v1/chat/completions", {**_CHAT_OK, "stop_token_ids": [10**9]}, 400,
     "stop_token_ids"),
    ("unknown-model-chat", "/v1/chat/completions", {**_CHAT_OK, "model": "no-such-model"}, 404, "model"),
    ("unknown-model-completions", "/v1/completions", {"prompt": "x", "model": "no-such-model"}, 404, "model"),
    ("prompt-wrong-type", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("prompt-too-long", "/v1/completions", {"prompt": "hello " * 1500, "max_tokens": 1}, 400, None),
    ("prompt-plus-max-tokens-too-long", "/v1/completions", {"prompt": "hello", "max_tokens": 5000}, 400, None),
    ("token-id-out-of-range", "/v1/completions", {"prompt": [10**9]}, 400, None),
    ("empty-token-prompt", "/v1/completions", {"prompt": []}, 400, None),
    ("suffix", "/v1/completions", {"prompt": "x", "suffix": "y"}, 400, None),
    ("logprobs-too-many", "/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("stream-options-without-stream", "/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}},
     400, None),
    # issue 11: a lone UTF-16 surrogate was a 500 (TypeError in the tokenizer); a message
    # without content was a 200 that generated up to the context length
    ("lone-surrogate-prompt", "/v1/completions", b'{"prompt": "\\udcff x", "max_tokens": 1}', 400, "prompt"),
    ("lone-surrogate-chat", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 1}', 400, "messages.0.content"),
    ("lone-surrogate-tokenize", "/tokenize", b'{"prompt": "\\udfff"}', 400, "prompt"),
    ("message-without-content", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("message-null-content", "/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400,
     "messages.0.content"),
    # vLLM's request extras: implemented ones checked, the others refused (never a 200 ignoring them)
    ("allowed-token-out-of-vocab", "/v1/completions", {"prompt": "x", "allowed_token_ids": [10**9]}, 400,
     "allowed_token_ids"),
    ("allowed-tokens-empty", "/v1/completions", {"prompt": "x", "allowed_token_ids": []}, 400, "allowed_token_ids"),
    ("priority", "/v1/chat/completions", {**_CHAT_OK, "priority": 5}, 400, "priority"),
    ("best-of", "/v1/completions", {"prompt": "x", "best_of": 3}, 400, None),
    ("beam-search", "/v1/chat/completions", {**_CHAT_OK, "use_beam_search": True}, 400, None),
    ("cache-salt", "/v1/chat/completions", {**_CHAT_OK, "cache_salt": "tenant-a"}, 400, None),
    ("continuous-usage-stats", "/v1/completions",
     {"prompt": "x", "stream": True, "stream_options": {"continuous_usage_stats": True}}, 400, None),
    ("truncate-zero", "/v1/completions", {"prompt": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    ("template-kwargs-reserved", "/v1/chat/completions", {**_CHAT_OK, "chat_template_kwargs": {"tokenize": False}},
     400, "chat_template_kwargs"),
    ("continue-and-generate", "/v1/chat/completions",
     {"messages": [*CHAT, {"role": "assistant", "content": "The sea"}], "continue_final_message": True}, 400, None),
    ("truncate-above-context", "/v1/completions", {"prompt": "x", "truncate_prompt_tokens": 5000}, 400,
     "truncate_prompt_tokens"),
    ("bad-word-blank", "/v1/completions", {"prompt": "x", "bad_words": ["  "]}, 400, "bad_words.0"),
    ("chat-echo", "/v1/chat/completions", {**_CHAT_OK, "echo": True}, 400, None),
    ("template-kwargs-on-completions", "/v1/completions", {"prompt": "x", "chat_template_kwargs": {"a": 1}}, 400,
     None),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests(server_main, name, path, body, status, param):
    got, resp = http_request(server_main, "POST", path, body)
    assert got == status, resp
    err = assert_error_body(resp, status)
    if param is not None:
        assert err["param"] == param, err
    if name == "prompt-too-long":
        assert "maximum context length" in err["message"]


def test_unknown_route_and_method_are_json(server_main):
    status, body = http_request(server_main, "GET", "/no/such/route", auth=False)
    assert status == 404
    assert_error_body(body, 404)
    status, body = http_request(server_main, "GET", "/v1/chat/completions")
    assert status == 405
    assert_error_body(body, 405)


def test_sdk_maps_errors(server_client, server_model):
    with pytest.raises(openai.BadRequestError):
        server_client.chat.completions.create(model=server_model, messages=CHAT, max_tokens=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server_client.chat.completions.create(model="gpt-nothing", messages=CHAT, max_tokens=1)


def test_server_still_serves_after_bad_requests(server_client, server_model):
    r = server_client.chat.completions.create(model=server_model, messages=CHAT, max_tokens=2)
    assert r.usage.completion_tokens >= 1


# ------------------------------------------------------------- vLLM request extras
def _token_id(server: ServerProcess, text: str) -> int:
    status, out = http_request(server, "POST", "/tokenize", {"prompt": text, "add_special_tokens": False})
    assert status == 200 and len(out["tokens"]) == 1, out
    return out["tokens"][0]


def test_allowed_token_ids_restrict_what_is_sampled(server_main):
    yes, no = _token_id(server_main, " yes"), _token_id(server_main, " no")
    status, out = http_request(server_main, "POST", "/v1/completions", {
        "prompt": "Is the sea blue? Answer:", "max_tokens": 8, "temperature": 1.0, "seed": 3, "ignore_eos": True,
        "allowed_token_ids": [yes, no]})
    assert status == 200, out
    assert out["usage"]["completion_tokens"] == 8
    words = out["choices"][0]["text"].split()
    assert len(words) == 8 and set(words) <= {"yes", "no"}, out["choices"][0]["text"]


def test_bad_words_are_never_generated(server_main):
    body = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    status, plain = http_request(server_main, "POST", "/v1/completions", body)
    assert status == 200 and "Paris" in plain["choices"][0]["text"], plain  # the greedy answer names it
    status, out = http_request(server_main, "POST", "/v1/completions", {**body, "bad_words": ["Paris"]})
    assert status == 200, out
    assert "Paris" not in out["choices"][0]["text"], out["choices"][0]["text"]


def test_truncate_prompt_tokens_keeps_the_last_tokens(server_main):
    long = "one two three four five six seven eight nine ten " * 4
    status, out = http_request(server_main, "POST", "/v1/completions",
                               {"prompt": long, "max_tokens": 1, "truncate_prompt_tokens": 7})
    assert status == 200 and out["usage"]["prompt_tokens"] == 7, out
    status, out = http_request(server_main, "POST", "/v1/chat/completions",
                               {**_CHAT_OK, "max_tokens": 1, "truncate_prompt_tokens": 5})
    assert status == 200 and out["usage"]["prompt_tokens"] == 5, out
    status, out = http_request(server_main, "POST", "/v1/completions",
                               {"prompt": "hello " * 1500, "max_tokens": 1, "truncate_prompt_tokens": 100})
    assert status == 200 and out["usage"]["prompt_tokens"] == 100, out  # too long untruncated (a 400 above)
    # -1: as much of the prompt as fits beside max_tokens (max_model_len is 1024 here)
    status, out = http_request(server_main, "POST", "/v1/completions",
                               {"prompt": "hello " * 1500, "max_tokens": 4, "truncate_prompt_tokens": -1})
    assert status == 200 and out["usage"]["prompt_tokens"] == 1020, out
    status, out = http_request(server_main, "POST", "/v1/embeddings", {"input": "hello " * 1500,
                                                                       "truncate_prompt_tokens": -1})
    assert status == 200 and out["usage"]["prompt_tokens"] == 1023, out


def test_chat_template_controls(server_main):
    """continue_final_message leaves the assistant's message open (no end-of-turn token
    after it, no new assistant header), so the prompt is shorter than the same
    conversation closed with a generation prompt; a chat_template_kwargs variable the
    bundled template does not use changes nothing (that the kwargs reach the template is
    tested below with a template that prints one)."""
    conv = [*CHAT, {"role": "assistant", "content": "The sea is"}]
    closed = tokenize_count(server_main, messages=conv, add_generation_prompt=True)
    status, out = http_request(server_main, "POST", "/v1/chat/completions", {
        "messages": conv, "max_tokens": 3, "continue_final_message": True, "add_generation_prompt": False,
        "temperature": 0})
    assert status == 200, out
    assert out["usage"]["prompt_tokens"] < closed - 1, (out["usage"], closed)
    status, plain = http_request(server_main, "POST", "/v1/chat/completions", {**_CHAT_OK, "temperature": 0})
    status2, kw = http_request(server_main, "POST", "/v1/chat/completions",
                               {**_CHAT_OK, "temperature": 0, "chat_template_kwargs": {"enable_thinking": False}})
    assert status == status2 == 200
    assert kw["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert kw["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]


def test_api_key_required_on_v1_only(server_main, server_model):
    status, body = http_request(server_main, "GET", "/v1/models", auth=False)
    assert status == 401
    assert_error_body(body, 401)
    status, body = http_request(server_main, "POST", "/v1/chat/completions", _CHAT_OK, auth=False,
                                headers={"Authorization": "Bearer wrong"})
    assert status == 401
    with pytest.raises(openai.AuthenticationError):
        server_main.client(api_key="wrong").chat.completions.create(model=server_model, messages=CHAT, max_tokens=1)
    for path in ("/health", "/metrics", "/version"):
        assert http_request(server_main, "GET", path, auth=False)[0] == 200


# ------------------------------------------------------------------------ metrics
REQUIRED_METRICS = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
    "vllm:time_per_output_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
    "vllm:request_queue_time_seconds_count",
]


def test_metrics_move_under_load(server_main, server_client, server_model):
    wait_for(lambda: _engine_idle(server_main), 10, "an idle engine before the test")
    before = scrape(server_main)
    for name in REQUIRED_METRICS:
        assert name in before, name
    length_key = 'vllm:request_success_total{finished_reason="length",model_name="%s"}' % server_model
    assert length_key in before
    prompt = "Count with me: one, two, three,"
    r = server_client.completions.create(model=server_model, prompt=prompt, max_tokens=5,
                                         extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    after = scrape(server_main)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 5
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == r.usage.prompt_tokens
    assert after[length_key] == before[length_key] + 1
    for h in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert after[f"vllm:{h}_seconds_count"] == before[f"vllm:{h}_seconds_count"] + 1, h
    assert after["vllm:inter_token_latency_seconds_count"] == before["vllm:inter_token_latency_seconds_count"] + 4
    assert after["vllm:prefix_cache_queries_total"] > before["vllm:prefix_cache_queries_total"]
    # the same prompt again: its full blocks come from the prefix cache
    server_client.completions.create(model=server_model, prompt=prompt * 8, max_tokens=1)
    server_client.completions.create(model=server_model, prompt=prompt * 8, max_tokens=1)
    assert scrape(server_main)["vllm:prefix_cache_hits_total"] > before["vllm:prefix_cache_hits_total"]


# ----------------------------------------------------- in-process: unexpected errors
def test_unexpected_exception_is_500_and_server_keeps_serving():
    """A handler crash is a JSON 500, never a dead server (in-process, stub engine)."""
    from aiohttp.test_utils import TestClient, TestServer

    from argosy.runtime.core.async_llm import AsyncLLM
    from argosy.runtime.server.app import build_app

    class Tok:
        backend_tokenizer = None

        def encode(self, text, add_special_tokens=True):
            return [1, 2, 3]

        def decode(self, ids, **kw):
            return "x"

    engine = SimpleNamespace(
        served_model_name="stub", max_model_len=64, model_config=SimpleNamespace(vocab_size=100),
        tokenizer=Tok(), scheduler_config=SimpleNamespace(max_waiting_requests=None),
        scheduler=SimpleNamespace(num_running=0, num_waiting=0, num_preemptions=0),
        kv=SimpleNamespace(usage=0.0, prefix_cache_queries=0, prefix_cache_hits=0),
        stats=SimpleNamespace(prompt_tokens=0, generation_tokens=0, finished={}),
        checkpoint=SimpleNamespace(path="stub"),
    )
    calls = {"n": 0}

    class StubLLM(AsyncLLM):
        def __init__(self):  # no engine thread
            self.engine = engine
            self.output_observers = []

        is_running = True
        is_healthy = True

        def check_request(self, ids, params):
            pass

        async def generate(self, request_id, ids, params):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("boom")
            from argosy.runtime.core.engine import RequestOutput
            yield RequestOutput(request_id, [5], "hi", "hi", True, "length", None, 3, 1, 0, [5])

    async def run():
        async with TestClient(TestServer(build_app(StubLLM()))) as client:
            r = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
            assert r.status == 500
            assert_error_body(await r.json(), 500)
            r = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
            assert r.status == 200, await r.text()
            assert (await r.json())["choices"][0]["text"] == "hi"
            assert (await client.get("/health")).status == 200

    asyncio.run(run())


# --------------------------------------------------- queue limit and SIGTERM drain
@pytest.fixture(scope="module")
def server_single_seq(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("argosy_server_small"), "single",
                        ["--max-num-seqs", "1", "--max-waiting-requests", "1", "--shutdown-timeout", "15",
                         "--served-model-name", "smol", "smollm2", "--enable-log-requests", "--max-log-len", "12",
                         "--swap-space", "4"],
                        api_key=API_KEY)
    yield srv
    srv.stop()


def test_served_model_names_request_and_access_logs(server_single_seq):
    """Several --served-model-name values: /v1/models lists each, requests may name any,
    responses report the first; --enable-log-requests logs each request under the id the
    response carries, prompt cut to --max-log-len; the access log has a line per request;
    a field this API does not read is named in a warning; --swap-space is accepted."""
    srv = server_single_seq
    status, models = http_request(srv, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["smol", "smollm2"]
    status, out = http_request(srv, "POST", "/v1/completions",
                               {"model": "smollm2", "prompt": "Hello there, tell me a story", "max_tokens": 2,
                                "some_future_field": 1})
    assert status == 200 and out["model"] == "smol", out
    status, err = http_request(srv, "POST", "/v1/completions", {"model": "smol2", "prompt": "x", "max_tokens": 1})
    assert status == 404
    # a prompt the engine refuses is refused before it is logged (decoding it would fail)
    status, err = http_request(srv, "POST", "/v1/completions", {"prompt": [2**40], "max_tokens": 1})
    assert status == 400, err
    wait_for(lambda: '"POST /v1/completions HTTP/1.1" 404' in srv.log(), 5, "the access log line of the 404")
    log = srv.log()
    assert f"Received request {out['id']}: prompt: 'Hello there,'" in log, log[-3000:]
    assert '"POST /v1/completions HTTP/1.1" 200' in log
    assert "some_future_field" in log and "--swap-space 4.0 has no effect" in log


def test_max_waiting_requests_503(server_single_seq):
    srv = server_single_seq
    conn, resp = open_stream(srv, "/v1/completions", {"prompt": "A long tale:", "max_tokens": 500,
                                                      "ignore_eos": True, "stream": True})
    read_events(resp, limit=1)  # A is running
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(http_request, srv, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        wait_for(lambda: scrape(srv)["vllm:num_requests_waiting"] == 1, 15, "one waiting request")
        status, body = http_request(srv, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 503
        assert_error_body(body, 503)
        hard_close(conn)  # A goes away: the waiting request runs
        status, body = waiting.result(timeout=60)
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


class _TimedStream(threading.Thread):
    """A streaming completion read in a background thread: each SSE payload with the
    ``time.monotonic()`` it arrived at. ``first`` is set on the first payload (or on failure)."""

    def __init__(self, srv: ServerProcess, body: dict):
        super().__init__(daemon=True)
        self.srv, self.body = srv, {**body, "stream": True, "stream_options": {"include_usage": True}}
        self.events: list[tuple[float, object]] = []
        self.first = threading.Event()
        self.error: Exception | None = None
        self.start()

    def run(self):
        try:
            conn, resp = open_stream(self.srv, "/v1/completions", self.body)
            try:
                while not self.events or self.events[-1][1] != "[DONE]":
                    ev = read_events(resp, limit=1)
                    if not ev:
                        break
                    self.events.append((time.monotonic(), ev[0]))
                    self.first.set()
            finally:
                conn.close()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.first.set()

    def chunks(self, after: float = float("-inf")) -> list[dict]:
        return [e for t, e in self.events if t > after and isinstance(e, dict) and e.get("choices")]

    def finish_reasons(self) -> list:
        return [c["choices"][0]["finish_reason"] for c in self.chunks() if c["choices"][0]["finish_reason"]]

    def errors(self) -> list[dict]:
        return [e for _, e in self.events if isinstance(e, dict) and "error" in e]

    def usage(self) -> dict | None:
        return next((e["usage"] for _, e in self.events if isinstance(e, dict) and e.get("usage")), None)


def _seconds_per_token(srv: ServerProcess, n: int = 24) -> float:
    """This machine's decode speed on ``srv`` (so that requests meant to outlast a window do)."""
    t = time.monotonic()
    status, body = http_request(srv, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": n, "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == n, body
    return (time.monotonic() - t) / n


def _assert_refusing_new_work(srv: ServerProcess) -> None:
    """While draining, the server still listens: generation requests get 503 "shutting
    down" and /health 503."""
    try:
        for path, body in (("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
                           ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})):
            status, out = http_request(srv, "POST", path, body)
            assert status == 503, f"{path} admitted while draining: {status} {out}"
            assert "shutting down" in assert_error_body(out, 503)["message"]
        assert http_request(srv, "GET", "/health", auth=False)[0] == 503, "/health does not report draining"
    except ConnectionError as e:
        pytest.fail(f"the server stopped listening right after SIGTERM (no drain window): {e!r}; "
                    f"exit code {srv.proc.poll()}")


def test_sigterm_drains_in_flight_requests_then_exits(server_single_seq):
    """SIGTERM with work in flight and a 15 s --shutdown-timeout: new requests get 503 and
    /health 503 at once, but the running request AND the one queued behind it (both
    admitted before the signal) are served to the end; the process then exits 0 as soon as
    they are done, long before the timeout."""
    srv = server_single_seq
    shutdown_timeout = 15.0  # the fixture's --shutdown-timeout
    # the running request should last about 3 s here, so it is surely mid-generation at SIGTERM
    n_running = max(32, min(800, int(3.0 / _seconds_per_token(srv))))
    running = _TimedStream(srv, {"prompt": "Count: 1, 2, 3,", "max_tokens": n_running, "ignore_eos": True})
    assert running.first.wait(60) and running.error is None, running.error

    def queued_request():
        out = http_request(srv, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 8, "ignore_eos": True})
        return (*out, time.monotonic())

    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(queued_request)  # waits behind the running one (max-num-seqs 1)
        wait_for(lambda: scrape(srv)["vllm:num_requests_waiting"] == 1, 15, "the second request to queue")
        t_sig = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM received" in srv.log(), 10, "the SIGTERM log line")
        _assert_refusing_new_work(srv)
        t_refused = time.monotonic()
        assert srv.proc.poll() is None, "the server exited with requests in flight"
        code = srv.proc.wait(timeout=shutdown_timeout + 30)
        t_exit = time.monotonic()
        q_status, q_body, t_queued_done = queued.result(timeout=30)
    running.join(timeout=30)
    log = srv.log()

    assert code == 0, log[-3000:]
    assert "draining 2 in-flight request(s)" in log, log[-3000:]
    # (a) drained: the running request went on generating after SIGTERM, to its full length
    assert running.error is None, running.error
    assert running.chunks(after=t_refused), "the running request was not generating during the drain"
    assert running.events[-1][1] == "[DONE]" and not running.errors(), running.events[-3:]
    assert running.finish_reasons() == ["length"]
    assert running.usage()["completion_tokens"] == n_running
    # ... and so did the request still queued when the signal came
    assert q_status == 200, q_body
    assert q_body["choices"][0]["finish_reason"] == "length" and q_body["usage"]["completion_tokens"] == 8
    # (c) the exit follows the end of the work, not the timeout
    t_work_done = max(running.events[-1][0], t_queued_done)
    assert t_exit - t_work_done < 5.0, f"exited {t_exit - t_work_done:.1f}s after the last request finished"
    assert t_exit - t_sig < shutdown_timeout - 1, f"exit {t_exit - t_sig:.1f}s after SIGTERM: it waited for the timeout"
    assert "aborting" not in log and "server stopped" in log


def test_sigterm_shutdown_timeout_bounds_the_drain(tmp_path):
    """With --shutdown-timeout 3 and a request that needs far longer, SIGTERM lets the
    request generate for the 3 s window, then aborts it (an error event, never a "length"
    finish) and exits 0: the exit comes no sooner than 3 s and not much later."""
    timeout_s = 3.0
    srv = ServerProcess(tmp_path, "short_timeout", ["--shutdown-timeout", str(timeout_s)], api_key=API_KEY)
    try:
        per_token = _seconds_per_token(srv)
        n_long = 1000  # the longest the 1024-token context allows
        if n_long * per_token < 2 * timeout_s + 2:  # the request must outlast the window by seconds
            pytest.skip(f"decoding is too fast here ({per_token * 1e3:.1f} ms/token) to outlast the drain window")
        long = _TimedStream(srv, {"prompt": "Count: 1, 2, 3,", "max_tokens": n_long, "ignore_eos": True})
        assert long.first.wait(60) and long.error is None, long.error
        t_sig = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM received" in srv.log(), 10, "the SIGTERM log line")
        _assert_refusing_new_work(srv)
        try:
            code = srv.proc.wait(timeout=timeout_s + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout_s + 30:.0f}s after SIGTERM with --shutdown-timeout {timeout_s}")
        elapsed = time.monotonic() - t_sig
        long.join(timeout=30)
        log = srv.log()
    finally:
        srv.stop()

    assert code == 0, log[-3000:]
    assert elapsed >= timeout_s, f"exited {elapsed:.2f}s after SIGTERM, before the {timeout_s}s drain window ended"
    assert elapsed < timeout_s + 8, f"exited {elapsed:.1f}s after SIGTERM: the {timeout_s}s timeout was not applied"
    assert len(long.chunks(after=t_sig + 1.0)) >= 3, "the request did not keep generating in the drain window"
    assert "length" not in long.finish_reasons(), "the long request cannot have finished"
    assert long.errors(), long.events[-3:]
    assert "aborting 1 request(s) still in flight" in log and "server stopped" in log


# ----------------------------------------------------------------- CLI load error
def test_serve_missing_model_exits_with_one_error_line():
    p = subprocess.run([sys.executable, "-m", "argosy.runtime.cli", "serve", "/nonexistent/model.gguf",
                        "--port", "0"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if line.startswith("argosy: error:")]
    assert len(errors) == 1, p.stderr
    assert "/nonexistent/model.gguf" in errors[0]
    assert "Traceback" not in p.stderr


def test_served_model_names_default_to_the_model_argument_as_given():
    """vLLM's default: the MODEL argument as typed (a hub id, not the snapshot directory it
    resolves to; a path as written); the bundled model (no argument) keeps its own name."""
    from argosy.runtime.core.engine import served_model_names

    assert served_model_names(None, "HuggingFaceTB/SmolLM2-135M-Instruct", "3f2a9c") == \
        ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert served_model_names(None, "./models/llama", "llama") == ["./models/llama"]
    assert served_model_names(None, None, "SmolLM2-135M-Instruct-Q4_1") == ["SmolLM2-135M-Instruct-Q4_1"]
    assert served_model_names("smol", "x", "y") == ["smol"]
    assert served_model_names(["a", "b"], "x", "y") == ["a", "b"]
    for bad in (["a", "a"], [""], ["  "]):
        with pytest.raises(ValueError, match="--served-model-name"):
            served_model_names(bad, "x", "y")



def test_served_model_aliases_keep_the_old_default_name():
    from argosy.runtime.core.engine import served_model_aliases

    assert served_model_aliases(None, ["./models/llama"], "llama") == ("llama",)
    assert served_model_aliases(None, ["SmolLM2-135M-Instruct-Q4_1"], "SmolLM2-135M-Instruct-Q4_1") == ()
    assert served_model_aliases(["smol"], ["smol"], "llama") == ()  # explicit names only


def test_served_model_name_swallowing_the_model_is_one_error_line(tmp_path):
    """``argosy serve --served-model-name a ./model.gguf``: nargs takes the model as a
    second name; without a MODEL that would serve the bundled model under both names."""
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "argosy.runtime.cli", "serve", "--served-model-name", "a", str(model)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "put MODEL before --served-model-name" in lines[0], proc.stderr


def test_chat_template_kwargs_reach_the_template():
    """The kwargs are the template's variables (a template that prints one), the
    server's own arguments are refused, and continue_final_message leaves the last
    message open (transformers' apply_chat_template is the oracle of both)."""
    import copy

    from argosy.runtime.loader import load_checkpoint
    from argosy.runtime.loader.tokenizer import chat_prompt_ids

    tok = copy.deepcopy(load_checkpoint(None).tokenizer)
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if not (loop.last and "
                         "continue_final_message) %}</{{ m.role }}>{% endif %}{% endfor %}{{ suffix | default('') }}")
    msgs = [{"role": "user", "content": "Hi"}]
    plain = chat_prompt_ids(tok, msgs, add_generation_prompt=False)
    with_kw = chat_prompt_ids(tok, msgs, add_generation_prompt=False, template_kwargs={"suffix": " THE END"})
    assert tok.decode(with_kw) == tok.decode(plain) + " THE END"
    opened = chat_prompt_ids(tok, msgs, add_generation_prompt=False, continue_final_message=True)
    assert tok.decode(opened) == "<user>Hi"
    with pytest.raises(ValueError, match="chat_template_kwargs must not set tokenize"):
        chat_prompt_ids(tok, msgs, template_kwargs={"tokenize": False})
