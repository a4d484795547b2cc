"""What the server takes on: request bodies up to a size (checked before parsing) and choices in
flight up to the running batch plus a bounded queue (more -> 429 with Retry-After)."""

from __future__ import annotations

import math

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import Overloaded, PayloadTooLarge


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is refused from its Content-Length before any of it
    is read, or, sent without one, as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, limit: int, reject) -> None:
        self.app, self.limit = app, limit
        self.reject = reject  # (scope, receive, send, PayloadTooLarge) -> sends the error response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self.reject(scope, receive, send, PayloadTooLarge(self.limit))
        received, over = 0, False

        async def counted() -> dict:
            nonlocal received, over
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                over = True
                raise PayloadTooLarge(self.limit)
            return message

        async def unless_over(message: dict) -> None:  # what the app answers to the failed read is ours to say
            if not over:
                await send(message)

        try:
            await self.app(scope, counted, unless_over)
        except Exception:
            if not over:
                raise
        if over:
            await self.reject(scope, receive, send, PayloadTooLarge(self.limit))


class Admission:
    """Counts the choices in flight (admitted, not yet finished), for both engines alike."""

    def __init__(self, batch: int, queue: int) -> None:
        self.batch, self.capacity = batch, batch + queue
        self.in_flight = 0

    def acquire(self, n: int) -> None:
        if self.in_flight + n > self.capacity:
            waiting = max(self.in_flight - self.batch, 0)
            # a rough wait: one batch's worth of work per second of retry, at least 1 s, at most 60
            retry = min(60, max(1, math.ceil(waiting / self.batch)))
            raise Overloaded(f"the server is at capacity ({self.in_flight} sequences in flight, {waiting} waiting); "
                             f"retry after {retry} s", retry)
        self.in_flight += n

    def release(self, n: int) -> None:
        self.in_flight -= n
