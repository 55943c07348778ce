"""`AsyncEngine`: an `LLMEngine` on its own thread, with an asyncio bridge so nothing blocks the event loop."""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from typing import AsyncIterator

from atv_core.engine.llm_engine import EngineDead, LLMEngine
from atv_core.engine.request import Request, RequestOutput, SamplingParams, SteeringSpec
from atv_core.engine.scheduler import QueueFull

log = logging.getLogger("atv.engine")


class AsyncEngine:
    """Runs an LLMEngine on its own thread; `generate()` is an async iterator of RequestOutput."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._pending = 0   # requests handed to the thread but not yet in its scheduler
        self._lock = threading.Lock()
        self.error: str | None = None
        self.num_running = 0
        self.num_waiting = 0

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "AsyncEngine":
        self._thread = threading.Thread(target=self._loop, name="atv-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def has_work(self) -> bool:
        return self._pending > 0 or self.num_running > 0 or self.num_waiting > 0

    # ---- requests -------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, steering: SteeringSpec,
                       prompt_text: str = "", request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        if not self.is_alive:
            raise EngineDead(self.error or "engine is not running")
        request_id = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request = Request(request_id, list(prompt_ids), params, steering, prompt_text,
                          on_output=lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
        self.engine.validate(request)
        with self._lock:
            if self.num_waiting + self._pending >= self.engine.config.max_waiting:
                raise QueueFull(f"waiting queue is full ({self.engine.config.max_waiting} requests)")
            self._pending += 1
        self._inbox.put(("add", request))
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:  # the consumer went away (client disconnect, timeout): stop generating
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # ---- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if self.engine.has_work():
                    self.engine.step()  # outputs reach each request's on_output callback
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
                self.num_running = len(self.engine.scheduler.running)
                self.num_waiting = len(self.engine.scheduler.waiting)
        except Exception as exc:  # unrecoverable: report it, fail everything in flight
            log.exception("engine loop died")
            self.error = f"{type(exc).__name__}: {exc}"
            self._fail_all(self.error)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._lock:
                    self._pending -= 1
                try:
                    self.engine.add_request(item)
                except (ValueError, QueueFull) as exc:
                    item.finish("error", str(exc))
                    self.engine._emit(item, [], None)
            else:
                self.engine.abort(item)

    def _fail_all(self, reason: str) -> None:
        pending = []
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                pending.append(item)
        for request in (*self.engine.scheduler.running, *self.engine.scheduler.waiting, *pending):
            request.finish("error", f"engine failed: {reason}")
            self.engine._emit(request, [], None)
