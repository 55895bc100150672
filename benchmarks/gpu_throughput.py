"""End-to-end on a CUDA GPU: Argosy's LLM.generate vs Hugging Face ``generate``, bf16.

Both engines run in this process on the same GPU, the same model (the bundled
SmolLM2-135M-Instruct GGUF unless --model is given) and the same prompts (the prompt
maker of ``benchmarks/offline_throughput.py``): ``--num-prompts`` prompts of 50-500
tokens, ``--output-len`` new tokens each, EOS ignored. HF runs batched with left padding
(``--hf-batch-size``). The second row is single-prompt (batch-1) decode speed.

    python benchmarks/gpu_throughput.py                                  # full workload
    python benchmarks/gpu_throughput.py --num-prompts 64 --output-len 64 # quick

Targets (issue 4): offline throughput >= 10x HF, batch-1 decode >= 5x HF (the latter
with CUDA graphs). Prints output tokens/s for each engine and the ratio (ours / HF) last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_throughput import SINGLE_PROMPT_LEN, make_prompts, run_hf  # noqa: E402  (shared with the CPU benchmark)


def _sync():
    import torch

    torch.cuda.synchronize()


def run_ours(args, prompts):
    """Returns (offline output tok/s, batch-1 decode tok/s, preemptions)."""
    from argosy.runtime import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device="cuda", max_model_len=1024, max_num_seqs=args.max_num_seqs,
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
              enforce_eager=args.enforce_eager)
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], SamplingParams(max_tokens=8, ignore_eos=True))
    _sync()
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    _sync()
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    t = time.perf_counter()
    one = llm.generate([{"prompt_token_ids": prompts[0][:SINGLE_PROMPT_LEN]}], sp)
    _sync()
    dt1 = time.perf_counter() - t
    tp = (n_out / dt, len(one[0].outputs[0].token_ids) / dt1, llm.engine.scheduler.num_preemptions)
    del llm
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    return tp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF or HF dir (default: bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--min-input-len", type=int, default=50)
    ap.add_argument("--max-input-len", type=int, default=500)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                    help="Argosy's share of GPU memory (HF runs after it, in the same process)")
    ap.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs in Argosy (when supported)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_throughput.py needs a CUDA device")
    from argosy.runtime.loader import load_checkpoint, resolve_model

    model_path = resolve_model(args.model)
    tok = load_checkpoint(model_path).tokenizer
    prompts = make_prompts(tok, args.num_prompts, args.min_input_len, args.max_input_len, args.seed)
    print(f"device: {torch.cuda.get_device_name()}; workload: {len(prompts)} prompts, "
          f"{sum(map(len, prompts))} prompt tokens, {args.output_len} output tokens each, {args.dtype}")
    ours_tp, ours_1, preempt = run_ours(args, prompts)
    hf_tp = hf_1 = float("nan")
    if not args.skip_hf:
        hf_tp, hf_1 = run_hf(args, prompts, model_path, device="cuda")
    print()
    print(f"{'metric':<38}{'argosy':>10}{'HF generate':>14}{'ratio':>8}{'target':>8}")
    print(f"{'offline throughput (output tok/s)':<38}{ours_tp:>10.1f}{hf_tp:>14.1f}{ours_tp / hf_tp:>8.2f}{'>=10':>8}")
    print(f"{'batch-1 decode (tok/s)':<38}{ours_1:>10.1f}{hf_1:>14.1f}{ours_1 / hf_1:>8.2f}{'>=5':>8}")
    print(f"(argosy preemptions: {preempt}; HF batch size {args.hf_batch_size}; "
          f"CUDA graphs {'off' if args.enforce_eager else 'as the engine decides'})")


if __name__ == "__main__":
    main()
