"""Scheduler policy on bookkeeping alone (no model): a burst of requests sharing an
uncached prompt prefix computes it once; a short shared preamble delays nobody."""

from __future__ import annotations

from argosy.runtime.config import SchedulerConfig
from argosy.runtime.core.kv_cache_manager import KVCacheManager
from argosy.runtime.core.request import Request
from argosy.runtime.core.sampling_params import SamplingParams
from argosy.runtime.core.scheduler import Scheduler

BS = 16


def _sched(budget=2048, caching=True, blocks=512):
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=64, max_model_len=4096)
    return Scheduler(cfg, KVCacheManager(blocks, BS, enable_caching=caching))


def _req(rid, ids, **sp):
    return Request(rid, ids, SamplingParams(temperature=0, max_tokens=4, **sp), eos_token_ids=(0,), max_tokens=4)


def _run_step(s):
    out = s.schedule()
    sampled = {r.request_id: 7 for r, n in out.scheduled if r.num_computed_tokens + n >= r.num_tokens}
    s.update(out, sampled)
    return {r.request_id: n for r, n in out.scheduled}


def test_a_burst_sharing_an_uncached_prefix_computes_it_once():
    prefix = list(range(1000, 1000 + 40 * BS))  # 640 shared tokens, not cached yet
    s = _sched()
    for i in range(4):
        s.add_request(_req(f"shared{i}", prefix + [5000 + i] * 20))
    s.add_request(_req("other", list(range(9000, 9300))))  # nothing in common: not held back
    step1 = _run_step(s)
    assert step1 == {"shared0": 660, "other": 300}, step1  # the others wait for shared0's blocks
    step2 = _run_step(s)
    for i in (1, 2, 3):  # the prefix is cached now: each computes its own 20 tokens only
        assert step2[f"shared{i}"] == 20
        assert s.requests[f"shared{i}"].num_cached_tokens == len(prefix)
    assert s.kv.prefix_cache_hits == 3 * len(prefix)


def test_deferred_while_the_shared_prefill_is_chunked():
    prefix = list(range(1000, 1000 + 64 * BS))  # 1,024 tokens: three 400-token chunks
    s = _sched(budget=400)
    s.add_request(_req("a", prefix + [1] * 10))
    s.add_request(_req("b", prefix + [2] * 10))
    assert _run_step(s) == {"a": 400}
    assert _run_step(s) == {"a": 400}
    assert _run_step(s) == {"a": 234}
    assert _run_step(s) == {"a": 1, "b": 10}  # a decodes, b hits all 64 blocks
    assert s.requests["b"].num_cached_tokens == len(prefix)


def test_a_short_shared_preamble_delays_nobody():
    preamble = list(range(100, 100 + 2 * BS))  # a chat template's system line: 2 blocks
    s = _sched()
    s.add_request(_req("a", preamble + list(range(2000, 2300))))
    s.add_request(_req("b", preamble + list(range(3000, 3300))))
    assert _run_step(s) == {"a": 332, "b": 332}  # b computes the 2 blocks again rather than wait


def test_without_prefix_caching_or_with_prompt_logprobs_nothing_waits():
    prefix = list(range(1000, 1000 + 40 * BS))
    s = _sched(caching=False)
    s.add_request(_req("a", prefix + [1]))
    s.add_request(_req("b", prefix + [2]))
    assert _run_step(s) == {"a": 641, "b": 641}
    s = _sched()
    s.add_request(_req("a", prefix + [1]))
    s.add_request(_req("b", prefix + [2], prompt_logprobs=1))  # needs every position: no cache reads
    assert _run_step(s) == {"a": 641, "b": 641}


def test_a_held_back_request_keeps_its_seat_and_its_place():
    """A request held back for shared blocks counts against max_num_seqs (newer ones do
    not take every seat meanwhile), and a newer request preempted later goes back behind
    it in arrival order (not to the front of the queue)."""
    prefix = list(range(1000, 1000 + 40 * BS))
    cfg = SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=3, max_model_len=4096)
    s = Scheduler(cfg, KVCacheManager(512, BS))
    s.add_request(_req("r", prefix + [1] * 5))
    s.add_request(_req("w", prefix + [2] * 5))
    s.add_request(_req("x1", list(range(5000, 5100))))
    s.add_request(_req("x2", list(range(6000, 6100))))
    assert set(_run_step(s)) == {"r", "x1"}  # w held back and keeps the third seat: x2 waits
    assert set(_run_step(s)) == {"r", "x1", "w"}  # w hits the 40 cached blocks
    assert [r.request_id for r in s.waiting] == ["x2"]

    s = _sched()
    s.add_request(_req("r", prefix + [1] * 5))
    s.add_request(_req("w", prefix + [2] * 5))  # held back behind r
    s.add_request(_req("x", list(range(5000, 5100))))
    assert set(_run_step(s)) == {"r", "x"}
    s._preempt(s.requests["x"])  # as when blocks run out
    assert [r.request_id for r in s.waiting] == ["w", "x"]  # arrival order: x does not jump ahead of w
