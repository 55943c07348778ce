"""The serving engine: continuous batching where every request carries its own task vector.

    add_request ──> Scheduler.waiting ──schedule()──> Batch(chunks: decodes + prompt chunks, one token budget)
         │                   ▲ admitted once `ready`         │
         └─> VectorWorker (own thread): generator(prompts arrived so far) -> each request's G
                                                           │
       first time scheduled: G (+ named vector) -> delta -> runner.assign_vector
       runner.run(chunks): one packed forward, paged KV, logits for chunks that end their sequence
       (run_scored: also every position of the chunks of requests that asked for prompt logprobs, scored
       chunk by chunk: log_softmax, gather, top-N; never a [prompt length, V] matrix for a whole long prompt)
                                                           │
       logits_processors.process (bias, penalties) -> sampler.sample -> tokens -> _append(): stop / length / EOS
                                                           │          (text: detokenizer.OutputText)
                         RequestOutput (text delta, SteeringReport) -> request.on_output(...)

`LLMEngine` is synchronous (`step()`); its tokenizer is used on the thread that steps it only
(detokenization). Where the generator runs (`generator_worker`, default by device):
- accelerators: on its own thread (vector_worker.py) while steps run, so a mode-atv request is admitted once
  its vector is made; when nothing else can run, the stepping thread makes the queued vectors itself;
- CPU: on the stepping thread when a request is first scheduled (one run per step for the requests it
  admits). A generator thread beside the steps competes with the engine's OpenMP threads for the same
  cores, and an OpenMP team that loses a core waits at every barrier: measured on the 2-core VM, `atv bench
  serve` at concurrency 32, TTFT(atv) - TTFT(off) was +0.27 s (29 %) with the thread and +0.07 s (8 %)
  without, HTTP ATV/off 0.90x vs 0.95x. `AsyncEngine` (async_engine.py) runs the engine on a background
thread. No HTTP here.
"""
from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass, replace
from typing import Callable

import torch

from atv_core.engine.detokenizer import OutputText, token_bytes
from atv_core.engine.logits_processors import LogitsProcessors, completing
from atv_core.engine.request import (GENERATION_DEFAULT_FIELDS, InvalidRequest, Request, RequestOutput,
                                    SteeringReport, Status, TokenLogprob, generation_default_problem)
from atv_core.engine.runner import ModelRunner
from atv_core.engine.sampler import make_generator, sample, token_logprobs
from atv_core.engine.scheduler import Scheduler, SchedulerConfig
from atv_core.engine.vector_worker import VectorResult, VectorWorker, run_batch
from atv_core.steering.vectors import VectorLayout, VectorStore

log = logging.getLogger("atv.engine")


class PromptTooLong(ValueError):
    """Prompt plus max_tokens does not fit the context (HTTP 413)."""


class EngineDead(RuntimeError):
    """The engine loop hit an unrecoverable error."""


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 32
    max_waiting: int = 256
    max_num_batched_tokens: int | None = None  # tokens per step (decodes + prompt chunks); default 512 on CPU,
                                               # 2048 on CUDA
    max_model_len: int | None = None    # default: the model's max_position_embeddings, capped at 8192
    block_size: int = 16                # tokens per KV block
    kv_cache_bytes: int | None = None   # KV memory budget; default: CPU min(2 GiB, 1/4 of available RAM),
    kv_cache_fraction: float = 0.8      # CUDA this fraction of the free memory at start
    long_prompt_tokens: int = 256       # prompts with more tokens left are long: beside decodes, long prompts ...
    long_prefill_chunk: int | None = None  # ... advance this many tokens per step in all; default 8 CPU, 256 CUDA
    enable_prefix_caching: bool = True  # reuse computed KV blocks of a shared prompt prefix (where steering allows)
    generator_worker: bool | None = None  # the generator on its own thread beside the steps (False: in the
                                          # step); default: True on accelerators, False on CPU (see above)
    generator_threads: int = 1          # torch intra-op threads of that thread (vector_worker.py's sizing note)
    cpu_decode_kernel: bool = True      # fp32 or bf16 on CPU: decode attention by the C++ kernel (cpu_kernel.py) where it builds

    def __post_init__(self):
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.generator_threads < 1:
            raise ValueError(f"generator_threads must be >= 1, got {self.generator_threads}")


@dataclass(frozen=True)
class StepStats:
    """Handed to step listeners (on the engine thread) after every step."""
    phase: str
    duration_s: float
    batch_size: int


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load (metrics gauges)."""
    num_running: int
    num_waiting: int
    vector_slots_used: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int = 0       # tokens of admitted sequences looked up in the prefix cache (cumulative)
    prefix_cache_hits: int = 0          # ... of which were reused instead of computed
    num_preemptions: int = 0            # running requests whose blocks were taken back (cumulative)
    num_queued: int = 0                 # of num_waiting, those never admitted (what max_waiting bounds)


def sampling_defaults(model) -> dict[str, float | int]:
    """The fields of GENERATION_DEFAULT_FIELDS the model's generation_config.json sets away from transformers'
    defaults (vLLM's `--generation-config auto`): what a request that leaves them out gets instead of the neutral
    values (max_new_tokens: its max_tokens)."""
    config = getattr(model, "generation_config", None)
    found = config.to_diff_dict() if config is not None else {}
    defaults = {}
    for name in GENERATION_DEFAULT_FIELDS:
        value = found.get(name)
        if value is None:
            continue
        problem = generation_default_problem(name, value)
        if problem is not None:
            log.warning("the model's generation_config sets %s=%r, which cannot be a default (%s): not used",
                        name, value, problem)
            continue
        defaults[name] = value
    return defaults


class LLMEngine:
    def __init__(self, model, tokenizer, generator=None, config: EngineConfig = EngineConfig(),
                 vectors: VectorStore | None = None):
        self.model, self.tokenizer, self._generator, self.config = model, tokenizer, generator, config
        self.steering_layout = VectorLayout.for_target(model, generator)   # steered layers, position policy
        device = model.get_input_embeddings().weight.device
        layout = self.steering_layout
        self.runner = ModelRunner(model, config.max_running, layout.layers, layout.position,
                                  block_size=config.block_size, kv_budget_bytes=config.kv_cache_bytes,
                                  kv_cache_fraction=config.kv_cache_fraction, cpu_decode_kernel=config.cpu_decode_kernel)
        budget = self.runner.kv_budget_bytes
        if self.runner.cache.max_blocks < 1:
            raise ValueError(f"the KV cache budget of {budget} bytes holds no block of {config.block_size} tokens "
                             f"({self.runner.layout.bytes_per_token} bytes per token); raise it (kv_cache_bytes, "
                             "--kv-cache-gib)")
        limit = getattr(model.config, "max_position_embeddings", None) or 8192
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the target's context of {limit} "
                             "positions (its max_position_embeddings); lower it (--max-model-len)")
        self.scheduler = Scheduler(_scheduler_config(config, device, self.runner.cache.max_blocks,
                                                     self.runner.position))
        log.info("KV cache: budget %.1f MiB = %d blocks of %d tokens (%d bytes per token); step budget %d tokens",
                 budget / 2**20, self.runner.cache.max_blocks, config.block_size,
                 self.runner.layout.bytes_per_token, self.scheduler.config.max_num_batched_tokens)
        self.max_model_len = config.max_model_len or min(limit, 8192)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.vocab_size = model.get_input_embeddings().num_embeddings   # prompt ids must be below this
        self._generators: dict[str, torch.Generator] = {}
        self.processors = LogitsProcessors(self.eos_ids)
        self.step_listeners: list[Callable[[StepStats], None]] = []
        self.vectors = vectors
        if vectors is not None:
            _check_vector_layout(vectors.layout, self.steering_layout)
        self.vector_worker = _vector_worker(generator, config, device)
        if self.vector_worker is not None:   # its thread ends with the engine (close() ends it earlier)
            weakref.finalize(self, self.vector_worker.close, None)

    @property
    def has_generator(self) -> bool:
        return self.generator is not None

    @property
    def generator(self):
        return self._generator

    @generator.setter
    def generator(self, generator) -> None:
        """Swap the generator (same layout): the worker's next batch uses the new one."""
        self._generator = generator
        if self.vector_worker is not None:
            self.vector_worker.generator = generator

    # ---- admission ------------------------------------------------------------------------------
    def validate(self, request: Request) -> None:
        """Checks that need no engine state (safe from any thread). Raises ValueError / PromptTooLong."""
        if not request.prompt_ids:
            raise InvalidRequest("prompt is empty: send at least one token")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        for name, ids in (("stop_token_ids", request.params.stop_token_ids),
                          ("logit_bias", [t for t, _ in request.params.logit_bias]),
                          ("allowed_token_ids", request.params.allowed_token_ids or ()),
                          ("bad_words", [t for word in request.params.bad_words_ids for t in word])):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequest(f"{name}: token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                                     name)
        params = request.params
        if params.allowed_token_ids is not None:   # nothing left to sample: the sampler would pick token 0
            allowed = set(params.allowed_token_ids) - set(completing(params.bad_words_ids, ()))   # banned from the start
            if not allowed:
                raise InvalidRequest("allowed_token_ids holds only tokens that bad_words ban: allow another token "
                                     "or drop the bad word", "allowed_token_ids")
            if params.min_tokens and allowed <= self.processors.end_tokens(params):
                banned = " or that bad_words ban" if params.bad_words_ids else ""
                raise InvalidRequest("allowed_token_ids holds only tokens that end the completion (EOS or "
                                     f"stop_token_ids){banned}, and min_tokens forbids the first before its count: "
                                     "allow another token or drop min_tokens", "allowed_token_ids")
        total = request.num_prompt_tokens + request.params.max_tokens
        if total > self.max_model_len:
            raise PromptTooLong(f"prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                                f"({request.params.max_tokens}) = {total} exceeds the context of "
                                f"{self.max_model_len} tokens; shorten the prompt or lower max_tokens")
        if not self.scheduler.fits(total):
            capacity = self.scheduler.blocks.capacity_tokens
            raise PromptTooLong(f"prompt + max_tokens = {total} tokens do not fit the KV cache budget of {capacity} "
                                f"tokens; raise the KV cache memory (kv_cache_bytes / --kv-cache-gib), shorten the "
                                f"prompt or lower max_tokens")
        if request.steering.uses_named_vector:
            self._check_vector_name(request.steering.vector)
        if request.steering.mode == "vector" and request.vector is not None:
            raise ValueError("Request.vector stands in for the generator's vector, which mode 'vector' does not use; "
                             "use mode 'atv' to add it to the named vector")
        if request.steering.mode == "atv" and request.vector is None:
            if self.generator is None:
                raise InvalidRequest("steering mode 'atv' needs a generator, and this server has none; use mode "
                                     "'off'", "atv.mode")
            try:
                self.generator.format_input(request.prompt_text, request.steering.examples)
            except ValueError as exc:   # examples this generator cannot read, with the fix
                raise InvalidRequest(str(exc), "atv.examples") from None
            if not request.prompt_text.strip() and not request.steering.examples and request.steering.scale != 0:
                raise InvalidRequest("steering mode 'atv' needs prompt text for the generator to read; "
                                     "send a non-empty prompt or use mode 'off'")

    def _check_vector_name(self, name: str) -> None:
        if self.vectors is None:
            raise InvalidRequest(f"unknown vector {name!r}: this server has no named vectors (start it with "
                                 "--vectors DIR)", "atv.vector")
        if name not in self.vectors:
            known = self.vectors.names()
            listed = ", ".join(known[:50]) + (f" and {len(known) - 50} more" if len(known) > 50 else "")
            raise InvalidRequest(f"unknown vector {name!r}; this server has: {listed or '(none)'}", "atv.vector")

    def add_request(self, request: Request) -> None:
        self.validate(request)
        self.scheduler.add(request)  # raises QueueFull
        self._generators[request.request_id] = make_generator(request.params.seed)
        self.prepare_vector(request)

    def prepare_vector(self, request: Request) -> None:
        """Hand a validated request's generator input to the worker now (any thread; once per request).
        add_request() calls it; AsyncEngine.submit() calls it earlier, so that the vector is being made
        while the request is still on its way to the engine thread."""
        if self.vector_worker is not None and request.vector_job is None and _needs_generator(request):
            request.vector_job = self.vector_worker.submit(self._generator_input(request))

    def start_vector_worker(self, on_ready: Callable[[], None] | None = None) -> None:
        """Start the generator thread now (step() does it too); on_ready() is called on it after each batch."""
        if self.vector_worker is not None:
            if on_ready is not None:
                self.vector_worker.listeners.append(on_ready)
            self.vector_worker.start()

    def close(self) -> None:
        """Stop the generator thread (the engine cannot make vectors afterwards)."""
        if self.vector_worker is not None:
            self.vector_worker.close()

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.find(request_id)
        if request is None:
            return None
        request.finish("abort")
        return self._retire(request, [], None)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def make_queued_vectors(self) -> bool:
        """For a caller with nothing to step (AsyncEngine's loop, _schedule): run the generator here, on the
        calling thread, over the vectors queued for the worker; until the next step the worker thread leaves
        the queue to this thread. -> whether any were made."""
        if self.vector_worker is None:
            return False
        self.vector_worker.engine_idle(True)
        return self.vector_worker.run_here()

    def ready_to_step(self) -> bool:
        """Whether step() has something to compute now, without waiting for a vector."""
        return bool(self.scheduler.running) or any(r.ready for r in self.scheduler.waiting)

    def stats(self) -> EngineStats:
        blocks = self.scheduler.blocks
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.runner.slots_used,
                           blocks.num_used, blocks.num_blocks, self.scheduler.prefix_queries,
                           self.scheduler.prefix_hits, self.scheduler.num_preemptions, self.scheduler.num_queued)

    def fail(self, request: Request, message: str) -> RequestOutput:
        """End a request that never entered the scheduler with an error output."""
        request.finish("error", message)
        _drop_vector_job(request)
        return self._emit(request, [], None)

    def fail_all(self, message: str) -> None:
        """End every queued and running request with an error output (the engine cannot go on)."""
        for request in (*self.scheduler.running, *self.scheduler.waiting):
            request.finish("error", message)
            _drop_vector_job(request)
            self._emit(request, [], None)

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self._schedule()
        if batch is None:
            return []
        if self.vector_worker is not None:
            self.vector_worker.engine_idle(False)   # vectors that arrive now are made beside the step
        start = time.perf_counter()
        outputs: list[RequestOutput] = []
        fresh = [r for r in batch.requests if r.scheduled_time is None]  # not seen before (not a recompute)
        if fresh:
            self._attach_vectors(fresh, outputs)
        chunks = self.scheduler.reuse_attached([c for c in batch.chunks if not c.request.finished])
        sampled = [c.request for c in chunks if c.samples]
        if chunks:
            scored = [i for i, c in enumerate(chunks) if _scores_prompt(c)]
            if scored:   # some request asked for prompt logprobs: every position of those chunks
                logits, prompt_logits = self.runner.run_scored(chunks, scored)
            else:
                logits, prompt_logits = self.runner.run(chunks), {}
            self.scheduler.cache_computed(chunks)
            for i, chunk_logits in prompt_logits.items():
                self._score_prompt(chunks[i], chunk_logits)
            del prompt_logits
            if sampled:
                outputs += self._sample_and_append(sampled, logits)
        duration = time.perf_counter() - start
        stats = StepStats(batch.phase, duration, len(chunks))
        for listener in self.step_listeners:
            listener(stats)
        return outputs

    def _schedule(self):
        """The next batch. When nothing can run until a vector is made, make the queued vectors here (or wait for
        the worker's run under way)."""
        worker = self.vector_worker
        if worker is not None:
            worker.start()
        while True:
            seen = worker.completed if worker is not None else 0
            batch = self.scheduler.schedule()
            if batch is not None or worker is None or self.ready_to_step() or not self.scheduler.waiting:
                return batch
            if not self.make_queued_vectors():   # nothing else to compute: make them on this thread, or
                worker.wait_past(seen)           # wait for the worker's run

    def _attach_vectors(self, requests: list[Request], outputs: list[RequestOutput]) -> list[Request]:
        """Give each admitted steered request its delta `scale * (G + vector_weight * N)` [L_sel, d]:
        G = the generator's vector (made by the worker, or without one a generator run for the whole prefill
        batch) or the precomputed `Request.vector`; N = the named vector. Requests whose vector is unusable
        fail alone."""
        now = time.monotonic()
        for request in requests:
            request.scheduled_time = now
            request.steering_report = SteeringReport(request.steering.mode, request.steering.scale,
                                                     request.steering.vector if request.steering.uses_named_vector
                                                     else None)
        steered = [r for r in requests if r.steering.mode != "off" and r.steering.scale != 0]
        named = {id(r): self._named_vector(r) for r in steered if r.steering.uses_named_vector}
        generated = self._generated_vectors([r for r in steered if not r.finished])
        for request in (r for r in steered if not r.finished):
            vector, gate, seconds = generated.get(id(request), (None, None, 0.0))
            self._assign(request, _delta(request.steering, vector, named.get(id(request))), gate, seconds)
        failed = [r for r in requests if r.finished]
        for request in failed:
            outputs.append(self._retire(request, [], None))
        return [r for r in requests if not r.finished]

    def _named_vector(self, request: Request) -> torch.Tensor | None:
        """N [L_sel, d] (CPU, fp32) of a request, as the store holds it now; fails the request if a reload
        removed the name since it was validated."""
        found = self.vectors.get(request.steering.vector) if self.vectors is not None else None
        if found is None:
            request.finish("error", f"named vector {request.steering.vector!r} was removed (the vectors folder "
                                    "was reloaded) before this request started; GET /v1/models lists the current "
                                    "ones (as <model>:vector/<name>)", "atv.vector")
            return None
        return found.vector

    def _generated_vectors(self, requests: list[Request]) -> dict[int, tuple[torch.Tensor, float, float]]:
        """G for the mode-atv requests: `Request.vector` when given, else the generator's (a failed generator
        run fails its request). -> {id(request): (G [L_sel, d], gate, generator seconds of its batch)}."""
        atv = [r for r in requests if r.steering.uses_generator]
        out = {id(r): (r.vector.float(), 1.0, 0.0) for r in atv if r.vector is not None}  # static vectors, eval
        pending = [r for r in atv if r.vector is None]
        for request, result in zip(pending, self._vector_results(pending)):
            if result.error is not None:
                request.finish("error", result.error)
            else:
                out[id(request)] = (result.vector, result.gate, result.seconds)
        return out

    def _vector_results(self, requests: list[Request]) -> list[VectorResult]:
        """Each request's generator result: the worker's (the scheduler admits a request once its job is done),
        or, for requests it never got (no worker), one generator run over them now."""
        jobs = [r.vector_job for r in requests]
        for request in requests:
            request.vector_job = None
        missing = [r for r, job in zip(requests, jobs) if job is None]
        made = iter(run_batch(self.generator, [self._generator_input(r) for r in missing]) if missing else [])
        results = [job.result if job is not None else next(made) for job in jobs]
        if any(result is None for result in results):
            raise RuntimeError("a request was scheduled before its vector was made (Request.ready not honoured)")
        return results

    def _generator_input(self, request: Request) -> str:
        """What the generator reads: the query, with the request's demonstrations in the checkpoint's format."""
        return self.generator.format_input(request.prompt_text, request.steering.examples)

    def _assign(self, request: Request, vector: torch.Tensor, gate: float | None, generator_s: float) -> None:
        norm = float(vector.norm())
        request.steering_report = replace(request.steering_report, gate=gate, vector_norm=norm, generator_s=generator_s)
        if not math.isfinite(norm):
            request.finish("error", "the steering vector is non-finite (the generator's output, or a scale or "
                                    "vector_weight too large)")
        elif norm > 0:
            self.runner.assign_vector(request, vector)
        else:   # an all-zero delta (a closed gate): no slot, and its KV is steering off's (prefix cache included)
            request.steering = replace(request.steering, scale=0.0)

    def _score_prompt(self, chunk, logits: torch.Tensor) -> None:
        """Prompt logprobs from one chunk's logits [chunk length, V]: position p scores prompt token p + 1
        (token 0 gets a None entry). Positions already scored (a recompute after preemption) are skipped."""
        request = chunk.request
        if not request.prompt_logprobs:
            first = TokenLogprob(request.prompt_ids[0], None, [])
            self._name_tokens(first)
            request.prompt_logprobs.append(first)
        lo = max(chunk.start, len(request.prompt_logprobs) - 1)
        hi = min(chunk.end, request.num_prompt_tokens - 1)
        if lo >= hi:
            return
        targets = torch.tensor(request.prompt_ids[lo + 1: hi + 1], device=logits.device)
        for entry in token_logprobs(logits[lo - chunk.start: hi - chunk.start], targets,
                                    request.params.prompt_logprobs):
            self._name_tokens(entry)
            request.prompt_logprobs.append(entry)

    def _sample_and_append(self, requests: list[Request], logits: torch.Tensor) -> list[RequestOutput]:
        scoring_only = [r for r in requests if r.params.max_tokens == 0]
        for request in scoring_only:   # max_tokens 0: the prompt is scored, nothing is sampled
            request.finish("length")
        outputs = [self._retire(r, [], None) for r in scoring_only]
        if scoring_only:
            keep = [i for i, r in enumerate(requests) if r.params.max_tokens > 0]
            requests, logits = [requests[i] for i in keep], logits[keep]
            if not requests:
                return outputs
        return outputs + self._sample_tokens(requests, logits)

    def _sample_tokens(self, requests: list[Request], logits: torch.Tensor) -> list[RequestOutput]:
        processed = self.processors.process(logits, requests)   # logprobs below: from the model's own logits
        empty, outputs = self.processors.empty_rows(processed, requests), []
        if empty:   # allowed_token_ids all banned by a bad word completed in the output: nothing may be sampled
            for i in empty:
                request, count = requests[i], len(requests[i].output_ids)
                ending = count < request.params.min_tokens   # min_tokens bans EOS too
                causes = "allowed_token_ids, bad_words and min_tokens" if ending else "allowed_token_ids and bad_words"
                request.finish("error", f"{causes} leave no token to sample after {count} output "
                               f"token{'s' if count != 1 else ''}: allow another token or drop the bad word"
                               f"{' or min_tokens' if ending else ''}", "bad_words")
            outputs = [self._retire(requests[i], [], None) for i in empty]
            keep = [i for i in range(len(requests)) if i not in empty]
            if not keep:
                return outputs
            requests, logits, processed = [requests[i] for i in keep], logits[keep], processed[keep]
        params = [r.params for r in requests]
        tokens = sample(processed, params, [self._generators[r.request_id] for r in requests])
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs = {}
        if want:
            index = torch.tensor(want)
            top_n = max(params[i].logprobs for i in want)
            for i, lp in zip(want, token_logprobs(logits[index], tokens[index], top_n)):
                lp.top = lp.top[: params[i].logprobs]
                logprobs[i] = lp
        now = time.monotonic()
        for i, (request, token) in enumerate(zip(requests, tokens.tolist())):
            request.first_token_time = request.first_token_time or now
            outputs.append(self._append(request, token, logprobs.get(i)))
        return outputs

    def _append(self, request: Request, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        params = request.params
        request.output_ids.append(token)
        if request.output is None:
            request.output = OutputText(self.tokenizer, params.stop, params.skip_special_tokens,
                                        params.include_stop_str_in_output, params.min_tokens)
        text = request.output
        eos = token in self.eos_ids and not params.ignore_eos
        stop_token = eos or token in params.stop_token_ids
        if stop_token:   # not part of the text unless include_stop_str_in_output (as vLLM)
            delta = (text.add(token) if params.include_stop_str_in_output else "") + text.finish()
        else:
            delta = text.add(token)
        if stop_token or text.stopped:
            request.finish("stop")
        elif len(request.output_ids) >= params.max_tokens or request.num_tokens >= self.max_model_len:
            delta += text.finish()
            request.finish("stop" if text.stopped else "length")
        if stop_token:   # vLLM's stop_reason: a stop_token_ids token, not EOS; else the stop string
            request.stop_reason = None if eos else token
        elif request.finish_reason == "stop":
            request.stop_reason = text.stop_string
        if logprob is not None:
            self._name_tokens(logprob)
        if request.finished:
            return self._retire(request, [token], logprob, delta)
        return self._emit(request, [token], logprob, delta)

    def _name_tokens(self, logprob: TokenLogprob) -> None:
        """Each token of a logprob entry decoded alone (the response lists them as text) and its bytes."""
        logprob.text = self.tokenizer.decode([logprob.token_id])
        logprob.raw = token_bytes(self.tokenizer, logprob.token_id, logprob.text)
        logprob.top_text = [self.tokenizer.decode([token]) for token, _ in logprob.top]
        logprob.top_raw = [token_bytes(self.tokenizer, token, text) for (token, _), text in
                           zip(logprob.top, logprob.top_text)]

    def _emit(self, request: Request, token_ids: list[int], logprob, delta: str = "") -> RequestOutput:
        queue_time = request.scheduled_time - request.arrival_time if request.scheduled_time is not None else None
        prompt_logprobs = None
        if request.prompt_logprobs and not request.prompt_logprobs_sent and \
                len(request.prompt_logprobs) == request.num_prompt_tokens:
            prompt_logprobs, request.prompt_logprobs_sent = request.prompt_logprobs, True
        out = RequestOutput(request.request_id, delta, token_ids, [logprob] if logprob else None, request.finished,
                            finish_reason=request.finish_reason, stop_reason=request.stop_reason,
                            error=request.error, error_field=request.error_field,
                            prompt_tokens=request.num_prompt_tokens, completion_tokens=len(request.output_ids),
                            steering=request.steering_report, queue_time_s=queue_time, prompt_logprobs=prompt_logprobs)
        if request.on_output is not None:
            request.on_output(out)
        return out

    def _retire(self, request: Request, token_ids: list[int], logprob, delta: str = "") -> RequestOutput:
        self.scheduler.finish(request)
        self.runner.release(request)
        self._generators.pop(request.request_id, None)
        self.processors.forget(request.request_id)
        _drop_vector_job(request)
        if request.status is not Status.FINISHED:
            request.finish("abort")
        return self._emit(request, token_ids, logprob, delta)


def _vector_worker(generator, config: EngineConfig, device: torch.device) -> VectorWorker | None:
    wanted = config.generator_worker if config.generator_worker is not None else device.type != "cpu"
    if generator is None or not wanted:
        return None
    return VectorWorker(generator, threads=config.generator_threads, max_batch=config.max_running)


def _needs_generator(request: Request) -> bool:
    """Whether the request's delta includes the generator's vector (mode atv, scale != 0, no Request.vector)."""
    return request.steering.uses_generator and request.steering.scale != 0 and request.vector is None


def _drop_vector_job(request: Request) -> None:
    """The request leaves: the worker skips its job if it has not started it; the result is dropped."""
    if request.vector_job is not None:
        request.vector_job.cancelled = True
        request.vector_job = None


def _scores_prompt(chunk) -> bool:
    """Whether this chunk's logits are needed for its request's prompt logprobs."""
    request = chunk.request
    return request.params.prompt_logprobs is not None and len(request.prompt_logprobs) < request.num_prompt_tokens \
        and chunk.start < max(request.num_prompt_tokens - 1, 1)


def _delta(spec, generated: torch.Tensor | None, named: torch.Tensor | None) -> torch.Tensor:
    """scale * (G + vector_weight * N) [L_sel, d]. An absent term is left out rather than added as zeros, so a
    lone G gives exactly `G * scale` and a lone N (weight 1) exactly `N * scale`."""
    total = generated
    if named is not None:
        weighted = named if spec.vector_weight == 1 else named * spec.vector_weight
        total = weighted if total is None else total + weighted.to(total.device)
    return total * spec.scale


def _check_vector_layout(have: VectorLayout, want: VectorLayout) -> None:
    if (have.target_layers, have.layers, have.hidden_size) != (want.target_layers, want.layers, want.hidden_size):
        raise ValueError(f"the named vectors were validated for {have.describe()}, but this engine steers "
                         f"{want.describe()}; build the VectorStore with VectorLayout.for_target(model, generator)")



def _scheduler_config(config: EngineConfig, device: torch.device, num_blocks: int, position: str) -> SchedulerConfig:
    """Engine settings -> scheduler limits (the unset token budgets default by device) and prefix caching."""
    cuda = device.type == "cuda"
    return SchedulerConfig(max_running=config.max_running,
                           max_num_batched_tokens=config.max_num_batched_tokens or (2048 if cuda else 512),
                           max_waiting=config.max_waiting, block_size=config.block_size, num_blocks=num_blocks,
                           long_prompt_tokens=config.long_prompt_tokens,
                           long_prefill_chunk=config.long_prefill_chunk or (256 if cuda else 8),
                           prefix_caching=config.enable_prefix_caching, steer_position=position)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    return ids
