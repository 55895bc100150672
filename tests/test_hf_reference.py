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


def test_biased_llama_matches_hf_at_tp1_and_tp2(tmp_path, checkpoint):
    """A Llama with ``attention_bias`` and ``mlp_bias`` (q/k/v/o and gate/up/down biased,
    as HF builds it), random non-zero biases, saved by transformers: our prompt logits
    equal HF's at TP=1 and TP=2 (the row-parallel o/down biases are added once, after the
    all-reduce: adding them on every rank would double them)."""
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    from argosy.runtime.config import EngineArgs
    from argosy.runtime.core.engine import LLMEngine

    cfg = LlamaConfig(vocab_size=checkpoint.config.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    torch.manual_seed(7)
    hf = HFLlama(cfg).eval()
    n_bias = 0
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
                n_bias += 1
    assert n_bias == 2 * 7  # q, k, v, o, gate, up, down per layer
    hf.save_pretrained(tmp_path, safe_serialization=True)
    checkpoint.tokenizer.save_pretrained(tmp_path)
    ids = checkpoint.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
        hf.model.layers[0].self_attn.o_proj.bias.zero_()  # the same model minus one bias
        without_o_bias = hf(torch.tensor([ids])).logits[0].float()
    assert (ref - without_o_bias).abs().max().item() > 0.1  # the biases matter to the output
    for tp in (1, 2):
        eng = LLMEngine(EngineArgs(model=str(tmp_path), dtype="float32", max_model_len=256,
                                   kv_cache_memory=16 << 20, tensor_parallel_size=tp))
        try:
            diff = (eng.prompt_logits(ids) - ref).abs().max().item()
        finally:
            eng.shutdown()
        assert diff <= LOGIT_ATOL, f"TP={tp}: max |logit diff| {diff}"
