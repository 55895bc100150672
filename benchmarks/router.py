"""Prefix-cache-aware routing: the same workload through ``argosy router --routing prefix``,
through ``--routing round-robin``, and straight to one engine, side by side in one run.

    python benchmarks/router.py                     # 3 engines, 64 requests, 8 prefixes of 600 tokens
    python benchmarks/router.py --engines 2 --requests 32 --prefixes 4   # quick

Workload: ``--prefixes`` distinct system prompts of ``--prefix-len`` tokens (built from a
word list with the model's tokenizer, seeded), ``--requests`` requests each made of one
prefix and a short question, sent as token ids to
``/v1/completions`` (streaming, ``--output-len`` tokens, ``ignore_eos``),
``--concurrency`` in flight. Every mode starts fresh engines (``argosy serve`` with
``--kv-cache-memory`` per engine, default 48 MiB: ~3.6 prefixes each, so the fleet's
caches only hold the working set when each prefix stays on one engine), each with
``OMP_NUM_THREADS`` = cores / engines (``--engine-threads``).

Two arrival orders (``--order``, default both): ``shuffled``, and ``interleaved`` (request
``k`` uses prefix ``k % prefixes``: the prefixes' users take turns). Under round-robin
each engine sees every prefix; with an LRU cache of C prefixes over P equally likely ones
a shuffled order still hits ~C/P of the time, an interleaved one cycles through all P and
hits almost never.

Reported per mode: the engines' prefix-cache hit tokens (``vllm:prefix_cache_hits_total``
summed), TTFT p50 / p99, wall time and output tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefix_sharing import prefix_counters  # noqa: E402
from serving import WORDS, Server, argosy_cmd, load_tokenizer, pct, resolve_model, run_level  # noqa: E402


def make_workload(tok, n: int, prefixes: int, prefix_len: int, seed: int, shuffle: bool = True) -> list[list[int]]:
    """``n`` prompts (token ids): prefix ``k % prefixes`` + a short question, shuffled or not."""
    rng = random.Random(seed)
    heads = []
    for i in range(prefixes):
        text = f"System prompt {i}. " + " ".join(rng.choice(WORDS) for _ in range(prefix_len * 2))
        heads.append(list(tok.encode(text, add_special_tokens=False))[:prefix_len])
    out = []
    for k in range(n):
        q = f"\nQuestion {k}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))) + "?\nAnswer:"
        out.append(heads[k % prefixes] + list(tok.encode(q, add_special_tokens=False)))
    if shuffle:
        rng.shuffle(out)
    return out


def router_cmd(model: str, upstreams: list[str], routing: str):
    exe = shutil.which("argosy") or str(Path(sys.executable).with_name("argosy"))

    def cmd(port: int) -> list[str]:
        return [exe, "router", "--host", "127.0.0.1", "--port", str(port), "--model", model, "--routing", routing,
                "--log-level", "warning", "--poll-interval", "0.5", *[a for u in upstreams for a in ("--upstream", u)]]

    return cmd


def run_mode(mode: str, args, model: str, prompts: list[list[int]]) -> dict:
    n_engines = 1 if mode == "one engine" else args.engines
    extra = ["--kv-cache-memory", args.kv_cache_memory, "--max-model-len", "2048"]
    threads = args.engine_threads or max(1, (os.cpu_count() or 1) // n_engines)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    engines = [Server(f"engine{i}", argosy_cmd(model, extra), env=env) for i in range(n_engines)]
    router = None
    try:
        for e in engines:
            e.__enter__()
        url = engines[0].url
        if mode != "one engine":
            router = Server(f"router-{mode}", router_cmd(model, [e.url for e in engines], mode))
            router.__enter__()
            url = router.url
        before = sum((prefix_counters(e.url) or (0.0, 0.0))[0] for e in engines)
        results, wall = asyncio.run(run_level(url, prompts, args.output_len, args.concurrency))
        hits = sum((prefix_counters(e.url) or (0.0, 0.0))[0] for e in engines) - before
        ok = [r for r in results if r.ok]
        ttft = [r.ttft for r in ok]
        return {"engines": n_engines, "threads": threads, "failed": len(results) - len(ok), "hit tokens": hits,
                "TTFT p50 ms": pct(ttft, 50) * 1e3, "TTFT p99 ms": pct(ttft, 99) * 1e3, "wall s": wall,
                "output tok/s": sum(r.output_tokens for r in ok) / wall}
    finally:
        if router is not None:
            router.stop()
        for e in engines:
            e.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--engines", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prefixes", type=int, default=8)
    ap.add_argument("--prefix-len", type=int, default=600)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--kv-cache-memory", default="48MiB", help="per engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--order", choices=("shuffled", "interleaved", "both"), default="both")
    ap.add_argument("--engine-threads", type=int, default=0,
                    help="OMP_NUM_THREADS per engine (default: cores / engines, at least 1: engines that share "
                         "cores with more threads than cores spin against each other)")
    args = ap.parse_args()
    model = resolve_model(args.model)
    tok = load_tokenizer(model)
    for order in (("shuffled", "interleaved") if args.order == "both" else (args.order,)):
        prompts = make_workload(tok, args.requests, args.prefixes, args.prefix_len, args.seed,
                                shuffle=order == "shuffled")
        rows = {mode: run_mode(mode, args, model, prompts) for mode in ("prefix", "round-robin", "one engine")}
        cols = list(next(iter(rows.values())))
        print(f"\n{args.requests} requests in {order} order, {args.prefixes} prefixes of {args.prefix_len} tokens, "
              f"{args.output_len} output tokens, concurrency {args.concurrency}, KV cache {args.kv_cache_memory}/engine")
        print(f"{'mode':<14}" + "".join(f"{c:>14}" for c in cols))
        for mode, r in rows.items():
            print(f"{mode:<14}" + "".join(f"{r[c]:>14.1f}" if isinstance(r[c], float) else f"{r[c]:>14}" for c in cols))
        rr = rows["round-robin"]["hit tokens"]
        ratio = f"{rows['prefix']['hit tokens'] / rr:.2f}x" if rr else "all of the hits (round-robin: none),"
        print(f"prefix routing ({order}): {ratio} round-robin's hit tokens", flush=True)

if __name__ == "__main__":
    main()
