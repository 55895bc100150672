"""Engine defects found in review (issue 11), each with a test that failed before its fix:
stop strings before ``min_tokens``, a bad prompt in ``LLM.generate``, requests that cannot
go on ending with ``finish_reason="error"``, blocks hit-able only after their step
completed, and prefix-cache lookups counted once per request."""

from __future__ import annotations

import asyncio

import pytest

from argosy.runtime import SamplingParams
from argosy.runtime.core.async_llm import AsyncLLM

from .conftest import run_to_completion

PROMPT = "The three primary colors are red, blue and"


def _fail_from_call(engine, n: int, exc=RuntimeError("simulated step failure")):
    """Make the engine's executor raise from its ``n``-th execute call on (1-based)."""
    real = engine.executor.execute
    calls = {"n": 0}

    def execute(plan):
        calls["n"] += 1
        if calls["n"] >= n:
            raise exc
        return real(plan)

    engine.executor.execute = execute
    return calls


def test_stop_string_is_ignored_until_min_tokens(make_engine):
    eng = make_engine()
    ids = eng.tokenizer.encode(PROMPT)
    free = run_to_completion(eng, [ids], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))["0"]
    text = eng.tokenizer.decode(free)
    # a stop string that occurs early in the greedy text: without min_tokens it fires there
    stop = text.strip().split()[0]
    early = run_to_completion(eng, [ids], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                         stop=[stop]))["0"]
    assert len(early) < 6, (text, early)
    # with min_tokens the same stop string is ignored until that many tokens exist (vLLM)
    late = run_to_completion(eng, [ids], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                        stop=[stop], min_tokens=8))["0"]
    assert len(late) >= 8
    assert late == free[: len(late)]
    eng.kv.check_invariants()


def test_generate_with_a_bad_prompt_in_the_middle_leaves_nothing_queued(model_path):
    from argosy.runtime import LLM

    llm = LLM(model_path, dtype="float32", max_model_len=256, kv_cache_memory=32 << 20)
    greedy = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(ValueError, match="prompt token ids"):
        llm.generate([PROMPT, [10**9], PROMPT], greedy)
    eng = llm.engine
    assert not eng.has_unfinished_requests()
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    # the next call works (it died with KeyError on the stale queued request before)
    out = llm.generate([PROMPT], greedy)
    assert len(out[0].outputs[0].token_ids) == 4


def test_step_failure_ends_in_flight_requests_with_finish_reason_error(make_engine):
    eng = make_engine()
    ids = eng.tokenizer.encode(PROMPT)
    _fail_from_call(eng, 4)  # prefill + 2 decodes succeed, then every step fails

    async def run():
        llm = AsyncLLM(eng)
        try:
            outs = [o async for o in llm.generate("a", ids, SamplingParams(temperature=0, max_tokens=50,
                                                                           ignore_eos=True))]
            return outs, llm.is_healthy
        finally:
            llm.shutdown()

    outs, healthy = asyncio.run(run())
    last = outs[-1]
    assert last.finished and last.finish_reason == "error"
    assert last.num_output_tokens == 3 and len(outs) == 4
    assert not healthy
    assert eng.stats.finished["error"] == 1
    assert eng.kv.num_free_blocks == eng.kv.num_blocks  # nothing leaked


def test_streamed_request_ends_with_an_error_chunk_through_the_server(make_engine):
    """Through the HTTP server: the stream ends with a chunk whose finish_reason is
    "error", then an OpenAI error event naming the cause, then [DONE]; never cut off."""
    import json

    from aiohttp.test_utils import TestClient, TestServer

    from argosy.runtime.server.app import build_app

    eng = make_engine()
    _fail_from_call(eng, 3)

    async def run():
        llm = AsyncLLM(eng)
        try:
            async with TestClient(TestServer(build_app(llm))) as client:
                r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 50, "stream": True,
                                                               "temperature": 0, "ignore_eos": True})
                assert r.status == 200
                raw = (await r.read()).decode()
        finally:
            llm.shutdown()
        return [line[6:] for line in raw.split("\n\n") if line.startswith("data: ")]

    events = asyncio.run(run())
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    chunks = [e for e in parsed if e.get("choices")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "error"
    assert parsed[-1]["error"]["code"] == 500 and "simulated step failure" in parsed[-1]["error"]["message"]


def test_blocks_of_a_failed_step_are_never_prefix_hits(make_engine):
    eng = make_engine(enable_prefix_caching=True)
    ids = eng.tokenizer.encode(PROMPT + " " + "green yellow purple orange " * 12)
    assert len(ids) > 3 * eng.block_size
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    reference = run_to_completion(make_engine(enable_prefix_caching=False), [ids], greedy)["0"]

    real = eng.executor.execute
    _fail_from_call(eng, 1)
    eng.add_request("failed", ids, greedy)
    with pytest.raises(RuntimeError, match="simulated"):
        eng.step()  # allocated the prompt's blocks, wrote no KV
    eng.abort_request("failed")
    eng.executor.execute = real
    eng.add_request("again", ids, greedy)
    outs = []
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.finished]
    assert outs[0].num_cached_tokens == 0  # the failed step's blocks were not hit-able
    assert outs[0].output_token_ids == reference
    # a completed step's blocks are
    eng.add_request("third", ids, greedy)
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.finished]
    assert outs[-1].num_cached_tokens > 0 and outs[-1].output_token_ids == reference
    eng.kv.check_invariants()


def test_prefix_cache_lookup_is_counted_once_per_request(make_engine):
    # 5 blocks x 16 tokens: request a (40-token prompt, growing to 60) holds 3-4 blocks,
    # so b (40 tokens, 3 blocks) waits ~20 steps at the head of the queue
    eng = make_engine(enable_prefix_caching=True, num_gpu_blocks_override=5, max_model_len=80)
    tok = eng.tokenizer
    a = tok.encode("alpha " * 40)[:40]
    b = tok.encode("bravo " * 40)[:40]
    assert len(a) == len(b) == 40
    eng.add_request("a", a, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    eng.add_request("b", b, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    steps_waiting = 0
    while eng.has_unfinished_requests():
        eng.step()
        steps_waiting += eng.scheduler.num_waiting
    assert steps_waiting >= 10, "b was meant to wait for blocks"
    assert eng.kv.prefix_cache_queries == 80  # each prompt looked up once, not once per step
    assert eng.scheduler.num_preemptions == 0
