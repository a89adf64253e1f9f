"""How the install queue's jobs and results are stored in Redis: as JSON, never as pickle.

arq's default codec is `pickle`, so anyone able to write to Redis could run code in the fetcher,
which reads jobs, and in the API, which reads results. The API's pool and the fetcher's worker
both give arq this module's `dumps` and `loads` instead, and everything arq stores goes through
them: a job (function name, arguments, try number, enqueue time) and its result.

A failed job's result is an exception object. `dumps` writes it as its type name and message,
and `loads` reads it back as `JobFailed`, which a reader can raise and show. No class is ever
looked up by name. Anything else that is not JSON (a tuple becomes a list) is refused when it is
written, so a job whose arguments are not JSON fails at enqueue. Bytes that are not a JSON object
(a pickle, say) fail in `loads`, and arq turns that into a `DeserializationError`.

Only the API and the fetcher use this module. It does not import arq: these are two plain
functions.
"""

from __future__ import annotations

import json
from typing import Any

# The one place arq puts an object of its own: a result's `r` holds the exception a job raised.
RESULT_KEY = "r"
EXCEPTION_KEY = "__pendra_exception__"


class JobFailed(Exception):
    """A queued job's failure as read back from Redis: the type name and the message of what the
    worker raised. It carries text only; the original exception is never rebuilt."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}" if message else kind)
        self.kind = kind
        self.message = message


def dumps(data: dict[str, Any]) -> bytes:
    """arq's job or result dict as JSON bytes; a raised exception as its type name and message."""
    result = data.get(RESULT_KEY)
    if isinstance(result, BaseException):
        described = {"type": type(result).__name__, "message": str(result)}
        data = {**data, RESULT_KEY: {EXCEPTION_KEY: described}}
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()


def loads(raw: bytes) -> dict[str, Any]:
    """The dict `dumps` wrote. Anything else (a pickle, a JSON array) raises ValueError."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError(f"a queue entry must be a JSON object, not {type(data).__name__}")
    result = data.get(RESULT_KEY)
    if isinstance(result, dict) and set(result) == {EXCEPTION_KEY}:
        data[RESULT_KEY] = _failure(result[EXCEPTION_KEY])
    return data


def _failure(described: Any) -> JobFailed:
    if not isinstance(described, dict):
        raise ValueError("a stored failure must be a JSON object")
    kind, message = described.get("type"), described.get("message")
    if not isinstance(kind, str) or not isinstance(message, str):
        raise ValueError("a stored failure needs a string type and message")
    return JobFailed(kind, message)
