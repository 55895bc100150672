"""Sampler semantics on synthetic logits (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from argosy.runtime import SamplingParams
from argosy.runtime.core.request import Request
from argosy.runtime.core.sampler import Sampler

V = 8


def _req(sp, prompt=(0,), out=()):
    r = Request("r", list(prompt), sp, eos_token_ids=(7,), max_tokens=100)
    for t in out:
        r.append_output_token(t)
    return r


def test_greedy_is_argmax_per_row():
    s = Sampler(V)
    logits = torch.randn(5, V)
    reqs = [_req(SamplingParams(temperature=0)) for _ in range(5)]
    assert s(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_top_k_1_and_tiny_top_p_are_greedy():
    s = Sampler(V, seed=3)
    logits = torch.randn(4, V)
    reqs = [_req(SamplingParams(temperature=1.5, top_k=1)), _req(SamplingParams(temperature=1.0, top_p=1e-6)),
            _req(SamplingParams(temperature=1.0, min_p=1.0)), _req(SamplingParams(temperature=0))]
    for _ in range(20):
        assert s(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_sampling_follows_the_distribution():
    s = Sampler(V, seed=0)
    probs = torch.tensor([0.5, 0.3, 0.2, 0, 0, 0, 0, 0])
    logits = probs.clamp_min(1e-12).log().expand(4000, V).contiguous()
    reqs = [_req(SamplingParams(temperature=1.0))] * 4000
    counts = torch.bincount(torch.tensor(s(logits, reqs).token_ids), minlength=V).float() / 4000
    assert torch.allclose(counts[:3], probs[:3], atol=0.03)
    assert counts[3:].sum() == 0


def test_top_p_cuts_the_tail():
    s = Sampler(V, seed=0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0, 0, 0, 0])
    logits = probs.clamp_min(1e-12).log().expand(2000, V).contiguous()
    toks = s(logits, [_req(SamplingParams(top_p=0.75))] * 2000).token_ids
    assert set(toks) == {0, 1}


def test_top_k_keeps_k():
    s = Sampler(V, seed=0)
    logits = torch.arange(V, dtype=torch.float32).expand(2000, V).contiguous()
    toks = s(logits, [_req(SamplingParams(top_k=2))] * 2000).token_ids
    assert set(toks) == {6, 7}


def test_seeded_rows_do_not_depend_on_batch():
    logits = torch.randn(6, V)
    sp = SamplingParams(temperature=1.0, seed=42)
    alone = Sampler(V, seed=1)(logits[2:3], [_req(sp)]).token_ids[0]
    batch = Sampler(V, seed=2)(logits, [_req(SamplingParams(temperature=1.0)) if i != 2 else _req(sp) for i in range(6)])
    assert batch.token_ids[2] == alone


def test_penalties():
    s = Sampler(V)
    logits = torch.tensor([[2.0, 1.9, -1.0, 0, 0, 0, 0, 0]])
    # token 0 repeated in the output: frequency/presence push it below token 1
    r = _req(SamplingParams(temperature=0, frequency_penalty=0.1, presence_penalty=0.05), out=(0, 0))
    assert s(logits, [r]).token_ids == [1]
    # repetition penalty divides positive logits of seen tokens (prompt included)
    r = _req(SamplingParams(temperature=0, repetition_penalty=1.2), prompt=(0,))
    assert s(logits, [r]).token_ids == [1]
    r = _req(SamplingParams(temperature=0, repetition_penalty=1.2), prompt=(5,))
    assert s(logits, [r]).token_ids == [0]


def test_min_tokens_masks_eos_and_stop_ids():
    s = Sampler(V)
    logits = torch.zeros(1, V)
    logits[0, 7] = 10.0  # EOS
    logits[0, 6] = 9.0   # a stop token id
    r = _req(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6]))
    assert s(logits, [r]).token_ids == [0]
    r = _req(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6]), out=(1, 1))
    assert s(logits, [r]).token_ids == [7]


def test_logprobs_are_raw_log_softmax():
    s = Sampler(V)
    logits = torch.randn(2, V)
    out = s(logits, [_req(SamplingParams(temperature=0, logprobs=2)), _req(SamplingParams(temperature=0))])
    lp, top = out.logprobs[0]
    ref = torch.log_softmax(logits[0], -1)
    assert math.isclose(lp, ref.max().item(), rel_tol=1e-5)
    assert [t for t, _ in top] == ref.topk(2).indices.tolist()
    assert out.logprobs[1] is None


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_k=-5), dict(max_tokens=0),
                                dict(n=0), dict(min_tokens=5, max_tokens=2), dict(logprobs=50), dict(stop=[""]),
                                dict(presence_penalty=3)])
def test_invalid_params(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)
