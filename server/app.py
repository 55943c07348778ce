"""The HTTP server: `create_app(async_engine, settings, metrics)` builds the FastAPI app (no import-time
side effects, nothing global: tests build their own), and `cli(argv)` is `atv serve`.

Routes: /v1/* (server/openai_api.py) and vLLM's POST /tokenize and /detokenize (server/tokenize_api.py), behind
the API key when one is set, and the open probes
GET /health (liveness: 503 once the engine loop died), GET /ready (200 only when loaded, warmed and not
draining), GET /metrics (Prometheus), GET /version. Two pure ASGI middlewares: the outer counts /v1 responses by status
and the in-flight requests that a SIGTERM drain waits for; the inner refuses a body over max_body_bytes
before reading it (server/body_limit.py). Loading, warm-up and the drain live in server/lifecycle.py.
Nothing here blocks the event loop: tokenizing, detokenizing and the engine run on the AsyncEngine's threads.
"""
from __future__ import annotations

import asyncio
import logging
import sys

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response

from .body_limit import BodyLimit
from .errors import CatchAll, install_error_handlers
from .metrics import Metrics
from .openai_api import api_router
from .settings import Settings, parse_settings
from .state import ServingState
from .tokenize_api import tokenize_router

log = logging.getLogger("atv.server")

# The engine thread runs long stretches of Python between torch kernels; the event loop needs the GIL often and
# briefly. At CPython's default 5 ms switch interval every loop wake-up can wait up to 5 ms (a convoy that
# slows reading request bodies and answering probes under load); 1 ms keeps the loop responsive.
GIL_SWITCH_INTERVAL_S = 0.001


def create_app(async_engine=None, settings: Settings | None = None, metrics: Metrics | None = None) -> FastAPI:
    """An app serving `async_engine` (a started, warmed AsyncEngine), or one still loading when it is None
    (then `app.state.atv.attach(engine)` makes it ready)."""
    settings = settings or Settings()
    state = ServingState(settings, metrics or Metrics(model_name=settings.model_id, vllm=settings.vllm_metrics))
    app = FastAPI(title="ATV", version="0.1.0", summary="OpenAI-compatible serving with per-request "
                  "Adaptive Task Vector steering (extension field `atv`)")
    app.state.atv = state
    install_error_handlers(app)
    app.add_middleware(CatchAll)   # added first: the innermost, right around the routes
    app.add_middleware(BodyLimit, state=state)
    app.add_middleware(APIAccounting, state=state)  # added last: the outer one, so it counts the 413s too
    app.include_router(probe_router(state))
    app.include_router(api_router(state))
    app.include_router(tokenize_router(state))
    if async_engine is not None:
        state.attach(async_engine)
    return app


def probe_router(state: ServingState) -> APIRouter:
    router = APIRouter()

    @router.api_route("/health", methods=["GET", "HEAD"])   # HEAD: the same status, no body (load balancers)
    async def health() -> JSONResponse:
        if state.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "dead", "error": state.engine.error}, status_code=503)

    @router.api_route("/ready", methods=["GET", "HEAD"])
    async def ready() -> JSONResponse:
        status = state.readiness()
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    @router.get("/version")   # as vLLM's: the server's package version
    async def version() -> JSONResponse:
        return JSONResponse({"version": _version()})

    @router.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    return router


class APIAccounting:
    """Pure ASGI middleware: atv_http_requests_total{status} for /v1 paths, and the count of in-flight
    /v1 POSTs (a stream counts until its last byte). 499: the client left before any response."""

    def __init__(self, app, state: ServingState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 499
        counted = 1 if scope["method"] == "POST" else 0

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.state.in_flight += counted
        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            status = 500 if status == 499 else status
            raise
        finally:
            self.state.in_flight -= counted
            self.state.metrics.http_requests.labels(str(status)).inc()


# ---- atv serve ----------------------------------------------------------------------------------
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("atv-serve")
    except PackageNotFoundError:   # run from a source tree that was not installed
        return "unknown"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cli(argv: list[str] | None = None) -> int:
    """`atv serve [flags]`: listen at once, load and warm up, serve until SIGTERM, drain, exit 0."""
    from .lifecycle import DrainingServer, fit_threads_to_cpu_quota, serve

    settings = parse_settings(argv)
    configure_logging(settings.log_level)
    fit_threads_to_cpu_quota()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    app = create_app(None, settings)
    config = uvicorn_config(app, settings)
    server = DrainingServer(config, app.state.atv, settings.drain_timeout)
    log.info("loading target %s (generator %s, device %s, dtype %s); listening on http://%s:%d meanwhile",
             settings.model, settings.generator, settings.device, settings.dtype, settings.host, settings.port)
    return asyncio.run(serve(server, settings))


def uvicorn_config(app: FastAPI, settings: Settings):
    import uvicorn

    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                          access_log=False, timeout_graceful_shutdown=5, lifespan="off")
