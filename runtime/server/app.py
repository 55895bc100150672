"""The OpenAI-compatible HTTP server (aiohttp).

``build_app(async_llm, args)`` returns the application; ``argosy serve`` (see
``runtime/cli.py``) runs it and owns graceful shutdown through :func:`drain`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
``GET /v1/models``, ``GET /health``, ``GET /metrics``, ``GET /version``,
``GET /openapi.json``, ``GET /kv_events``, ``POST /tokenize``, ``POST /detokenize``.
Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``.

A request with ``n`` choices (times the number of prompts, for completions) becomes
that many engine requests, merged back into one response or one SSE stream. When the
handler stops early (client gone: aiohttp cancels the handler, or a write fails) the
engine requests are aborted and their KV blocks freed.

This module is the wiring (routes, authentication, errors, health, metrics, tokenize);
the endpoints live by themselves, as vLLM's do: :mod:`.chat`, :mod:`.completions`,
:mod:`.embeddings`, on :mod:`.common` (state, parsing, admission, answering),
:mod:`.choices` (fan-out and merge), :mod:`.formats` (rendering, logprobs), :mod:`.sse`
(streaming), :mod:`.errors`, :mod:`.protocol` (request models, the source of
``/openapi.json``) and :mod:`.tools` (with :mod:`.tool_parsers`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Optional

from aiohttp import web

from .. import __version__
from ..core.async_llm import AsyncLLM
from .chat import chat_completions
from .common import OPENAPI, STATE, ServerState, TokenText, chat_prompt, check_model, parse_body
from .completions import completions
from .embeddings import embeddings
from .errors import ApiError, error_response
from .metrics import CONTENT_TYPE, ServerMetrics
from .openapi import openapi_document
from .protocol import DetokenizeRequest, TokenizeRequest

logger = logging.getLogger("argosy.server")

#: Largest request body accepted (bytes).
MAX_BODY_BYTES = 32 << 20


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: one card per served name (``--served-model-name``), the same
    model behind each, as vLLM lists them."""
    state = request.app[STATE]
    root = str(getattr(state.engine.checkpoint, "path", state.model_name))
    cards = [{"id": name, "object": "model", "created": state.created, "owned_by": "argosy", "root": root,
              "parent": None, "max_model_len": state.max_model_len, "permission": []}
             for name in (state.model_names or (state.model_name,))]
    return web.json_response({"object": "list", "data": cards})


async def health(request: web.Request) -> web.Response:
    """``GET /health``: 200 while the engine is healthy and not draining, else 503."""
    state = request.app[STATE]
    ok = state.async_llm.is_healthy and not state.draining
    return web.Response(status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text exposition."""
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def kv_events(request: web.Request) -> web.Response:
    """``GET /kv_events?since=SEQ&instance_id=ID``: the block hashes the prefix cache
    stored and removed since event ``SEQ``, or a snapshot of every held hash (see
    :mod:`argosy.runtime.core.kv_events`); for ``argosy router``. 404 when prefix caching
    is off, 400 for a non-integer ``since``."""
    log = request.app[STATE].engine.kv.events
    if log is None:
        raise ApiError(404, "prefix caching is off (--no-enable-prefix-caching): no KV events")
    since = request.query.get("since")
    try:
        since_n = int(since) if since is not None else None
    except ValueError:
        raise ApiError(400, f"since must be an integer, got {since!r}", "since") from None
    return web.json_response(log.read(since_n, request.query.get("instance_id")))


async def openapi_json(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the OpenAPI 3.1 document (:mod:`.openapi`)."""
    return web.json_response(request.app[OPENAPI])


async def version(request: web.Request) -> web.Response:
    """``GET /version``."""
    return web.json_response({"version": __version__})


async def tokenize(request: web.Request) -> web.Response:
    """``POST /tokenize``: text or a chat (through its template) to token ids."""
    state = request.app[STATE]
    req = await parse_body(request, TokenizeRequest)
    check_model(state, req.model)
    if req.messages is not None:
        ids = chat_prompt(state, [m.to_template() for m in req.messages], bool(req.add_generation_prompt))
    else:
        ids = list(state.tokenizer.encode(req.prompt, add_special_tokens=bool(req.add_special_tokens)))
    return web.json_response({"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids})


async def detokenize(request: web.Request) -> web.Response:
    """``POST /detokenize``: token ids to text."""
    state = request.app[STATE]
    req = await parse_body(request, DetokenizeRequest)
    check_model(state, req.model)
    bad = [t for t in req.tokens if t >= state.vocab_size]
    if bad:
        raise ApiError(400, f"token ids must be in [0, {state.vocab_size}), got {bad[0]}", "tokens")
    return web.json_response({"prompt": state.tokenizer.decode(req.tokens)}, dumps=lambda o: json.dumps(o, ensure_ascii=False))


# ---------------------------------------------------------------------- middleware
def _authorized(request: web.Request, key: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


@web.middleware
async def _errors_and_auth(request: web.Request, handler) -> web.StreamResponse:
    state = request.app[STATE]
    if state.api_key and (request.path == "/v1" or request.path.startswith("/v1/")):
        if not _authorized(request, state.api_key):
            return error_response(401, "Invalid or missing API key (send 'Authorization: Bearer <key>').")
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, e.reason if e.status != 404 else f"{request.method} {request.path}: not found")
    except asyncio.CancelledError:
        raise
    except Exception as e:
        logger.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(500, f"internal server error ({type(e).__name__}: {e})")


# ------------------------------------------------------------------------ the app
def build_app(async_llm: AsyncLLM, args=None) -> web.Application:
    """Create the aiohttp application serving ``async_llm``'s engine.

    Args:
        async_llm: the running engine front.
        args: the ``argosy serve`` namespace (or any object); read: ``api_key``
            (None = no auth) and ``max_waiting_requests`` (default: the engine's
            scheduler config). May be None.
    Returns:
        The application; the metrics observer is registered on ``async_llm``.
    """
    engine = async_llm.engine
    max_waiting = getattr(args, "max_waiting_requests", None)
    if max_waiting is None:
        max_waiting = engine.scheduler_config.max_waiting_requests
    state = ServerState(
        async_llm=async_llm,
        model_name=engine.served_model_name,
        model_names=tuple(getattr(engine, "served_model_names", (engine.served_model_name,))),
        model_aliases=tuple(getattr(engine, "served_model_aliases", ())),
        max_model_len=engine.max_model_len,
        vocab_size=engine.model_config.vocab_size,
        api_key=getattr(args, "api_key", None) or None,
        max_waiting_requests=max_waiting,
        metrics=ServerMetrics(engine, engine.served_model_name),
        tokens=TokenText(engine.tokenizer),
        enable_auto_tool_choice=bool(getattr(args, "enable_auto_tool_choice", False)),
        tool_call_parser=getattr(args, "tool_call_parser", None),
        log_requests=bool(getattr(args, "enable_log_requests", False)),
        max_log_len=getattr(args, "max_log_len", None),
    )
    async_llm.output_observers.append(state.metrics.observe)
    if getattr(engine, "structured", None) is not None:
        engine.structured.warm_up()  # the grammar engine's import and tables, off the request path
    app = web.Application(middlewares=[_errors_and_auth], client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/version", version)
    app.router.add_get("/openapi.json", openapi_json)
    app[OPENAPI] = openapi_document()
    app.router.add_get("/kv_events", kv_events)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    return app


async def drain(app: web.Application, timeout_s: float, force: Optional[asyncio.Event] = None) -> bool:
    """Stop admitting requests and wait for in-flight generations to end.

    After this, new generation requests get 503 and ``/health`` returns 503.

    Args:
        timeout_s: longest wait (seconds).
        force: when set while waiting, stop waiting at once.
    Returns:
        True if every in-flight request finished in time.
    """
    state = app[STATE]
    state.draining = True
    deadline = time.monotonic() + timeout_s
    while state.inflight:
        if time.monotonic() >= deadline or (force is not None and force.is_set()):
            return False
        await asyncio.sleep(0.05)
    return True


def num_inflight(app: web.Application) -> int:
    """Generation requests currently being served."""
    return len(app[STATE].inflight)
