"""OpenAI-format errors of the HTTP server: the body ``{"error": {"message", "type", "param",
"code"}}`` (OpenAI's API reference, "Error codes"), and the 400s made from pydantic's and
:class:`~argosy.runtime.core.sampling_params.SamplingParams`' validation errors."""

from __future__ import annotations

import re
from typing import Optional

from aiohttp import web
from pydantic import ValidationError

#: OpenAI's error ``type`` by HTTP status.
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


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
    etype = ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return {"error": {"message": message, "type": etype, "param": param, "code": status}}


def error_response(status: int, message: str, param: Optional[str] = None) -> web.Response:
    """A JSON error response."""
    return web.json_response(error_body(status, message, param), status=status)


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|function-\w+\[.*\]|[A-Z]\w*)$")


def validation_error(e: ValidationError) -> ApiError:
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


def params_error(e: ValueError) -> ApiError:
    """A 400 for ``SamplingParams``' ValueError (its message starts with the field name)."""
    msg = str(e)
    word = msg.split(" ", 1)[0].rstrip(":").split(".")[0]
    return ApiError(400, msg, word if re.fullmatch(r"[a-z_]+", word) else None)


def engine_stopped(e: BaseException) -> str:
    """The 503 message for a request the engine stopped under (``EngineDeadError`` ``e``)."""
    return f"the engine stopped before the request finished ({e})"
