"""Prefix sharing: TTFT of requests that share a long system prompt, argosy prefix caching on vs off.

    python benchmarks/prefix_sharing.py                          # 32 requests, 1,000-token shared prefix
    python benchmarks/prefix_sharing.py --num-requests 8         # quick
    python benchmarks/prefix_sharing.py --concurrency 1          # one at a time (best case for the cache)
    python benchmarks/prefix_sharing.py --prime                  # prefix cached by one request first
    python benchmarks/prefix_sharing.py --with-llama             # add a llama-server column (-np 32 -t 2 -c 49152)

Workload: ``--num-requests`` prompts (default 32), each a shared ``--prefix-len``-token
"system prompt" (default 1,000 tokens, deterministic) followed by a short distinct question
(~20-30 tokens), sent as token-id lists so the shared part is exactly identical. Every
request generates ``--output-len`` tokens (default 16, ``ignore_eos``). The requests are
queued at once with at most ``--concurrency`` in flight (default: all of them, a burst).

Each configuration gets a fresh server: ``argosy serve`` with prefix caching on (its
default) and with ``--no-enable-prefix-caching``; optionally llama-server, whose slots each
keep their own prompt cache (no sharing between slots). A warm-up request with an unrelated
prompt goes first, so the shared prefix is not cached before the measured requests: the
default measures a cold burst, where only requests scheduled after the first prefix blocks
were computed can hit (requests prefilled in the same engine step as the first one cannot).
``--prime`` sends one unmeasured request with the shared prefix first (the warm case).

The client is the streaming client of ``serving.py`` (TTFT = time to the first content
chunk). Printed: TTFT p50 (the headline), mean and p99, TPOT p50, wall time, and for
argosy the prefix-cache hit rate over the measured requests (``vllm:prefix_cache_hits`` /
``vllm:prefix_cache_queries`` from ``/metrics``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import (WORDS, Server, argosy_cmd, llama_server_cmd, load_tokenizer, mib,  # noqa: E402
                     resolve_model, run_level, summarize, warm_up)


def make_workload(tok, n: int, prefix_len: int, seed: int) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(seed)
    text = "You are a helpful assistant. Background notes follow. " + " ".join(
        rng.choice(WORDS) for _ in range(prefix_len * 2))
    prefix = list(tok.encode(text, add_special_tokens=False))[:prefix_len]
    prompts = []
    for i in range(n):
        q = f"\nQuestion {i}: what does the note say about the " + " ".join(
            rng.choice(WORDS) for _ in range(rng.randint(8, 16))) + "?\nAnswer:"
        prompts.append(prefix + list(tok.encode(q, add_special_tokens=False)))
    return prefix, prompts


def prefix_counters(url: str) -> tuple[float, float] | None:
    """(hits, queries) in tokens from argosy's /metrics, or None if not exported."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except Exception:
        return None
    vals = {}
    for name in ("hits", "queries"):
        m = [float(x) for x in re.findall(rf"^vllm:prefix_cache_{name}(?:_total)?(?:{{[^}}]*}})? ([0-9.eE+-]+)$",
                                          text, re.M)]
        if not m:
            return None
        vals[name] = sum(m)
    return vals["hits"], vals["queries"]


def measure(server: Server, prompts, warm, output_len: int, concurrency: int, prime: list[int] | None) -> dict:
    warm_up(server.url, warm)
    if prime is not None:
        warm_up(server.url, [prime])
    before = prefix_counters(server.url)
    res, wall = asyncio.run(run_level(server.url, prompts, output_len, concurrency))
    s = summarize(res, wall, output_len)
    after = prefix_counters(server.url)
    s["hit_rate"] = None
    if before and after and after[1] > before[1]:
        s["hit_rate"] = (after[0] - before[0]) / (after[1] - before[1])
    s["rss_after"] = server.rss()
    if s["failed"]:
        print(f"[{server.name}]   {s['failed']} failed: {s['errors']}", flush=True)
    print(f"[{server.name}]   TTFT p50 {s['ttft_p50_ms']:.0f} ms, wall {s['wall_s']:.1f} s", flush=True)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prefix-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=None, help="max in flight (default: all requests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prime", action="store_true",
                    help="send one unmeasured request with the shared prefix first (prefix already cached)")
    ap.add_argument("--argosy-args", default="", help="extra `argosy serve` flags for both argosy runs")
    ap.add_argument("--with-llama", action="store_true", help="also measure llama-server (-np 32 -t 2)")
    ap.add_argument("--llama-ctx", type=int, default=49152,
                    help="llama-server -c; split over its 32 slots (default 1,536 tokens each: prefix + question + output)")
    ap.add_argument("--llama-args", default="")
    ap.add_argument("--no-build", action="store_true", help="fail instead of building llama-server")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    model = resolve_model(args.model)
    tok = load_tokenizer(model)
    prefix, prompts = make_workload(tok, args.num_requests, args.prefix_len, args.seed)
    warm = [list(tok.encode("Hello there, this is a warm-up request about " + w, add_special_tokens=False))
            for w in WORDS[:2]]
    conc = args.concurrency or args.num_requests
    prime = None
    if args.prime:
        prime = prefix + list(tok.encode("\nQuestion: is this a priming request?\nAnswer:", add_special_tokens=False))
    lens = [len(p) for p in prompts]
    print(f"model: {model}")
    print(f"workload: {len(prompts)} requests, shared prefix {len(prefix)} tokens, prompts {min(lens)}-{max(lens)} "
          f"tokens, {args.output_len} output tokens each, concurrency {conc}, "
          f"{'prefix primed first' if args.prime else 'cold (prefix not cached before the burst)'}")

    configs = [("argosy cache on", ["--enable-prefix-caching"]), ("argosy cache off", ["--no-enable-prefix-caching"])]
    results = {}
    for name, flags in configs:
        with Server(name.replace(" ", "-"), argosy_cmd(model, flags + args.argosy_args.split())) as s:
            results[name] = measure(s, prompts, warm, args.output_len, conc, prime)
    if args.with_llama:
        from llama_baseline import find_or_build

        lc = find_or_build(build_if_missing=not args.no_build)
        cmd = llama_server_cmd(str(lc.server), model, 32, 2, args.llama_ctx, args.llama_args.split())
        with Server("llama-server", cmd) as s:
            results["llama-server"] = measure(s, prompts, warm, args.output_len, conc, prime)

    names = list(results)
    print()
    print(f"  {'metric':<26}" + "".join(f"{n:>18}" for n in names))
    for label, key, fmt in [("TTFT p50 (ms)", "ttft_p50_ms", "{:.1f}"), ("TTFT mean (ms)", "ttft_mean_ms", "{:.1f}"),
                            ("TTFT p99 (ms)", "ttft_p99_ms", "{:.1f}"), ("TPOT p50 (ms)", "tpot_p50_ms", "{:.1f}"),
                            ("output tok/s", "output_tok_s", "{:.1f}"), ("wall time (s)", "wall_s", "{:.2f}")]:
        print(f"  {label:<26}" + "".join(f"{fmt.format(results[n][key]):>18}" for n in names))
    print(f"  {'prefix cache hit rate':<26}" + "".join(
        f"{('-' if results[n]['hit_rate'] is None else format(results[n]['hit_rate'], '.1%')):>18}" for n in names))
    print(f"  {'failed / wrong length':<26}" + "".join(
        f"{str(results[n]['failed']) + ' / ' + str(results[n]['wrong_length']):>18}" for n in names))
    print(f"  {'server RSS after run':<26}" + "".join(f"{mib(results[n]['rss_after']):>18}" for n in names))
    on, off = results["argosy cache on"]["ttft_p50_ms"], results["argosy cache off"]["ttft_p50_ms"]
    print(f"\nTTFT p50 speed-up from prefix caching: {off / on:.2f}x ({off:.0f} ms -> {on:.0f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "model": model, "results": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
