"""The one place where any exception becomes an OpenAI-shaped error.

Every route, every exception handler and every streamed error event goes through :func:`to_api_error`, so a
client sees the same ``{"error": {"message", "type", "param", "code"}}`` body whatever failed, and nothing
internal (tracebacks, object reprs with memory addresses, file paths of the server) ever leaves the process:
unknown exceptions are logged here with their traceback and reported as a bare 500.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from llmctl.engine.errors import EngineDeadError, RequestFailedError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger("llmctl_server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "internal_error",
    503: "service_unavailable",
}


@dataclass
class APIError(Exception):
    """An error whose message is safe to show to the client as is."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after: int | None = None
    err_type: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type or _TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, retry_after: int = 1) -> APIError:
    return APIError(503, message, code="service_unavailable", retry_after=retry_after)


# -- scrubbing --------------------------------------------------------------------------------------------------
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}")
_OBJ_REPR = re.compile(r"<[\w.]+ object at [^>]*>")
_PATH = re.compile(r"(?<![\w/])/(?:[\w.+-]+/)+[\w.+-]*")
_MAX_MESSAGE = 1000


def scrub(message: str) -> str:
    """Remove what must not leave the server from an otherwise user-facing message (engine ValueErrors are
    written for users, but a repr or a path can slip into them)."""
    message = _OBJ_REPR.sub("<object>", message)
    message = _ADDRESS.sub("0x…", message)
    message = _PATH.sub("<path>", message)
    if "Traceback (most recent call last)" in message:
        message = message.split("Traceback (most recent call last)")[0].strip() or "invalid request"
    return message[:_MAX_MESSAGE]


# -- validation errors --------------------------------------------------------------------------------------------
_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|function-\w+|tagged-union|literal)(\[.*)?$|^[A-Z]")


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if item in ("body", "query", "path", "header") and not parts:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and _UNION_TAG.match(item):
            continue  # pydantic's name for a union member, not a field
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "body"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def from_validation_errors(errors: list[dict[str, Any]]) -> APIError:
    """pydantic/FastAPI errors -> one 400 that names the field(s) and the limit that was broken."""
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    if first.get("type") in ("json_invalid", "json_type") or first.get("loc", ())[:1] == ("body",) and len(
            first.get("loc", ())) == 1 and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        kind = "malformed JSON" if first.get("type") == "json_invalid" else "the request body must be a JSON object"
        detail = (first.get("ctx") or {}).get("error")
        return bad_request(f"{kind}{': ' + str(detail) if detail else ''}", code="invalid_json")
    seen: dict[str, str] = {}
    for err in errors:
        param = _loc_to_param(tuple(err.get("loc", ())))
        if param in seen:
            continue
        msg = str(err.get("msg", "invalid value"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        named = _param_of(msg)
        if err.get("type") == "missing":
            text = f"{param}: field required"
        elif named is not None:
            # our own validators already name the field (model-level checks are located at the body)
            param, text = named, msg
        else:
            text = f"{param}: {msg}"
            if "input" in err and err.get("type") not in ("missing",):
                text += f" (got {_short(err['input'])})"
        seen[param] = text
        if len(seen) >= 3:
            break
    params = list(seen)
    return bad_request("; ".join(seen.values()), param=params[0], code="invalid_value")


# -- the sanitiser -----------------------------------------------------------------------------------------------
def _engine_error_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(engine-dead errors, per-request failures): core's, as the 503 and the 500-with-reason."""
    return (EngineDeadError,), (RequestFailedError,)


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to the error the client sees. Unknown exceptions are logged (with traceback) and
    become a generic 500 whose message says nothing about the server's internals."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return from_validation_errors(list(exc.errors()))
    if isinstance(exc, ValidationError):
        return from_validation_errors(list(exc.errors()))
    if isinstance(exc, json.JSONDecodeError):
        return bad_request(f"malformed JSON: {exc.msg} at position {exc.pos}", code="invalid_json")
    if isinstance(exc, StarletteHTTPException):
        status = exc.status_code
        message = {404: "not found", 405: "method not allowed"}.get(status, str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
        return APIError(status, scrub(message), code=code)
    dead, failed = _engine_error_types()
    if dead and isinstance(exc, dead):
        return unavailable("the inference engine is not running", retry_after=5)
    if failed and isinstance(exc, failed):
        logger.warning("request failed in the engine: %s", exc)
        return APIError(500, "the engine failed while processing this request; other requests are unaffected",
                        code="request_failed")
    if isinstance(exc, ValueError):
        return bad_request(scrub(str(exc)) or "invalid request", param=_param_of(str(exc)), code="invalid_value")
    logger.error("unhandled error while serving a request", exc_info=exc)
    return APIError(500, "internal server error", code="internal_error")


_PARAM_PREFIX = re.compile(r"^([a-z_][a-z0-9_.\[\]]*):")


def _param_of(message: str) -> str | None:
    """Engine ValueErrors start with the field name (``"max_tokens: must be >= 1"``)."""
    m = _PARAM_PREFIX.match(message)
    return m.group(1) if m else None


def error_response(exc: BaseException) -> JSONResponse:
    err = to_api_error(exc)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


def sse_error_event(exc: BaseException) -> str:
    """The error as one SSE event, for failures after a stream has started (the status line is already 200)."""
    err = to_api_error(exc)
    return f"data: {json.dumps(err.body(), ensure_ascii=False)}\n\n"
