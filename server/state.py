"""What every route of one app shares: the engine (None while loading), settings, metrics, readiness,
draining, in-flight requests. One `ServingState` per app (app.state.atv); nothing module-global.
"""
from __future__ import annotations

import secrets
import time

from fastapi import Request

from .errors import APIError
from .metrics import Metrics
from .settings import Settings


class ServingState:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.engine = None            # AsyncEngine once loaded and warmed
        self.draining = False         # set by SIGTERM: refuse new work, finish what runs
        self.in_flight = 0            # /v1 POSTs not yet answered (streams: until their last byte)
        self.jobs: set = set()        # running server.jobs.Job objects (stopped on drain timeout)
        self.started = int(time.time())

    def attach(self, async_engine) -> None:
        """The engine is loaded and warmed: serve it."""
        self.metrics.bind(async_engine)
        self.engine = async_engine

    @property
    def alive(self) -> bool:
        """Liveness: false only once the engine loop has died (loading counts as alive)."""
        return self.engine is None or self.engine.error is None

    def readiness(self) -> str:
        if self.draining:
            return "draining"
        if self.engine is None:
            return "loading"
        return "ready" if self.engine.is_alive else "dead"

    def admit(self, model: str | None):
        """The engine for a new request, or the reason it cannot have one (503 / 404)."""
        status = self.readiness()
        if status != "ready":
            raise APIError(503, f"the server is {status}; retry later", code=f"server_{status}",
                           headers={"Retry-After": "1"})
        if model is not None and model != self.settings.model_id:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.settings.model_id!r} "
                           "(see GET /v1/models)", "model", "model_not_found")
        return self.engine

    def check_api_key(self, request: Request) -> None:
        """FastAPI dependency of /v1: 'Authorization: Bearer KEY' when ATV_API_KEY is set."""
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                     key.get_secret_value().encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def stop_all(self, reason: str) -> None:
        for job in list(self.jobs):
            job.stop(reason)
