"""Quantized Hugging Face checkpoints against the same model dense in bfloat16, on CPU.

From the bundled SmolLM2-135M-Instruct GGUF, ``transformers`` makes a dense float
checkpoint (saved in bfloat16: the baseline), and the formats' own tools quantize it the
way the tests do (``tests/test_compressed_tensors.py``, ``tests/test_gptq_awq.py``):
compressed-tensors W4A16 (group 64, symmetric) and W8A8 (int8 per channel, dynamic
per-token activations), AWQ (4-bit GEMM, group 64) and GPTQ (4-bit, act-order, group 64;
AutoAWQ and AutoGPTQ are downloaded from PyPI, nothing installed). Each directory is
served by Argosy in bfloat16 on the same workload, one after the other in this process:

* offline: ``--num-prompts`` prompts of 50-500 tokens, ``--output-len`` new tokens each
  (EOS ignored), output tokens/s;
* single stream: one 16-token prompt, ``--output-len`` tokens, tokens/s (decode speed).

Also printed: the weight bytes by format from the engine's startup accounting.

    python benchmarks/quantized_checkpoints.py                      # 32 x 64
    python benchmarks/quantized_checkpoints.py --num-prompts 16 --output-len 32
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# the tests' checkpoint makers (``tests`` first, before any installed package of that name;
# the standard library's ``operator`` is imported by then, so the repository's operator/
# cannot shadow it)
sys.path.insert(0, str(REPO))


def make_checkpoints(root: Path, formats: list[str]) -> dict[str, str]:
    """``format -> directory`` for ``formats`` (``bf16``, ``w4a16``, ``w8a8``, ``awq``, ``gptq``)."""
    from transformers import AutoModelForCausalLM

    from argosy.runtime.loader import load_checkpoint
    from argosy.runtime.loader.resolve import default_model_path

    gguf = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                              dtype=torch.float32).eval()
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    tok = load_checkpoint(gguf).tokenizer
    out: dict[str, str] = {}
    if "bf16" in formats:
        d = root / "bf16"
        hf.to(torch.bfloat16).save_pretrained(d)
        hf.to(torch.float32)
        tok.save_pretrained(d)
        out["bf16"] = str(d)
    if {"w4a16", "w8a8"} & set(formats):
        from tests.test_compressed_tensors import _make as make_ct

        if "w4a16" in formats:
            out["w4a16"] = make_ct(hf, tok, root / "w4a16", "group", True)
        if "w8a8" in formats:
            out["w8a8"] = make_ct(hf, tok, root / "w8a8", "channel", True, kind="w8a8")
    if {"awq", "gptq"} & set(formats):
        from tests import quant_tools
        from tests.test_gptq_awq import _make as make_legacy

        tools = quant_tools.load(root / "tools")
        if "awq" in formats:
            out["awq"] = make_legacy(tools, hf, tok, root / "awq", "awq")[0]
        if "gptq" in formats:
            out["gptq"] = make_legacy(tools, hf, tok, root / "gptq", "gptq4-actorder")[0]
    del hf
    gc.collect()
    return out


def run(path: str, prompts: list[list[int]], args) -> dict:
    from argosy.runtime import LLM
    from offline_throughput import time_generation

    llm = LLM(path, dtype="bfloat16", max_model_len=1024, max_num_seqs=args.max_num_seqs,
              kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=False)
    offline, single = time_generation(llm, prompts, args.output_len)
    by = llm.engine.executor.runner.model.weight_bytes_by_format  # the startup accounting
    res = {"offline_tok_s": offline, "single_tok_s": single,
           "weights_mib": {k: round(v / 2**20) for k, v in sorted(by.items(), key=lambda kv: -kv[1])}}
    del llm
    gc.collect()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--kv-cache-memory", type=int, default=1 << 30)
    ap.add_argument("--formats", default="bf16,w4a16,w8a8,awq,gptq")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from offline_throughput import make_prompts

    formats = args.formats.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        dirs = make_checkpoints(Path(tmp), formats)
        print(f"checkpoints made in {time.perf_counter() - t:.0f} s", flush=True)
        from argosy.runtime.loader import load_checkpoint

        tok = load_checkpoint(dirs[formats[0]]).tokenizer
        prompts = make_prompts(tok, args.num_prompts, 50, 500, args.seed)
        results = {}
        for f in formats:
            results[f] = run(dirs[f], prompts, args)
            print(f, json.dumps(results[f]), flush=True)
    base = results.get("bf16")
    print(f"\n{args.num_prompts} prompts x {args.output_len} tokens, bfloat16 on CPU ({torch.get_num_threads()} "
          "threads)")
    print(f"{'format':8} {'offline tok/s':>14} {'vs bf16':>8} {'single tok/s':>13} {'vs bf16':>8}  weights (MiB)")
    for f, r in results.items():
        rel = (f"{r['offline_tok_s'] / base['offline_tok_s']:.2f}x", f"{r['single_tok_s'] / base['single_tok_s']:.2f}x") \
            if base else ("", "")
        print(f"{f:8} {r['offline_tok_s']:14.1f} {rel[0]:>8} {r['single_tok_s']:13.1f} {rel[1]:>8}  "
              + ", ".join(f"{k} {v}" for k, v in r["weights_mib"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
