"""Prometheus metrics of one server: a `Metrics` object owns its own `CollectorRegistry` (no module globals).

Names are fixed (the deploy dashboards, alerts and autoscaler query them); buckets follow vLLM's.
Engine-side series come from two places: a step listener on the AsyncEngine (step time, batch size; called
on the engine thread, so it only observes) and gauges read at scrape time from `AsyncEngine.stats()`, the
snapshot the engine thread takes after every step or idle wait (running, waiting, vector slots, KV blocks, and
the cumulative prefix-cache token counts and preemptions, exported as counters by `EngineCounters`), and its
error (engine up). Per-request series are recorded by server/jobs.py through the `observe_*` / `count_*`
methods, labelled `model_name` (the model id or steering preset id the request named).

With `vllm=True` the same observations also feed vLLM-named series (`vllm:...`, labelled `model_name`; the
engine gauges carry the served base id), so dashboards, alerts and autoscalers written for vLLM read this
server unchanged. promtool's linter rejects ':' in names by design, so they are off by default.
"""
from __future__ import annotations


from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
                 640.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, model_name: str = "", vllm: bool = False):
        """model_name: the served base id (series created up front carry it); vllm: also export vllm: series."""
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        self._histograms()
        self._counters()
        self._gauges()
        self.vllm = VLLMSeries(self.registry, model_name) if vllm else None

    def _histograms(self) -> None:
        h = lambda name, doc, buckets, labels=(): Histogram(  # noqa: E731
            name, doc, labels, buckets=buckets, registry=self.registry)
        model = ("model_name",)
        self.e2e_latency = h("atv_e2e_request_latency_seconds", "Arrival to finish of a request", REQUEST_BUCKETS,
                             model)
        self.ttft = h("atv_time_to_first_token_seconds", "Arrival to first generated token", TTFT_BUCKETS, model)
        self.inter_token = h("atv_inter_token_latency_seconds", "Time between generated tokens", ITL_BUCKETS, model)
        self.queue_time = h("atv_request_queue_time_seconds", "Arrival to admission into a prefill", QUEUE_BUCKETS,
                            model)
        self.vector_generation = h("atv_vector_generation_seconds", "Generator time of the batch that made a "
                                   "request's vector", STEP_BUCKETS)
        self.step_duration = h("atv_step_duration_seconds", "Engine step time", STEP_BUCKETS, ("phase",))
        self.batch_size = h("atv_batch_size", "Requests in one engine step", BATCH_BUCKETS)
        for phase in ("prefill", "decode"):
            self.step_duration.labels(phase)

    def _counters(self) -> None:
        c = lambda name, doc, labels=(): Counter(name, doc, labels, registry=self.registry)  # noqa: E731
        self.prompt_tokens = c("atv_prompt_tokens", "Prompt tokens of admitted requests", ("model_name",))
        self.generation_tokens = c("atv_generation_tokens", "Generated tokens", ("model_name",))
        self.requests_finished = c("atv_requests_finished", "Finished engine requests", ("finish_reason", "model_name"))
        self.http_requests = c("atv_http_requests", "HTTP responses of the /v1 API", ("status",))
        self.client_disconnects = c("atv_client_disconnects", "Requests whose client went away before the end")
        self.requests_steering = c("atv_requests_steering", "Admitted engine requests by steering mode",
                                   ("mode", "model_name"))
        for reason in ("stop", "length", "abort", "error"):  # series exist from the start: rate() works at once
            self.requests_finished.labels(reason, self.model_name)
        for mode in ("atv", "off"):
            self.requests_steering.labels(mode, self.model_name)
        self.prompt_tokens.labels(self.model_name)
        self.generation_tokens.labels(self.model_name)
        for series in (self.e2e_latency, self.ttft, self.inter_token, self.queue_time):   # rate() from the start
            series.labels(self.model_name)

    def _gauges(self) -> None:
        g = lambda name, doc: Gauge(name, doc, registry=self.registry)  # noqa: E731
        self.num_running = g("atv_num_requests_running", "Requests in the running batch")
        self.num_waiting = g("atv_num_requests_waiting", "Requests in the waiting queue")
        self.vector_slots_used = g("atv_vector_slots_used", "Occupied rows of the steering vector table")
        self.kv_cache_usage = g("atv_kv_cache_usage", "Fraction of the KV cache blocks in use (0-1)")
        self.engine_up = g("atv_engine_up", "1 unless the engine loop has died (mirrors /health)")
        self.engine_up.set(1)

    def bind(self, async_engine) -> None:
        """Read the engine's gauges at scrape time and listen to its steps."""
        self.num_running.set_function(lambda: async_engine.stats().num_running)
        self.num_waiting.set_function(lambda: async_engine.stats().num_waiting)
        self.vector_slots_used.set_function(lambda: async_engine.stats().vector_slots_used)
        self.kv_cache_usage.set_function(lambda: _usage(async_engine.stats()))
        self.engine_up.set_function(lambda: 1 if async_engine.error is None else 0)
        self.registry.register(EngineCounters(async_engine, self.model_name, vllm=self.vllm is not None))
        async_engine.add_step_listener(self.on_step)
        if self.vllm is not None:
            self.vllm.bind(async_engine)

    # ---- per request (server/jobs.py, on the event loop) ----------------------------------------
    def count_admitted(self, model_name: str, mode: str, prompt_tokens: int) -> None:
        self.prompt_tokens.labels(model_name).inc(prompt_tokens)
        self.requests_steering.labels(mode, model_name).inc()
        if self.vllm is not None:
            self.vllm.prompt_tokens.labels(model_name).inc(prompt_tokens)

    def count_generated(self, model_name: str, tokens: int) -> None:
        self.generation_tokens.labels(model_name).inc(tokens)
        if self.vllm is not None:
            self.vllm.generation_tokens.labels(model_name).inc(tokens)

    def observe_ttft(self, model_name: str, seconds: float) -> None:
        self.ttft.labels(model_name).observe(seconds)
        if self.vllm is not None:
            self.vllm.ttft.labels(model_name).observe(seconds)

    def observe_inter_token(self, model_name: str, seconds: float) -> None:
        self.inter_token.labels(model_name).observe(seconds)
        if self.vllm is not None:
            self.vllm.inter_token.labels(model_name).observe(seconds)

    def observe_finish(self, model_name: str, reason: str, e2e_s: float, queue_s: float | None) -> None:
        self.requests_finished.labels(reason, model_name).inc()
        self.e2e_latency.labels(model_name).observe(e2e_s)
        if queue_s is not None:
            self.queue_time.labels(model_name).observe(queue_s)
        if self.vllm is not None:
            self.vllm.observe_finish(model_name, reason, e2e_s, queue_s)

    def on_step(self, stats) -> None:
        """Step listener (engine thread): observe only."""
        self.step_duration.labels(stats.phase).observe(stats.duration_s)
        self.batch_size.observe(stats.batch_size)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class VLLMSeries:
    """The vLLM-named request and engine series (`vllm:*`, label `model_name`), fed by `Metrics`."""

    def __init__(self, registry: CollectorRegistry, model_name: str):
        model = ("model_name",)
        h = lambda name, doc, buckets: Histogram(name, doc, model, buckets=buckets, registry=registry)  # noqa: E731
        self.model_name = model_name
        self.ttft = h("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                      TTFT_BUCKETS)
        self.inter_token = h("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        self.e2e_latency = h("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_BUCKETS)
        self.queue_time = h("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for "
                            "request.", QUEUE_BUCKETS)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", model,
                                     registry=registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", model,
                                         registry=registry)
        self.request_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                       ("finished_reason", "model_name"), registry=registry)
        self.num_running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                                 model, registry=registry)
        self.num_waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                                 model, registry=registry)
        self.kv_cache_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                                    model, registry=registry)
        for series in (self.ttft, self.inter_token, self.e2e_latency, self.queue_time, self.prompt_tokens,
                       self.generation_tokens):
            series.labels(model_name)
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(reason, model_name)

    def bind(self, async_engine) -> None:
        self.num_running.labels(self.model_name).set_function(lambda: async_engine.stats().num_running)
        self.num_waiting.labels(self.model_name).set_function(lambda: async_engine.stats().num_waiting)
        self.kv_cache_usage.labels(self.model_name).set_function(lambda: _usage(async_engine.stats()))

    def observe_finish(self, model_name: str, reason: str, e2e_s: float, queue_s: float | None) -> None:
        if reason != "error":   # vLLM counts finished requests as successes, aborted ones included
            self.request_success.labels(reason, model_name).inc()
        self.e2e_latency.labels(model_name).observe(e2e_s)
        if queue_s is not None:
            self.queue_time.labels(model_name).observe(queue_s)


class EngineCounters:
    """The engine's cumulative counts, read at scrape time: prompt tokens looked up in the prefix cache, those
    found there, and preemptions (running requests whose KV blocks were taken back, to be recomputed); with
    vllm=True also vLLM's `vllm:prefix_cache_queries` / `_hits` and `vllm:num_preemptions`."""

    def __init__(self, async_engine, model_name: str, vllm: bool):
        self.engine, self.model_name, self.vllm = async_engine, model_name, vllm

    def describe(self):
        return self._families(0, 0, 0)

    def collect(self):
        stats = self.engine.stats()
        return self._families(stats.prefix_cache_queries, stats.prefix_cache_hits, stats.num_preemptions)

    def _families(self, queries: int, hits: int, preemptions: int) -> list[CounterMetricFamily]:
        families = [CounterMetricFamily("atv_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                        value=queries),
                    CounterMetricFamily("atv_prefix_cache_hits", "Prompt tokens found in the prefix cache "
                                        "(reused, not computed)", value=hits),
                    CounterMetricFamily("atv_num_preemptions", "Running requests whose KV blocks were taken back "
                                        "to be recomputed later (KV cache full)", value=preemptions)]
        if self.vllm:
            for name, doc, value in (("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of "
                                      "queried tokens.", queries),
                                     ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached "
                                      "tokens.", hits),
                                     ("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                                      preemptions)):
                family = CounterMetricFamily(name, doc, labels=["model_name"])
                family.add_metric([self.model_name], value)
                families.append(family)
        return families


def _usage(stats) -> float:
    return stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
