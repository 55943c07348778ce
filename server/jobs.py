"""One HTTP request in the engine: a `Job` submits its choices (one engine request each) and merges their outputs.

    job.start(http_request)  submit every choice; APIError if the engine refuses one (close() then aborts the
                             choices submitted before it)
    job.events()             (choice, RequestOutput) as the engine produces them, until every choice finished;
                             raises JobStopped when stop() cut it short
    job.stop(reason)         abort what still runs: "disconnect", "timeout", "shutdown", "failed"
    job.close()              always, once: abort leftovers, write the request's log line

Each choice is submitted to `AsyncEngine.submit` with one callback (`_on_output`, run on the event loop) that
records the request's metrics (TTFT, inter-token latency, end to end, tokens, finish reasons) and queues the
output for events(). The engine ends every request with one finished output (aborts included), so each
finish is counted once, also when it arrives after the response ended. An abort frees the request's KV row
and vector slot within one engine step. A disconnect watcher and a timer call stop().
This module knows no response format (server/formatting.py) and no routes (server/openai_api.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass, field

from atv_core.engine.request import RequestOutput, SamplingParams, SteeringReport, SteeringSpec, TokenLogprob

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
    echo_text: str = ""            # what `echo` prepends: the prompt as sent (token ids: decoded, special tokens kept)
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)   # echo + logprobs
    completion_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None   # vLLM's: the stop token id or stop string that ended it
    error: str | None = None
    steering: SteeringReport | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    queue_time_s: float | None = None  # arrival in the engine -> admission into a prefill
    cache_salt: str | None = None      # vLLM's: prefix-cache blocks shared only with requests of the same salt
    spec: SteeringSpec | None = None   # this choice's steering where it is not the job's (default steering of a
                                       # prompt the generator has no text to read: off)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def absorb(self, out: RequestOutput) -> None:
        if out.text_delta:
            self.text_parts.append(out.text_delta)
        self.logprobs += out.logprobs or []
        self.prompt_logprobs += out.prompt_logprobs or []
        self.completion_tokens = out.completion_tokens
        self.steering = out.steering or self.steering
        self.queue_time_s = out.queue_time_s if out.queue_time_s is not None else self.queue_time_s
        if out.finished:
            self.finish_reason, self.stop_reason, self.error = out.finish_reason, out.stop_reason, out.error


class JobStopped(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Job:
    def __init__(self, engine, metrics: Metrics, choices: list[Choice], steering: SteeringSpec, job_id: str,
                 timeout_s: float, registry: set | None = None, log_fields: dict | None = None,
                 model_id: str = ""):
        self.engine, self.metrics, self.choices, self.steering = engine, metrics, choices, steering
        self.id, self.timeout_s = job_id, timeout_s
        self.model_id = model_id       # the served id or preset id the request named (metrics label)
        self.arrival = time.monotonic()
        self.registry = registry if registry is not None else set()
        self.log_fields = log_fields or {}
        self.admitted = False
        self.stopped: str | None = None
        self.closed = False
        self._outputs: asyncio.Queue = asyncio.Queue()   # (choice, RequestOutput), or (None, stop reason)
        self._submitted: list[Choice] = []
        self._watcher: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def done(self) -> bool:
        return all(c.finished for c in self.choices)

    def request_id(self, choice: Choice) -> str:
        return f"{self.id}-{choice.index}"

    def spec_for(self, choice: Choice) -> SteeringSpec:
        """The steering a choice is served with: its own where set (Choice.spec), else the job's."""
        return choice.spec or self.steering

    # ---- start ----------------------------------------------------------------------------------
    def start(self, http_request=None, prompt_param: str = "prompt") -> None:
        """Submit every choice. Raises APIError when the engine refuses one (then call close()); a refused
        prompt names `prompt_param`, the request field that carried it."""
        self.registry.add(self)
        for choice in self.choices:
            try:
                self.engine.submit(choice.prompt_ids, choice.params, self.spec_for(choice),
                                   functools.partial(self._on_output, choice), prompt_text=choice.prompt_text,
                                   request_id=self.request_id(choice), cache_salt=choice.cache_salt)
            except Exception as exc:  # QueueFull, PromptTooLong, ValueError, EngineDead: its HTTP status
                raise from_engine_error(exc, prompt_param) from exc
            self._submitted.append(choice)
        self.admitted = True
        counted = set()   # prompt tokens once per prompt, as usage counts them (n choices share a prompt)
        for choice in self.choices:
            first = choice.prompt_index not in counted
            counted.add(choice.prompt_index)
            tokens = len(choice.prompt_ids) if first else 0
            self.metrics.count_admitted(self.model_id, self.spec_for(choice).mode, tokens)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, self.arrival + self.timeout_s - time.monotonic()), self.stop, "timeout")
        if http_request is not None:
            self._watcher = asyncio.create_task(self._watch(http_request))

    async def _watch(self, http_request) -> None:
        while not await http_request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        self.stop("disconnect")

    # ---- outputs --------------------------------------------------------------------------------
    def _on_output(self, choice: Choice, out: RequestOutput) -> None:
        """The engine's callback for `choice` (on the event loop)."""
        if not self.admitted:  # a refused job: the choices submitted before the refusal, being aborted
            return
        self._record(choice, out)
        if not self.closed:
            self._outputs.put_nowait((choice, out))

    async def events(self):
        """(choice, output) pairs until every choice finished. Raises JobStopped."""
        left = len(self.choices)
        while left:
            choice, item = await self._outputs.get()
            if choice is None:
                raise JobStopped(item)
            left -= item.finished
            yield choice, item

    def _record(self, choice: Choice, out: RequestOutput) -> None:
        now = time.monotonic()
        if out.token_ids:
            if choice.first_token_at is None:
                self.metrics.observe_ttft(self.model_id, now - self.arrival)
            else:
                self.metrics.observe_inter_token(self.model_id, (now - choice.last_token_at) / len(out.token_ids))
            choice.first_token_at = choice.first_token_at or now
            choice.last_token_at = now
            self.metrics.count_generated(self.model_id, len(out.token_ids))
        choice.absorb(out)
        if out.finished:
            self._record_finish(choice, out.finish_reason, now)

    def _record_finish(self, choice: Choice, reason: str, now: float) -> None:
        m = self.metrics
        m.observe_finish(self.model_id, reason, now - self.arrival, choice.queue_time_s)
        if choice.steering is not None and choice.steering.generator_s:
            m.vector_generation.observe(choice.steering.generator_s)

    # ---- ending ---------------------------------------------------------------------------------
    def stop(self, reason: str) -> None:
        """Abort every unfinished choice; events() raises JobStopped(reason) at its next wait."""
        if self.stopped or self.closed or self.done:
            return
        self.stopped = reason
        if reason == "disconnect":
            self.metrics.client_disconnects.inc()
        self._abort_unfinished()
        self._outputs.put_nowait((None, reason))

    def _abort_unfinished(self) -> None:
        for choice in self._submitted:
            if not choice.finished:
                self.engine.abort(self.request_id(choice))

    def close(self) -> None:
        """Always called once the response is over (or abandoned)."""
        if self.closed:
            return
        if self.admitted and not self.done and not self.stopped:
            self.stop("disconnect")  # the consumer went away without saying why: a closed stream
        self.closed = True
        if not self.admitted:
            self._abort_unfinished()
        if self._watcher is not None:
            self._watcher.cancel()
        if self._timer is not None:
            self._timer.cancel()
        self.registry.discard(self)
        log.info("request %s", json.dumps(self.summary(time.monotonic())))

    def summary(self, now: float) -> dict:
        """The request's log line: ids, token counts, latencies, steering (prompt text only if asked)."""
        first = [c.first_token_at for c in self.choices if c.first_token_at is not None]
        spec = self.spec_for(self.choices[0])
        steering = dataclasses.asdict(self.choices[0].steering or SteeringReport(spec.mode, spec.scale))
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
