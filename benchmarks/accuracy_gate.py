"""Accuracy gate of the fast CPU path: ours vs llama.cpp against the float32 reference.

Teacher-forced over text (default: every file of ``../shared/seeds/``, in windows of
``--window`` tokens), three models read the same GGUF file and score every next token:

- the reference: Argosy with ``--dtype float32`` (the file dequantized, dense; agrees with
  Hugging Face ``transformers`` to rounding, tests/test_hf_reference.py);
- ours: Argosy's default fast path (bfloat16; 4-bit weights packed for the int4 kernel,
  8/6/5-bit ones as grouped int8 for ours), fed in decode-shaped steps of
  ``INT4_MAX_ROWS`` tokens so those kernels run (``--chunk``);
- llama.cpp: ``llama-cpp-python`` with ``logits_all=True`` (its own CPU kernels), run in
  the Python given by ``--llama-python`` (a separate venv, see ``benchmarks/llama_baseline.py``).

Both are compared with the reference by mean KL divergence and top-1 agreement
(:func:`argosy.runtime.quantization.accuracy.distribution_agreement`); the gate is that
ours is no worse than llama.cpp on both.

    python benchmarks/accuracy_gate.py                                # all seed texts
    python benchmarks/accuracy_gate.py --slice tests/data/seed_slice.txt   # the test's slice
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import torch

_LLAMA_CHILD = textwrap.dedent("""
    import sys, numpy as np
    from llama_cpp import Llama
    model, ids_path, out_path, threads = sys.argv[1:5]
    ids = np.load(ids_path).tolist()
    llm = Llama(model_path=model, n_ctx=max(512, len(ids) + 8), n_batch=512, logits_all=True,
                n_threads=int(threads), verbose=False)
    llm.eval(ids)
    np.save(out_path, np.asarray(llm.scores[: len(ids)], dtype=np.float32))
""")


def llama_cpp_logits(python: str, model: str, ids: list[int], threads: int) -> torch.Tensor:
    """``[len(ids), vocab]`` logits from llama.cpp (``llama-cpp-python``) in ``python``.

    Raises:
        RuntimeError: the child failed (message carries its stderr).
    """
    with tempfile.TemporaryDirectory() as d:
        ids_path, out_path = os.path.join(d, "ids.npy"), os.path.join(d, "logits.npy")
        np.save(ids_path, np.asarray(ids, dtype=np.int32))
        res = subprocess.run([python, "-c", _LLAMA_CHILD, model, ids_path, out_path, str(threads)],
                             capture_output=True, text=True, cwd=d)
        if res.returncode:
            raise RuntimeError(f"llama-cpp-python failed: {res.stderr[-2000:]}")
        return torch.from_numpy(np.load(out_path))


def main(argv=None) -> int:
    from argosy.runtime.config import EngineArgs, default_num_threads
    from argosy.runtime.core.engine import LLMEngine
    from argosy.runtime.layers import INT4_MAX_ROWS
    from argosy.runtime.quantization.accuracy import distribution_agreement

    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled model)")
    ap.add_argument("--slice", default=None, help="one text file instead of the seed texts")
    ap.add_argument("--seeds", default=os.path.join(here, "..", "..", "shared", "seeds"), help="folder of .txt files")
    ap.add_argument("--window", type=int, default=1024, help="tokens per teacher-forced window")
    ap.add_argument("--chunk", type=int, default=INT4_MAX_ROWS, help="tokens per step of our fast path")
    ap.add_argument("--llama-python", default=os.environ.get("LLAMA_PYTHON", "/work/llama-venv/bin/python"),
                    help="a Python with llama-cpp-python installed ('' to skip llama.cpp)")
    args = ap.parse_args(argv)

    ref = LLMEngine(EngineArgs(model=args.model, dtype="float32", max_model_len=args.window + 8,
                               kv_cache_memory=256 << 20))
    fast = LLMEngine(EngineArgs(model=args.model, dtype="auto", max_model_len=args.window + 8,
                                kv_cache_memory=256 << 20))
    path = ref.checkpoint.path
    files = [args.slice] if args.slice else sorted(glob.glob(os.path.join(args.seeds, "*.txt")))
    windows = []
    for f in files:
        ids = ref.tokenizer.encode(open(f, encoding="utf-8").read())
        windows += [ids[i : i + args.window] for i in range(0, len(ids), args.window) if len(ids[i : i + args.window]) > 16]
    rows = {"ours (bf16 fast path)": [], "llama.cpp": []}
    for ids in windows:
        r = ref.prompt_logits(ids)[:-1]
        rows["ours (bf16 fast path)"].append((distribution_agreement(r, fast.prompt_logits(ids, args.chunk)[:-1])))
        if args.llama_python:
            lc = llama_cpp_logits(args.llama_python, path, ids, default_num_threads())[:-1, : r.shape[1]]
            rows["llama.cpp"].append(distribution_agreement(r, lc))
    print(f"model {path}; {len(windows)} windows of <= {args.window} tokens from {len(files)} file(s); "
          "reference: float32 dense")
    print(f"{'':28s} {'positions':>9s} {'mean KL (nats)':>15s} {'top-1 agreement':>16s}")
    for name, parts in rows.items():
        if not parts:
            print(f"{name:28s} (not run)")
            continue
        n = sum(p.positions for p in parts)
        kl = sum(p.mean_kl * p.positions for p in parts) / n
        top1 = sum(p.top1 * p.positions for p in parts) / n
        print(f"{name:28s} {n:9d} {kl:15.6f} {top1:16.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
