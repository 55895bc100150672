"""Server-Sent Events: the streaming form of ``/v1/chat/completions`` and ``/v1/completions``
(OpenAI's ``stream: true``; chunks are ``chat.completion.chunk`` / ``text_completion``
objects, the stream ends with ``data: [DONE]``)."""

from __future__ import annotations

import contextlib
import json
import logging
from aiohttp import web

from ..core.async_llm import AsyncLLM, EngineDeadError
from .choices import Choice, generate_choices, usage
from .errors import engine_stopped, error_body
from .formats import ResponseFormat

logger = logging.getLogger("argosy.server")


def json_bytes(obj) -> bytes:
    """Compact UTF-8 JSON (non-ASCII text as is) of one event's payload."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def stream(request: web.Request, async_llm: AsyncLLM, choices: list[Choice], fmt: ResponseFormat,
                 header: dict, include_usage: bool) -> web.StreamResponse:
    """Answer with a Server-Sent Events stream (``text/event-stream``): one ``data: {chunk}``
    event per output that ``fmt`` renders, the usage chunk when ``include_usage``, then
    ``data: [DONE]`` (OpenAI's streaming format). An error after the headers went out is
    an OpenAI error event in the stream (400, 500 or 503 in ``code``), then ``[DONE]``; a
    client that goes away ends the stream and aborts the engine requests."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    base = {**header, "object": fmt.chunk_object}
    if include_usage:
        base["usage"] = None

    async def send(payload) -> None:
        await resp.write(b"data: " + (payload if isinstance(payload, bytes) else json_bytes(payload)) + b"\n\n")

    try:
        try:
            for ch in choices:
                first = fmt.prelude(ch)
                if first is not None:
                    await send({**base, "choices": [first]})
            async with contextlib.aclosing(generate_choices(async_llm, choices)) as outs:
                async for ch, out in outs:
                    ch.update(out)
                    part = fmt.delta(ch, out)  # a failed request's last chunk: finish_reason "error"
                    part = fmt.with_prompt_logprobs(part, ch, True)
                    if part is not None:
                        await send({**base, "choices": [part]})
                    if out.finish_reason == "error":  # then why, as an OpenAI error event
                        why = (f"the engine failed while generating this request ({async_llm.error!r})"
                               if async_llm.error is not None else
                               "generation stopped: the output constraint allowed no token the request permits "
                               "(e.g. min_tokens banned the end of a completed structured output)")
                        await send(error_body(500, why))
            if include_usage:
                await send({**base, "choices": [], "usage": usage(choices)})
        except ConnectionError:
            raise
        except EngineDeadError as e:
            await send(error_body(503, engine_stopped(e)))
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
