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


def test_max_tokens_gives_length(server_client, server_model):
    r = server_client.chat.completions.create(model=server_model, messages=CHAT, max_tokens=2,
                                              extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


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
                        ["--max-num-seqs", "1", "--max-waiting-requests", "1", "--shutdown-timeout", "15"],
                        api_key=API_KEY)
    yield srv
    srv.stop()


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


def test_sigterm_drains_then_exits_zero(server_single_seq):
    srv = server_single_seq
    results: dict[str, list] = {}
    started = threading.Event()

    def stream(name, max_tokens):
        conn, resp = open_stream(srv, "/v1/completions", {"prompt": "Count: 1, 2, 3,", "max_tokens": max_tokens,
                                                          "ignore_eos": True, "stream": True})
        events = read_events(resp, limit=1)
        started.set()
        events += read_events(resp)
        results[name] = events
        conn.close()

    threads = [threading.Thread(target=stream, args=("short", 6))]
    threads[0].start()
    assert started.wait(60)
    # a second request queues behind the first (max-num-seqs 1) and outlives the shutdown timeout
    threads.append(threading.Thread(target=stream, args=("long", 1000)))
    threads[1].start()
    wait_for(lambda: scrape(srv)["vllm:num_requests_waiting"] == 1, 15, "the long request to queue")

    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM received" in srv.log(), 10, "the SIGTERM log line")
    status, body = http_request(srv, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 503
    assert "shutting down" in assert_error_body(body, 503)["message"]
    assert http_request(srv, "GET", "/health", auth=False)[0] == 503

    assert srv.proc.wait(timeout=40) == 0, srv.log()[-3000:]
    elapsed = time.monotonic() - t0
    for t in threads:
        t.join(timeout=30)
    short = results["short"]
    assert short[-1] == "[DONE]"
    chunks = [e for e in short if isinstance(e, dict) and "choices" in e]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len("".join(c["choices"][0]["text"] for c in chunks)) > 0
    long = results.get("long", [])
    assert not any(isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"] == "length"
                   for e in long), "the long request cannot have finished"
    assert any(isinstance(e, dict) and "error" in e for e in long), long[-3:]
    assert elapsed < 15 + 15
    assert "server stopped" in srv.log()


# ----------------------------------------------------------------- CLI load error
def test_serve_missing_model_exits_with_one_error_line():
    p = subprocess.run([sys.executable, "-m", "argosy.runtime.cli", "serve", "/nonexistent/model.gguf",
                        "--port", "0"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if line.startswith("argosy: error:")]
    assert len(errors) == 1, p.stderr
    assert "/nonexistent/model.gguf" in errors[0]
    assert "Traceback" not in p.stderr
