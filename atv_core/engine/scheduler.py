"""Iteration-level (continuous) batching, in plain Python: no torch, testable without a model.

Each engine step asks `schedule()` for one batch: a *prefill* of newly admitted requests when any are
waiting and fit, otherwise a *decode* step over every running request. New requests therefore join the
running batch at the next step, and `finish()` removes a request at once. Admission is bounded by the
number of running sequences, the padded prefill tokens per step, and a bounded waiting queue.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

from atv_core.engine.request import Request, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 32             # KV rows / vector slots
    max_prefill_tokens: int = 4096    # padded tokens (requests x longest prompt) in one prefill step
    max_waiting: int = 256            # beyond this, add() refuses (HTTP 429)

    def __post_init__(self):
        if self.max_running < 1 or self.max_prefill_tokens < 1 or self.max_waiting < 0:
            raise ValueError(f"scheduler limits must be positive, got {self}")


@dataclass(frozen=True)
class Batch:
    phase: Literal["prefill", "decode"]
    requests: tuple[Request, ...]

    @property
    def padded_tokens(self) -> int:
        if self.phase == "decode":
            return len(self.requests)
        return len(self.requests) * max(r.num_prompt_tokens for r in self.requests)


class QueueFull(Exception):
    """The waiting queue is at its bound: retry later."""


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"waiting queue is full ({self.config.max_waiting} requests)")
        request.status = Status.WAITING
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch | None:
        admitted = self._admit()
        if admitted:
            return Batch("prefill", tuple(admitted))
        if self.running:
            return Batch("decode", tuple(self.running))
        return None

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        longest = 0
        while self.waiting and len(self.running) + len(admitted) < self.config.max_running:
            candidate = self.waiting[0]
            longest_if = max(longest, candidate.num_prompt_tokens)
            if admitted and longest_if * (len(admitted) + 1) > self.config.max_prefill_tokens:
                break  # the first request is always admitted, whatever its length
            admitted.append(self.waiting.popleft())
            longest = longest_if
        for request in admitted:
            request.status = Status.RUNNING
            self.running.append(request)
        return admitted

    def finish(self, request: Request) -> None:
        """Remove a finished request from whichever queue holds it."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def find(self, request_id: str) -> Request | None:
        for request in (*self.running, *self.waiting):
            if request.request_id == request_id:
                return request
        return None
