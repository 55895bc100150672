"""Offline throughput: Argosy's LLM.generate vs Hugging Face ``generate`` on one workload.

Both run in this process on the same machine, the same model (the bundled
SmolLM2-135M-Instruct GGUF unless --model is given) and the same prompts:
``--num-prompts`` prompts of 50-500 tokens, ``--output-len`` new tokens each,
EOS ignored. HF runs batched with left padding (``--hf-batch-size``). A second table
row measures single-prompt decode speed for both (a 16-token prompt, so prefill is
negligible).

    python benchmarks/offline_throughput.py                       # full workload
    python benchmarks/offline_throughput.py --num-prompts 16 --output-len 32   # quick

Prints output tokens/s for each engine and the ratio (ours / HF).
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

#: Prompt length of the single-prompt row (tokens): short, so the row measures decode speed.
SINGLE_PROMPT_LEN = 16


def make_prompts(tok, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    vocab_words = "the of river data model system light music paper city green quickly under between".split()
    prompts = []
    for _ in range(n):
        target = rng.randint(lo, hi)
        words = " ".join(rng.choice(vocab_words) for _ in range(target * 2))
        prompts.append(tok.encode(words)[:target])
    return prompts


def run_ours(args, prompts):
    from argosy.runtime import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, max_model_len=1024, max_num_seqs=args.max_num_seqs,
              kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=False)
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([prompts[0][:8]], SamplingParams(max_tokens=2))  # warm-up
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    t = time.perf_counter()
    one = llm.generate([{"prompt_token_ids": prompts[0][:SINGLE_PROMPT_LEN]}], sp)
    dt1 = time.perf_counter() - t
    return n_out / dt, len(one[0].outputs[0].token_ids) / dt1, llm.engine.scheduler.num_preemptions


def run_hf(args, prompts, model_path, device: str = "cpu"):
    """HF ``generate`` on the same workload (batched, left-padded) on ``device``.

    Returns ``(offline output tok/s, single-prompt decode tok/s)``.
    """
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "auto": torch.float32}[args.dtype]
    m = AutoModelForCausalLM.from_pretrained(os.path.dirname(model_path), gguf_file=os.path.basename(model_path),
                                             dtype=dtype).to(device).eval()
    pad = 0

    def gen(batch):
        L = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (L - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.no_grad():
            out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.output_len,
                             min_new_tokens=args.output_len, do_sample=False, pad_token_id=pad)
        if device != "cpu":
            torch.cuda.synchronize()
        return (out.shape[1] - L) * len(batch)

    gen([prompts[0][:8]])  # warm-up
    t = time.perf_counter()
    n_out = sum(gen(prompts[i : i + args.hf_batch_size]) for i in range(0, len(prompts), args.hf_batch_size))
    dt = time.perf_counter() - t
    t = time.perf_counter()
    n1 = gen([prompts[0][:SINGLE_PROMPT_LEN]])
    dt1 = time.perf_counter() - t
    return n_out / dt, n1 / dt1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF or HF dir (default: bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--min-input-len", type=int, default=50)
    ap.add_argument("--max-input-len", type=int, default=500)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--kv-cache-memory", type=int, default=3 << 30)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from argosy.runtime.loader import load_checkpoint, resolve_model

    model_path = resolve_model(args.model)
    tok = load_checkpoint(model_path).tokenizer
    prompts = make_prompts(tok, args.num_prompts, args.min_input_len, args.max_input_len, args.seed)
    print(f"workload: {len(prompts)} prompts, {sum(map(len, prompts))} prompt tokens, "
          f"{args.output_len} output tokens each, dtype {args.dtype}, {torch.get_num_threads()} threads")
    ours_tp, ours_1, preempt = run_ours(args, prompts)
    hf_tp = hf_1 = float("nan")
    if not args.skip_hf:
        hf_tp, hf_1 = run_hf(args, prompts, model_path)
    print()
    print(f"{'metric':<38}{'argosy':>10}{'HF generate':>14}{'ratio':>8}")
    print(f"{'offline throughput (output tok/s)':<38}{ours_tp:>10.1f}{hf_tp:>14.1f}{ours_tp / hf_tp:>8.2f}")
    print(f"{'single-prompt decode (tok/s)':<38}{ours_1:>10.1f}{hf_1:>14.1f}{ours_1 / hf_1:>8.2f}")
    print(f"(argosy preemptions: {preempt}; HF batch size {args.hf_batch_size})")


if __name__ == "__main__":
    main()
