"""``GET /openapi.json``: the server's OpenAPI 3.1 document, generated from the pydantic
models the handlers validate requests with (:mod:`.protocol`) and the response models
below, so the document cannot drift from what the server accepts.

Response models describe what the server sends (extra fields allowed: the fields
here are the ones clients rely on); every error is OpenAI's error object
(:class:`ErrorResponse`). Streams (``stream: true``) are ``text/event-stream`` whose
``data:`` lines carry the ``*.chunk`` objects and a final ``[DONE]``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from .. import __version__
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, TokenizeRequest


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Open):
    message: str
    type: str
    param: Optional[str]
    code: Union[int, str, None]


class ErrorResponse(_Open):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


class Usage(_Open):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: Optional[int] = None


class ToolCallFunction(_Open):
    name: str
    arguments: str


class ToolCall(_Open):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class ChatMessageOut(_Open):
    role: Literal["assistant"]
    content: Optional[str]
    tool_calls: Optional[list[ToolCall]] = None


class ChatChoice(_Open):
    index: int
    message: ChatMessageOut
    finish_reason: Optional[str]


class ChatCompletionResponse(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(_Open):
    index: int
    text: str
    finish_reason: Optional[str]


class CompletionResponse(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class EmbeddingData(_Open):
    object: Literal["embedding"]
    index: int
    embedding: Union[list[float], str]


class EmbeddingResponse(_Open):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(_Open):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(_Open):
    prompt: str


class VersionResponse(_Open):
    version: str


_MODELS = [ChatCompletionRequest, CompletionRequest, EmbeddingRequest, TokenizeRequest, DetokenizeRequest,
           ErrorResponse, ChatCompletionResponse, CompletionResponse, EmbeddingResponse, ModelList, TokenizeResponse,
           DetokenizeResponse, VersionResponse]

#: Error statuses every JSON endpoint may answer with (413: body over the size limit;
#: 503: draining, engine down, or --max-waiting-requests reached).
_ERRORS = (400, 401, 404, 413, 503)


def _ref(model: type) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type) -> dict:
    return {"application/json": {"schema": _ref(model)}}


def _responses(ok: Optional[dict], errors=_ERRORS, stream: bool = False) -> dict:
    out: dict[str, Any] = {}
    if ok is not None:
        content = dict(ok)
        if stream:
            content["text/event-stream"] = {"schema": {"type": "string"}}
        out["200"] = {"description": "OK", "content": content}
    for code in errors:
        out[str(code)] = {"description": "Error", "content": _json(ErrorResponse)}
    return out


def _post(summary: str, request: type, response: type, stream: bool = False) -> dict:
    return {"post": {"summary": summary, "operationId": summary.replace(" ", "_").lower(),
                     "requestBody": {"required": True, "content": _json(request)},
                     "responses": _responses(_json(response), stream=stream)}}


def _get(summary: str, ok: Optional[dict], errors=(401, 404)) -> dict:
    return {"get": {"summary": summary, "operationId": summary.replace(" ", "_").lower(),
                    "responses": _responses(ok, errors)}}


def openapi_document() -> dict:
    """The OpenAPI 3.1 document of ``argosy serve`` (``GET /openapi.json``)."""
    _, top = models_json_schema([(m, "validation" if m.__name__.endswith("Request") else "serialization")
                                 for m in _MODELS], ref_template="#/components/schemas/{model}")
    schemas = top.get("$defs", {})
    text = {"text/plain": {"schema": {"type": "string"}}}
    paths = {
        "/v1/chat/completions": _post("Create chat completion", ChatCompletionRequest, ChatCompletionResponse, True),
        "/v1/completions": _post("Create completion", CompletionRequest, CompletionResponse, True),
        "/v1/embeddings": _post("Create embeddings", EmbeddingRequest, EmbeddingResponse),
        "/v1/models": _get("List models", _json(ModelList)),
        "/tokenize": _post("Tokenize", TokenizeRequest, TokenizeResponse),
        "/detokenize": _post("Detokenize", DetokenizeRequest, DetokenizeResponse),
        "/health": {"get": {"summary": "Health", "operationId": "health",
                            "responses": {"200": {"description": "healthy"},
                                          "503": {"description": "unhealthy or draining"}}}},
        "/version": _get("Version", _json(VersionResponse), ()),
        "/metrics": _get("Prometheus metrics", text, ()),
    }
    return {"openapi": "3.1.0",
            "info": {"title": "Argosy OpenAI-compatible server", "version": __version__},
            "paths": paths, "components": {"schemas": schemas}}
