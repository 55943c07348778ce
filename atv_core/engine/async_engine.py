"""`AsyncEngine`: the one object the server talks to. It runs an `LLMEngine` on its own thread and tokenizes on
another, so an asyncio event loop only routes messages.

    thread           owns                                          does
    event loop       nothing of the engine                         submit() / abort() / encode*() / stats();
                                                                   runs every request's output callback
    atv-tokenizer    a private copy of the tokenizer               prompts and chat templates -> ids
    atv-engine       the LLMEngine (scheduler, runner, the         steps; detokenizes with the engine's
                     engine's own tokenizer)                       tokenizer
    atv-generator    the generator (LLMEngine.vector_worker)       prompts -> vectors, beside the steps

Messages into the engine thread are typed (`AddRequest`, `AbortRequest`). Each request is submitted with one
callback, called on the submitter's event loop with every `RequestOutput`, the last one finished (abort,
error and engine failure included). The waiting-queue bound (on new requests: preempted ones back in the
queue were accepted already and do not count) is decided in submit() (QueueFull, HTTP 429), with counts kept
under a lock so the engine thread never has to refuse a request it was handed. submit()
also hands a mode-atv request's prompt to the generator thread at once; the engine thread wakes when a
vector is ready, and admits the request then. When it has nothing to step, the engine thread makes the queued
vectors itself (LLMEngine.make_queued_vectors), with all its torch threads.
Knows no HTTP.
"""
from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from atv_core.engine.llm_engine import EngineDead, EngineStats, LLMEngine, PromptTooLong, StepStats, sampling_defaults
from atv_core.engine.request import Request, RequestOutput, SamplingParams, SteeringSpec
from atv_core.engine.scheduler import QueueFull
from atv_core.engine.tokenization import ChatTemplateOptions, TokenizerWorker

__all__ = ["AsyncEngine", "EngineDead", "EngineLimits", "EngineStats", "PromptTooLong", "QueueFull", "StepStats"]

log = logging.getLogger("atv.engine")

IDLE_WAIT_S = 0.05   # the engine thread's nap when it has nothing to do (a message wakes it at once)


@dataclass(frozen=True)
class AddRequest:
    request: Request


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class EngineLimits:
    max_model_len: int             # prompt + completion tokens
    max_prompt_chars: int | None   # no longer prompt can fit (None: the tokenizer gives no such bound)
    max_waiting: int               # queued requests before submit() raises QueueFull


class AsyncEngine:
    def __init__(self, engine: LLMEngine, tokenizer=None):
        """tokenizer: the tokenizer worker's own (default: a deep copy of the engine's)."""
        self.engine = engine
        self._tokens = TokenizerWorker(tokenizer if tokenizer is not None else copy.deepcopy(engine.tokenizer),
                                       engine.max_model_len)
        self.limits = EngineLimits(engine.max_model_len, self._tokens.max_prompt_chars, engine.config.max_waiting)
        self.has_generator = engine.has_generator
        self.error: str | None = None
        self._inbox: queue.SimpleQueue[AddRequest | AbortRequest] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._lock = threading.Lock()   # guards the two counts below and `error`
        self._pending = 0               # AddRequests in the inbox
        self._waiting = 0               # >= new requests in the scheduler's waiting queue (preempted ones aside)
        self._stats = engine.stats()

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "AsyncEngine":
        self.engine.start_vector_worker(on_ready=self._wake.set)
        self._thread = threading.Thread(target=self._loop, name="atv-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.engine.close()
        self._tokens.shutdown()

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        """Running / waiting requests and vector slots as of the engine thread's last step."""
        return self._stats

    def vector_names(self) -> list[str]:
        """The named vectors this engine serves (empty without a vectors folder)."""
        return self.engine.vectors.names() if self.engine.vectors is not None else []

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: 0 .. vocab_size - 1."""
        return self.engine.vocab_size

    @property
    def sampling_defaults(self) -> dict:
        """The sampling fields the target's generation_config.json sets (llm_engine.sampling_defaults)."""
        return sampling_defaults(self.engine.model)

    async def reload_vectors(self) -> list[str]:
        """Re-read the vectors folder on a worker thread -> names. ValueError (naming the bad file) keeps the
        old set; ValueError too when the engine was built without a folder."""
        if self.engine.vectors is None:
            raise ValueError("this server has no vectors folder; start it with --vectors DIR (ATV_VECTORS)")
        return await asyncio.to_thread(self.engine.vectors.reload)

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        """listener(StepStats) after every step, on the engine thread: it must only observe, and be quick."""
        self.engine.step_listeners.append(listener)

    # ---- tokenization (off the event loop) ------------------------------------------------------
    async def encode(self, text: str) -> list[int]:
        """A prompt's token ids. PromptTooLong at once when no prompt that long can fit."""
        return await self._tokens.encode(text)

    async def encode_last(self, text: str, keep: int) -> tuple[list[int], bool]:
        """A prompt's ids left-truncated to `keep` tokens, BOS and the like kept -> (ids, whether cut)."""
        return await self._tokens.encode_last(text, keep)

    async def encode_chat(self, messages: list[dict[str, str]],
                          template: ChatTemplateOptions | None = None) -> list[int]:
        """[{role, content}, ...] through the chat template. PromptTooLong, or ValueError if the template refuses."""
        return await self._tokens.encode_chat(messages, template)

    async def bad_words_ids(self, words: list[str]) -> list[tuple[int, ...]]:
        """vLLM's `bad_words` as the token sequences the logits processors block (tokenization.py)."""
        return await self._tokens.bad_words_ids(words)

    async def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids, special tokens dropped (what the generator reads of a token-id prompt) or kept."""
        return await self._tokens.decode(ids, skip_special_tokens)

    async def token_texts(self, ids: list[int]) -> list[str]:
        """Each token decoded alone, special tokens kept (the `tokens` of prompt logprobs)."""
        return await self._tokens.token_texts(ids)

    # ---- requests -------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, steering: SteeringSpec,
               on_output: Callable[[RequestOutput], None], *, prompt_text: str = "",
               request_id: str | None = None, cache_salt: str | None = None) -> str:
        """Queue one request; on_output(out) then runs on this event loop for each of its outputs, the last
        with out.finished. Raises ValueError / PromptTooLong (bad request), QueueFull, EngineDead."""
        request = Request(request_id or f"req-{next(self._ids)}", list(prompt_ids), params, steering, prompt_text,
                          on_output=_on_loop(asyncio.get_running_loop(), on_output), cache_salt=cache_salt)
        self.engine.validate(request)
        with self._lock:
            if not self.is_alive:
                raise EngineDead(self.error or "engine is not running")
            if self._pending + self._waiting >= self.limits.max_waiting:
                raise QueueFull(f"waiting queue is full ({self.limits.max_waiting} requests)")
            self._pending += 1
            self.engine.prepare_vector(request)   # the generator starts on it now, off the engine thread
            self._inbox.put(AddRequest(request))
        self._wake.set()
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request (its last output, finish_reason "abort", follows within a step)."""
        self._inbox.put(AbortRequest(request_id))
        self._wake.set()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, steering: SteeringSpec,
                       prompt_text: str = "", request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """submit() as an async iterator of outputs; closing it early aborts the request."""
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request_id = self.submit(prompt_ids, params, steering, outputs.put_nowait, prompt_text=prompt_text,
                                 request_id=request_id)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    # ---- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if self.engine.has_work() and self.engine.ready_to_step():   # not only pending vectors
                    self.engine.step()  # outputs reach each request's on_output callback
                elif not self.engine.make_queued_vectors():   # nothing to step: make vectors here, or nap;
                    # a message or a finished vector wakes it at once
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                self._note_stats()
        except Exception as exc:  # unrecoverable: report it, fail everything in flight
            log.exception("engine loop died")
            self._fail_all(f"{type(exc).__name__}: {exc}")

    def _take_inbox(self):
        """The messages waiting in the inbox, taken without blocking."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drain_inbox(self) -> None:
        for message in self._take_inbox():
            if isinstance(message, AbortRequest):
                self.engine.abort(message.request_id)
                continue
            with self._lock:  # the request moves from the inbox to the waiting queue: the sum stays the same
                self._pending -= 1
                self._waiting += 1
            try:
                self.engine.add_request(message.request)
            except (ValueError, QueueFull) as exc:  # submit() checked both: not reached unless that is broken
                log.error("request %s refused by the engine thread: %s", message.request.request_id, exc)
                self.engine.fail(message.request, str(exc))

    def _note_stats(self) -> None:
        stats = self.engine.stats()
        with self._lock:
            self._waiting = stats.num_queued
        self._stats = stats

    def _fail_all(self, reason: str) -> None:
        message = f"engine failed: {reason}"
        with self._lock:  # from here on submit() refuses, so nothing reaches the inbox after the drain below
            self.error = reason
        for item in self._take_inbox():
            if isinstance(item, AddRequest):
                self.engine.fail(item.request, message)
        self.engine.fail_all(message)


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[RequestOutput], None]):
    """callback, called from the engine thread, run on `loop` (dropped once that loop is closed)."""
    def deliver(out: RequestOutput) -> None:
        try:
            loop.call_soon_threadsafe(callback, out)
        except RuntimeError:
            if not loop.is_closed():
                raise
            log.debug("output of %s dropped: its event loop is closed", out.request_id)
    return deliver
