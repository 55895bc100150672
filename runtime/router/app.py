"""The router's HTTP side: an OpenAI-compatible reverse proxy (aiohttp).

``POST /v1/chat/completions`` and ``POST /v1/completions`` are tokenized (the model's own
tokenizer and chat template, :mod:`argosy.runtime.loader.tokenizer`), hashed
(:func:`.policy.block_hashes` with the engine's hash function), routed
(:func:`.policy.choose`) and forwarded unchanged; the answer is passed back chunk by
chunk as it arrives (streams stay streams). A client that goes away closes the upstream
connection, so the engine aborts the request and frees its KV blocks.

Failures: an upstream that refuses the connection or fails before answering is marked
not ready and the request goes to another (at most ``MAX_ATTEMPTS`` tries); a stream
that breaks midway ends with an OpenAI error event and ``[DONE]``, never a silent cut.
With ``--fallback URL`` (another InferenceService), a request no upstream can take (none
ready, all at ``--max-inflight-per-upstream``, or all failed it) goes there instead of
waiting (``argosy_router_fallback_requests_total``).

With no ready upstream a request waits (``--pending-timeout`` seconds, at most
``--max-pending`` waiting; beyond either: 503 with ``Retry-After``). The number waiting
is ``argosy_router_pending_requests{service}``, the metric a scale-from-zero trigger
reads. ``GET /v1/models``, ``POST /tokenize``, ``POST /detokenize`` and ``GET /version``
are answered by a ready upstream; ``GET /health`` is 200 while
the router runs (it holds requests even with no upstream); ``GET /metrics`` is the
router's own Prometheus exposition.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass
from typing import Optional

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from ..core.kv_cache_manager import get_hash_fn
from ..loader.tokenizer import chat_prompt_ids
from .fairqueue import FairWaitQueue
from .policy import DEFAULT_LOAD_COST_TOKENS, POLICIES, block_hashes, choose
from .tenants import Tenants, billable
from .upstreams import Upstream, UpstreamPool

logger = logging.getLogger("argosy.router")

#: Upstreams tried per request before giving up (connection failures only).
MAX_ATTEMPTS = 3

#: Request headers passed to the upstream (hop-by-hop and length headers are not).
_FORWARD_HEADERS = ("Authorization", "Content-Type", "Accept", "OpenAI-Organization", "OpenAI-Project", "User-Agent")


def _error(status: int, message: str, headers: Optional[dict] = None) -> web.Response:
    body = {"object": "error", "error": {"message": message, "type": "server_error" if status >= 500 else
                                         "invalid_request_error", "param": None, "code": status}}
    return web.json_response(body, status=status, headers=headers)


class RouterMetrics:
    """The router's Prometheus series (its own registry)."""

    def __init__(self, service: str, pool: UpstreamPool):
        self.registry = CollectorRegistry()
        r = self.registry
        self.service = service
        self.pending = Gauge("argosy_router_pending_requests", "Requests waiting for a ready upstream",
                             ["service"], registry=r)
        self.requests = Counter("argosy_router_requests", "Requests routed, by upstream and HTTP status",
                                ["service", "upstream", "code"], registry=r)
        self.rejected = Counter("argosy_router_rejected_requests",
                                "Requests answered by the router itself, by reason", ["service", "reason"], registry=r)
        self.fallback = Counter("argosy_router_fallback_requests", "Requests sent to --fallback because no upstream "
                                "could take them", ["service"], registry=r)
        self.retries = Counter("argosy_router_retries", "Requests sent to another upstream after a connection failure",
                               ["service"], registry=r)
        self.prompt_tokens = Counter("argosy_router_prompt_tokens", "Prompt tokens of routed requests (as tokenized "
                                     "by the router)", ["service"], registry=r)
        self.matched_tokens = Counter("argosy_router_prefix_matched_tokens", "Prompt tokens already cached on the "
                                      "chosen upstream when it was chosen", ["service"], registry=r)
        self.ready = Gauge("argosy_router_upstream_ready", "1 when the upstream passes its health check",
                           ["service", "upstream"], registry=r)
        self.in_flight = Gauge("argosy_router_upstream_in_flight", "Requests the router has in flight there",
                               ["service", "upstream"], registry=r)
        self.mismatch = Gauge("argosy_router_upstream_prefix_config_mismatch",
                              "1 when the upstream hashes KV blocks differently (block size or hash algorithm) "
                              "from the router, so prefix routing cannot use it", ["service", "upstream"], registry=r)
        self.held_blocks = Gauge("argosy_router_upstream_cached_blocks", "Prefix-cache blocks the upstream reports",
                                 ["service", "upstream"], registry=r)
        self.tenant_tokens = Counter("argosy_router_tenant_tokens", "Tokens by tenant: prompt (all prompt tokens), "
                                     "cached (of those, served from the prefix cache) and completion, from the "
                                     "engines' usage", ["service", "tenant", "kind"], registry=r)
        self.tenant_requests = Counter("argosy_router_tenant_requests", "Requests by tenant and HTTP status (429: "
                                       "over a limit)", ["service", "tenant", "code"], registry=r)
        self.pending.labels(service).set(0)
        self._pool = pool
        self._labelled: set[str] = set()

    def render(self, block_size: int, hash_algo: str) -> bytes:
        urls = {u.url for u in self._pool.upstreams}
        for gone in self._labelled - urls:  # an upstream discovery dropped: drop its series
            for g in (self.ready, self.in_flight, self.mismatch, self.held_blocks):
                g.remove(self.service, gone)
        self._labelled = urls
        for u in self._pool.upstreams:
            labels = (self.service, u.url)
            self.ready.labels(*labels).set(1 if u.ready else 0)
            self.in_flight.labels(*labels).set(u.in_flight)
            self.mismatch.labels(*labels).set(
                1 if (u.prefix_events and not u.prefix_compatible(block_size, hash_algo)) else 0)
            self.held_blocks.labels(*labels).set(len(u.held.hashes))
        return generate_latest(self.registry)


@dataclass
class RouterConfig:
    """``argosy router`` settings (see ``argosy router --help``)."""

    upstreams: list[str]
    routing: str = "prefix"
    block_size: int = 16
    hash_algo: str = "sha256"
    max_pending: int = 1024
    pending_timeout: float = 300.0
    poll_interval: float = 1.0
    load_cost_tokens: float = DEFAULT_LOAD_COST_TOKENS
    service: str = "default"
    connect_timeout: float = 5.0
    #: EndpointSlice discovery (:mod:`.discovery`) instead of / besides ``upstreams``.
    upstream_service: Optional[str] = None
    namespace: Optional[str] = None
    upstream_port_name: str = "http"
    kubeconfig: Optional[str] = None
    #: Tenants file (:mod:`.tenants`); None = no keys, no limits.
    tenants_file: Optional[str] = None
    #: Bearer token the router sends upstream (engines started with --api-key).
    upstream_api_key: Optional[str] = None
    #: Requests in flight per upstream before new ones wait in the fair queue (0 = no limit).
    max_inflight_per_upstream: int = 0
    #: ``--fallback``: where requests go when no upstream can take them (or all failed).
    fallback: Optional[str] = None


@dataclass
class RouterState:
    """The running router: its settings, the model's tokenizer, the upstream pool, metrics,
    the engines' block-hash function, tenants and the fair wait queue; ``routed`` counts
    routing decisions (round-robin's turn) and ``pending`` the requests waiting now."""

    config: RouterConfig
    tokenizer: object
    pool: UpstreamPool
    metrics: RouterMetrics
    hash_fn: object
    session: Optional[aiohttp.ClientSession] = None
    routed: int = 0
    pending: int = 0
    tenants: Optional[Tenants] = None
    queue: Optional[FairWaitQueue] = None


STATE = web.AppKey("router_state", RouterState)


def prompt_token_ids(tokenizer, path: str, body: dict) -> list[int]:
    """The prompt the engine will run for this request body, tokenized as the server
    tokenizes it (chat template for chat; the first prompt of a completion).

    Raises:
        ValueError / TypeError / KeyError: a body the server would reject (the router then
            routes on load alone and lets the engine answer with its 400).
    """
    if path.endswith("/chat/completions"):
        from ..server.protocol import ChatCompletionRequest

        req = ChatCompletionRequest.model_validate(body)
        ids = chat_prompt_ids(tokenizer, req.template_messages(), **req.template_args())
        return _truncated(ids, req.truncate_prompt_tokens)
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return _truncated(list(tokenizer.encode(prompt, add_special_tokens=body.get("add_special_tokens") is not False)),
                          body.get("truncate_prompt_tokens"))
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return _truncated(list(prompt), body.get("truncate_prompt_tokens"))
    raise ValueError("prompt is neither text nor token ids")


def _truncated(ids: list[int], k) -> list[int]:
    """The server's ``truncate_prompt_tokens`` cut (last k tokens); -1 (the engine's
    ``max_model_len``, unknown here) and absent leave the ids whole."""
    return ids[-k:] if isinstance(k, int) and not isinstance(k, bool) and 0 < k < len(ids) else ids


async def _pick(state: RouterState, hashes: list[bytes], exclude: set, tenant: Optional[str] = None
                ) -> Optional[Upstream]:
    """Choose a ready upstream with a free slot, not in ``exclude``; wait in the fair queue
    (:mod:`.fairqueue`) while there is none.

    Returns:
        The upstream, or None when the wait timed out (or every ready upstream already
        failed this request).
    Raises:
        web.HTTPServiceUnavailable: too many requests already waiting.
    """
    cfg = state.config
    cap = cfg.max_inflight_per_upstream
    deadline = ticket = None
    while True:
        ups = state.pool.upstreams  # re-read: discovery replaces the list while we wait
        views = [u.view(cfg.block_size, cfg.hash_algo) for u in ups]
        for v, u in zip(views, ups):
            v.ready = v.ready and u not in exclude and (not cap or u.in_flight < cap)
        d = choose(cfg.routing, views, hashes, cfg.block_size, state.routed, cfg.load_cost_tokens)
        fb = state.pool.fallback
        if d is None and fb is not None and fb.ready and fb not in exclude:
            state.metrics.fallback.labels(cfg.service).inc()
            return fb  # no capacity here (or every upstream failed): the other service takes it
        if d is not None:
            u = ups[d.index]
            state.routed += 1
            state.metrics.matched_tokens.labels(cfg.service).inc(d.matched_tokens)
            if cfg.routing == "prefix" and views[d.index].prefix_ok:
                u.remember(hashes)
            return u
        ready = [u for u in ups if u.ready]
        if exclude and ready and all(u in exclude for u in ready):
            return None  # the ready ones all failed this request already
        now = asyncio.get_running_loop().time()
        if deadline is None:
            if state.pending >= cfg.max_pending:
                state.metrics.rejected.labels(cfg.service, "queue_full").inc()
                raise web.HTTPServiceUnavailable()
            deadline, ticket = now + cfg.pending_timeout, state.queue.ticket()
        if now >= deadline:
            return None
        state.pending += 1
        state.metrics.pending.labels(cfg.service).set(state.pending)
        try:
            await state.queue.wait(tenant, ticket, deadline - now)
        finally:
            state.pending -= 1
            state.metrics.pending.labels(cfg.service).set(state.pending)


async def _sse_error(resp: web.StreamResponse, message: str) -> None:
    body = {"object": "error", "error": {"message": message, "type": "server_error", "param": None, "code": 502}}
    await resp.write(b"data: " + json.dumps(body).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")


async def proxy(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``."""
    state = request.app[STATE]
    cfg = state.config
    tenants = state.tenants
    tenant = None
    if tenants is not None:
        tenant = tenants.tenant_for(request.headers.get("Authorization"))
        if tenant is None:
            return _error(401, "Invalid or missing API key (send 'Authorization: Bearer <key>').")
        retry, which = tenants.admit(tenant)
        if retry is not None:
            state.metrics.tenant_requests.labels(cfg.service, tenant, "429").inc()
            body = {"object": "error", "error": {"message": f"tenant {tenant!r} is over its {which} limit",
                                                 "type": "rate_limit_exceeded", "param": None, "code": 429}}
            return web.json_response(body, status=429, headers={"Retry-After": str(math.ceil(retry))})
    usage: dict = {}
    resp = None
    try:
        resp = await _route(request, state, tenant, usage)
        return resp
    finally:  # also when the client went away mid-request: the tenant's slot is given back
        if tenant is not None:
            prompt, cached, completion = billable(usage.get("usage"))
            tenants.release(tenant, prompt - cached + completion)
            m = state.metrics
            for kind, n in (("prompt", prompt), ("cached", cached), ("completion", completion)):
                if n:
                    m.tenant_tokens.labels(cfg.service, tenant, kind).inc(n)
            m.tenant_requests.labels(cfg.service, tenant, str(resp.status if resp is not None else 499)).inc()


async def _route(request: web.Request, state: RouterState, tenant: Optional[str], usage: dict
                 ) -> web.StreamResponse:
    """Read, tokenize and hash the request, then forward it (``usage`` receives the answer's
    usage when tenants are on)."""
    cfg = state.config
    tenants = state.tenants
    raw = await request.read()
    hashes: list[bytes] = []
    strip_usage = False
    try:
        body = json.loads(raw)
        if tenants is not None and isinstance(body, dict) and body.get("stream"):
            # usage is what tenants are charged from: ask for it, and keep it from clients
            # that did not
            opts = body.get("stream_options") or {}
            if isinstance(opts, dict) and not opts.get("include_usage"):
                body["stream_options"] = {**opts, "include_usage": True}
                raw, strip_usage = json.dumps(body).encode(), True
        if cfg.routing == "prefix":
            ids = prompt_token_ids(state.tokenizer, request.path, body)
            hashes = block_hashes(ids, cfg.block_size, state.hash_fn)
            state.metrics.prompt_tokens.labels(cfg.service).inc(len(ids))
    except Exception as e:  # noqa: BLE001 - malformed bodies are the engine's to reject
        logger.debug("not tokenizing %s (%s); routing on load", request.path, e)
    return await _forward(request, state, "POST", raw, _upstream_headers(request, state), hashes,
                          usage if tenants is not None else None, strip_usage, tenant)


def _upstream_headers(request: web.Request, state: RouterState) -> dict:
    """Request headers for the upstream: the client's, except that with tenants the client's
    key (a router key) is replaced by ``--upstream-api-key`` or dropped."""
    headers = {k: request.headers[k] for k in _FORWARD_HEADERS if k in request.headers}
    if state.config.upstream_api_key:
        headers["Authorization"] = f"Bearer {state.config.upstream_api_key}"
    elif state.tenants is not None:
        headers.pop("Authorization", None)
    return headers


async def _forward(request: web.Request, state: RouterState, method: str, raw: bytes, headers: dict,
                   hashes: list[bytes], usage: Optional[dict] = None, strip_usage: bool = False,
                   tenant: Optional[str] = None) -> web.StreamResponse:
    cfg = state.config
    tried: set = set()
    try:
        for attempt in range(MAX_ATTEMPTS):
            up = await _pick(state, hashes, tried, tenant)
            if up is None:
                reason = "no_upstream" if not tried else "upstreams_failed"
                state.metrics.rejected.labels(cfg.service, reason).inc()
                msg = ("no ready upstream within --pending-timeout" if not tried else
                       f"every ready upstream failed this request ({', '.join(u.url for u in tried)})")
                return _error(503, msg, {"Retry-After": "5"})
            if attempt:
                state.metrics.retries.labels(cfg.service).inc()
            tried.add(up)
            up.in_flight += 1
            try:
                upstream_resp = await state.session.request(method, up.url + request.path_qs, data=raw or None,
                                                            headers=headers)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                up.in_flight -= 1
                state.queue.wake_all()
                up.mark_failed(f"{type(e).__name__}: {e}")
                continue
            try:
                return await _relay(request, state, up, upstream_resp, usage, strip_usage)
            finally:
                up.in_flight -= 1
                upstream_resp.release()
                state.queue.wake_all()  # a slot is free
        return _error(503, "every upstream tried failed this request", {"Retry-After": "5"})
    except web.HTTPServiceUnavailable:
        return _error(503, f"too many requests waiting for an upstream (--max-pending {cfg.max_pending})",
                      {"Retry-After": "5"})


#: Most bytes of a JSON answer kept to read its ``usage`` (tenants only).
MAX_USAGE_BODY = 8 << 20


async def _relay(request: web.Request, state: RouterState, up: Upstream, upstream_resp: aiohttp.ClientResponse,
                 usage: Optional[dict] = None, strip_usage: bool = False) -> web.StreamResponse:
    """Pass the upstream's answer back as it arrives.

    With ``usage`` (a dict; tenants on), the answer's OpenAI ``usage`` object is stored in
    it under ``"usage"``: read from a JSON body, or from the stream's usage chunk, which is
    not forwarded when ``strip_usage`` (the router asked for it, the client did not).
    """
    cfg = state.config
    state.metrics.requests.labels(cfg.service, up.url, str(upstream_resp.status)).inc()
    resp = web.StreamResponse(status=upstream_resp.status)
    ctype = upstream_resp.headers.get("Content-Type", "application/json")
    resp.headers["Content-Type"] = ctype
    for h in ("Retry-After", "Cache-Control"):
        if h in upstream_resp.headers:
            resp.headers[h] = upstream_resp.headers[h]
    await resp.prepare(request)
    sse = ctype.startswith("text/event-stream")
    pending, body = b"", bytearray()
    try:
        async for chunk in upstream_resp.content.iter_any():
            if usage is None:
                await resp.write(chunk)
            elif sse:  # forward whole events, reading (and maybe dropping) the usage one
                pending += chunk
                *events, pending = pending.split(b"\n\n")
                out = [e for e in events if not _take_usage(e, usage, strip_usage)]
                if out:
                    await resp.write(b"".join(e + b"\n\n" for e in out))
            else:
                if len(body) < MAX_USAGE_BODY:
                    body += chunk
                await resp.write(chunk)
        if pending:
            await resp.write(pending)
        if usage is not None and not sse and body:
            try:
                usage["usage"] = json.loads(bytes(body)).get("usage")
            except (ValueError, AttributeError):
                pass
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
        # the upstream broke midway: end the stream visibly (a JSON body cannot be mended)
        up.mark_failed(f"{type(e).__name__} mid-response: {e}")
        if sse:
            await _sse_error(resp, f"upstream {up.url} failed mid-stream ({type(e).__name__}); the answer is incomplete")
    except ConnectionResetError:
        logger.debug("client went away; closing the upstream request so the engine aborts it")
        upstream_resp.close()
        return resp
    await resp.write_eof()
    return resp


def _take_usage(event: bytes, usage: dict, strip: bool) -> bool:
    """Record the usage of an SSE event carrying one; True when the event is to be dropped
    (a usage-only chunk the client did not ask for)."""
    if b'"usage":{' not in event and b'"usage": {' not in event:
        return False
    line = event.strip()
    if not line.startswith(b"data: "):
        return False
    try:
        obj = json.loads(line[6:])
    except ValueError:
        return False
    if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
        usage["usage"] = obj["usage"]
        return strip and not obj.get("choices")
    return False


async def models(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models``: answered by the least-loaded ready upstream."""
    state = request.app[STATE]
    if state.tenants is not None and state.tenants.tenant_for(request.headers.get("Authorization")) is None:
        return _error(401, "Invalid or missing API key (send 'Authorization: Bearer <key>').")
    return await _forward(request, state, "GET", b"", _upstream_headers(request, state), [])


async def passthrough(request: web.Request) -> web.StreamResponse:
    """``POST /tokenize``, ``POST /detokenize``, ``GET /version``: the engine's own answer,
    from the least-loaded ready upstream (held like any request while none is ready); the
    tenant's API key is required as on ``/v1``, not charged (no tokens are generated)."""
    state = request.app[STATE]
    if state.tenants is not None and state.tenants.tenant_for(request.headers.get("Authorization")) is None:
        return _error(401, "Invalid or missing API key (send 'Authorization: Bearer <key>').")
    raw = await request.read() if request.method == "POST" else b""
    return await _forward(request, state, request.method, raw, _upstream_headers(request, state), [])


async def health(request: web.Request) -> web.Response:
    """``GET /health``: 200 while the router runs; the body counts ready upstreams."""
    pool = request.app[STATE].pool
    return web.json_response({"upstreams": len(pool.upstreams), "ready": sum(u.ready for u in pool.upstreams)})


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the router's Prometheus series."""
    state = request.app[STATE]
    body = state.metrics.render(state.config.block_size, state.config.hash_algo)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_router_app(config: RouterConfig, tokenizer) -> web.Application:
    """The router application (its upstream poll loop runs while the app runs).

    Args:
        config: settings; ``config.routing`` one of :data:`~.policy.POLICIES`.
        tokenizer: the model's tokenizer (:func:`~argosy.runtime.loader.tokenizer.load_model_tokenizer`).
    Raises:
        ValueError: unknown routing policy or hash algorithm, no upstream, a bad tenants file.
    """
    if config.routing not in POLICIES:
        raise ValueError(f"--routing must be one of {', '.join(POLICIES)}, not {config.routing!r}")
    if not config.upstreams and not config.upstream_service:
        raise ValueError("give at least one --upstream URL or --upstream-service")
    if config.upstream_service and not config.namespace:
        raise ValueError("--upstream-service needs --namespace outside a cluster")
    pool = UpstreamPool(config.upstreams, config.poll_interval, fallback=config.fallback)
    state = RouterState(config=config, tokenizer=tokenizer, pool=pool, metrics=RouterMetrics(config.service, pool),
                        hash_fn=get_hash_fn(config.hash_algo),
                        tenants=Tenants.load(config.tenants_file) if config.tenants_file else None)
    state.queue = FairWaitQueue(state.tenants.charged if state.tenants is not None else (lambda _t: 0))
    pool.on_poll.append(state.queue.wake_all)
    app = web.Application(client_max_size=64 << 20)
    app[STATE] = state

    async def lifecycle(app: web.Application):
        state.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=config.connect_timeout, sock_connect=config.connect_timeout),
            connector=aiohttp.TCPConnector(limit=0))
        await pool.poll_once(state.session)
        pool.start(state.session)
        watcher = None
        if config.upstream_service:
            from .discovery import EndpointSliceWatcher

            loop = asyncio.get_running_loop()
            static = list(config.upstreams)

            def on_change(urls: list[str]) -> None:  # on the watcher's thread
                loop.call_soon_threadsafe(pool.set_urls, static + [u for u in urls if u not in static], state.session)

            watcher = EndpointSliceWatcher(config.upstream_service, config.namespace, on_change,
                                           config.upstream_port_name, config.kubeconfig)
            watcher.start()
        yield
        if watcher is not None:
            watcher.stop()
        await pool.stop()
        await state.session.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/chat/completions", proxy)
    app.router.add_post("/v1/completions", proxy)
    app.router.add_post("/v1/embeddings", proxy)  # routed on load (no prefix to reuse), tenants charged
    app.router.add_get("/v1/models", models)
    app.router.add_post("/tokenize", passthrough)
    app.router.add_post("/detokenize", passthrough)
    app.router.add_get("/version", passthrough)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app
