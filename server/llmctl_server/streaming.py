"""The SSE response: written with a deadline per write, so a client that stopped reading cannot hold a request.

uvicorn already applies backpressure: once the connection's write buffer is full, ``send`` waits for the client.
Without a deadline a stalled client kept its request running (and its KV blocks) for as long as it kept the socket
open. Here a write that waits longer than ``--stream-write-timeout`` aborts the request in the engine (its blocks
are freed at once) and drops the connection, so nothing the stream buffered stays behind.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

logger = logging.getLogger("llmctl_server")

# Where connections.py puts the connection's ``abort`` in the request scope (an ASGI scope extension).
CONNECTION_EXTENSION = "llmctl.connection"


def connection_abort(scope: Scope) -> Callable[[], None] | None:
    ext = (scope.get("extensions") or {}).get(CONNECTION_EXTENSION) or {}
    abort = ext.get("abort")
    return abort if callable(abort) else None


class GuardedStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` whose every write must complete within ``write_timeout`` seconds."""

    def __init__(self, content: AsyncIterator[str], *, write_timeout: float | None, on_stalled: Any,
                 request_id: str, **kw: Any) -> None:
        super().__init__(content, **kw)
        self.write_timeout = write_timeout
        self.on_stalled = on_stalled  # async callable: abort the request in the engine
        self.request_id = request_id
        self._scope: Scope = {}
        self.stalled = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._scope = scope
        await super().__call__(scope, receive, send)

    async def _send_within(self, send: Send, message: dict[str, Any]) -> bool:
        if self.write_timeout is None:
            await send(message)
            return True
        with anyio.move_on_after(self.write_timeout):
            await send(message)
            return True
        return False

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            data = chunk if isinstance(chunk, (bytes, memoryview)) else chunk.encode(self.charset)
            if not await self._send_within(send, {"type": "http.response.body", "body": data, "more_body": True}):
                await self._stalled()
                return
        if not await self._send_within(send, {"type": "http.response.body", "body": b"", "more_body": False}):
            await self._stalled()

    async def _stalled(self) -> None:
        self.stalled = True
        logger.warning("request %s: the client read nothing for %.1fs (--stream-write-timeout); aborting it",
                       self.request_id, self.write_timeout)
        await self.on_stalled()
        aclose = getattr(self.body_iterator, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()
        abort = connection_abort(self._scope)
        if abort is not None:
            abort()  # drop the socket and what is buffered for it; the client is not reading anyway
