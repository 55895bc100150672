"""The engine against Hugging Face transformers on the bundled model (the oracle)."""

from __future__ import annotations

import torch

from argosy.runtime import SamplingParams

from .conftest import prefill_logits, run_to_completion

#: Max |logit difference| allowed vs HF in float32. Both run the same fp32 ops on the
#: same dequantized weights; observed difference is 0.0, the bound leaves room for
#: BLAS blocking differences.
LOGIT_ATOL = 1e-3

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three colors:",
]


def _chat_ids(tok, text):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return ids if isinstance(ids, list) else list(ids["input_ids"])


def test_first_forward_logits_match_hf(make_engine, hf_model):
    eng = make_engine()
    tok = eng.tokenizer
    ids = _chat_ids(tok, "What is the tallest mountain on Earth?")
    t = len(ids)
    ours = prefill_logits(eng, ids)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape == (t, eng.model_config.vocab_size)
    diff = (ours - ref).abs().max().item()
    assert diff <= LOGIT_ATOL, f"max |logit diff| {diff} > {LOGIT_ATOL}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@torch.no_grad()
def _hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding with HF's model and its own KV cache (no generation-config
    processors, so EOS is not special: matches ``ignore_eos=True``)."""
    out = hf_model(torch.tensor([ids]), use_cache=True)
    past, new = out.past_key_values, []
    for _ in range(n):
        nxt = int(out.logits[0, -1].argmax())
        new.append(nxt)
        out = hf_model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return new


def test_greedy_generation_equals_hf(make_engine, hf_model):
    eng = make_engine()
    tok = eng.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    ours = run_to_completion(eng, prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for i, ids in enumerate(prompts):
        ref_new = _hf_greedy(hf_model, ids, 32)
        assert ours[str(i)] == ref_new, f"prompt {PROMPTS[i]!r}: ours {ours[str(i)]} != HF {ref_new}"


def test_chat_template_from_gguf_metadata(checkpoint):
    tok = checkpoint.tokenizer
    assert tok.chat_template and "im_start" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert 2 in checkpoint.config.eos_token_ids  # <|im_end|>
