"""The process around the app: load the models, warm up, listen, and drain on SIGTERM.

    serve(app, settings):  uvicorn listens at once (/health 200, /ready 503 "loading")
                           -> target + generator load on a thread -> one short warm-up request
                           -> state.attach(engine): /ready 200
    SIGTERM / SIGINT:      /ready and new requests 503 -> in-flight requests finish (up to drain_timeout;
                           then they are stopped with 503 / an error event) -> uvicorn stops -> exit 0.
                           A second signal stops at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path

import uvicorn

from .settings import Settings
from .state import ServingState

log = logging.getLogger("atv.server")

WARMUP_PROMPT = "Hello"


# ---- loading ------------------------------------------------------------------------------------
def fit_threads_to_cpu_quota(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """Cap torch's threads at the container's CPU quota (rounded down, at least 1) unless OMP_NUM_THREADS is set.

    torch starts one thread per core it can see, but a CPU quota (`docker run --cpus`, a Kubernetes CPU limit)
    is not a core count: with more threads than the quota allows, every step's barriers wait for throttled
    threads (deploy/README.md measures 474 s vs 51 s for oversubscribed threads). cgroup v2 only (cpu.max);
    returns the new count."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        quota, period = cpu_max.read_text().split()[:2]
        threads = max(1, int(quota) // int(period))
    except (OSError, ValueError):   # no cgroup v2 file, or "max" (no quota)
        return None
    if threads >= torch.get_num_threads():
        return None
    log.info("CPU quota of %s cores (%s): torch threads %d -> %d (set OMP_NUM_THREADS to choose)",
             f"{int(quota) / int(period):g}", cpu_max, torch.get_num_threads(), threads)
    torch.set_num_threads(threads)
    return threads


def load_engine(settings: Settings):
    """Target, generator, engine thread started. Runs on a worker thread (blocking, seconds to minutes)."""
    from atv_core.engine.build import build_engine
    from atv_core.engine.async_engine import AsyncEngine
    from atv_core.engine.llm_engine import EngineConfig

    kv_bytes = int(settings.kv_cache_gib * 2**30) if settings.kv_cache_gib else None
    config = EngineConfig(max_running=settings.max_running, max_waiting=settings.max_waiting,
                          max_num_batched_tokens=settings.max_num_batched_tokens, max_model_len=settings.max_model_len,
                          block_size=settings.block_size, kv_cache_bytes=kv_bytes,
                          kv_cache_fraction=settings.kv_cache_fraction, long_prompt_tokens=settings.long_prompt_tokens,
                          long_prefill_chunk=settings.long_prefill_chunk,
                          enable_prefix_caching=settings.enable_prefix_caching,
                          generator_worker=settings.generator_worker, generator_threads=settings.generator_threads,
                          cpu_decode_kernel=settings.cpu_decode_kernel)
    engine = build_engine(settings.model, settings.generator, device=settings.device, dtype=settings.dtype,
                          device_map=settings.device_map, config=config, vectors=settings.vectors,
                          chat_template=settings.chat_template)
    return AsyncEngine(engine).start()


async def warm_up(async_engine) -> None:
    """One short request through every path a request takes (the generator too, when present)."""
    from atv_core.engine.request import SamplingParams, SteeringSpec

    ids = await async_engine.encode(WARMUP_PROMPT)
    mode = "atv" if async_engine.has_generator else "off"
    start = time.perf_counter()
    async for out in async_engine.generate(ids, SamplingParams(max_tokens=2, temperature=0.0),
                                           SteeringSpec(mode), prompt_text=WARMUP_PROMPT, request_id="warmup"):
        if out.finish_reason == "error":
            raise RuntimeError(f"warm-up request failed: {out.error}")
    log.info("warm-up (%s) done in %.2f s", mode, time.perf_counter() - start)


def _on_daemon_thread(fn, *args) -> asyncio.Future:
    """Run fn on a daemon thread (a load still running at exit does not hold the process)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def target():
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # handed to the awaiting coroutine
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(_settle, future, result, error)

    threading.Thread(target=target, name="atv-load", daemon=True).start()
    return future


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# ---- serving ------------------------------------------------------------------------------------
class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of closing the listener, and which does
    not re-raise the signal afterwards (uvicorn does), so a drained shutdown exits 0."""

    def __init__(self, config: uvicorn.Config, state: ServingState, drain_timeout: float):
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self.drain_deadline: float | None = None
        self._drain_logged = False

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        """Signal handler: only flags (logging happens in on_tick)."""
        if self.drain_deadline is None:
            self.state.draining = True
            self.drain_deadline = time.monotonic() + self.drain_timeout
        elif self.should_exit:   # already stopping (uvicorn's graceful shutdown): another signal cuts it short
            self.force_exit = True
        else:   # a second signal: the drain ends now; the next tick stops what is left (503 / error event), exits
            self.drain_deadline = 0.0

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            self._drain_step()
        return await super().on_tick(counter)

    def _drain_step(self) -> None:
        if not self._drain_logged:
            self._drain_logged = True
            log.info("signal received: draining %d in-flight requests (up to %g s)", self.state.in_flight,
                     self.drain_timeout)
        if self.state.in_flight == 0:
            log.info("drained; shutting down")
            self.should_exit = True
        elif time.monotonic() > self.drain_deadline:
            log.warning("%s: stopping %d requests", "second signal" if self.drain_deadline == 0.0 else "drain timeout",
                        len(self.state.jobs))
            self.state.stop_all("shutdown")
            self.should_exit = True


async def _listen(server: DrainingServer, settings: Settings) -> None:
    try:
        await server.serve()
    except SystemExit:   # uvicorn exits when it cannot bind; it has logged why (e.g. the address is in use)
        log.error("could not listen on %s:%d; exiting (free the port, or pick another with --port / ATV_PORT)",
                  settings.host, settings.port)


async def serve(server: DrainingServer, settings: Settings) -> int:
    """Listen at once, load and warm up meanwhile; 0 after a clean (drained) stop, 1 when loading or listening
    failed."""
    listening = asyncio.create_task(_listen(server, settings))
    loading = _on_daemon_thread(load_engine, settings)
    await asyncio.wait({listening, loading}, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():  # stopped (or failed to bind) while loading
        loading.cancel()
        await listening
        return 0 if server.started else 1
    from atv_core.engine.build import LoadError

    engine = None
    try:
        engine = loading.result()
        await warm_up(engine)
    except Exception as exc:
        if isinstance(exc, LoadError):   # most likely the user's to fix: one line, the traceback at debug level
            log.error("could not start: %s (--log-level debug shows the traceback)", exc)
            log.debug("what failed to load", exc_info=True)
        else:
            log.exception("could not load %s; exiting", settings.model)
        if engine is not None:
            engine.shutdown()
        server.should_exit = True
        await listening
        return 1
    server.state.attach(engine)
    log.info("ready: serving %s at http://%s:%d (max_running %d, max_waiting %d, max_model_len %d)",
             settings.model_id, settings.host, settings.port, settings.max_running, settings.max_waiting,
             engine.limits.max_model_len)
    await listening
    engine.shutdown()
    return 0 if server.started else 1
