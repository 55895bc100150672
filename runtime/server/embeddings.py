"""``POST /v1/embeddings``: one pooled vector per input, as floats or base64 (OpenAI's
Embeddings API), computed by the serving engine alongside generation."""

from __future__ import annotations

import base64
import struct

from aiohttp import web

from ..core.sampling_params import PoolingParams
from .choices import Choice
from .common import (STATE, admit, check_model, engine_outputs, in_flight, log_request, parse_body, request_id,
                     truncated)
from .errors import ApiError
from .protocol import EmbeddingRequest


async def embeddings(request: web.Request) -> web.Response:
    """``POST /v1/embeddings``: one vector per input, pooled on the serving engine (LAST
    token of the final hidden states, L2-normalized; see :class:`PoolingParams`), batched
    with the other requests by the scheduler."""
    state = request.app[STATE]
    req = await parse_body(request, EmbeddingRequest)
    check_model(state, req.model)
    hidden = state.engine.model_config.hidden_size
    if req.dimensions is not None and req.dimensions != hidden:
        raise ApiError(400, f"dimensions {req.dimensions} is not supported: this model's embeddings have {hidden} "
                            "dimensions (no truncation)", "dimensions")
    prompts = [truncated(state, req, list(state.tokenizer.encode(p)) if isinstance(p, str) else list(p))
               for p in req.inputs()]
    pp = PoolingParams()
    rid = request_id("embd")
    choices = []
    for i, ids in enumerate(prompts):
        try:
            state.async_llm.check_request(ids, pp)
        except ValueError as e:
            raise ApiError(400, f"input {i}: {e}" if len(prompts) > 1 else str(e), "input") from None
        choices.append(Choice(i, i, f"{rid}-{i}", ids, pp))
    admit(state)
    log_request(state, rid, prompts, pp)
    vectors: dict[int, list[float]] = {}
    with in_flight(state):
        async with engine_outputs(state, choices) as outs:
            async for ch, out in outs:
                if out.finished:
                    if out.embedding is None:
                        raise ApiError(500, f"the engine finished input {ch.index} without an embedding "
                                            f"({out.finish_reason})")
                    vectors[ch.index] = out.embedding
    data = []
    for i in range(len(prompts)):
        v = vectors[i]
        emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if req.encoding_format == "base64" else v
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = sum(len(p) for p in prompts)
    return web.json_response({"object": "list", "data": data, "model": state.model_name,
                              "usage": {"prompt_tokens": n, "total_tokens": n}})
