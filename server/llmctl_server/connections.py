"""uvicorn's h11 protocol plus the connection limits it lacks: a header-read timeout and an idle cap per client.

uvicorn closes a keep-alive connection that stays idle after a response (``timeout_keep_alive``), but a
connection that never sends a request, or sends half a header (``GET /heal`` and nothing more: slowloris), stays
open forever. Here every connection must deliver a complete request header within ``header_read_timeout`` seconds
of opening or of its previous response, and one client address keeps at most ``max_idle_per_client`` idle
connections (the longest-idle one is closed beyond that). The request scope also gets the connection's ``abort``
(``streaming.CONNECTION_EXTENSION``), so a stream whose client stopped reading can drop its socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from llmctl_server.streaming import CONNECTION_EXTENSION


class _IdleRegistry:
    """Idle connections per client address, oldest first."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.by_client: dict[str, collections.OrderedDict[int, Any]] = {}

    def idle(self, proto: Any) -> None:
        host = proto.client[0] if proto.client else ""
        conns = self.by_client.setdefault(host, collections.OrderedDict())
        conns[id(proto)] = proto
        conns.move_to_end(id(proto))
        while len(conns) > self.cap:
            # Longest-idle first, preferring connections that have been served already (idle keep-alive) over
            # fresh ones, which are most likely about to send their first request.
            key = next((k for k, p in conns.items() if p.llmctl_served), next(iter(conns)))
            conns.pop(key).close_idle()

    def busy(self, proto: Any) -> None:
        host = proto.client[0] if proto.client else ""
        conns = self.by_client.get(host)
        if conns is not None:
            conns.pop(id(proto), None)
            if not conns:
                del self.by_client[host]


def protocol_class(header_read_timeout: float | None, max_idle_per_client: int) -> type[H11Protocol]:
    """An ``H11Protocol`` subclass bound to these limits (uvicorn's ``Config(http=...)`` takes a class)."""

    class LimitedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            registry = getattr(self.server_state, "llmctl_idle", None)
            if registry is None:
                registry = _IdleRegistry(max_idle_per_client)
                self.server_state.llmctl_idle = registry  # type: ignore[attr-defined]
            self._idle_registry: _IdleRegistry = registry
            self._header_timer: asyncio.TimerHandle | None = None
            self.llmctl_served = False  # has completed a response (an idle keep-alive connection, not a fresh one)

        # -- state changes ------------------------------------------------------------------------------------
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._between_requests()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            self._idle_registry.busy(self)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            super().data_received(data)
            self._maybe_started(before)

        def on_response_complete(self) -> None:
            before = self.cycle
            super().on_response_complete()
            if self.transport.is_closing():
                return
            self.llmctl_served = True
            if not self._maybe_started(before):
                self._between_requests()

        # -- helpers --------------------------------------------------------------------------------------------
        def _maybe_started(self, before: Any) -> bool:
            """A new request cycle means its header is complete: stop the header clock, mark the connection busy."""
            if self.cycle is None or self.cycle is before:
                return False
            self._cancel_header_timer()
            self._idle_registry.busy(self)
            self.cycle.scope.setdefault("extensions", {})[CONNECTION_EXTENSION] = {"abort": self.transport.abort}
            return True

        def _between_requests(self) -> None:
            self._cancel_header_timer()
            if header_read_timeout is not None:
                self._header_timer = self.loop.call_later(header_read_timeout, self._header_timeout)
            self._idle_registry.idle(self)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:
                self.close_idle()

        def close_idle(self) -> None:
            """Close a connection that has no request in progress (nothing is cut)."""
            if self.cycle is not None and not self.cycle.response_complete:
                return
            self._cancel_header_timer()
            if not self.transport.is_closing():
                with contextlib.suppress(Exception):
                    self.transport.close()

    return LimitedH11Protocol
