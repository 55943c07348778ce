"""`VectorWorker`: the ATV generator on its own thread, so that vectors are made while the engine decodes.

    submit(text) -> VectorJob  (any thread; cheap)      atv-generator thread
    ───────────────────────────────────────────         ─────────────────────────────────────────────
    job queue (FIFO) ─────────────────────────────────> take every job that has arrived (<= max_batch,
                                                        cancelled ones dropped) -> one generator run
    job.result = VectorResult(G, gate, seconds) <────── (retried one by one if the run fails, so only
               or VectorResult(error=...)               the job at fault fails) -> listeners()
    run_here() (the engine's thread, when it has nothing to step): the same, on the calling thread; while the
    engine says so (engine_idle(True)) the worker thread leaves the queue to it

One generator run at a time (a lock): the generator's tokenizer and modules are never used by two threads
at once.

Sizing (`threads`, torch intra-op threads of the worker thread only; default 1). While the engine decodes,
the worker makes vectors beside it on one thread. When the engine has nothing to step until vectors exist
(a burst of arrivals), the engine's thread runs the queued jobs itself with all of its threads (run_here)
and the worker thread starts none, so no core idles exactly when it matters. Why not simply give the worker more threads: a second
OpenMP team makes the process hold more OpenMP threads than there are cores, and libgomp then stops spinning
at its barriers ("throttled" spin), which slowed every engine step by about 1.5x (2-core VM, a batch-32
decode step 215 vs 136 ms, even with the worker idle). With one worker thread there is no second team.
Torch keeps the count per thread, but set_num_threads() also sets the default that threads started later
take, so start() puts the starting thread's count back as that default. A vector made with another thread
count can differ from the synchronous path's in the last bit (the sums are split otherwise); with equal
counts the two are bit-equal.

A `VectorJob` is plain data the request holds (`Request.vector_job`): its result lives and dies with the
request, so a request that is aborted or refused leaves nothing behind here. This module does not decide when a request runs (the scheduler admits a request once its job is
done) and does not place vectors in the runner's table (llm_engine.py).
"""
from __future__ import annotations

import atexit
import logging
from collections import deque
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger("atv.engine")


@dataclass(frozen=True)
class VectorResult:
    vector: torch.Tensor | None = None   # G [L_sel, d] fp32 (None when the run failed)
    gate: float | None = None
    seconds: float = 0.0                 # the generator run that made it (its whole batch)
    error: str | None = None


@dataclass(eq=False)
class VectorJob:
    """One request's generator input and, once the worker is done with it, its result."""
    text: str                            # what the generator reads (format_input of the query)
    result: VectorResult | None = None   # set once, by the worker thread
    cancelled: bool = False              # the request left: skip it if not yet started

    @property
    def done(self) -> bool:
        return self.result is not None


def generate(generator, texts: list[str]) -> tuple[torch.Tensor, list[float]]:
    """One generator run: texts -> (G [B, L_sel, d] fp32, gates). The same call on either thread. A closed gate
    (< the checkpoint's `gate_open`, 0.5 unless it says otherwise) zeroes its G, so the request is served exactly
    as steering off: the soft gate alone left vectors scaled by ~0.01 that still changed 32 greedy tokens on 6 of
    50 generic prompts (session 16)."""
    with torch.no_grad():
        out = generator(texts)
    vectors, gates = out.vectors.float(), out.gates.float()
    vectors[gates < generator.config.gate_open] = 0
    return vectors, gates.tolist()


def run_batch(generator, texts: list[str]) -> list[VectorResult]:
    """One run over `texts`; if it fails, one run per text so that only the text at fault fails. Every
    result carries the time of the whole call (what the requests of this batch waited for)."""
    t0 = time.perf_counter()
    try:
        vectors, gates = generate(generator, texts)
        made = [(vectors[i], gates[i], None) for i in range(len(texts))]
    except Exception:
        log.exception("generator failed on a batch of %d; retrying one by one", len(texts))
        made = [_generate_alone(generator, text) for text in texts]
    elapsed = time.perf_counter() - t0
    return [VectorResult(vector, gate, elapsed, error) for vector, gate, error in made]


def _generate_alone(generator, text: str) -> tuple[torch.Tensor | None, float | None, str | None]:
    """(G [L_sel, d], gate, None), or (None, None, the error message for the request)."""
    try:
        vectors, gates = generate(generator, [text])
    except Exception as exc:
        return None, None, f"vector generation failed: {type(exc).__name__}: {exc}"
    return vectors[0], gates[0], None


class VectorWorker:
    def __init__(self, generator, threads: int = 1, max_batch: int = 32):
        if threads < 1 or max_batch < 1:
            raise ValueError(f"generator threads and batch must be >= 1, got {threads} and {max_batch}")
        self.generator, self.threads, self.max_batch = generator, threads, max_batch
        self.listeners: list[Callable[[], None]] = []   # called on the running thread after each batch
        self._queue: deque[VectorJob] = deque()         # guarded by _cond
        self._cond = threading.Condition()
        self._engine_idle = False          # the engine has nothing to step: it takes the queue itself (run_here)
        self._closed = False
        self._running = threading.Lock()   # held for each generator run, on whichever thread
        self._done = threading.Condition()
        self._completed = 0                # batches finished (guarded by _done)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # ---- any thread -------------------------------------------------------------------------------
    def submit(self, text: str) -> VectorJob:
        job = VectorJob(text)
        with self._cond:
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def start(self) -> None:
        """Start the thread (idempotent). Jobs submitted before start form its first batch."""
        with self._start_lock:
            if self._thread is not None or self._closed:
                return
            keep, ready = torch.get_num_threads(), threading.Event()
            self._thread = threading.Thread(target=self._loop, args=(ready,), name="atv-generator", daemon=True)
            self._thread.start()
            ready.wait()
            torch.set_num_threads(keep)   # the worker's set_num_threads also set torch's default for new threads
            # a daemon thread that still exists at interpreter exit with its own torch thread pool makes the
            # process abort ("terminate called without an active exception", rc 134): join it first
            atexit.register(self.close)

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the thread after its current batch, waiting up to `timeout` s for it (None: do not wait).
        A closed worker does not start again; jobs still queued are not run."""
        with self._start_lock, self._cond:
            self._closed = True
            self._cond.notify_all()
        atexit.unregister(self.close)
        thread = self._thread
        if thread is not None and timeout is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def completed(self) -> int:
        """Batches finished so far: pass it to wait_past()."""
        with self._done:
            return self._completed

    def wait_past(self, completed: int, timeout: float = 1.0) -> None:
        """Block until a batch after the `completed`-th is finished (or timeout); RuntimeError if the
        thread is gone."""
        with self._done:
            if self._completed == completed:
                self._done.wait(timeout)
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the generator worker is not running: start() it (or it was closed)")

    # ---- the engine's thread ------------------------------------------------------------------------
    def engine_idle(self, idle: bool) -> None:
        """The engine says whether it has nothing to step. While it has nothing, it runs the queued jobs
        itself (run_here, all its torch threads) and the worker thread starts no new batch."""
        with self._cond:
            self._engine_idle = idle
            if not idle:
                self._cond.notify_all()

    def run_here(self) -> bool:
        """Run the jobs that have arrived (<= max_batch) on the calling thread, with its torch threads, if no
        generator run is under way. -> whether a batch ran (False: nothing queued, or a run is under way)."""
        if not self._running.acquire(blocking=False):
            return False
        try:
            with self._cond:
                batch = self._pop()
            if batch:
                self._finish(batch)
            return bool(batch)
        finally:
            self._running.release()

    # ---- the worker thread ----------------------------------------------------------------------------
    def _loop(self, ready: threading.Event) -> None:
        torch.get_num_threads()             # this thread's pool initialised from the default first ...
        torch.set_num_threads(self.threads)   # ... then sized: later ops keep this count
        ready.set()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or (self._queue and not self._engine_idle))
                if self._closed:
                    return
                batch = self._pop()
            with self._running:
                self._finish(batch)

    def _pop(self) -> list[VectorJob]:
        """Up to max_batch queued jobs, oldest first (the caller holds _cond)."""
        return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _finish(self, batch: list[VectorJob]) -> None:
        self._run([job for job in batch if not job.cancelled])
        with self._done:
            self._completed += 1
            self._done.notify_all()
        for listener in self.listeners:
            listener()

    def _run(self, jobs: list[VectorJob]) -> None:
        try:
            results = run_batch(self.generator, [job.text for job in jobs]) if jobs else []
        except Exception as exc:   # not the generator's own failure (run_batch handles those): fail the jobs
            log.exception("generator worker failed on a batch of %d", len(jobs))
            results = [VectorResult(error=f"vector generation failed: {type(exc).__name__}: {exc}")] * len(jobs)
        for job, result in zip(jobs, results):
            job.result = result
