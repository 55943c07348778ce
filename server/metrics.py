"""Prometheus metrics of one server: a `Metrics` object owns its own `CollectorRegistry` (no module globals).

Names are fixed (the deploy dashboards, alerts and autoscaler query them); buckets follow vLLM's.
Engine-side series come from two places: a step listener on the AsyncEngine (step time, batch size; called
on the engine thread, so it only observes) and gauges read at scrape time from `AsyncEngine.stats()`, the
snapshot the engine thread takes after every step or idle wait (running, waiting, vector slots, KV blocks), and its
error (engine up). Per-request series are recorded by server/jobs.py.
"""
from __future__ import annotations


from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._histograms()
        self._counters()
        self._gauges()

    def _histograms(self) -> None:
        h = lambda name, doc, buckets, labels=(): Histogram(  # noqa: E731
            name, doc, labels, buckets=buckets, registry=self.registry)
        self.e2e_latency = h("atv_e2e_request_latency_seconds", "Arrival to finish of a request", REQUEST_BUCKETS)
        self.ttft = h("atv_time_to_first_token_seconds", "Arrival to first generated token", TTFT_BUCKETS)
        self.inter_token = h("atv_inter_token_latency_seconds", "Time between generated tokens", ITL_BUCKETS)
        self.queue_time = h("atv_request_queue_time_seconds", "Arrival to admission into a prefill", QUEUE_BUCKETS)
        self.vector_generation = h("atv_vector_generation_seconds", "Generator time of the batch that made a "
                                   "request's vector", STEP_BUCKETS)
        self.step_duration = h("atv_step_duration_seconds", "Engine step time", STEP_BUCKETS, ("phase",))
        self.batch_size = h("atv_batch_size", "Requests in one engine step", BATCH_BUCKETS)
        for phase in ("prefill", "decode"):
            self.step_duration.labels(phase)

    def _counters(self) -> None:
        c = lambda name, doc, labels=(): Counter(name, doc, labels, registry=self.registry)  # noqa: E731
        self.prompt_tokens = c("atv_prompt_tokens", "Prompt tokens of admitted requests")
        self.generation_tokens = c("atv_generation_tokens", "Generated tokens")
        self.requests_finished = c("atv_requests_finished", "Finished engine requests", ("finish_reason",))
        self.http_requests = c("atv_http_requests", "HTTP responses of the /v1 API", ("status",))
        self.client_disconnects = c("atv_client_disconnects", "Requests whose client went away before the end")
        self.requests_steering = c("atv_requests_steering", "Admitted engine requests by steering mode", ("mode",))
        for reason in ("stop", "length", "abort", "error"):  # series exist from the start: rate() works at once
            self.requests_finished.labels(reason)
        for mode in ("atv", "off"):
            self.requests_steering.labels(mode)

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
        async_engine.add_step_listener(self.on_step)

    def on_step(self, stats) -> None:
        """Step listener (engine thread): observe only."""
        self.step_duration.labels(stats.phase).observe(stats.duration_s)
        self.batch_size.observe(stats.batch_size)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _usage(stats) -> float:
    return stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
