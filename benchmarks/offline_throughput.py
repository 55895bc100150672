"""Offline throughput: Argosy's LLM.generate vs Hugging Face ``generate`` (and llama.cpp) on one workload.

Argosy and HF run in this process on the same machine, the same model (the bundled
SmolLM2-135M-Instruct GGUF unless --model is given) and the same prompts:
``--num-prompts`` prompts of 50-500 tokens, ``--output-len`` new tokens each,
EOS ignored. HF runs batched with left padding (``--hf-batch-size``). A second table
row measures single-prompt decode speed for all (a 16-token prompt, so prefill is
negligible).

llama.cpp runs too when ``llama-cpp-python`` is installed, in whichever Python has it:
``--llama-python`` / ``$ARGOSY_LLAMA_PYTHON``, else ``/work/llama-venv/bin/python`` if it
exists, else this Python if it can import ``llama_cpp`` (``--skip-llama-cpp`` turns it
off; build that venv with ``python benchmarks/llama_baseline.py --pip-install
/work/llama-venv``). It gets the same token ids, runs the GGUF as is (no dequantization),
with ``--llama-threads`` threads (default: torch's), in a subprocess
(``llama_offline_worker.py``), in two labelled modes:

* ``llama.cpp batched``: llama-cpp-python's high-level ``Llama`` API cannot batch several
  sequences (``Llama.generate`` is one sequence), so this uses the package's low-level
  bindings of the llama.cpp C API: all prompts as separate sequences of one context,
  prefilled together, then one ``llama_decode`` per step for all of them (static batching);
* ``llama.cpp sequential``: the high-level ``Llama.generate``, one prompt after the other.

    python benchmarks/offline_throughput.py                       # full workload (64 x 128)
    python benchmarks/offline_throughput.py --num-prompts 32 --output-len 64   # issue 17's other workload
    python benchmarks/offline_throughput.py --num-prompts 16 --output-len 32   # quick
    python benchmarks/offline_throughput.py --skip-hf --llama-modes batched    # argosy vs llama.cpp only

Prints output tokens/s for each engine and the ratios (ours / HF, ours / llama.cpp).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
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


def time_generation(llm, prompts: list[list[int]], output_len: int) -> tuple[float, float]:
    """One warm-up, then ``prompts`` batched and the single-prompt row on ``llm`` (an
    Argosy ``LLM``), greedy, ``output_len`` tokens each, EOS ignored.

    Returns:
        ``(offline output tok/s, single-prompt decode tok/s)``.
    """
    from argosy.runtime import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0][:8]}], SamplingParams(max_tokens=2))  # warm-up
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    t = time.perf_counter()
    one = llm.generate([{"prompt_token_ids": prompts[0][:SINGLE_PROMPT_LEN]}], sp)
    dt1 = time.perf_counter() - t
    return n_out / dt, len(one[0].outputs[0].token_ids) / dt1


def run_ours(args, prompts):
    from argosy.runtime import LLM

    llm = LLM(args.model, dtype=args.dtype, max_model_len=1024, max_num_seqs=args.max_num_seqs,
              kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=False)
    offline, single = time_generation(llm, prompts, args.output_len)
    return offline, single, llm.engine.scheduler.num_preemptions


def run_hf(args, prompts, model_path, device: str = "cpu"):
    """HF ``generate`` on the same workload (batched, left-padded) on ``device``.

    Returns ``(offline output tok/s, single-prompt decode tok/s)``.
    """
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "auto": torch.float32}[args.hf_dtype]
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


def find_llama_python(explicit: str | None) -> str | None:
    """The Python interpreter that can import ``llama_cpp``, or None."""
    for cand in (explicit, os.environ.get("ARGOSY_LLAMA_PYTHON"), "/work/llama-venv/bin/python"):
        if cand and os.path.exists(cand):
            return cand
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    return None


def run_llama_cpp(args, prompts, model_path, python: str) -> dict:
    """llama.cpp via llama-cpp-python in ``python`` (a subprocess running llama_offline_worker.py)."""
    job = {"model": model_path, "prompts": prompts, "output_len": args.output_len,
           "threads": args.llama_threads or torch.get_num_threads(),
           "single_prompt": prompts[0][:SINGLE_PROMPT_LEN], "modes": args.llama_modes}
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_offline_worker.py")
    out = subprocess.run([python, worker], input=json.dumps(job), capture_output=True, text=True,
                         cwd=os.path.dirname(worker))
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp worker failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF or HF dir (default: bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--min-input-len", type=int, default=50)
    ap.add_argument("--max-input-len", type=int, default=500)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="ours (auto = the default: bfloat16, 4-bit GGUF weights packed)")
    ap.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"], help="HF generate's dtype")
    ap.add_argument("--kv-cache-memory", type=int, default=3 << 30)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-llama-cpp", action="store_true", help="do not run llama.cpp even if installed")
    ap.add_argument("--llama-python", default=None,
                    help="Python with llama-cpp-python (default: $ARGOSY_LLAMA_PYTHON, /work/llama-venv/bin/python, "
                         "or this one if it has llama_cpp)")
    ap.add_argument("--llama-modes", nargs="+", default=["batched", "sequential"], choices=["batched", "sequential"])
    ap.add_argument("--llama-threads", type=int, default=None, help="llama.cpp threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from argosy.runtime.loader import load_checkpoint, resolve_model

    model_path = resolve_model(args.model)
    tok = load_checkpoint(model_path).tokenizer
    prompts = make_prompts(tok, args.num_prompts, args.min_input_len, args.max_input_len, args.seed)
    print(f"workload: {len(prompts)} prompts, {sum(map(len, prompts))} prompt tokens, "
          f"{args.output_len} output tokens each, ours --dtype {args.dtype}, HF {args.hf_dtype}, "
          f"{torch.get_num_threads()} threads")
    ours_tp, ours_1, preempt = run_ours(args, prompts)
    hf_tp = hf_1 = float("nan")
    if not args.skip_hf:
        hf_tp, hf_1 = run_hf(args, prompts, model_path)
    llama = {}
    if not args.skip_llama_cpp:
        py = find_llama_python(args.llama_python)
        if py is None:
            print("llama.cpp: llama-cpp-python not found (see --llama-python); skipped")
        else:
            llama = run_llama_cpp(args, prompts, model_path, py)
            print(f"llama.cpp: llama-cpp-python {llama.get('version')} in {py}, "
                  f"{args.llama_threads or torch.get_num_threads()} threads")
    cols = [("argosy", ours_tp, ours_1), ("HF generate", hf_tp, hf_1)]
    for mode in args.llama_modes:
        if mode in llama:
            cols.append((f"llama.cpp {mode}", llama[mode]["throughput"], llama[mode]["single"]))
    ratios = [c for c in cols[1:] if c[1] == c[1]]  # skip NaN (not run)
    short = {"HF generate": "HF", "llama.cpp batched": "lcpp-batch", "llama.cpp sequential": "lcpp-seq"}
    w = [max(12, len(c[0]) + 2) for c in cols]
    print()
    print(f"{'metric':<36}" + "".join(f"{c[0]:>{wi}}" for c, wi in zip(cols, w))
          + "".join(f"{'ours/' + short[c[0]]:>17}" for c in ratios))
    for label, k in (("offline throughput (output tok/s)", 1), ("single-prompt decode (tok/s)", 2)):
        print(f"{label:<36}" + "".join(f"{c[k]:>{wi}.1f}" for c, wi in zip(cols, w))
              + "".join(f"{cols[0][k] / c[k]:>17.2f}" for c in ratios))
    print(f"(argosy preemptions: {preempt}; HF batch size {args.hf_batch_size}"
          + ("; llama.cpp batched = low-level C API through llama-cpp-python, static batch of all prompts; "
             "sequential = high-level Llama.generate, one prompt at a time" if llama else "") + ")")


if __name__ == "__main__":
    main()
