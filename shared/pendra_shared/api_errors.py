"""OpenAI-style errors for Pendra's HTTP services, and the handlers that render them.

    APIError (500, server_error)
    ├── InvalidRequest (400, invalid_request_error)
    │   ├── ContextLengthExceeded (code context_length_exceeded)
    │   └── WrongPurpose (code model_wrong_purpose)
    ├── Unauthorized (401, code invalid_api_key)
    ├── Forbidden (403, code forbidden: e.g. hf_not_allowed)
    ├── ModelNotFoundError (404, code model_not_found)
    ├── NotFound (404, code not_found)
    ├── Conflict (409, code conflict)
    ├── NotSupported (501, code not_supported)
    ├── BadGateway (502, code bad_gateway: a source answered something unusable)
    └── Unavailable (503, code model_unavailable; sent with Retry-After)
        ├── UpstreamUnavailable (code service_unavailable)
        └── Overloaded (code server_overloaded: the model's queue is full or the wait too long)

Every error, request validation included, leaves as `{"error": {"message", "type", "param",
"code"}}` with `code` a string, the body the `openai` client parses. FastAPI is imported only where
the handlers are installed, so the CLI's store commands never load it.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)


class APIError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class WrongPurpose(InvalidRequest):
    code = "model_wrong_purpose"


class Unauthorized(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(APIError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class ModelNotFoundError(APIError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(APIError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class NotSupported(APIError):
    status = 501
    type = "not_supported_error"
    code = "not_supported"


class BadGateway(APIError):
    status = 502
    type = "server_error"
    code = "bad_gateway"


class Unavailable(APIError):
    status = 503
    type = "server_error"
    code = "model_unavailable"


class UpstreamUnavailable(Unavailable):
    code = "service_unavailable"


class Overloaded(Unavailable):
    code = "server_overloaded"


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def stream_error_end(error: APIError) -> bytes:
    """How an event stream ends on an error once it has begun: the error as an event, then
    `[DONE]` (what the openai client reads as an error rather than a cut)."""
    return f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()


def install_error_handlers(app: FastAPI) -> None:
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": "5"} if exc.status == 503 else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # the body did not parse; loc holds a position
            ctx = first.get("ctx")
            reason = (ctx.get("error") if isinstance(ctx, dict) else None) or "syntax error"
            position = first.get("loc", ("body", 0))[-1]
            where = f" (at character {position})" if position else ""
            return JSONResponse(
                error_body(
                    f"The request body is not valid JSON: {reason}{where}",
                    "invalid_request_error",
                    None,
                    "invalid_request",
                ),
                status_code=400,
            )
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return JSONResponse(
            error_body(message, "invalid_request_error", param, "invalid_request"), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(
            error_body(str(exc.detail), type_, None, code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        return JSONResponse(
            error_body(f"internal error: {type(exc).__name__}", "server_error", None, "internal_error"),
            status_code=500,
        )
