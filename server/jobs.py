"""One HTTP request in the engine: a `Job` runs its choices (one engine request each) and merges their outputs.

    job.start(http_request)  submit every choice; APIError if the engine refuses one (nothing keeps running)
    job.events()             (choice, RequestOutput) as the engine produces them, until every choice finished;
                             raises JobStopped when stop() cut it short
    job.stop(reason)         abort what still runs: "disconnect", "timeout", "shutdown", "failed"
    job.close()              always, once: abort leftovers, count them, write the request's log line

Each choice is consumed by its own task (a pump) that forwards outputs to one queue. Cancelling a pump
closes its `AsyncEngine.generate()` iterator, which aborts the request in the engine (its KV row and vector
slot are freed within one step). A disconnect watcher and a timer call stop(). Per-request metrics (TTFT,
inter-token latency, end to end, tokens, finish reasons) are recorded here as outputs arrive.
This module knows no response format (server/formatting.py) and no routes (server/openai_api.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from atv_core.engine.request import RequestOutput, SamplingParams, SteeringSpec, TokenLogprob

from .errors import APIError, from_engine_error
from .metrics import Metrics

log = logging.getLogger("atv.request")

DISCONNECT_POLL_S = 0.2


@dataclass
class Choice:
    """One engine request of a job and everything it produced."""
    index: int
    prompt_index: int
    prompt_ids: list[int]
    prompt_text: str               # what the generator reads
    params: SamplingParams
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    steering: dict | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    refusal: Exception | None = None   # raised by the engine at admission
    queue_time_s: float | None = None  # arrival in the engine -> admission into a prefill

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def absorb(self, out: RequestOutput) -> None:
        self.text += out.text_delta
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.completion_tokens = out.completion_tokens
        self.steering = out.steering or self.steering
        self.queue_time_s = out.queue_time_s if out.queue_time_s is not None else self.queue_time_s
        if out.finished:
            self.finish_reason, self.error = out.finish_reason, out.error


class JobStopped(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Job:
    def __init__(self, engine, metrics: Metrics, choices: list[Choice], steering: SteeringSpec, job_id: str,
                 timeout_s: float, registry: set | None = None, log_fields: dict | None = None):
        self.engine, self.metrics, self.choices, self.steering = engine, metrics, choices, steering
        self.id, self.timeout_s = job_id, timeout_s
        self.arrival = time.monotonic()
        self.registry = registry if registry is not None else set()
        self.log_fields = log_fields or {}
        self.admitted = False
        self.stopped: str | None = None
        self.closed = False
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._watcher: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def done(self) -> bool:
        return all(c.finished for c in self.choices)

    # ---- start ----------------------------------------------------------------------------------
    async def start(self, http_request=None) -> None:
        """Submit every choice. Raises APIError (nothing left running once close() is called) on refusal."""
        self.registry.add(self)
        self._pumps = [asyncio.create_task(self._pump(c)) for c in self.choices]
        # generate() validates and queues the request before its first wait, so after one yield each pump
        # has either been refused (QueueFull, PromptTooLong, ...) or is waiting for its first output
        await asyncio.sleep(0)
        refused = next((c.refusal for c in self.choices if c.refusal is not None), None)
        if refused is not None:
            raise from_engine_error(refused)
        self.admitted = True
        for choice in self.choices:
            self.metrics.prompt_tokens.inc(len(choice.prompt_ids))
            self.metrics.requests_steering.labels(self.steering.mode).inc()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, self.arrival + self.timeout_s - time.monotonic()), self.stop, "timeout")
        if http_request is not None:
            self._watcher = asyncio.create_task(self._watch(http_request))

    async def _pump(self, choice: Choice) -> None:
        outputs = self.engine.generate(choice.prompt_ids, choice.params, self.steering,
                                       prompt_text=choice.prompt_text, request_id=f"{self.id}-{choice.index}")
        try:
            async for out in outputs:
                self._queue.put_nowait((choice, out))
        except Exception as exc:  # generate() raises only at admission; outputs carry later failures
            choice.refusal = exc
            self._queue.put_nowait((choice, exc))

    async def _watch(self, http_request) -> None:
        while not await http_request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        self.stop("disconnect")

    # ---- outputs --------------------------------------------------------------------------------
    async def events(self):
        """(choice, output) pairs until every choice finished. Raises JobStopped, or APIError on refusal."""
        left = sum(not c.finished for c in self.choices)
        while left:
            choice, item = await self._queue.get()
            if choice is None:
                raise JobStopped(item)
            if isinstance(item, Exception):
                raise from_engine_error(item)
            self._record(choice, item)
            left -= item.finished
            yield choice, item

    def _record(self, choice: Choice, out: RequestOutput) -> None:
        now = time.monotonic()
        if out.token_ids:
            if choice.first_token_at is None:
                self.metrics.ttft.observe(now - self.arrival)
            else:
                self.metrics.inter_token.observe((now - choice.last_token_at) / len(out.token_ids))
            choice.first_token_at = choice.first_token_at or now
            choice.last_token_at = now
            self.metrics.generation_tokens.inc(len(out.token_ids))
        choice.absorb(out)
        if out.finished:
            self._record_finish(choice, out.finish_reason, now)

    def _record_finish(self, choice: Choice, reason: str, now: float) -> None:
        m = self.metrics
        m.requests_finished.labels(reason).inc()
        m.e2e_latency.observe(now - self.arrival)
        if choice.queue_time_s is not None:
            m.queue_time.observe(choice.queue_time_s)
        generator_s = (choice.steering or {}).get("generator_s")
        if generator_s:
            m.vector_generation.observe(generator_s)

    # ---- ending ---------------------------------------------------------------------------------
    def stop(self, reason: str) -> None:
        """Abort every unfinished choice; events() raises JobStopped(reason) at its next wait."""
        if self.stopped or self.closed or self.done:
            return
        self.stopped = reason
        if reason == "disconnect":
            self.metrics.client_disconnects.inc()
        for pump in self._pumps:
            pump.cancel()
        self._queue.put_nowait((None, reason))

    def close(self) -> None:
        """Always called once the response is over (or abandoned)."""
        if self.closed:
            return
        if self.admitted and not self.done and not self.stopped:
            self.stop("disconnect")  # the consumer went away without saying why: a closed stream
        self.closed = True
        for task in (*self._pumps, self._watcher):
            if task is not None:
                task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        now = time.monotonic()
        for choice in self.choices:
            if self.admitted and not choice.finished:
                self._record_finish(choice, "abort", now)
        self.registry.discard(self)
        log.info("request %s", json.dumps(self.summary(now)))

    def summary(self, now: float) -> dict:
        """The request's log line: ids, token counts, latencies, steering (prompt text only if asked)."""
        first = [c.first_token_at for c in self.choices if c.first_token_at is not None]
        steering = self.choices[0].steering or {"mode": self.steering.mode, "scale": self.steering.scale}
        return {
            "id": self.id,
            "outcome": self.stopped or ("refused" if not self.admitted else "finished"),
            "finish_reasons": [c.finish_reason or "abort" for c in self.choices] if self.admitted else [],
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "queue_s": _round(max((c.queue_time_s for c in self.choices if c.queue_time_s is not None), default=None)),
            "ttft_s": _round(min(first) - self.arrival if first else None),
            "e2e_s": _round(now - self.arrival),
            "steering": {k: _round(v) if isinstance(v, float) else v for k, v in steering.items()},
            "errors": sorted({c.error for c in self.choices if c.error}) or None,
            **self.log_fields,
        }

    @property
    def prompt_tokens(self) -> int:
        seen = {c.prompt_index: len(c.prompt_ids) for c in self.choices}
        return sum(seen.values())

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def stopped_error(stopped: JobStopped, timeout_s: float) -> APIError:
    """What a job cut short answers (a client that disconnected gets nothing: see the routes)."""
    if stopped.reason == "timeout":
        return APIError(504, f"request timed out after {timeout_s:g} s and was aborted", code="request_timeout")
    if stopped.reason == "shutdown":
        return APIError(503, "the server is shutting down; retry on another replica", code="shutting_down")
    return APIError(500, f"request stopped: {stopped.reason}")
