"""Online serving: ``argosy serve`` vs llama.cpp's ``llama-server``, same prompts, same client.

    python benchmarks/serving.py                                  # concurrency 1, 8, 32; 128 tokens out
    python benchmarks/serving.py --concurrency 1 8 --num-prompts 8 --output-len 32   # quick
    python benchmarks/serving.py --only argosy                    # skip llama-server
    python benchmarks/serving.py --json /tmp/serving.json         # also write every number

What it does, in one run: start ``argosy serve`` on a free loopback port (same GGUF, the
bundled SmolLM2-135M-Instruct Q4_1 unless ``--model``), wait for ``/health``, run every
concurrency level, record the server's resident memory, stop it; then the same for
``llama-server -m <same GGUF> -np 32 -t 2 -c 16384`` (32 slots of 512 tokens). The servers
never run at the same time. ``llama-server`` comes from ``llama_baseline.find_or_build()``: the
cache build, ``$ARGOSY_LLAMA_SERVER`` or ``$PATH``; it is built (~10 minutes on 2 cores)
only if missing, and ``--no-build`` forbids that.

Workload: a fixed, seeded set of prompts of ``--min-input-len``..``--max-input-len``
tokens (default 100-300), built from a small word list and tokenized with the model's own
tokenizer, sent as token-id lists so both servers see exactly the same tokens. Each
concurrency level gets its own slice of the set (no prompt is sent twice, so neither
server's prompt cache helps), and both servers get the same slices. Every request is
``POST /v1/completions`` with ``stream: true``, ``temperature: 0``, ``max_tokens:
--output-len`` and ``ignore_eos: true`` (both servers accept that field), so each generates
exactly ``--output-len`` tokens; the client checks that against the ``usage`` the server
reports (or the number of streamed chunks when it reports none). A few warm-up requests
with other prompts go first.

Client and metrics, in the manner of ``vllm bench serve`` (all requests queued at once,
at most ``concurrency`` in flight):

* TTFT: request sent -> first chunk carrying non-empty text;
* TPOT: per request ``(e2e latency - TTFT) / (output tokens - 1)``;
* ITL: gaps between successive content chunks, pooled over all requests;
* output tok/s: total output tokens / wall time of the level (first send -> last byte).

p50 / p99 are reported for TTFT, TPOT and ITL (and the mean). Resident memory is the RSS
(psutil) of the server process plus its children, sampled every 0.2 s while it runs: the
peak and the value right after the last level are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

# --------------------------------------------------------------------------- prompts
WORDS = ("the of river data model system light music paper city green quickly under between "
         "winter mountain engine story window market garden silver ocean number simple letter").split()


def load_tokenizer(model_path: str):
    from argosy.runtime.loader import load_checkpoint

    return load_checkpoint(model_path).tokenizer


def make_prompts(tok, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """``n`` deterministic prompts (token-id lists) of ``lo``..``hi`` tokens."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        target = rng.randint(lo, hi)
        words = f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(target * 2))
        prompts.append(list(tok.encode(words, add_special_tokens=False))[:target])
    return prompts


def resolve_model(model: str | None) -> str:
    from argosy.runtime.loader import resolve_model as rm

    return rm(model)


# --------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(proc: psutil.Process) -> int:
    """RSS of ``proc`` and its children (bytes); 0 when it is gone."""
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class Server:
    """A server subprocess on a loopback port: started, waited for, RSS-sampled, stopped.

    ``with Server(name, cmd_fn) as s:`` where ``cmd_fn(port)`` returns the argv. The log
    goes to a temp file (its path is printed if the server fails to start).
    """

    def __init__(self, name: str, cmd_fn, env: dict | None = None, cwd: str | None = None,
                 startup_timeout: float = 600.0):
        self.name = name
        self.port = free_port()
        self.cmd = cmd_fn(self.port)
        self.env = env
        self.cwd = cwd or tempfile.gettempdir()  # never the repo root (its operator/ shadows the stdlib)
        self.startup_timeout = startup_timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.peak_rss = 0
        self._stop_sampling = threading.Event()
        self._sampler: threading.Thread | None = None
        self.log_path = ""

    def __enter__(self) -> "Server":
        log = tempfile.NamedTemporaryFile(prefix=f"bench-{self.name}-", suffix=".log", delete=False)
        self.log_path = log.name
        print(f"[{self.name}] starting: {' '.join(map(str, self.cmd))}", flush=True)
        print(f"[{self.name}] log: {self.log_path}", flush=True)
        self.proc = subprocess.Popen(list(map(str, self.cmd)), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.cwd, env=self.env,
                                     start_new_session=True)
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self._ps = psutil.Process(self.proc.pid)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        t0 = time.time()
        import urllib.request

        while time.time() - t0 < self.startup_timeout:
            if self.proc.poll() is not None:
                tail = Path(self.log_path).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting; log tail:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        print(f"[{self.name}] ready in {time.time() - t0:.1f} s on port {self.port}", flush=True)
                        return
            except Exception:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} not ready after {self.startup_timeout:.0f} s (log: {self.log_path})")

    def _sample(self) -> None:
        while not self._stop_sampling.is_set():
            self.peak_rss = max(self.peak_rss, tree_rss(self._ps))
            self._stop_sampling.wait(0.2)

    def rss(self) -> int:
        r = tree_rss(self._ps)
        self.peak_rss = max(self.peak_rss, r)
        return r

    def stop(self, timeout: float = 30.0) -> None:
        self._stop_sampling.set()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"[{self.name}] did not stop in {timeout:.0f} s; killing", flush=True)
            self.proc.kill()
            self.proc.wait()


def argosy_cmd(model: str, extra: list[str]):
    exe = shutil.which("argosy") or str(Path(sys.executable).with_name("argosy"))

    def cmd(port: int) -> list[str]:
        return [exe, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra]

    return cmd


def llama_server_cmd(binary: str, model: str, parallel: int, threads: int, ctx: int, extra: list[str]):
    def cmd(port: int) -> list[str]:
        return [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port),
                "-np", str(parallel), "-t", str(threads), "-c", str(ctx), *extra]

    return cmd


# --------------------------------------------------------------------------- client
@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    chunks: int = 0
    usage_tokens: int | None = None


async def one_request(session: aiohttp.ClientSession, url: str, body: dict) -> RequestResult:
    res = RequestResult()
    t0 = time.perf_counter()
    last = None
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.text())[:300]}"
                return res
            buf = b""
            async for data in r.content.iter_any():
                now = time.perf_counter()
                buf += data
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            continue
                        msg = json.loads(payload)
                        if "error" in msg and "choices" not in msg:
                            res.error = str(msg["error"])[:300]
                            return res
                        if msg.get("usage"):
                            res.usage_tokens = int(msg["usage"].get("completion_tokens", 0))
                        for ch in msg.get("choices") or []:
                            if ch.get("text"):
                                res.chunks += 1
                                if last is None:
                                    res.ttft = now - t0
                                else:
                                    res.itl.append(now - last)
                                last = now
            res.e2e = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - reported per request
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.output_tokens = res.usage_tokens if res.usage_tokens is not None else res.chunks
    res.ok = last is not None
    if not res.ok:
        res.error = "no content chunk received"
    return res


def request_body(model_name: str | None, prompt: list[int], output_len: int) -> dict:
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if model_name:
        body["model"] = model_name
    return body


async def run_level(url: str, prompts: list[list[int]], output_len: int, concurrency: int,
                    model_name: str | None = None, timeout: float = 3600.0) -> tuple[list[RequestResult], float]:
    """Send every prompt (all queued at once, ``concurrency`` in flight); return results and wall time."""
    sem = asyncio.Semaphore(concurrency)
    # a fresh connection per request: llama-server closes idle keep-alive connections, and a
    # request written into one that is closing fails ("Can not write request body")
    conn = aiohttp.TCPConnector(limit=concurrency + 4, force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def go(p):
            async with sem:
                return await one_request(session, url, request_body(model_name, p, output_len))

        t0 = time.perf_counter()
        results = await asyncio.gather(*(go(p) for p in prompts))
        wall = time.perf_counter() - t0
    return list(results), wall


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100.0
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def summarize(results: list[RequestResult], wall: float, output_len: int) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [g for r in ok for g in r.itl]
    total_out = sum(r.output_tokens for r in ok)
    ms = 1000.0
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "wrong_length": sum(1 for r in ok if r.output_tokens != output_len),
        "wall_s": wall,
        "output_tokens": total_out,
        "output_tok_s": total_out / wall if wall > 0 else float("nan"),
        "request_s": len(ok) / wall if wall > 0 else float("nan"),
        "ttft_mean_ms": statistics.fmean(ttft) * ms if ttft else float("nan"),
        "ttft_p50_ms": pct(ttft, 50) * ms,
        "ttft_p99_ms": pct(ttft, 99) * ms,
        "tpot_mean_ms": statistics.fmean(tpot) * ms if tpot else float("nan"),
        "tpot_p50_ms": pct(tpot, 50) * ms,
        "tpot_p99_ms": pct(tpot, 99) * ms,
        "itl_mean_ms": statistics.fmean(itl) * ms if itl else float("nan"),
        "itl_p50_ms": pct(itl, 50) * ms,
        "itl_p99_ms": pct(itl, 99) * ms,
        "chunks_per_token": (sum(r.chunks for r in ok) / total_out) if total_out else float("nan"),
    }


def warm_up(url: str, prompts: list[list[int]], model_name: str | None = None) -> None:
    res, _ = asyncio.run(run_level(url, prompts, 8, min(len(prompts), 4), model_name))
    bad = [r.error for r in res if not r.ok]
    if bad:
        raise RuntimeError(f"warm-up failed: {bad[0]}")


# --------------------------------------------------------------------------- report
ROWS = [
    ("output tok/s", "output_tok_s", "{:.1f}", True),
    ("requests/s", "request_s", "{:.2f}", True),
    ("TTFT mean (ms)", "ttft_mean_ms", "{:.1f}", False),
    ("TTFT p50 (ms)", "ttft_p50_ms", "{:.1f}", False),
    ("TTFT p99 (ms)", "ttft_p99_ms", "{:.1f}", False),
    ("TPOT mean (ms)", "tpot_mean_ms", "{:.1f}", False),
    ("TPOT p50 (ms)", "tpot_p50_ms", "{:.1f}", False),
    ("TPOT p99 (ms)", "tpot_p99_ms", "{:.1f}", False),
    ("ITL p50 (ms)", "itl_p50_ms", "{:.1f}", False),
    ("ITL p99 (ms)", "itl_p99_ms", "{:.1f}", False),
    ("wall time (s)", "wall_s", "{:.1f}", False),
    ("failed / wrong length", None, "", False),
]


def print_table(title: str, cols: dict[str, dict]) -> None:
    names = list(cols)
    print()
    print(title)
    hdr = f"  {'metric':<24}" + "".join(f"{n:>14}" for n in names)
    if len(names) == 2:
        hdr += f"{'ratio':>9}"
    print(hdr)
    for label, key, fmt, _higher in ROWS:
        line = f"  {label:<24}"
        if key is None:
            line += "".join(f"{str(cols[n]['failed']) + ' / ' + str(cols[n]['wrong_length']):>14}" for n in names)
            print(line)
            continue
        vals = [cols[n][key] for n in names]
        line += "".join(f"{fmt.format(v):>14}" for v in vals)
        if len(names) == 2:
            a, b = vals
            line += f"{(a / b if b else float('nan')):>9.2f}"
        print(line)


def mib(b: int) -> str:
    return f"{b / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- main
def bench_server(server: Server, levels: list[int], slices: dict[int, list[list[int]]], warm: list[list[int]],
                 output_len: int, model_name: str | None) -> dict:
    out = {"levels": {}}
    warm_up(server.url, warm, model_name)
    for c in levels:
        print(f"[{server.name}] concurrency {c}: {len(slices[c])} requests x {output_len} tokens ...", flush=True)
        res, wall = asyncio.run(run_level(server.url, slices[c], output_len, c, model_name))
        s = summarize(res, wall, output_len)
        if s["failed"]:
            print(f"[{server.name}]   {s['failed']} failed: {s['errors']}", flush=True)
        if s["wrong_length"]:
            print(f"[{server.name}]   {s['wrong_length']} requests did not return {output_len} tokens", flush=True)
        print(f"[{server.name}]   {s['output_tok_s']:.1f} output tok/s, TTFT p50 {s['ttft_p50_ms']:.0f} ms, "
              f"TPOT p50 {s['tpot_p50_ms']:.1f} ms", flush=True)
        out["levels"][c] = s
    out["rss_after"] = server.rss()
    out["rss_peak"] = server.peak_rss
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="requests per concurrency level (default: max(8, 2 x concurrency))")
    ap.add_argument("--min-input-len", type=int, default=100)
    ap.add_argument("--max-input-len", type=int, default=300)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["argosy", "llama"], default=None, help="run one server only")
    ap.add_argument("--argosy-args", default="", help="extra `argosy serve` flags, one string")
    ap.add_argument("--llama-args", default="", help="extra llama-server flags, one string")
    ap.add_argument("--llama-parallel", type=int, default=32, help="llama-server -np (slots)")
    ap.add_argument("--llama-threads", type=int, default=2, help="llama-server -t")
    ap.add_argument("--llama-ctx", type=int, default=16384, help="llama-server -c (split over the slots)")
    ap.add_argument("--no-build", action="store_true", help="fail instead of building llama-server")
    ap.add_argument("--json", default=None, help="write all numbers to this file")
    args = ap.parse_args()

    model = resolve_model(args.model)
    tok = load_tokenizer(model)
    levels = list(args.concurrency)
    n_per = {c: (args.num_prompts or max(8, 2 * c)) for c in levels}
    n_warm = 4
    prompts = make_prompts(tok, n_warm + sum(n_per.values()), args.min_input_len, args.max_input_len, args.seed)
    warm, i, slices = prompts[:n_warm], n_warm, {}
    for c in levels:
        slices[c] = prompts[i : i + n_per[c]]
        i += n_per[c]
    n_prompt_tok = sum(len(p) for p in prompts[n_warm:])
    print(f"model: {model}")
    print(f"workload: levels {levels}, requests per level {[n_per[c] for c in levels]}, "
          f"{n_prompt_tok} prompt tokens in all ({args.min_input_len}-{args.max_input_len} each), "
          f"{args.output_len} output tokens each (ignore_eos), /v1/completions streaming")

    results: dict[str, dict] = {}
    if args.only in (None, "argosy"):
        with Server("argosy", argosy_cmd(model, args.argosy_args.split())) as s:
            results["argosy"] = bench_server(s, levels, slices, warm, args.output_len, None)
    if args.only in (None, "llama"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from llama_baseline import find_or_build  # benchmarks/llama_baseline.py

        per_slot = args.llama_ctx // args.llama_parallel
        if args.max_input_len + args.output_len > per_slot:
            print(f"warning: llama-server slots hold {per_slot} tokens (-c {args.llama_ctx} / -np "
                  f"{args.llama_parallel}) < max prompt + output ({args.max_input_len + args.output_len}); "
                  "raise --llama-ctx", flush=True)
        lc = find_or_build(build_if_missing=not args.no_build)
        print(f"llama-server: {lc.server} ({lc.version()})")
        cmd = llama_server_cmd(str(lc.server), model, args.llama_parallel, args.llama_threads, args.llama_ctx,
                               args.llama_args.split())
        with Server("llama-server", cmd) as s:
            results["llama.cpp"] = bench_server(s, levels, slices, warm, args.output_len, None)

    for c in levels:
        print_table(f"concurrency {c} ({n_per[c]} requests, {args.output_len} output tokens each)",
                    {k: v["levels"][c] for k, v in results.items()})
    print()
    print(f"  {'server RSS after run':<24}" + "".join(f"{mib(v['rss_after']):>14}" for v in results.values()))
    print(f"  {'server RSS peak':<24}" + "".join(f"{mib(v['rss_peak']):>14}" for v in results.values()))
    if len(results) == 2:
        print("  (ratio column: argosy / llama.cpp; higher is better for tok/s and requests/s, lower for times)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "model": model, "results": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
