"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the right status.

`APIError` is what the routes raise; `from_engine_error` maps the engine's exceptions (bad input 400,
prompt too long 413, queue full 429 with Retry-After, engine dead 503); `install_error_handlers` makes
validation errors 400 and every other failure an OpenAI-shaped body. (A body over the size limit is
refused before the app by server/body_limit.py.)
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from atv_core.engine.async_engine import EngineDead, PromptTooLong, QueueFull
from atv_core.engine.request import InvalidRequest

from .settings import pydantic_message

log = logging.getLogger("atv.server")

RETRY_AFTER_S = 1
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable", 504: "timeout_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_engine_error(exc: BaseException, prompt_param: str = "prompt") -> APIError:
    """Map an exception raised by AsyncEngine.submit / encode to its HTTP error (`prompt_param`: the request
    field that carried the prompt, "messages" for a chat)."""
    if isinstance(exc, PromptTooLong):
        return APIError(413, str(exc), prompt_param, "context_length_exceeded")
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), prompt_param if exc.field == "prompt" else exc.field)
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    if isinstance(exc, QueueFull):
        return APIError(429, f"{exc}; retry in {RETRY_AFTER_S} s", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineDead):
        return APIError(503, f"the engine is not running: {exc}", code="engine_dead")
    log.error("unexpected engine error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


def _is_field(part) -> bool:
    """Field names and list indices, not pydantic's union-branch tags ('str', 'list[constrained-str]', 'TextPart')."""
    text = str(part)
    return text != "body" and not (set(text) & set("-[") or text in _TYPE_TAGS or text[:1].isupper())


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    # a type mismatch in one union branch says less than the constraint another branch broke
    errors = sorted(exc.errors(), key=lambda e: str(e.get("type", "")).endswith("_type"))
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc, kind = tuple(first.get("loc", ())), first.get("type", "")
    if kind == "json_invalid":   # loc: ("body", character offset)
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        return f"the body is not valid JSON{where}: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if loc == ("body",) and kind != "value_error":   # no body, or not a JSON object (a list, a form body)
        return ("the body must be a JSON object sent with Content-Type: application/json, "
                f"with the fields of this endpoint ({first.get('msg', 'invalid')})"), None
    param = ".".join(str(part) for part in loc if _is_field(part)) or None
    message = pydantic_message(first)
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"{param + ': ' if param else ''}{message}{more}", param


class CatchAll:
    """Pure ASGI middleware (the innermost): an unexpected exception becomes the OpenAI-style 500 here, logged
    once. Left to Starlette's outermost ServerErrorMiddleware, the 500 would be sent and the exception raised
    again, so that uvicorn logs it a second time and drops the keep-alive connection, failing the client's next
    request on it. An exception after the response has started is raised on (nothing valid can follow)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def note(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, note)
        except Exception as exc:
            if started:
                raise
            await internal_error(scope["method"], scope["path"], exc).response()(scope, receive, send)


def internal_error(method: str, path: str, exc: Exception) -> APIError:
    """An unexpected exception: logged with its traceback, answered as a 500 that names only its type."""
    log.error("unhandled error on %s %s", method, path, exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(400, message, param, "invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(request.method, request.url.path, exc).response()
