"""llama.cpp side of ``offline_throughput.py``, run through ``llama-cpp-python``.

It runs in the Python that has ``llama_cpp`` installed (normally a separate venv, e.g.
``/work/llama-venv``; see ``llama_baseline.py --pip-install``), as a subprocess of
``offline_throughput.py``: it reads one JSON job on stdin and prints one JSON line with
the results on stdout. It imports neither torch nor argosy.

    echo '{"model": "...gguf", "prompts": [[1,2,3]], "output_len": 8, "threads": 2,
           "single_prompt": [1,2,3], "modes": ["batched", "sequential"]}' |
        /work/llama-venv/bin/python benchmarks/llama_offline_worker.py

Two modes, labelled as such in the report:

* ``batched``: llama-cpp-python's high-level API (``Llama``) generates one sequence at a
  time (``Llama.generate`` has no multi-sequence form; its only batching is of one
  prompt's tokens), so this mode uses the package's *low-level* ctypes bindings of the
  llama.cpp C API: one context with ``n_seq_max`` = number of prompts and one KV stream
  per sequence (``kv_unified`` off, as llama-server with ``-np``; a unified cache, job key
  ``"kv_unified": true``, was 2-4x slower here because attention then spans every
  sequence's cells); all prompts are prefilled (packed into ``llama_decode`` calls of up to
  ``n_batch`` tokens, each prompt its own sequence id), then every step decodes one
  token for all sequences in one ``llama_decode`` call. Greedy (argmax of the logits),
  EOS ignored, exactly ``output_len`` tokens per prompt. This is static batching
  (prefill all, then decode all), not continuous batching.
* ``sequential``: the high-level ``Llama.generate`` (greedy, temp 0), one prompt after
  the other, stopping after ``output_len`` tokens (EOS ignored). ``flash_attn=True`` as
  llama-server and the C API's default ("auto") have it on this CPU; the high-level API's
  default (off) gives slightly different numerics.

Each mode also reports single-prompt decode speed (the ``single_prompt`` tokens, then
``output_len`` new tokens). Times are wall clock around the generation only (model
load and a short warm-up excluded).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def _lowlevel():
    import llama_cpp.llama_cpp as C  # the ctypes bindings

    return C


class BatchedGenerator:
    """Static-batched greedy generation over the llama.cpp C API (through llama-cpp-python)."""

    def __init__(self, model_path: str, n_ctx: int, n_seq_max: int, threads: int, n_batch: int = 2048,
                 n_ubatch: int = 512, kv_unified: bool = True):
        C = self.C = _lowlevel()
        C.llama_backend_init()
        mp = C.llama_model_default_params()
        self.model = C.llama_model_load_from_file(model_path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"cannot load {model_path}")
        cp = C.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_ubatch
        cp.n_seq_max = n_seq_max
        cp.n_threads = threads
        cp.n_threads_batch = threads
        # unified: one cache of n_ctx cells shared by all sequences (attention spans all used
        # cells, masked); else one stream of n_ctx / n_seq_max cells per sequence
        cp.kv_unified = kv_unified
        cp.no_perf = True
        self.ctx = C.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("cannot create llama context (n_ctx too large?)")
        self.n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(self.model))
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self.batch = C.llama_batch_init(max(n_batch, n_seq_max), 0, 1)

    def close(self) -> None:
        C = self.C
        C.llama_batch_free(self.batch)
        C.llama_free(self.ctx)
        C.llama_model_free(self.model)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, pos, seq_id, want_logits)."""
        b = self.batch
        for i, (tok, pos, seq, out) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if out else 0
        b.n_tokens = len(entries)
        rc = self.C.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        ptr = self.C.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], output_len: int) -> list[list[int]]:
        assert len(prompts) <= self.n_seq_max
        self.C.llama_memory_clear(self.C.llama_get_memory(self.ctx), True)
        outs: list[list[int]] = [[] for _ in prompts]
        # prefill: pack prompt tokens into decode calls of <= n_batch tokens
        pending: list[tuple[int, int, int, bool]] = []
        owners: list[int] = []  # batch index -> sequence whose last prompt token it is (-1: none)

        def flush():
            if not pending:
                return
            self._decode(pending)
            for i, s in enumerate(owners):
                if s >= 0:
                    outs[s].append(self._argmax(i))
            pending.clear()
            owners.clear()

        for s, p in enumerate(prompts):
            for j, tok in enumerate(p):
                last = j == len(p) - 1
                pending.append((tok, j, s, last))
                owners.append(s if last else -1)
                if len(pending) == self.n_batch:
                    flush()
        flush()
        # decode: one token for every sequence per step
        pos = [len(p) for p in prompts]
        for _ in range(output_len - 1):
            entries = [(outs[s][-1], pos[s], s, True) for s in range(len(prompts))]
            for s in range(len(prompts)):
                pos[s] += 1
            for k in range(0, len(entries), self.n_batch):
                chunk = entries[k : k + self.n_batch]
                self._decode(chunk)
                for i, (_, _, s, _) in enumerate(chunk):
                    outs[s].append(self._argmax(i))
        return outs


def run_batched(job: dict) -> dict:
    prompts, n_out, threads = job["prompts"], job["output_len"], job["threads"]
    n_seq = max(len(prompts), 1)
    unified = bool(job.get("kv_unified", False))
    if unified:
        n_ctx = sum(len(p) + n_out for p in prompts) + 256
    else:  # one stream per sequence, each long enough for the longest prompt + output
        n_ctx = n_seq * (max(len(p) for p in prompts + [job["single_prompt"]]) + n_out + 32)
    g = BatchedGenerator(job["model"], n_ctx=n_ctx, n_seq_max=n_seq, threads=threads, kv_unified=unified)
    try:
        # warm-up with every sequence (the first decode of each batch shape is slow: graph set-up)
        g.generate([p[:8] for p in prompts], 2)
        g.generate([job["single_prompt"]], 2)
        t = time.perf_counter()
        outs = g.generate(prompts, n_out)
        dt = time.perf_counter() - t
        n_tok = sum(len(o) for o in outs)
        t = time.perf_counter()
        one = g.generate([job["single_prompt"]], n_out)
        dt1 = time.perf_counter() - t
    finally:
        g.close()
    return {"throughput": n_tok / dt, "single": len(one[0]) / dt1, "output_tokens": n_tok, "seconds": dt,
            "first_output": outs[0][:16]}


def run_sequential(job: dict) -> dict:
    from llama_cpp import Llama

    prompts, n_out, threads = job["prompts"], job["output_len"], job["threads"]
    n_ctx = max(len(p) for p in prompts + [job["single_prompt"]]) + n_out + 16
    # flash_attn=True: the high-level API defaults to off, llama-server and the C API default to
    # "auto" (on, on CPU); without it greedy outputs can differ from the other two in near ties.
    llm = Llama(model_path=job["model"], n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                flash_attn=True, verbose=False)

    def gen(p: list[int]) -> list[int]:
        out = []
        llm.reset()
        for tok in llm.generate(p, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if len(out) == n_out:
                break
        return out

    gen(prompts[0][:8])  # warm-up
    t = time.perf_counter()
    outs = [gen(p) for p in prompts]
    dt = time.perf_counter() - t
    n_tok = sum(len(o) for o in outs)
    t = time.perf_counter()
    one = gen(job["single_prompt"])
    dt1 = time.perf_counter() - t
    llm.close()
    return {"throughput": n_tok / dt, "single": len(one) / dt1, "output_tokens": n_tok, "seconds": dt,
            "first_output": outs[0][:16]}


def main() -> None:
    job = json.load(sys.stdin)
    import llama_cpp

    res = {"version": getattr(llama_cpp, "__version__", "?")}
    for mode in job.get("modes", ["batched", "sequential"]):
        res[mode] = {"batched": run_batched, "sequential": run_sequential}[mode](job)
        print(f"[llama.cpp {mode}] {res[mode]['throughput']:.1f} output tok/s", file=sys.stderr, flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
