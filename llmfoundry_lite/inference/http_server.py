"""uvicorn (h11), with the two guards a public endpoint needs and uvicorn lacks.

- A deadline for each whole request: its headers and body must arrive within `client_timeout_s` of
  its first chance (the connection opening, or the previous answer on a kept-alive connection).
  uvicorn's only timeout is for idle kept-alive connections, so a client trickling a byte every few
  seconds would hold its connection forever. Past the deadline the connection is closed, after a 408
  if part of a request had arrived; the application, if it was reading the body, sees a disconnect.
- A bound on open connections: one over `max_connections` gets a 503 at once and is closed.
  (uvicorn's `limit_concurrency` counts only requests whose headers have arrived.)
Both live in one place, `_GuardedH11`, a subclass of uvicorn's h11 protocol. The refusals h11 itself
makes (a garbled request line, oversized headers) are JSON too.
"""
from __future__ import annotations

import json
import socket
import threading
from typing import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)  # h11's states of a client whose request has fully arrived


def raw_response(status: int, payload: dict) -> bytes:
    """A whole HTTP response with a JSON body, for a connection about to be closed."""
    body = json.dumps(payload).encode()
    reason = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}[status]
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, reason, len(body), body))


def guarded_protocol(client_timeout_s: float, max_connections: int, error: Callable[[int, str, str], dict]):
    """The protocol class for `uvicorn.Config(http=...)`; `error(status, field, message)` shapes a JSON error."""
    late = raw_response(408, error(408, "body", f"the request did not arrive within {client_timeout_s:g}s"))
    busy = raw_response(503, error(503, "connection", "server busy: too many open connections; retry later"))

    class _GuardedH11(H11Protocol):
        _deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(busy)
                transport.close()
            else:
                self._arm()

        def _arm(self):
            self._disarm()
            self._deadline = self.loop.call_later(client_timeout_s, self._too_late)

        def _disarm(self):
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_late(self):
            self._deadline = None
            if self.transport.is_closing() or self.conn.their_state in RECEIVED:
                return
            started = self.conn.their_state is not h11.IDLE or self.conn.trailing_data[0]
            answering = self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete
            if started and not answering:
                self.transport.write(late)
            self.transport.close()  # a connection that never sent a byte of its request is just closed

        def handle_events(self):
            super().handle_events()
            if self.conn.their_state in RECEIVED:
                self._disarm()

        def on_response_complete(self):
            received = self.conn.their_state in RECEIVED
            super().on_response_complete()
            if not received:  # answered before its body arrived (401, 413, ...): the rest is not waited for
                self._disarm()
                self.transport.close()
            elif not self.transport.is_closing():
                self._arm()  # the next request on this connection has its own deadline

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str):
            self.transport.write(raw_response(400, error(400, "request", f"malformed HTTP request: {msg}")))
            self.transport.close()

    return _GuardedH11


class EndpointServer:
    """An ASGI app served by uvicorn on a socket bound at construction (port 0: a free port, read from
    `server_address`). `serve_forever()` blocks; `shutdown()` (from another thread) stops it."""

    def __init__(self, app, host: str, port: int, protocol, quiet: bool = False):
        # IPPROTO_TCP named, not 0: asyncio turns Nagle's algorithm off only on sockets that say TCP, and
        # with it on, a kept-alive connection waits 40 ms (delayed ACK) for each answer's second packet
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                                    socket.IPPROTO_TCP)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(1024)
        self.server_address = self.socket.getsockname()
        logging = {"log_config": None, "log_level": "warning", "access_log": False} if quiet else {}
        self.server = uvicorn.Server(uvicorn.Config(app, http=protocol, lifespan="off", timeout_graceful_shutdown=5,
                                                    **logging))
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def open_connections(self) -> int:
        return len(self.server.server_state.connections)

    def shutdown(self) -> None:
        self.server.should_exit = True
        self._stopped.wait(30)

    def server_close(self) -> None:
        self.socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server_close()
