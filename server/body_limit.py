"""Pure ASGI middleware: a request body over the limit (`max_body_bytes`) gets HTTP 413 before it is read.

A declared Content-Length over the limit is refused before any byte of the body is read; a body sent without
one (chunked) is counted as it arrives and refused as soon as the count passes the limit. Either way the
app never parses it, and its own answer to the cut body is replaced by the 413 (an OpenAI error body). The
413 says `Connection: close`, so the server closes the connection instead of reading the rest (clients such
as httpx read the answer when their upload is cut short). Knows nothing of routes or the engine.
"""
from __future__ import annotations

import json
import logging

from .errors import error_body

log = logging.getLogger("atv.server")


class BodyTooLarge(Exception):
    """Raised into the app by `receive` once the body passed the limit."""


class BodyLimit:
    def __init__(self, app, state):
        self.app, self.state = app, state   # state.settings.max_body_bytes is read per request

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.state.settings.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await refuse(send, limit)
            return
        received, cut, started = 0, False, False

        async def counted_receive():
            nonlocal received, cut
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    cut = True
                    raise BodyTooLarge(f"body over {limit} bytes")
            return message

        async def send_unless_cut(message) -> None:
            nonlocal started
            if cut:  # the app answering a body it did not get whole (a parse error): the 413 replaces it
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, send_unless_cut)
        except Exception as exc:
            if not cut:
                raise
            log.debug("app stopped by the body limit: %r", exc)
        if cut and not started:
            await refuse(send, limit)


async def refuse(send, limit: int) -> None:
    body = json.dumps(error_body(413, f"request body is over this server's limit of {limit} bytes; send a "
                                 "smaller request (setting max_body_bytes)", code="body_too_large")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _content_length(scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
