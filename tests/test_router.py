"""``argosy router``: block hashes shared with the engine, the KV event log, the routing
policy (pure), and real processes on loopback (engines + router, the openai SDK)."""

from __future__ import annotations

import hashlib
import queue
import random
import statistics
import struct
import subprocess
import sys
import threading
import time

from pathlib import Path

import pytest

from argosy.runtime.core.kv_cache_manager import KVCacheManager, get_hash_fn
from argosy.runtime.core.kv_events import HeldBlocks, KVEventLog
from argosy.runtime.loader import default_model_path
from argosy.runtime.router.policy import UpstreamView, block_hashes, choose

from .serving import RouterProcess, ServerProcess, free_port, http_request, scrape


#: The bundled model's served name (the GGUF file's name without ``.gguf``).
MODEL = Path(default_model_path()).name.removesuffix(".gguf")


def _oracle_hashes(ids: list[int], bs: int) -> list[bytes]:
    """The sha256 block-hash format as the README defines it, written out independently:
    SHA-256(parent's 32 bytes (zeros for the first block) || token ids as little-endian int32)."""
    out, parent = [], b"\x00" * 32
    for i in range(len(ids) // bs):
        parent = hashlib.sha256(parent + struct.pack(f"<{bs}i", *ids[i * bs : (i + 1) * bs])).digest()
        out.append(parent)
    return out


# ------------------------------------------------------------------ pure / in-process
def test_router_hashes_are_the_engines_hashes():
    """The router's prompt hashes equal the format's definition, and the hashes the KV
    manager reports as stored after a request's prefill are exactly those."""
    ids = list(range(1000, 1000 + 70))  # 4 full blocks of 16, 6 tokens left over
    assert block_hashes(ids, 16, get_hash_fn("sha256")) == _oracle_hashes(ids, 16)
    kv = KVCacheManager(num_blocks=32, block_size=16)
    assert kv.allocate_slots("r", ids, 0, len(ids))
    kv.cache_blocks("r", ids, len(ids))
    snap = kv.events.read()
    assert snap["snapshot"] and snap["block_size"] == 16 and snap["hash_algo"] == "sha256"
    assert {bytes.fromhex(h) for h in snap["hashes"]} == set(_oracle_hashes(ids, 16))


def test_event_log_followed_by_a_reader_matches_the_manager():
    """Deltas, eviction, reset and a reader that fell behind the bounded log (snapshot)."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.events = KVEventLog(4, "sha256", capacity=6)
    reader = HeldBlocks()
    rng = random.Random(0)
    for step in range(60):
        rid = f"r{step}"
        ids = [rng.randrange(5) for _ in range(rng.randrange(4, 17))]
        if kv.allocate_slots(rid, ids, 0, len(ids)):
            kv.cache_blocks(rid, ids, len(ids))
            kv.free(rid)
        if step % 3 == 0 or step == 59:  # a reader polling now and then: deltas or a snapshot
            msg = kv.events.read(reader.seq, reader.instance_id)
            reader.apply(msg)
            assert reader.hashes == set(kv.cached), f"step {step}: reader diverged"
    assert kv.reset_prefix_cache()
    reader.apply(kv.events.read(reader.seq, reader.instance_id))
    assert reader.hashes == set() == set(kv.cached)
    # another engine instance (restart): the reader gets a snapshot, not foreign deltas
    other = KVEventLog(4, "sha256")
    other.stored(b"\x01" * 32)
    msg = other.read(reader.seq, reader.instance_id)
    assert msg["snapshot"]
    reader.apply(msg)
    assert reader.hashes == {b"\x01" * 32}


def test_policy_prefers_the_cache_holder_until_load_outweighs_it():
    hashes = [bytes([i]) * 32 for i in range(40)]  # a 640-token prompt
    holder = UpstreamView("a", held=set(hashes[:38]))
    other = UpstreamView("b")
    d = choose("prefix", [other, holder], hashes, 16)
    assert d.index == 1 and d.matched_tokens == 38 * 16
    holder.load = 4  # 4 x 256 tokens of queue > 608 cached tokens
    assert choose("prefix", [other, holder], hashes, 16).index == 0
    # a prefix match is a leading run: a hole in block 0 is a miss
    holder.load, holder.held = 0, set(hashes[1:])
    other.load = 1
    assert choose("prefix", [other, holder], hashes, 16).matched_tokens == 0
    # an engine hashing differently never gets a prefix score
    holder.held, holder.prefix_ok = set(hashes), False
    assert choose("prefix", [other, holder], hashes, 16).matched_tokens == 0
    # blocks of requests sent there recently count as cached
    other.held, other.recent, other.load = set(), {h: 1.0 for h in hashes}, 0
    assert choose("prefix", [UpstreamView("c", load=0), other], hashes, 16).index == 1
    views = [UpstreamView("a", load=3), UpstreamView("b", ready=False), UpstreamView("c", load=1)]
    assert choose("least-load", views, hashes, 16).index == 2
    assert [choose("round-robin", views, [], 16, rr).index for rr in range(4)] == [0, 2, 0, 2]
    assert choose("prefix", [UpstreamView("x", ready=False)], hashes, 16) is None
    with pytest.raises(ValueError):
        choose("random", views, hashes, 16)


def test_tenant_limits_with_a_clock():
    """Sliding 60 s windows for requests and tokens, concurrency, the default entry, and
    the Retry-After each refusal gives."""
    from argosy.runtime.router.tenants import TenantLimits, Tenants

    now = [1000.0]
    t = Tenants({"ka": "a", "kb": "b"}, {"a": TenantLimits(requests_per_minute=2, max_concurrent=5),
                                        "default": TenantLimits(tokens_per_minute=100, max_concurrent=1)},
                clock=lambda: now[0])
    assert t.tenant_for("Bearer ka") == "a" and t.tenant_for("Bearer nope") is None and t.tenant_for(None) is None
    assert t.admit("a") == (None, "") and t.admit("a") == (None, "")
    now[0] += 10
    retry, which = t.admit("a")
    assert which.startswith("requests_per_minute") and retry == pytest.approx(50.0)
    now[0] += 50.5  # the first admission left the window
    assert t.admit("a")[0] is None
    # b falls under "default": one at a time, 100 tokens a minute
    assert t.admit("b")[0] is None
    assert t.admit("b")[1].startswith("max_concurrent")
    t.release("b", 80)
    now[0] += 5
    assert t.admit("b")[0] is None
    t.release("b", 30)  # 110 charged in the window
    now[0] += 5
    retry, which = t.admit("b")
    assert which.startswith("tokens_per_minute") and retry == pytest.approx(50.0)  # once the 80 age out
    now[0] += 50.5
    assert t.admit("b")[0] is None


def test_tenants_file_errors(tmp_path):
    from argosy.runtime.router.tenants import Tenants

    bad = tmp_path / "t.json"
    for doc, msg in (("{", "Expecting"), ('{"keys": {}}', "needs"), ('{"keys": {"k": "a"}, "limits": {"a": {"rpm": 1}}}',
                                                                       "unknown limit"),
                     ('{"keys": {"k": "a"}, "limits": {"a": {"max_concurrent": -1}}}', "non-negative")):
        bad.write_text(doc)
        with pytest.raises(ValueError, match=msg):
            Tenants.load(str(bad))


def test_router_imports_no_torch():
    code = ("import sys; import argosy.runtime.router.app, argosy.runtime.router.cli, argosy.runtime.cli as c; "
            "c.build_parser(serve_flags=False); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ real processes
#: One torch thread per engine: three engines share this machine's two cores.
ENGINE_FLAGS = ["--dtype", "auto", "--kv-cache-memory", "48MiB", "--num-threads", "1"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    d = tmp_path_factory.mktemp("router-engines")
    procs = []
    try:
        for i in range(3):  # started in parallel, then waited for
            procs.append(ServerProcess(d, f"engine{i}", ENGINE_FLAGS, wait=False))
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.stop()


def _system_prompts(n: int, seed: int, words: int = 580) -> list[str]:
    rng = random.Random(seed)
    vocab = "river data model light music paper city green under winter mountain story market garden".split()
    return [f"System {seed}-{i}: " + " ".join(rng.choice(vocab) for _ in range(words)) for i in range(n)]


def _hits(engines) -> float:
    return sum(scrape(e).get("vllm:prefix_cache_hits_total", 0.0) for e in engines)


def _run_workload(router, prompts: list[str], n: int, concurrency: int, seed: int,
                  shuffle: bool = True) -> list[float]:
    """``n`` chat requests (1 token each) over ``prompts``, in a shuffled order or
    interleaved (prompt ``k % len(prompts)`` for request ``k``: the prompts' users take
    turns); TTFTs (s)."""
    rng = random.Random(seed)
    order = [prompts[i % len(prompts)] for i in range(n)]
    if shuffle:
        rng.shuffle(order)
    ttfts, lock, errors = [], threading.Lock(), []

    work = queue.SimpleQueue()
    for item in enumerate(order):
        work.put(item)

    def worker():
        client = router.client()
        while True:
            try:
                k, sp = work.get_nowait()
            except queue.Empty:
                return
            t = time.monotonic()
            try:
                r = client.chat.completions.create(model=MODEL, max_tokens=1, temperature=0, messages=[
                    {"role": "system", "content": sp}, {"role": "user", "content": f"question {k}"}])
                assert r.choices[0].finish_reason in ("length", "stop")
            except Exception as e:  # noqa: BLE001
                errors.append(e)
            with lock:
                ttfts.append(time.monotonic() - t)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    return ttfts


@pytest.mark.slow  # ~50 s an order on 2 cores: .ci/run runs both after the default suite
@pytest.mark.parametrize("order", ["interleaved", "shuffled"])
def test_prefix_routing_beats_round_robin_on_cache_hits(engines, tmp_path, order):
    """64 requests over 8 distinct ~600-token system prompts, 3 engines whose KV caches
    hold ~3.6 such prompts each: prefix routing keeps each prompt on one engine (8 cold
    misses, then hits), round-robin spreads every prompt over all three, where they evict
    each other. Two arrival orders, each measured for both policies in one run:

    - interleaved (the 8 prompts' users take turns): every round-robin engine cycles
      through all 8 prompts with room for ~3.6, the LRU worst case; the issue's 3x is asserted.
    - shuffled: an LRU cache of C prompts over P equally likely ones hits ~C/P
      of the time, so round-robin still hits ~3.6/8 of its requests and the expected ratio
      is only (1 - 8/64) / (3.6/8) ~ 1.9x; seen 1.7x-2.8x depending on timing, so only 1.4x
      is asserted there. Prefix routing itself is held to >= 60% of the ideal hit tokens in
      both (measured 92-103% on a quiet machine, 77% with other tests running beside it:
      the router moves requests off a busy engine, where they miss).
    """
    urls = [e.base_url for e in engines]
    results = {}
    seed = 0 if order == "interleaved" else 2
    for policy in ("prefix", "round-robin"):
        seed += 1  # fresh prompts per run: nothing left in the caches helps the next one
        router = RouterProcess(tmp_path, f"router-{policy}-{order}", urls, ["--routing", policy])
        try:
            prompts = _system_prompts(8, seed)
            before = _hits(engines)
            ttfts = _run_workload(router, prompts, 64, 4, seed, shuffle=order == "shuffled")
            results[policy] = (_hits(engines) - before, statistics.median(ttfts))
            if policy == "prefix":
                m = scrape(router)
                assert m["argosy_router_prefix_matched_tokens_total{service=\"default\"}"] > 0
        finally:
            router.stop()
    for policy, (h, t) in results.items():
        print(f"{order:>11} {policy:>11}: prefix-cache hit tokens {h:.0f}, TTFT p50 {t * 1e3:.0f} ms")
    # A system prompt is ~600 tokens (580 words of one-token vocabulary + the template); only
    # whole 16-token blocks hit, and the first request of each prompt is a cold miss.
    ideal = (64 - 8) * 576
    ratio = {"interleaved": 3.0, "shuffled": 1.4}[order]
    hp, hr = results["prefix"][0], results["round-robin"][0]
    assert hp >= 0.6 * ideal, (order, results)
    assert hp >= ratio * max(hr, 1.0), (order, results)


def test_router_reports_an_engine_that_hashes_blocks_differently(engines, tmp_path):
    router = RouterProcess(tmp_path, "router-bs32", [engines[0].base_url], ["--block-size", "32"])
    try:
        deadline = time.monotonic() + 10
        key = f'argosy_router_upstream_prefix_config_mismatch{{service="default",upstream="{engines[0].base_url}"}}'
        while scrape(router).get(key) != 1.0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert scrape(router).get(key) == 1.0
        sp = _system_prompts(1, 9)[0]
        for _ in range(2):  # the second would match if the hashes were usable
            router.client().chat.completions.create(model=MODEL, max_tokens=1, messages=[{"role": "user", "content": sp}])
        assert scrape(router)['argosy_router_prefix_matched_tokens_total{service="default"}'] == 0
    finally:
        router.stop()


def test_streams_pass_through_the_router(engines, tmp_path):
    router = RouterProcess(tmp_path, "router-stream", [e.base_url for e in engines])
    try:
        msgs = [{"role": "user", "content": "Name three colours."}]
        chunks = list(router.client().chat.completions.create(model=MODEL, max_tokens=12, temperature=0, messages=msgs,
                                                              stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        # one chunk per token arrives as its own chunk (not one buffered body), then the usage
        assert len(chunks) >= 12 and text.strip()
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 12
        models = router.client().models.list()
        assert models.data and models.data[0].id
        assert http_request(router, "GET", "/health", auth=False)[0] == 200
        # the engines' tokenizer endpoints and version, through the router
        status, tok = http_request(router, "POST", "/tokenize", {"prompt": "Hello there"})
        assert status == 200 and tok["count"] == len(tok["tokens"]) > 0, tok
        assert http_request(engines[0], "POST", "/tokenize", {"prompt": "Hello there"})[1]["tokens"] == tok["tokens"]
        status, detok = http_request(router, "POST", "/detokenize", {"tokens": tok["tokens"]})
        assert status == 200 and detok["prompt"] == "Hello there", detok
        status, ver = http_request(router, "GET", "/version")
        assert status == 200 and ver["version"], ver
    finally:
        router.stop()


def test_a_request_is_held_until_an_upstream_comes_up(tmp_path):
    """Scale from zero: no upstream is listening; the request waits (pending metric 1),
    an engine starts on the upstream's address, the request completes."""
    port = free_port()
    router = RouterProcess(tmp_path, "router-zero", [f"http://127.0.0.1:{port}"], ["--pending-timeout", "240"])
    engine = None
    try:
        result = {}

        def send():
            try:
                r = router.client().completions.create(model=MODEL, prompt="Hello", max_tokens=2)
                result["text"] = r.choices[0].text
            except Exception as e:  # noqa: BLE001
                result["error"] = e

        t = threading.Thread(target=send)
        t.start()
        deadline = time.monotonic() + 10
        key = 'argosy_router_pending_requests{service="default"}'
        while scrape(router).get(key) != 1.0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert scrape(router).get(key) == 1.0, "the request was not held"
        assert t.is_alive()
        engine = ServerProcess(tmp_path, "late-engine", ENGINE_FLAGS + ["--port", str(port)])
        t.join(timeout=120)
        assert not t.is_alive() and "text" in result, result
        assert scrape(router).get(key) == 0.0
    finally:
        router.stop()
        if engine is not None:
            engine.stop()


def test_no_upstream_within_the_timeout_is_a_503_with_retry_after(tmp_path):
    router = RouterProcess(tmp_path, "router-timeout", [f"http://127.0.0.1:{free_port()}"],
                           ["--pending-timeout", "1"])
    try:
        status, body = http_request(router, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi"}, auth=False)
        assert status == 503 and body["error"]["message"]
    finally:
        router.stop()


def test_an_upstream_killed_mid_stream_ends_the_stream_visibly_and_the_others_take_over(tmp_path):
    """``kill -9`` of the engine serving a stream: the client gets an error event and
    ``[DONE]`` (not a silent cut, not a hang); the next requests go to the other engine."""
    import json
    import os
    import signal

    from .serving import open_stream

    procs = [p.wait_ready() for p in [ServerProcess(tmp_path, f"victim{i}", ENGINE_FLAGS, wait=False)
                                      for i in range(2)]]
    router = RouterProcess(tmp_path, "router-kill", [p.base_url for p in procs], ["--routing", "least-load"])
    try:
        router.api_key = "unused"  # open_stream sends a bearer token; the engines have no key
        conn, resp = open_stream(router, "/v1/completions", {"model": MODEL, "prompt": "Tell a long story.",
                                                             "max_tokens": 900, "stream": True,
                                                             "ignore_eos": True})
        first = resp.readline()
        while not first.startswith(b"data: "):
            first = resp.readline()
        m = scrape(router)
        busy = [p for p in procs if m.get(f'argosy_router_upstream_in_flight{{service="default",upstream="{p.base_url}"}}') == 1.0]
        assert len(busy) == 1
        os.kill(busy[0].proc.pid, signal.SIGKILL)
        events, t0 = [], time.monotonic()
        while True:
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
        conn.close()
        assert time.monotonic() - t0 < 60
        assert events[-1] == b"[DONE]"
        err = json.loads(events[-2])
        assert "error" in err and "failed mid-stream" in err["error"]["message"]
        survivor = next(p for p in procs if p is not busy[0])
        for _ in range(3):
            r = router.client().completions.create(model=MODEL, prompt="Hi", max_tokens=2)
            assert r.choices[0].text is not None
        m = scrape(router)
        assert m[f'argosy_router_requests_total{{code="200",service="default",upstream="{survivor.base_url}"}}'] >= 3
    finally:
        router.stop()
        for p in procs:
            p.stop()


def test_router_follows_a_services_endpointslices(engines, tmp_path):
    """``--upstream-service``: upstreams are the ready endpoints of the Service's
    EndpointSlices, watched (here on the in-repo API stand-in, which is not a real API
    server): no slice -> the request is held; a slice with a ready endpoint -> it completes;
    the endpoint turns not ready -> the router drops it."""
    import yaml

    from .operator.apiserver_standin import StandIn

    port = engines[0].port
    slices = "/apis/discovery.k8s.io/v1/namespaces/ml/endpointslices"

    def endpoint_slice(ready: bool) -> dict:
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "llm-abc12", "namespace": "ml", "labels": {"kubernetes.io/service-name": "llm"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": ready}}]}

    with StandIn() as api:
        assert api.http("POST", "/api/v1/namespaces", {"metadata": {"name": "ml"}})[0] == 201
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": api.url}}],
            "users": [{"name": "u", "user": {}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "u"}}]}))
        router = RouterProcess(tmp_path, "router-eps", [], ["--upstream-service", "llm", "--namespace", "ml",
                                                            "--kubeconfig", str(kubeconfig)])
        try:
            result = {}

            def send():
                try:
                    result["r"] = router.client().completions.create(model=MODEL, prompt="Hello", max_tokens=2)
                except Exception as e:  # noqa: BLE001
                    result["error"] = e

            t = threading.Thread(target=send)
            t.start()
            key = 'argosy_router_pending_requests{service="default"}'
            deadline = time.monotonic() + 10
            while scrape(router).get(key) != 1.0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert scrape(router).get(key) == 1.0, "the request was not held"
            assert api.http("POST", slices, endpoint_slice(True))[0] == 201
            t.join(timeout=60)
            assert not t.is_alive() and "r" in result, result
            ready_key = f'argosy_router_upstream_ready{{service="default",upstream="{engines[0].base_url}"}}'
            assert scrape(router).get(ready_key) == 1.0
            assert api.http("PUT", f"{slices}/llm-abc12", endpoint_slice(False))[0] == 200
            deadline = time.monotonic() + 10
            while ready_key in scrape(router) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert ready_key not in scrape(router), "a not-ready endpoint is still an upstream"
            assert http_request(router, "GET", "/health", auth=False)[1] == {"upstreams": 0, "ready": 0}
        finally:
            router.stop()


def test_tenants_through_the_router(engines, tmp_path):
    """Keys -> tenants: no key is a 401, a tenant over its requests-per-minute gets an
    OpenAI-format 429 with Retry-After, and usage is charged per tenant from the engine's
    own usage, also for streams whose client did not ask for usage (the usage chunk the
    router asked for is not passed on)."""
    import json

    import openai

    cfg = tmp_path / "tenants.json"
    cfg.write_text(json.dumps({"keys": {"sk-a": "team-a", "sk-b": "team-b"},
                               "limits": {"team-b": {"requests_per_minute": 2}}}))
    router = RouterProcess(tmp_path, "router-tenants", [engines[0].base_url], ["--tenants", str(cfg)])
    try:
        status, body = http_request(router, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi"}, auth=False)
        assert status == 401 and body["error"]["message"]
        a = router.client(api_key="sk-a")
        r = a.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, extra_body={"ignore_eos": True})
        chunks = list(a.chat.completions.create(model=MODEL, max_tokens=7, stream=True, messages=[
            {"role": "user", "content": "Hi"}], extra_body={"ignore_eos": True}))
        assert all(c.usage is None for c in chunks), "the usage chunk the router asked for reached the client"
        assert all(c.choices for c in chunks)
        m = scrape(router)
        completion = m['argosy_router_tenant_tokens_total{kind="completion",service="default",tenant="team-a"}']
        prompt = m['argosy_router_tenant_tokens_total{kind="prompt",service="default",tenant="team-a"}']
        assert completion == 12 and prompt >= r.usage.prompt_tokens + 1
        # the engine's prefix-cache hits are billed apart (prompt_tokens_details.cached_tokens)
        long = "A long prompt for the cache: " + " ".join(f"w{i}" for i in range(80))
        for _ in range(2):
            a.completions.create(model=MODEL, prompt=long, max_tokens=1)
        cached = scrape(router)['argosy_router_tenant_tokens_total{kind="cached",service="default",tenant="team-a"}']
        assert cached > 0 and cached % 16 == 0
        b = router.client(api_key="sk-b")
        for _ in range(2):
            b.completions.create(model=MODEL, prompt="x", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as e:
            b.completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert "requests_per_minute" in str(e.value)
        assert int(e.value.response.headers["Retry-After"]) > 0
        assert scrape(router)['argosy_router_tenant_requests_total{code="429",service="default",tenant="team-b"}'] == 1
    finally:
        router.stop()


def test_a_light_tenant_is_not_queued_behind_a_heavy_one(engines, tmp_path):
    """One engine, one request in flight at a time (``--max-inflight-per-upstream 1``): a
    heavy tenant keeps 10 requests waiting, a light one sends 4 in turn. Waiters are served
    lightest tenant first (tokens charged in the last minute), so the light tenant's p50
    latency stays under a third of the heavy tenant's (FIFO would put each light request
    behind ~9 heavy ones: about the same latency as theirs)."""
    import json

    cfg = tmp_path / "tenants.json"
    cfg.write_text(json.dumps({"keys": {"sk-heavy": "heavy", "sk-light": "light"}}))
    router = RouterProcess(tmp_path, "router-fair", [engines[0].base_url],
                           ["--tenants", str(cfg), "--max-inflight-per-upstream", "1", "--routing", "least-load"])
    lat = {"heavy": [], "light": []}
    lock = threading.Lock()

    def run(key: str, name: str, n: int, delay: float = 0.0):
        time.sleep(delay)
        client = router.client(api_key=key)
        for _ in range(n):
            t = time.monotonic()
            client.completions.create(model=MODEL, prompt="Tell me about rivers.", max_tokens=16,
                                      extra_body={"ignore_eos": True})
            with lock:
                lat[name].append(time.monotonic() - t)

    try:
        threads = [threading.Thread(target=run, args=("sk-heavy", "heavy", 4)) for _ in range(10)]
        threads.append(threading.Thread(target=run, args=("sk-light", "light", 4, 3.0)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        heavy, light = statistics.median(lat["heavy"]), statistics.median(lat["light"])
        print(f"p50 latency: light tenant {light * 1e3:.0f} ms, heavy tenant {heavy * 1e3:.0f} ms")
        assert len(lat["light"]) == 4 and len(lat["heavy"]) == 40
        assert light * 3 < heavy, lat
    finally:
        router.stop()


def test_fallback_takes_what_no_upstream_can(engines, tmp_path):
    """``--fallback``: the only upstream is down, so the request goes to the fallback at
    once (it is not held), and the router counts it."""
    router = RouterProcess(tmp_path, "router-fallback", [f"http://127.0.0.1:{free_port()}"],
                           ["--fallback", engines[1].base_url, "--pending-timeout", "1"])
    try:
        t = time.monotonic()
        r = router.client().completions.create(model=MODEL, prompt="Hello", max_tokens=3)
        assert r.choices[0].text is not None and time.monotonic() - t < 30
        m = scrape(router)
        assert m['argosy_router_fallback_requests_total{service="default"}'] == 1
        assert m[f'argosy_router_requests_total{{code="200",service="default",upstream="{engines[1].base_url}"}}'] == 1
    finally:
        router.stop()
