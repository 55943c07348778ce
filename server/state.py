"""What every route of one app shares: the engine (None while loading), settings, metrics, readiness,
draining, in-flight requests. One `ServingState` per app (app.state.atv); nothing module-global.
"""
from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

from fastapi import Request

from .errors import APIError
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("atv.server")


@dataclass(frozen=True)
class Preset:
    """A steering preset served as a model id: <base> (the server default), <base>:off, <base>:atv,
    <base>:vector/<name>. An explicit `atv` field in a request wins over it."""
    id: str
    mode: str | None = None       # None: the server default (atv with a generator, else off)
    vector: str | None = None


class ServingState:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.engine = None            # AsyncEngine once loaded and warmed
        self.draining = False         # set by SIGTERM: refuse new work, finish what runs
        self.in_flight = 0            # /v1 POSTs not yet answered (streams: until their last byte)
        self.jobs: set = set()        # running server.jobs.Job objects (stopped on drain timeout)
        self.started = int(time.time())
        self.sampling_defaults: dict = {}   # request fields left out -> the model's (--generation-config auto)
        self.default_max_tokens: int | None = None   # max_tokens left out (chat) -> the generation config's
        self.max_tokens_cap: int | None = None       # --override-generation-config's max_new_tokens: every request

    def attach(self, async_engine) -> None:
        """The engine is loaded and warmed: serve it."""
        self.metrics.bind(async_engine)
        defaults = dict(async_engine.sampling_defaults) if self.settings.generation_config == "auto" else {}
        override = self.settings.override_generation_config or {}
        defaults.update(override)   # vLLM: merged over the model's (auto), alone (vllm)
        self.default_max_tokens = defaults.pop("max_new_tokens", None)
        self.max_tokens_cap = override.get("max_new_tokens")
        if (self.default_max_tokens or 0) > self.settings.max_tokens:
            log.warning("the generation config's max_new_tokens %d is above --max-tokens %d: requests get at most %d",
                        self.default_max_tokens, self.settings.max_tokens, self.settings.max_tokens)
        self.sampling_defaults = defaults
        if defaults or self.default_max_tokens:
            log.info("fields a request leaves out default to the generation config (%s%s): %s%s",
                     "the model's" if self.settings.generation_config == "auto" else "--generation-config vllm",
                     ", --override-generation-config" if override else "", defaults,
                     f", max_tokens {self.default_max_tokens}" if self.default_max_tokens else "")
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

    def presets(self) -> list[Preset]:
        """Every model id this server answers to (GET /v1/models), the base id first."""
        base = self.settings.model_id
        found = [Preset(base), Preset(f"{base}:off", "off")]
        if self.engine is not None and self.engine.has_generator:
            found.append(Preset(f"{base}:atv", "atv"))
        names = self.engine.vector_names() if self.engine is not None else []
        return found + [Preset(f"{base}:vector/{name}", "vector", name) for name in names]

    def admit(self, model: str | None) -> tuple[object, Preset]:
        """The engine and the preset for a new request, or the reason it cannot have them (503 / 404).
        The model id is matched whole against the listed ids (the base id may itself contain ':')."""
        status = self.readiness()
        if status != "ready":
            raise APIError(503, f"the server is {status}; retry later", code=f"server_{status}",
                           headers={"Retry-After": "1"})
        presets = self.presets()
        if model is None:
            return self.engine, presets[0]
        for preset in presets:
            if preset.id == model:
                return self.engine, preset
        raise APIError(404, f"model {model!r} does not exist; this server serves {self.settings.model_id!r} and "
                       "its steering presets (see GET /v1/models)", "model", "model_not_found")

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
