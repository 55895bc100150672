"""Engine behaviour on the bundled model: batch invariance under chunked prefill and
preemption, prefix caching, sampling semantics, stop handling."""

from __future__ import annotations

import pytest

from argosy.runtime import SamplingParams

from .conftest import run_to_completion

WORDS = ("river mountain lantern copper violet engine harbor quiet maple orbit silver canyon "
         "window thunder garden pencil").split()


def _prompts(tok, n=16):
    """n prompts of different lengths (about 6 to 120 tokens), different content."""
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i * 7)]
        out.append(tok.encode(f"Story {i}: " + " ".join(words) + ". Continue:"))
    return out


@pytest.mark.slow  # ~30 s; the prefix-caching variant below covers chunked prefill and preemption by default
def test_batch_invariance_with_chunked_prefill_and_preemption(make_engine):
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone_engine = make_engine(max_model_len=256)
    prompts = _prompts(alone_engine.tokenizer)
    assert len({len(p) for p in prompts}) == 16
    alone = {}
    for i, ids in enumerate(prompts):
        alone[str(i)] = run_to_completion(alone_engine, [ids], greedy)["0"]
        alone_engine.abort_request([])  # no-op; engine is idle again
    # 24 blocks x 16 = 384 token slots for 16 requests needing ~70-140 each; 64-token budget.
    small = make_engine(max_model_len=256, num_gpu_blocks_override=24, max_num_batched_tokens=64,
                        enable_chunked_prefill=True, enable_prefix_caching=False)
    batch = run_to_completion(small, prompts, greedy)
    assert small.scheduler.num_preemptions > 0, "the small cache was meant to force preemptions"
    for k in alone:
        assert batch[k] == alone[k], f"prompt {k}: batched output differs from alone"
    small.kv.check_invariants()
    assert small.kv.num_free_blocks == small.kv.num_blocks


def test_batch_invariance_with_prefix_caching_and_preemption(make_engine, caplog):
    """The same check with prefix caching ON: prompts share a 3-block prefix (and pairs
    share more), the cache is too small for all of them, so requests are preempted,
    freed and recomputed, picking up blocks cached by others or by their own earlier
    run. Greedy outputs must equal those of each prompt run alone on a cache-less engine.
    The first preemption is logged as a warning (vLLM's "check for preemptions in logs")."""
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    alone_engine = make_engine(max_model_len=128, enable_prefix_caching=False)
    tok = alone_engine.tokenizer
    shared = tok.encode("Shared preamble: " + " ".join(WORDS * 3))[:48]  # 3 full blocks
    prompts = []
    for i in range(8):
        words = [WORDS[(i // 2 * 5 + j * 3) % len(WORDS)] for j in range(6 + 2 * (i // 2))]  # pairs share words
        prompts.append(shared + tok.encode(f" Story {i // 2}: " + " ".join(words) + ("." if i % 2 else "!")))
    assert len({tuple(p) for p in prompts}) == 8
    alone = {str(i): run_to_completion(alone_engine, [ids], greedy)["0"] for i, ids in enumerate(prompts)}
    # 14 blocks x 16 = 224 slots for 8 requests of ~60-80 tokens each (shared blocks help, not enough)
    small = make_engine(max_model_len=128, num_gpu_blocks_override=14, max_num_batched_tokens=32,
                        enable_chunked_prefill=True, enable_prefix_caching=True)
    batch = run_to_completion(small, prompts, greedy)
    assert small.scheduler.num_preemptions > 0, "the small cache was meant to force preemptions"
    assert small.kv.prefix_cache_hits > 0, "the shared prefix was meant to hit the prefix cache"
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "was preempted" in r.getMessage()]
    assert warned and "Preemptions so far: 1" in warned[0].getMessage()
    for k in alone:
        assert batch[k] == alone[k], f"prompt {k}: batched output (prefix caching, preemption) differs from alone"
    small.kv.check_invariants()
    assert small.kv.num_free_blocks == small.kv.num_blocks


def test_prefix_caching_computes_fewer_tokens_same_output(make_engine):
    eng = make_engine(enable_prefix_caching=True)
    tok = eng.tokenizer
    shared = tok.encode("You are a careful assistant. " + " ".join(WORDS * 12))
    assert len(shared) > 160
    a = shared + tok.encode(" Question: what is 2+2?")
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    before = eng.stats.computed_tokens
    first = run_to_completion(eng, [a], greedy)["0"]
    cost_first = eng.stats.computed_tokens - before
    hits_before = eng.kv.prefix_cache_hits

    before = eng.stats.computed_tokens
    eng.add_request("again", a, greedy)
    outs = []
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.finished]
    cost_second = eng.stats.computed_tokens - before

    assert outs[0].output_token_ids == first
    assert outs[0].num_cached_tokens >= (len(shared) // eng.block_size - 1) * eng.block_size
    assert eng.kv.prefix_cache_hits - hits_before == outs[0].num_cached_tokens
    assert cost_second <= cost_first - outs[0].num_cached_tokens
    eng.kv.check_invariants()

    # Without prefix caching the second run costs the full prompt again.
    cold = make_engine(enable_prefix_caching=False)
    run_to_completion(cold, [a], greedy)
    b0 = cold.stats.computed_tokens
    assert run_to_completion(cold, [a], greedy)["0"] == first
    assert cold.stats.computed_tokens - b0 == cost_first


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine()


def _gen(engine, ids, sp, rid="x"):
    engine.add_request(rid, ids, sp)
    last = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == rid and o.finished:
                last = o
    return last


def test_seed_is_reproducible_regardless_of_batch(engine):
    tok = engine.tokenizer
    ids = tok.encode("Write a short poem about the sea.")
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = _gen(engine, ids, sp).output_token_ids
    # Same request inside a batch of unseeded and differently seeded neighbours.
    others = [tok.encode(f"Tell me about topic {i}.") for i in range(5)]
    for i, o in enumerate(others):
        engine.add_request(f"n{i}", o, SamplingParams(temperature=1.0, max_tokens=20, seed=None if i % 2 else i))
    batched = _gen(engine, ids, sp, rid="y").output_token_ids
    assert batched == alone
    other_seed = _gen(engine, ids, SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=16, ignore_eos=True), rid="z")
    assert other_seed.output_token_ids != alone


def test_stop_string_and_token_and_length(engine):
    tok = engine.tokenizer
    ids = tok.encode("1, 2, 3, 4,")
    free = _gen(engine, ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert free.finish_reason == "length" and free.num_output_tokens == 12
    assert " 7," in free.text
    stopped = _gen(engine, ids, SamplingParams(temperature=0, max_tokens=12, stop=[" 7,"]), rid="s")
    assert stopped.finish_reason == "stop" and stopped.stop_reason == " 7,"
    assert stopped.text == free.text[: free.text.index(" 7,")]
    kept = _gen(engine, ids, SamplingParams(temperature=0, max_tokens=12, stop=" 7,", include_stop_str_in_output=True), rid="k")
    assert kept.text == free.text[: free.text.index(" 7,") + 3]
    tid = free.output_token_ids[3]
    first = free.output_token_ids.index(tid)
    by_token = _gen(engine, ids, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tid]), rid="t")
    assert by_token.finish_reason == "stop" and by_token.stop_reason == tid
    assert by_token.output_token_ids == free.output_token_ids[: first + 1]
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_min_tokens_suppresses_eos(engine):
    tok = engine.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=True)
    ids = ids if isinstance(ids, list) else list(ids["input_ids"])
    short = _gen(engine, ids, SamplingParams(temperature=0, max_tokens=64))
    assert short.finish_reason == "stop" and short.num_output_tokens < 40
    longer = _gen(engine, ids, SamplingParams(temperature=0, max_tokens=64, min_tokens=40), rid="m")
    assert longer.num_output_tokens >= 40
    assert not set(longer.output_token_ids[:39]) & set(engine.model_config.eos_token_ids)


def test_logprobs_and_streamed_text_is_valid_utf8(engine):
    tok = engine.tokenizer
    ids = tok.encode("Translate to Japanese: good morning ->")
    engine.add_request("u", ids, SamplingParams(temperature=0, max_tokens=24, logprobs=3, ignore_eos=True))
    pieces, final = [], None
    while engine.has_unfinished_requests():
        for o in engine.step():
            pieces.append(o.new_text)
            assert "\ufffd" not in o.new_text
            assert len(o.logprobs) == len(o.new_token_ids)
            for tid, lp, top in o.logprobs:
                assert lp <= 0 and len(top) == 3 and top[0][1] >= lp - 1e-5
                assert tid == top[0][0]  # greedy: the sampled token is the most likely
            final = o
    # A character cut off by max_tokens mid-UTF-8 sequence is dropped, never emitted broken.
    assert "".join(pieces) == final.text == tok.decode(final.output_token_ids, skip_special_tokens=True).rstrip("\ufffd")


def test_abort_frees_blocks(engine):
    ids = engine.tokenizer.encode("Count to one hundred:")
    engine.add_request("ab", ids, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.kv.num_free_blocks < engine.kv.num_blocks
    outs = engine.abort_request(["ab"])
    assert outs[0].finished and outs[0].finish_reason == "abort"
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert not engine.has_unfinished_requests()


def test_prompt_too_long_is_refused(engine):
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request("long", [1] * engine.max_model_len, SamplingParams())
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request("long2", [1] * 10, SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", [], SamplingParams())


def test_quantization_flag_is_checked_against_the_checkpoint(make_engine):
    """As vLLM: the checkpoint's own method is accepted, another one is refused naming both
    (no double quantization)."""
    assert make_engine(quantization="gguf").model_config.quantization == "gguf"
    with pytest.raises(ValueError, match="--quantization awq does not match .* already quantized with gguf"):
        make_engine(quantization="awq")
