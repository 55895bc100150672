"""What the endpoints share: the server's state, request parsing and admission, and
answering with one JSON body or an SSE stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
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
from .protocol import UNSUPPORTED_FIELDS, SamplingRequest
from .sse import stream

logger = logging.getLogger("argosy.server")
_requests_log = logging.getLogger("argosy.requests")


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
    #: every name ``model`` may carry (``--served-model-name``; ``model_name`` is the first)
    model_names: tuple = ()
    #: also accepted, not listed by /v1/models (see ``LLMEngine.served_model_aliases``)
    model_aliases: tuple = ()
    draining: bool = False
    inflight: set = field(default_factory=set)
    created: int = field(default_factory=lambda: int(time.time()))
    #: ``--enable-auto-tool-choice`` / ``--tool-call-parser``: what ``tool_choice: "auto"`` needs
    enable_auto_tool_choice: bool = False
    tool_call_parser: Optional[str] = None
    #: ``--enable-log-requests`` / ``--max-log-len``: a log line per request as it arrives
    log_requests: bool = False
    max_log_len: Optional[int] = None
    #: (endpoint model, field names) already warned about as ignored
    warned_fields: set = field(default_factory=set)

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
        parsed = model_cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    _warn_ignored_fields(request.app[STATE].warned_fields, model_cls, data)
    return parsed


#: Top-level fields clients send that change nothing here and are ignored without a warning
#: (OpenAI's bookkeeping; ``UNSUPPORTED_FIELDS`` at their harmless values neither).
QUIETLY_IGNORED = frozenset({"metadata", "store", "service_tier"})
#: Most distinct (endpoint, names) pairs warned about (the rest are not logged).
MAX_WARNED_FIELD_SETS = 256


def _warn_ignored_fields(warned: set, model_cls, data: dict) -> None:
    """Log (once per endpoint and set of names, at WARNING; ``warned`` remembers them) the
    top-level fields that no model field reads, as vLLM does: the request ran without them."""
    known = set(model_cls.model_fields) | {f.alias for f in model_cls.model_fields.values() if f.alias}
    unknown = tuple(sorted(k for k in data if k not in known and k not in QUIETLY_IGNORED
                           and k not in UNSUPPORTED_FIELDS))
    if not unknown or (model_cls.__name__, unknown) in warned or len(warned) >= MAX_WARNED_FIELD_SETS:
        return
    warned.add((model_cls.__name__, unknown))
    logger.warning("%s: fields %s are not part of this API and were ignored", model_cls.__name__,
                   ", ".join(unknown))


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
    """Raises ApiError(404) when ``model`` is given and is none of the served names."""
    if model is not None and model != state.model_name and model not in state.model_names \
            and model not in state.model_aliases:
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
        params = req.to_sampling_params(default_max_tokens)
    except ValueError as e:
        raise params_error(e) from None
    bad = [t for t in (req.allowed_token_ids or []) if t >= state.vocab_size]
    if bad:
        raise ApiError(400, f"allowed_token_ids must be in [0, {state.vocab_size}), got {bad[0]}", "allowed_token_ids")
    if req.bad_words:
        params.bad_words_token_ids = bad_words_token_ids(state.tokenizer, req.bad_words)
    return params


def bad_words_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """``bad_words`` as token-id sequences, by vLLM's rule: each word (leading spaces
    stripped) tokenized without special tokens, plus its form with one leading space (its
    mid-sentence spelling) when that starts with another token and has as many tokens."""
    out: list[list[int]] = []
    for word in words:
        bare = list(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = list(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if bare and bare not in out:
            out.append(bare)
        if bare and spaced and spaced[0] != bare[0] and len(spaced) == len(bare) and spaced not in out:
            out.append(spaced)
    return out


def truncated(state: ServerState, req, ids: list[int], max_tokens: Optional[int] = None) -> list[int]:
    """``req.truncate`` (``truncate_prompt_tokens``) with the server's context length.
    Raises ApiError(400) naming the field."""
    try:
        return req.truncate(ids, state.max_model_len, max_tokens)
    except ValueError as e:
        raise ApiError(400, str(e), "truncate_prompt_tokens") from None


def chat_prompt(state: ServerState, messages: list[dict], add_generation_prompt: bool = True,
                 tools: Optional[list[dict]] = None, continue_final_message: bool = False,
                 template_kwargs: Optional[dict] = None) -> list[int]:
    """Token ids of a conversation (and its tools) through the model's chat template (the
    function ``argosy router`` uses too; see :func:`chat_prompt_ids`). Raises ApiError(400)."""
    try:
        return chat_prompt_ids(state.tokenizer, messages, add_generation_prompt, tools, continue_final_message,
                               template_kwargs)
    except ValueError as e:
        raise ApiError(400, str(e), "chat_template_kwargs" if str(e).startswith("chat_template_kwargs")
                       else "messages") from None


def log_request(state: ServerState, request_id: str, prompts: list[list[int]], params: object,
                texts: Optional[list[Optional[str]]] = None) -> None:
    """With ``--enable-log-requests``: one INFO line per prompt on logger ``argosy.requests``
    (vLLM's "Received request" line): the id, the prompt text (decoded from the ids when
    the client sent ids or a chat) and ids, each cut to ``--max-log-len`` characters /
    ids, and the sampling or pooling parameters."""
    if not state.log_requests:
        return
    cut = state.max_log_len
    for i, ids in enumerate(prompts):
        text = texts[i] if texts and texts[i] is not None else state.tokenizer.decode(ids[:cut] if cut is not None
                                                                                     else ids)
        rid = request_id if len(prompts) == 1 else f"{request_id} (prompt {i})"
        _requests_log.info("Received request %s: prompt: %r, params: %s, prompt_token_ids: %s (%d tokens)", rid,
                           text if cut is None else text[:cut], params, ids if cut is None else ids[:cut], len(ids))




def request_id(prefix: str) -> str:
    """``prefix-<32 hex>``: a response or engine request id (OpenAI's ``chatcmpl-...`` form)."""
    return f"{prefix}-{uuid.uuid4().hex}"


async def respond(request: web.Request, state: ServerState, choices: list[Choice], fmt: ResponseFormat,
                  streaming: bool, include_usage: bool, response_id: Optional[str] = None) -> web.StreamResponse:
    """Run the choices and answer with one JSON body or an SSE stream whose ``id`` is
    ``response_id`` (the engine requests' prefix, so logs and responses name the same
    request; default a new id)."""
    with in_flight(state):
        header = {"id": response_id or request_id(fmt.prefix), "object": fmt.object, "created": int(time.time()),
                  "model": state.model_name}
        if streaming:
            return await stream(request, state.async_llm, choices, fmt, header, include_usage)
        return await collect(state, choices, fmt, header)


@contextlib.contextmanager
def in_flight(state: ServerState):
    """Counts the calling handler's task among the requests a SIGTERM drain waits for
    (``state.inflight``) while the block runs."""
    task = asyncio.current_task()
    state.inflight.add(task)
    try:
        yield
    finally:
        state.inflight.discard(task)


@contextlib.asynccontextmanager
async def engine_outputs(state: ServerState, choices: list[Choice]):
    """The choices' engine outputs as an async iterator of ``(choice, output)``; leaving
    the block early aborts the unfinished requests (their KV blocks freed).

    Raises:
        ApiError: 503 when the engine stopped, 400 when it refused a request.
    """
    try:
        async with contextlib.aclosing(generate_choices(state.async_llm, choices)) as outs:
            yield outs
    except EngineDeadError as e:
        raise ApiError(503, engine_stopped(e)) from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None


async def collect(state: ServerState, choices: list[Choice], fmt: ResponseFormat, header: dict) -> web.Response:
    """Run the choices to the end and answer with one JSON body (:meth:`ResponseFormat.body`).

    Raises:
        ApiError: 503 when the engine stopped, 400 when it refused a request.
    """
    async with engine_outputs(state, choices) as outs:
        async for ch, out in outs:
            ch.update(out)
    return web.json_response(fmt.body(header, choices), dumps=lambda o: json.dumps(o, ensure_ascii=False))
