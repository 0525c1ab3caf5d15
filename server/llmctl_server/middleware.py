"""Pure-ASGI middleware: body-size limit and API-key auth. Both run before the route reads or parses anything."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Router

from llmctl_server.errors import APIError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_error(send: Send, err: APIError) -> None:
    import json

    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers().items()]
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(StarletteHTTPException):
    """An HTTPException so that FastAPI's body reader passes it through unchanged (it turns any other error
    raised while reading into a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: refused from Content-Length up front, and otherwise counted chunk by
    chunk as the route reads them, so a chunked upload is cut off without being buffered in full."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> APIError:
        return APIError(413, f"request body is larger than the limit of {self.max_bytes} bytes",
                        code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_error(send, APIError(400, "invalid Content-Length header", code="invalid_header"))
                    return
                if declared > self.max_bytes:
                    await send_error(send, self._error())
                    return
        if scope.get("method") == "POST":
            _json_content_type(scope)
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await send_error(send, self._error())


def _json_content_type(scope: Scope) -> None:
    """Every POST body here is JSON. ``curl -d`` labels it form-encoded, and FastAPI would then refuse it as
    "not an object"; relabel missing or form content types so the body is parsed (and validated) as JSON."""
    headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
    ctype = next((v for k, v in scope.get("headers", []) if k == b"content-type"), b"")
    if not ctype or ctype.split(b";")[0].strip().lower() in (b"application/x-www-form-urlencoded", b"text/plain"):
        scope["headers"] = [*headers, (b"content-type", b"application/json")]


def matched_route_path(router: Router, scope: Scope) -> str | None:
    """The path template of the route the app will dispatch ``scope`` to (None: no route). Judged the way the
    router judges it, so neither the Host header nor an unusual raw path can make a private route look public."""
    for route in router.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", None)
    return None


class AuthMiddleware:
    """Bearer-key auth on every route except ``public`` ones (by matched route path). Unmatched paths need the
    key too, so probing for routes without one learns nothing."""

    def __init__(self, app: ASGIApp, router: Router, api_key: str | None, public: frozenset[str]) -> None:
        self.app = app
        self.router = router
        self._key = api_key.encode() if api_key else None
        self.public = public

    def _authorized(self, scope: Scope) -> bool:
        assert self._key is not None
        supplied = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                supplied = value
                break
        scheme, _, token = supplied.partition(b" ")
        if scheme.lower() != b"bearer":
            token = b""
        # compare_digest on equal-purpose bytes: time does not depend on where the first difference is.
        return hmac.compare_digest(token.strip(), self._key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._key is None:
            await self.app(scope, receive, send)
            return
        path = matched_route_path(self.router, scope)
        if (path is not None and path in self.public) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await send_error(send, APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                        code="invalid_api_key"))
