"""What the endpoints share: the server's state, request parsing and admission, and
answering with one JSON body or an SSE stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from aiohttp import web
from pydantic import ValidationError

from ..core.async_llm import AsyncLLM, EngineDeadError
from ..core.sampling_params import SamplingParams
from ..loader.tokenizer import chat_prompt_ids
from .choices import Choice, generate_choices
from .errors import ApiError, engine_stopped, params_error, validation_error
from .formats import ResponseFormat, TokenText
from .metrics import ServerMetrics
from .protocol import SamplingRequest
from .sse import stream


@dataclass
class ServerState:
    """Everything the handlers share (one per app)."""

    async_llm: AsyncLLM
    model_name: str
    max_model_len: int
    vocab_size: int
    api_key: Optional[str]
    max_waiting_requests: Optional[int]
    metrics: ServerMetrics
    tokens: TokenText
    draining: bool = False
    inflight: set = field(default_factory=set)
    created: int = field(default_factory=lambda: int(time.time()))
    #: ``--enable-auto-tool-choice`` / ``--tool-call-parser``: what ``tool_choice: "auto"`` needs
    enable_auto_tool_choice: bool = False
    tool_call_parser: Optional[str] = None

    @property
    def engine(self):
        return self.async_llm.engine

    @property
    def tokenizer(self):
        return self.async_llm.engine.tokenizer


STATE = web.AppKey("argosy_state", ServerState)
OPENAPI = web.AppKey("argosy_openapi", dict)


async def parse_body(request: web.Request, model_cls):
    """Read and validate a JSON body. Raises ApiError(400)."""
    raw = await request.read()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"invalid JSON body: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    bad = _lone_surrogate_path(data)
    if bad is not None:
        raise ApiError(400, f"invalid string in {bad}: it contains a lone UTF-16 surrogate (not valid Unicode text)",
                       bad)
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def _lone_surrogate_path(obj, path: str = "") -> Optional[str]:
    """Dotted path (``messages.0.content``) of the first string in a decoded JSON value
    holding a lone UTF-16 surrogate (``"\\udcff"`` is valid JSON but no Unicode text:
    tokenizers and UTF-8 encoding reject it), or None."""
    if isinstance(obj, str):
        if obj.isascii():
            return None
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        if isinstance(key, str) and _lone_surrogate_path(key) is not None:
            return f"{path}.{key!r}" if path else "body"
        found = _lone_surrogate_path(value, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def check_model(state: ServerState, model: Optional[str]) -> None:
    """Raises ApiError(404) when ``model`` is given and is not the served model."""
    if model is not None and model != state.model_name:
        raise ApiError(404, f"The model `{model}` does not exist.", "model")


def admit(state: ServerState) -> None:
    """Raises ApiError(503) while draining, when the engine is down, or when the waiting
    queue is at ``--max-waiting-requests``."""
    if state.draining:
        raise ApiError(503, "the server is shutting down")
    if not state.async_llm.is_running:
        raise ApiError(503, "the engine is not running")
    limit = state.max_waiting_requests
    if limit is not None and state.async_llm.num_waiting >= limit:
        raise ApiError(503, f"too many requests waiting ({limit}); retry later")


def sampling_params(state: ServerState, req: SamplingRequest, default_max_tokens: Optional[int]) -> SamplingParams:
    """Request -> SamplingParams. Raises ApiError(400)."""
    bad = [t for t in (req.stop_token_ids or []) if t >= state.vocab_size]
    if bad:
        raise ApiError(400, f"stop_token_ids must be in [0, {state.vocab_size}), got {bad[0]}", "stop_token_ids")
    bad = [k for k in (req.logit_bias or {}) if k.isdigit() and int(k) >= state.vocab_size]
    if bad:
        raise ApiError(400, f"logit_bias token ids must be in [0, {state.vocab_size}), got {bad[0]}", "logit_bias")
    try:
        return req.to_sampling_params(default_max_tokens)
    except ValueError as e:
        raise params_error(e) from None


def chat_prompt(state: ServerState, messages: list[dict], add_generation_prompt: bool = True,
                 tools: Optional[list[dict]] = None) -> list[int]:
    """Token ids of a conversation (and its tools) through the model's chat template (the
    function ``argosy router`` uses too). Raises ApiError(400)."""
    try:
        return chat_prompt_ids(state.tokenizer, messages, add_generation_prompt, tools)
    except ValueError as e:
        raise ApiError(400, str(e), "messages") from None


def request_id(prefix: str) -> str:
    """``prefix-<32 hex>``: a response or engine request id (OpenAI's ``chatcmpl-...`` form)."""
    return f"{prefix}-{uuid.uuid4().hex}"


async def respond(request: web.Request, state: ServerState, choices: list[Choice], fmt: ResponseFormat,
                  streaming: bool, include_usage: bool) -> web.StreamResponse:
    """Run the choices and answer with one JSON body or an SSE stream."""
    task = asyncio.current_task()
    state.inflight.add(task)
    try:
        header = {"id": request_id(fmt.prefix), "object": fmt.object, "created": int(time.time()),
                  "model": state.model_name}
        if streaming:
            return await stream(request, state.async_llm, choices, fmt, header, include_usage)
        return await collect(state, choices, fmt, header)
    finally:
        state.inflight.discard(task)


async def collect(state: ServerState, choices: list[Choice], fmt: ResponseFormat, header: dict) -> web.Response:
    """Run the choices to the end and answer with one JSON body (:meth:`ResponseFormat.body`).

    Raises:
        ApiError: 503 when the engine stopped, 400 when it refused a request.
    """
    try:
        async with contextlib.aclosing(generate_choices(state.async_llm, choices)) as outs:
            async for ch, out in outs:
                ch.update(out)
    except EngineDeadError as e:
        raise ApiError(503, engine_stopped(e)) from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return web.json_response(fmt.body(header, choices), dumps=lambda o: json.dumps(o, ensure_ascii=False))
