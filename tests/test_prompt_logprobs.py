"""``prompt_logprobs`` (issue 14 item 4) against Hugging Face ``transformers`` on the same
GGUF (float32, the exact path): every prompt token's log-probability, its rank and the
top alternatives, with the prompt split over several chunked-prefill steps, and again
when the prompt is already in the prefix cache (such requests do not read it)."""

from __future__ import annotations

import torch

from argosy.runtime.core.sampling_params import SamplingParams

TEXT = ("The quick brown fox jumps over the lazy dog. Kubernetes schedules pods onto nodes, and "
        "the scheduler weighs requests against what each node can still give.")


def _run(engine, rid: str, ids: list[int], params: SamplingParams):
    engine.add_request(rid, ids, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    return final


def test_prompt_logprobs_equal_hf(make_engine, hf_model):
    engine = make_engine(dtype="float32", max_num_batched_tokens=16, max_model_len=256)
    ids = engine.tokenizer.encode(TEXT)
    assert len(ids) > 16  # two or more prefill chunks
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for attempt in range(2):  # the second run's prompt is fully cached: still computed, same values
        res = _run(engine, f"plp-{attempt}", ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3))
        plp = res.prompt_logprobs
        assert len(plp) == len(ids) and plp[0] is None and res.num_cached_tokens == 0
        for j in range(1, len(ids)):
            tok, lp, rank, top = plp[j]
            row = ref[j - 1]
            assert tok == ids[j]
            assert abs(lp - float(row[tok])) < 1e-4, (j, lp, float(row[tok]))
            assert rank == int((row > row[tok] + 1e-5).sum()) + 1 or abs(
                float(row.sort(descending=True).values[rank - 1]) - lp) < 1e-4
            ref_top = row.topk(3)
            assert torch.allclose(torch.tensor([v for _, v in top]), ref_top.values, atol=1e-4)
    assert engine.kv.num_free_blocks == engine.num_blocks
