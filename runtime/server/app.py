"""The OpenAI-compatible HTTP server (aiohttp).

``build_app(async_llm, args)`` returns the application; ``argosy serve`` (see
``runtime/cli.py``) runs it and owns graceful shutdown through :func:`drain`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics``, ``GET /version``, ``POST /tokenize``,
``POST /detokenize``. Errors use OpenAI's body ``{"error": {"message", "type",
"param", "code"}}``.

A request with ``n`` choices (times the number of prompts, for completions) becomes
that many engine requests, merged back into one response or one SSE stream. When the
handler stops early (client gone: aiohttp cancels the handler, or a write fails) the
engine requests are aborted and their KV blocks freed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import json
import logging
import re
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from aiohttp import web
from pydantic import ValidationError

from .. import __version__
from ..core.async_llm import AsyncLLM, EngineDeadError
from ..core.engine import RequestOutput
from ..core.sampling_params import PoolingParams, SamplingParams, StructuredOutputsParams
from ..loader.tokenizer import chat_prompt_ids
from .metrics import CONTENT_TYPE, ServerMetrics
from .openapi import openapi_document
from .tools import ToolCalls, ToolMode, get_parser, named_schema, required_schema
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    SamplingRequest,
)

logger = logging.getLogger("argosy.server")

#: Largest request body accepted (bytes).
MAX_BODY_BYTES = 32 << 20
#: Floor for log-probabilities in responses (JSON has no -inf).
_MIN_LOGPROB = -9999.0

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


# --------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error answered with an OpenAI-format body.

    Args:
        status: HTTP status code.
        message: human-readable message.
        param: the offending request field, if known.
    """

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.param)


def error_body(status: int, message: str, param: Optional[str] = None) -> dict:
    """OpenAI's error object for ``status``."""
    etype = _ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return {"error": {"message": message, "type": etype, "param": param, "code": status}}


def error_response(status: int, message: str, param: Optional[str] = None) -> web.Response:
    """A JSON error response."""
    return web.json_response(error_body(status, message, param), status=status)


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|function-\w+\[.*\]|[A-Z]\w*)$")


def _validation_error(e: ValidationError) -> ApiError:
    """Turn pydantic's first error into a 400 naming the field (``messages.0.content``)."""
    err = e.errors(include_url=False)[0]
    path, tags = [], []
    for part in err["loc"]:
        if isinstance(part, str) and _UNION_TAG.match(part):
            tags.append(part)
        else:
            path.append(str(part))
    param = ".".join(path) or None
    msg = err["msg"].removeprefix("Value error, ")
    if tags:
        msg = "value does not match any accepted type"
    return ApiError(400, f"{param}: {msg}" if param else msg, param)


def _params_error(e: ValueError) -> ApiError:
    """A 400 for ``SamplingParams``' ValueError (its message starts with the field name)."""
    msg = str(e)
    word = msg.split(" ", 1)[0].rstrip(":").split(".")[0]
    return ApiError(400, msg, word if re.fullmatch(r"[a-z_]+", word) else None)


# ---------------------------------------------------------------------- app state
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
    tokens: "_TokenText"
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


def _byte_alphabet() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: printable Latin-1 bytes stand for
    themselves, the other byte values are shifted to code points 256 and up, in order."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, shift = {}, 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(256 + shift)] = b
            shift += 1
    return out


class _TokenText:
    """Text and UTF-8 bytes of single tokens, for log-probability responses (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._alphabet = _byte_alphabet() if type(decoder).__name__ == "ByteLevel" else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        """``(text, utf8_bytes)`` of one token (text has U+FFFD for partial characters)."""
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        raw = None
        if self._alphabet is not None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and all(c in self._alphabet for c in piece):
                raw = bytes(self._alphabet[c] for c in piece)
        if raw is None:
            raw = self.tokenizer.decode([token_id]).encode("utf-8")
        hit = (raw.decode("utf-8", errors="replace"), list(raw))
        self._cache[token_id] = hit
        return hit


# ------------------------------------------------------------------ shared helpers
async def _parse(request: web.Request, model_cls):
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
        raise _validation_error(e) from None


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


def _check_model(state: ServerState, model: Optional[str]) -> None:
    """Raises ApiError(404) when ``model`` is given and is not the served model."""
    if model is not None and model != state.model_name:
        raise ApiError(404, f"The model `{model}` does not exist.", "model")


def _admit(state: ServerState) -> None:
    """Raises ApiError(503) while draining, when the engine is down, or when the waiting
    queue is at ``--max-waiting-requests``."""
    if state.draining:
        raise ApiError(503, "the server is shutting down")
    if not state.async_llm.is_running:
        raise ApiError(503, "the engine is not running")
    limit = state.max_waiting_requests
    if limit is not None and state.async_llm.num_waiting >= limit:
        raise ApiError(503, f"too many requests waiting ({limit}); retry later")


def _sampling_params(state: ServerState, req: SamplingRequest, default_max_tokens: Optional[int]) -> SamplingParams:
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
        raise _params_error(e) from None


def _chat_prompt(state: ServerState, messages: list[dict], add_generation_prompt: bool = True,
                 tools: Optional[list[dict]] = None) -> list[int]:
    """Token ids of a conversation (and its tools) through the model's chat template (the
    function ``argosy router`` uses too). Raises ApiError(400)."""
    try:
        return chat_prompt_ids(state.tokenizer, messages, add_generation_prompt, tools)
    except ValueError as e:
        raise ApiError(400, str(e), "messages") from None


def _tool_mode(state: ServerState, req: ChatCompletionRequest, params: SamplingParams
               ) -> tuple[Optional[ToolMode], SamplingParams]:
    """How the request uses its tools, and its sampling parameters with the output
    constraint that ``required`` or a named ``tool_choice`` implies.

    Raises:
        ApiError(400): ``auto`` without ``--enable-auto-tool-choice`` and
            ``--tool-call-parser`` (vLLM's rule), or a forced tool call combined with
            another output constraint.
    """
    choice = req.effective_tool_choice
    if choice == "none":
        return None, params
    if choice == "auto":
        if not (state.enable_auto_tool_choice and state.tool_call_parser):
            raise ApiError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
                                'set (or send tool_choice "none", "required" or a named function)', "tool_choice")
        names = frozenset(t.function.name for t in req.tools)
        # tool-call markers such as Hermes' <tool_call> are special tokens in some vocabularies:
        # keep them in the text the parser reads (vLLM does the same)
        return ToolMode("auto", parser=get_parser(state.tool_call_parser), names=names), \
            dataclasses.replace(params, skip_special_tokens=False)
    if params.structured_outputs is not None:
        raise ApiError(400, "tool_choice required or a named function cannot be combined with response_format, "
                            "guided_* or structured_outputs", "tool_choice")
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if choice == "required":
        mode, schema = ToolMode("required"), required_schema(tools, req.parallel_tool_calls is not False)
    else:
        tool = next(t for t in tools if t["function"]["name"] == choice.function.name)
        mode, schema = ToolMode("named", function=choice.function.name), named_schema(tool)
    return mode, dataclasses.replace(params, structured_outputs=StructuredOutputsParams(json=schema))


def _request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ------------------------------------------------------------------- fan-out + merge
@dataclass
class Choice:
    """One engine request behind one response choice, and what it produced so far."""

    index: int
    prompt_index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: Optional[str] = None
    text: str = ""
    num_tokens: int = 0
    logprobs: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: object = None
    text_offset: int = 0  # legacy logprobs: characters emitted so far
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: Optional[list] = None  # the engine's entries, once the prompt is done
    prompt_logprobs_sent: bool = False  # stream: already in a chunk
    echo_sent: bool = False  # stream, echo with logprobs: the prompt went out

    def update(self, out: RequestOutput) -> None:
        """Fold one engine output into this choice."""
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.text += out.new_text
        self.num_tokens = out.num_output_tokens
        self.num_cached_tokens = out.num_cached_tokens
        self.logprobs.extend(out.logprobs)
        if out.finished:
            self.finish_reason = out.finish_reason
            self.stop_reason = out.stop_reason


def fan_out(state: ServerState, request_id: str, prompts: list[list[int]], params: SamplingParams,
            prompt_texts: Optional[list[Optional[str]]] = None) -> list[Choice]:
    """One :class:`Choice` per prompt x ``params.n`` (choice index ``prompt * n + j``).

    Sub-request ``j`` of a seeded request uses ``seed + j`` so the choices differ but
    stay reproducible.

    Raises:
        ApiError(400): a prompt the engine would refuse (empty, too long, bad ids).
    """
    choices = []
    for p, ids in enumerate(prompts):
        for j in range(params.n):
            child = dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + j)
            try:
                state.async_llm.check_request(ids, child)
            except ValueError as e:
                raise ApiError(400, str(e)) from None
            idx = p * params.n + j
            choices.append(Choice(idx, p, f"{request_id}-{idx}", ids, child,
                                  prompt_texts[p] if prompt_texts else None))
    return choices


async def generate_choices(async_llm: AsyncLLM, choices: list[Choice]) -> AsyncIterator[tuple[Choice, RequestOutput]]:
    """Run every choice's engine request concurrently; yield ``(choice, output)`` as they come.

    Closing the iterator (or cancelling its consumer) aborts the unfinished requests.

    Raises:
        EngineDeadError: the engine stopped.
        ValueError: the engine refused a request.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(ch: Choice) -> None:
        try:
            async for out in async_llm.generate(ch.request_id, ch.prompt_ids, ch.params):
                queue.put_nowait((ch, out))
        except Exception as e:  # delivered to the consumer; CancelledError propagates
            queue.put_nowait((ch, e))

    tasks = [asyncio.create_task(pump(ch)) for ch in choices]
    remaining = len(choices)
    try:
        while remaining:
            ch, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                remaining -= 1
            yield ch, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def usage(choices: list[Choice]) -> dict:
    """OpenAI ``usage``: prompt tokens counted once per prompt, completion tokens summed, and
    ``prompt_tokens_details.cached_tokens``: the counted prompts' tokens served from the
    prefix cache (per prompt, its first choice's; further choices of ``n`` share it)."""
    first: dict[int, Choice] = {}
    for ch in sorted(choices, key=lambda c: c.index):
        first.setdefault(ch.prompt_index, ch)
    prompt = sum(len(ch.prompt_ids) for ch in first.values())
    cached = sum(ch.num_cached_tokens for ch in first.values())
    completion = sum(ch.num_tokens for ch in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


# ----------------------------------------------------------------------- formats
class _Format:
    """How one endpoint renders choices (full response and stream chunks)."""

    prefix = ""
    object = ""
    chunk_object = ""

    def __init__(self, tokens: _TokenText, want_logprobs: bool, want_prompt_logprobs: bool = False):
        self.tokens = tokens
        self.want_logprobs = want_logprobs
        self.want_prompt_logprobs = want_prompt_logprobs

    def prompt_logprobs(self, ch: Choice, stream: bool) -> Optional[list]:
        """vLLM's ``prompt_logprobs`` of a choice: per prompt token None (the first) or
        ``{token_id: {"logprob", "rank", "decoded_token"}}`` holding the token itself and
        the top alternatives; in a stream only once, in the first chunk after the prompt."""
        if not self.want_prompt_logprobs or ch.prompt_logprobs is None or (stream and ch.prompt_logprobs_sent):
            return None
        ch.prompt_logprobs_sent = True
        out: list = []
        for e in ch.prompt_logprobs:
            if e is None:
                out.append(None)
                continue
            tok, lp, rank, top = e
            d = {}
            for r, (t_id, t_lp) in enumerate(top, start=1):
                d[str(t_id)] = {"logprob": max(t_lp, _MIN_LOGPROB), "rank": r, "decoded_token": self.tokens.get(t_id)[0]}
            d[str(tok)] = {"logprob": max(lp, _MIN_LOGPROB), "rank": rank, "decoded_token": self.tokens.get(tok)[0]}
            out.append(d)
        return out

    def with_prompt_logprobs(self, part: Optional[dict], ch: Choice, stream: bool) -> Optional[dict]:
        """``part`` with ``prompt_logprobs`` added when the request asked for them."""
        if part is not None and self.want_prompt_logprobs:
            plp = self.prompt_logprobs(ch, stream)
            if plp is not None or not stream:
                part["prompt_logprobs"] = plp
        return part

    def prelude(self, ch: Choice) -> Optional[dict]:
        """A choice sent before any output (stream only), or None."""
        return None

    def delta(self, ch: Choice, out: RequestOutput) -> Optional[dict]:
        """The stream choice for one output, or None when there is nothing to send."""
        raise NotImplementedError

    def final(self, ch: Choice) -> dict:
        """The choice of the full (non-streamed) response."""
        raise NotImplementedError


class ChatFormat(_Format):
    """``chat.completion`` objects, logprobs in the chat format."""

    prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def _logprobs(self, entries: list) -> Optional[dict]:
        if not self.want_logprobs:
            return None
        content = []
        for tok, lp, top in entries:
            text, raw = self.tokens.get(tok)
            tops = []
            for t_id, t_lp in top:
                t_text, t_raw = self.tokens.get(t_id)
                tops.append({"token": t_text, "logprob": max(t_lp, _MIN_LOGPROB), "bytes": t_raw})
            content.append({"token": text, "logprob": max(lp, _MIN_LOGPROB), "bytes": raw, "top_logprobs": tops})
        return {"content": content}

    def __init__(self, tokens: _TokenText, want_logprobs: bool, tools: Optional[ToolCalls] = None,
                 want_prompt_logprobs: bool = False):
        super().__init__(tokens, want_logprobs, want_prompt_logprobs)
        self.tools = tools

    def prelude(self, ch: Choice) -> dict:
        return {"index": ch.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta(self, ch: Choice, out: RequestOutput) -> Optional[dict]:
        has_lp = self.want_logprobs and out.logprobs
        if self.tools is not None:
            d, finish = self.tools.delta(ch.index, ch.text, out.finished, out.finish_reason)
            if not (d or out.finished or has_lp):
                return None
            return {"index": ch.index, "delta": d, "logprobs": self._logprobs(out.logprobs), "finish_reason": finish,
                    "stop_reason": out.stop_reason}
        if not (out.new_text or out.finished or has_lp):
            return None
        return {"index": ch.index, "delta": {"content": out.new_text} if out.new_text or has_lp else {},
                "logprobs": self._logprobs(out.logprobs), "finish_reason": out.finish_reason,
                "stop_reason": out.stop_reason}

    def final(self, ch: Choice) -> dict:
        message, finish = {"role": "assistant", "content": ch.text}, ch.finish_reason
        if self.tools is not None:
            message, finish = self.tools.message(ch.text, ch.finish_reason)
        return {"index": ch.index, "message": message, "logprobs": self._logprobs(ch.logprobs),
                "finish_reason": finish, "stop_reason": ch.stop_reason}


class CompletionFormat(_Format):
    """``text_completion`` objects, logprobs in the legacy format; ``echo`` prepends the prompt."""

    prefix = "cmpl"
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, tokens: _TokenText, want_logprobs: bool, echo: bool, want_prompt_logprobs: bool = False,
                 num_logprobs: int = 0):
        super().__init__(tokens, want_logprobs, want_prompt_logprobs)
        self.echo = echo
        self.num_logprobs = num_logprobs

    def _logprobs(self, entries: list, offset: int) -> Optional[dict]:
        if not self.want_logprobs:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tok, lp, top in entries:
            text, _ = self.tokens.get(tok)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if lp is None:  # the prompt's first token (echo): nothing predicts it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            tops = {self.tokens.get(t_id)[0]: max(t_lp, _MIN_LOGPROB) for t_id, t_lp in top}
            tops.setdefault(text, max(lp, _MIN_LOGPROB))
            out["token_logprobs"].append(max(lp, _MIN_LOGPROB))
            out["top_logprobs"].append(tops)
        return out

    def _echo_entries(self, ch: Choice) -> list:
        """The prompt as legacy logprob entries (echo + logprobs): the first token's is None;
        top alternatives cut to ``logprobs``. Empty when the prompt never finished (the
        request failed or was aborted before): the echoed text then has no entries."""
        if not ch.prompt_logprobs or len(ch.prompt_logprobs) < len(ch.prompt_ids):
            return []
        k = self.num_logprobs
        return [(ch.prompt_ids[0], None, [])] + [(tok, lp, top[:k]) for tok, lp, _, top in ch.prompt_logprobs[1:]]

    @property
    def _echo_logprobs(self) -> bool:
        return self.echo and self.want_logprobs

    def _echo_text(self, ch: Choice) -> str:
        if not self.echo:
            return ""
        if ch.prompt_text is None:
            ch.prompt_text = self.tokens.tokenizer.decode(ch.prompt_ids)
        return ch.prompt_text

    def prelude(self, ch: Choice) -> Optional[dict]:
        text = self._echo_text(ch)
        if not text or self._echo_logprobs:  # with logprobs the prompt goes out once they are known
            return None
        return {"index": ch.index, "text": text, "logprobs": None, "finish_reason": None}

    def delta(self, ch: Choice, out: RequestOutput) -> Optional[dict]:
        has_lp = self.want_logprobs and out.logprobs
        if not (out.new_text or out.finished or has_lp):
            return None
        entries, prefix = out.logprobs, ""
        if self._echo_logprobs and ch.prompt_logprobs is not None and not ch.echo_sent:
            entries, prefix = self._echo_entries(ch) + list(out.logprobs), self._echo_text(ch)
            ch.echo_sent = True
        lps = self._logprobs(entries, ch.text_offset)
        if lps:
            ch.text_offset += sum(len(t) for t in lps["tokens"])
        return {"index": ch.index, "text": prefix + out.new_text, "logprobs": lps, "finish_reason": out.finish_reason,
                "stop_reason": out.stop_reason}

    def final(self, ch: Choice) -> dict:
        prefix = self._echo_text(ch)
        entries = self._echo_entries(ch) + ch.logprobs if self._echo_logprobs else ch.logprobs
        return {"index": ch.index, "text": prefix + ch.text, "logprobs": self._logprobs(entries, 0 if self._echo_logprobs
                                                                                         else len(prefix)),
                "finish_reason": ch.finish_reason, "stop_reason": ch.stop_reason}


# ---------------------------------------------------------------------- responding
async def _respond(request: web.Request, state: ServerState, choices: list[Choice], fmt: _Format,
                   stream: bool, include_usage: bool) -> web.StreamResponse:
    """Run the choices and answer with one JSON body or an SSE stream."""
    task = asyncio.current_task()
    state.inflight.add(task)
    try:
        header = {"id": _request_id(fmt.prefix), "object": fmt.object, "created": int(time.time()),
                  "model": state.model_name}
        if stream:
            return await _stream(request, state, choices, fmt, header, include_usage)
        return await _collect(state, choices, fmt, header)
    finally:
        state.inflight.discard(task)


async def _collect(state: ServerState, choices: list[Choice], fmt: _Format, header: dict) -> web.Response:
    try:
        async with contextlib.aclosing(generate_choices(state.async_llm, choices)) as outs:
            async for ch, out in outs:
                ch.update(out)
    except EngineDeadError as e:
        raise ApiError(503, f"the engine stopped before the request finished ({e})") from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    if isinstance(fmt, ChatFormat):  # vLLM's chat response carries them once, at the top level
        body = {**header, "choices": [fmt.final(ch) for ch in choices], "usage": usage(choices)}
        if fmt.want_prompt_logprobs:
            body["prompt_logprobs"] = fmt.prompt_logprobs(choices[0], False)
    else:
        body = {**header, "choices": [fmt.with_prompt_logprobs(fmt.final(ch), ch, False) for ch in choices],
                "usage": usage(choices)}
    return web.json_response(body, dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def _stream(request: web.Request, state: ServerState, choices: list[Choice], fmt: _Format, header: dict,
                  include_usage: bool) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    base = {**header, "object": fmt.chunk_object}
    if include_usage:
        base["usage"] = None

    async def send(payload) -> None:
        await resp.write(b"data: " + (payload if isinstance(payload, bytes) else _json_bytes(payload)) + b"\n\n")

    try:
        try:
            for ch in choices:
                first = fmt.prelude(ch)
                if first is not None:
                    await send({**base, "choices": [first]})
            async with contextlib.aclosing(generate_choices(state.async_llm, choices)) as outs:
                async for ch, out in outs:
                    ch.update(out)
                    part = fmt.delta(ch, out)  # a failed request's last chunk: finish_reason "error"
                    part = fmt.with_prompt_logprobs(part, ch, True)
                    if part is not None:
                        await send({**base, "choices": [part]})
                    if out.finish_reason == "error":  # then why, as an OpenAI error event
                        why = (f"the engine failed while generating this request ({state.async_llm.error!r})"
                               if state.async_llm.error is not None else
                               "generation stopped: the output constraint allowed no token the request permits "
                               "(e.g. min_tokens banned the end of a completed structured output)")
                        await send(error_body(500, why))
            if include_usage:
                await send({**base, "choices": [], "usage": usage(choices)})
        except ConnectionError:
            raise
        except EngineDeadError as e:
            await send(error_body(503, f"the engine stopped before the request finished ({e})"))
        except ValueError as e:
            await send(error_body(400, str(e)))
        except Exception as e:  # headers are sent: report in the stream, keep serving
            logger.exception("unexpected error while streaming %s", request.path)
            await send(error_body(500, f"internal server error ({type(e).__name__}: {e})"))
        await send(b"[DONE]")
        await resp.write_eof()
    except ConnectionError:
        logger.debug("client went away during a stream; request aborted")
    return resp


# ------------------------------------------------------------------------ handlers
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    state = request.app[STATE]
    req = await _parse(request, ChatCompletionRequest)
    _check_model(state, req.model)
    params = _sampling_params(state, req, None)
    mode, params = _tool_mode(state, req, params)
    prompt = _chat_prompt(state, req.template_messages(), tools=req.template_tools())
    _admit(state)
    choices = fan_out(state, _request_id("chatcmpl"), [prompt], params)
    fmt = ChatFormat(state.tokens, bool(req.logprobs), ToolCalls(mode) if mode else None,
                     req.prompt_logprobs is not None)
    return await _respond(request, state, choices, fmt, bool(req.stream), req.include_usage)


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    state = request.app[STATE]
    req = await _parse(request, CompletionRequest)
    _check_model(state, req.model)
    params = _sampling_params(state, req, 16)
    texts: list[Optional[str]] = []
    prompts: list[list[int]] = []
    for p in req.prompt_list():
        if isinstance(p, str):
            texts.append(p)
            prompts.append(list(state.tokenizer.encode(p)))
        else:
            texts.append(None)
            prompts.append(list(p))
    _admit(state)
    choices = fan_out(state, _request_id("cmpl"), prompts, params, texts)
    fmt = CompletionFormat(state.tokens, req.logprobs is not None, bool(req.echo), req.prompt_logprobs is not None,
                           req.logprobs or 0)
    return await _respond(request, state, choices, fmt, bool(req.stream), req.include_usage)


async def embeddings(request: web.Request) -> web.Response:
    """``POST /v1/embeddings``: one vector per input, pooled on the serving engine (LAST
    token of the final hidden states, L2-normalized; see :class:`PoolingParams`), batched
    with the other requests by the scheduler."""
    state = request.app[STATE]
    req = await _parse(request, EmbeddingRequest)
    _check_model(state, req.model)
    hidden = state.engine.model_config.hidden_size
    if req.dimensions is not None and req.dimensions != hidden:
        raise ApiError(400, f"dimensions {req.dimensions} is not supported: this model's embeddings have {hidden} "
                            "dimensions (no truncation)", "dimensions")
    prompts = [list(state.tokenizer.encode(p)) if isinstance(p, str) else p for p in req.inputs()]
    pp = PoolingParams()
    rid = _request_id("embd")
    choices = []
    for i, ids in enumerate(prompts):
        try:
            state.async_llm.check_request(ids, pp)
        except ValueError as e:
            raise ApiError(400, f"input {i}: {e}" if len(prompts) > 1 else str(e), "input") from None
        choices.append(Choice(i, i, f"{rid}-{i}", ids, pp))
    _admit(state)
    vectors: dict[int, list[float]] = {}
    task = asyncio.current_task()
    state.inflight.add(task)
    try:
        async with contextlib.aclosing(generate_choices(state.async_llm, choices)) as outs:
            async for ch, out in outs:
                if out.finished:
                    if out.embedding is None:
                        raise ApiError(500, f"the engine finished input {ch.index} without an embedding "
                                            f"({out.finish_reason})")
                    vectors[ch.index] = out.embedding
    except EngineDeadError as e:
        raise ApiError(503, f"the engine stopped before the request finished ({e})") from None
    finally:
        state.inflight.discard(task)
    data = []
    for i in range(len(prompts)):
        v = vectors[i]
        emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if req.encoding_format == "base64" else v
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = sum(len(p) for p in prompts)
    return web.json_response({"object": "list", "data": data, "model": state.model_name,
                              "usage": {"prompt_tokens": n, "total_tokens": n}})


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the one served model."""
    state = request.app[STATE]
    card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "argosy",
            "root": str(getattr(state.engine.checkpoint, "path", state.model_name)), "parent": None,
            "max_model_len": state.max_model_len, "permission": []}
    return web.json_response({"object": "list", "data": [card]})


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
    req = await _parse(request, TokenizeRequest)
    _check_model(state, req.model)
    if req.messages is not None:
        ids = _chat_prompt(state, [m.to_template() for m in req.messages], bool(req.add_generation_prompt))
    else:
        ids = list(state.tokenizer.encode(req.prompt, add_special_tokens=bool(req.add_special_tokens)))
    return web.json_response({"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids})


async def detokenize(request: web.Request) -> web.Response:
    """``POST /detokenize``: token ids to text."""
    state = request.app[STATE]
    req = await _parse(request, DetokenizeRequest)
    _check_model(state, req.model)
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
        max_model_len=engine.max_model_len,
        vocab_size=engine.model_config.vocab_size,
        api_key=getattr(args, "api_key", None) or None,
        max_waiting_requests=max_waiting,
        metrics=ServerMetrics(engine, engine.served_model_name),
        tokens=_TokenText(engine.tokenizer),
        enable_auto_tool_choice=bool(getattr(args, "enable_auto_tool_choice", False)),
        tool_call_parser=getattr(args, "tool_call_parser", None),
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
