"""Tensor-parallel throughput: the same workload at several ``--tensor-parallel-size``
values, side by side in one run.

By default the model is a Llama with random weights written to a temporary Hugging
Face directory (``--hidden-size`` etc.; 16 layers x 1024 hidden ~ 250M parameters), so
that TP=2 is possible (the bundled SmolLM2-135M has 9 heads and 3 KV heads: use
``--model default --tp-sizes 1,3`` for it). Random weights do not change the cost of a
step; EOS is ignored, so every run generates exactly the same number of tokens.

    python benchmarks/tp_throughput.py                              # TP 1 vs 2, CPU (gloo)
    python benchmarks/tp_throughput.py --model default --tp-sizes 1,3
    python benchmarks/tp_throughput.py --device cuda --dtype bfloat16 --tp-sizes 1,2   # >= 2 GPUs (NCCL)

For each size it prints output tokens/s for a batch of ``--num-prompts`` prompts, the
batch-1 decode step time, and the ratio to the first size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_throughput import make_prompts  # noqa: E402  (same prompt generator as the main benchmark)


def write_random_llama(path: str, args) -> None:
    """A Llama with random weights (seed 0) and the bundled model's tokenizer, as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from argosy.runtime.loader import load_checkpoint

    cfg = LlamaConfig(vocab_size=49152, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                      num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                      num_key_value_heads=args.num_kv_heads, max_position_embeddings=2048,
                      tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    load_checkpoint(None).tokenizer.save_pretrained(path)


def run(model: str, tp: int, args, prompts) -> tuple[float, float]:
    """Returns ``(batch output tokens/s, batch-1 decode ms/token)``."""
    from argosy.runtime import LLM, SamplingParams

    llm = LLM(model, tensor_parallel_size=tp, dtype=args.dtype, device=args.device, max_model_len=1024,
              max_num_seqs=args.num_prompts, kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=False)
    try:
        sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        llm.generate([{"prompt_token_ids": prompts[0][:8]}], SamplingParams(max_tokens=2))  # warm-up
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
        batch = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)
        one_sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        llm.generate([{"prompt_token_ids": prompts[0][:16]}], SamplingParams(temperature=0, max_tokens=1))
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompts[0][:16]}], one_sp)
        step_ms = (time.perf_counter() - t) / 32 * 1000
        return batch, step_ms
    finally:
        llm.engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF / HF dir, 'default' for the bundled model "
                                                  "(default: a random-weight Llama, see --hidden-size)")
    ap.add_argument("--tp-sizes", default="1,2", help="comma-separated tensor-parallel sizes (default 1,2)")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--kv-cache-memory", type=int, default=1 << 30, help="bytes per rank")
    ap.add_argument("--hidden-size", type=int, default=1024)
    ap.add_argument("--intermediate-size", type=int, default=2816)
    ap.add_argument("--num-layers", type=int, default=16)
    ap.add_argument("--num-heads", type=int, default=16)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    args = ap.parse_args()

    from argosy.runtime.loader import load_checkpoint

    sizes = [int(x) for x in args.tp_sizes.split(",")]
    tmp = None
    model = None if args.model == "default" else args.model
    if args.model is None:
        tmp = tempfile.TemporaryDirectory(prefix="argosy-tp-bench-")
        write_random_llama(tmp.name, args)
        model = tmp.name
    prompts = make_prompts(load_checkpoint(None).tokenizer, args.num_prompts, 50, 200, 0)
    rows = []
    for tp in sizes:
        batch, step_ms = run(model, tp, args, prompts)
        rows.append((tp, batch, step_ms))
        print(f"tp={tp}: {batch:.1f} tok/s batch, {step_ms:.1f} ms/token batch-1", flush=True)
    base = rows[0]
    name = args.model or f"random Llama {args.num_layers}x{args.hidden_size}"
    print(f"\n{name}, {args.device}, {args.dtype}, {args.num_prompts} prompts x {args.output_len} tokens, "
          f"{os.cpu_count()} CPUs")
    print(f"{'TP':>3} | {'batch tok/s':>11} | {'vs TP=' + str(base[0]):>8} | {'batch-1 ms/token':>16} | {'vs TP=' + str(base[0]):>8}")
    for tp, batch, step_ms in rows:
        print(f"{tp:>3} | {batch:>11.1f} | {batch / base[1]:>7.2f}x | {step_ms:>16.1f} | {base[2] / step_ms:>7.2f}x")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
