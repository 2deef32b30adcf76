"""Prometheus metrics (names follow vLLM's `vllm:*`), one CollectorRegistry per app.

Label sets are bounded: route templates (never raw paths), status codes, finish reasons, job statuses. No tenant,
prefix or key ever becomes a label.
"""

from __future__ import annotations

from collections import Counter as _Counter
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

P = "prefixserve:"

LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
# vLLM's (1, 2, 5 steps up to its max_model_len)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
               0.75, 1.0, 2.5)  # fmt: skip
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


class _EngineCollector(Collector):
    """Reads engine/prefix-cache/job state at scrape time (no per-request cost)."""

    def __init__(self, state: Callable[[], dict[str, Any] | None]) -> None:
        self._state = state

    def collect(self) -> Iterable[Metric]:
        s = self._state() or {}
        running = GaugeMetricFamily(P + "num_requests_running", "Requests in the running batch")
        running.add_metric([], s.get("running", 0))
        yield running
        waiting = GaugeMetricFamily(P + "num_requests_waiting", "Requests waiting to be scheduled")
        waiting.add_metric([], s.get("waiting", 0))
        yield waiting
        for name, doc in (
            ("prefix_cache_hits", "Prefix cache lookups served from device memory"),
            (
                "prefix_cache_misses",
                "Prefix cache lookups (one per request) that found the prefix not resident",
            ),
            ("prefix_cache_fetches", "Prefix reads from the store (a miss joins a read under way)"),
            ("prefix_cache_evictions", "Prefixes evicted from device memory"),
            ("prefix_cache_load_errors", "Prefix fetches that failed (store down, corrupt, wrong model)"),
        ):
            c = CounterMetricFamily(P + name, doc)
            c.add_metric([], s.get(name, 0))
            yield c
        g = GaugeMetricFamily(P + "prefix_cache_resident_bytes", "Bytes of KV pool held by resident prefixes")
        g.add_metric([], s.get("prefix_cache_resident_bytes", 0))
        yield g
        g = GaugeMetricFamily(P + "prefix_cache_resident_prefixes", "Prefixes resident in device memory")
        g.add_metric([], s.get("prefix_cache_resident_prefixes", 0))
        yield g
        g = GaugeMetricFamily(
            P + "kv_cache_usage_perc",
            "Fraction of KV cache blocks in use (idle resident prefixes, evicted on demand, count as free)",
        )
        g.add_metric([], s.get("kv_cache_usage", 0.0))
        yield g
        for name, doc in (
            ("prompt_cache_query_tokens", "Own tokens of admitted requests looked up in the prompt cache"),
            (
                "prompt_cache_hit_tokens",
                "Of those, tokens whose KV came from the prompt cache (not recomputed)",
            ),
            ("prompt_cache_evictions", "Cached prompt blocks reused for other data"),
            (
                "num_preemptions",
                "Running requests put back in the queue for KV room (their KV recomputed when they resume)",
            ),
            (
                "num_fair_preemptions",
                "Of those, preemptions that gave a row to a tenant below its even share of the rows (fair scheduling)",
            ),
            ("spec_decode_num_draft_tokens", "Speculative (prompt-lookup) tokens drafted and verified"),
            (
                "spec_decode_num_accepted_tokens",
                "Of those, tokens the model agreed with (emitted without a step)",
            ),
        ):
            c = CounterMetricFamily(P + name, doc)
            c.add_metric([], s.get(name, 0))
            yield c
        g = GaugeMetricFamily(
            P + "prompt_cache_blocks", "KV blocks holding cached prompt tokens (in use or free)"
        )
        g.add_metric([], s.get("prompt_cache_blocks", 0))
        yield g
        jobs = GaugeMetricFamily(P + "training_jobs", "Training jobs by status", labels=["status"])
        counts: dict[str, int] = s.get("jobs", {})
        for st in sorted(set(JOB_STATUSES) | set(counts)):
            jobs.add_metric([st], counts.get(st, 0))
        yield jobs
        g = GaugeMetricFamily(
            P + "http_requests_in_flight",
            "HTTP requests let in and not yet answered, bodies still arriving included (what a drain waits for)",
        )
        g.add_metric([], s.get("http_requests_in_flight", 0))
        yield g
        up = GaugeMetricFamily(P + "ready", "1 when the server is ready to serve")
        up.add_metric([], 1.0 if s.get("ready") else 0.0)
        yield up


FINISH_REASONS = ("stop", "length", "abort", "error")  # request_success_total's finished_reason
REJECT_REASONS = ("too_long", "rate_limit", "tenant_limit", "queue_full")  # requests_rejected_total's reason


class Metrics:
    def __init__(self, state: Callable[[], dict[str, Any] | None] | None = None) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            P + "http_requests",
            "HTTP requests by route template and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_success = Counter(
            P + "request_success",
            "Finished generation requests by finish reason",
            ["finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            P + "time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            P + "inter_token_latency_seconds", "Inter-token latency", buckets=ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            P + "e2e_request_latency_seconds",
            "End-to-end generation latency, whatever the finish reason (aborted requests included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            P + "request_queue_time_seconds",
            "Time waiting before first scheduled",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            P + "prompt_tokens", "Prompt tokens processed, whatever the finish reason", registry=r
        )
        self.generation_tokens = Counter(
            P + "generation_tokens",
            "Tokens generated, whatever the finish reason (not the scoring token of echo with max_tokens 0)",
            registry=r,
        )
        # per finished request, as vLLM's dashboards read them
        self.request_prompt_tokens = Histogram(
            P + "request_prompt_tokens",
            "Prompt tokens of each finished request",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.request_generation_tokens = Histogram(
            P + "request_generation_tokens",
            "Generated tokens of each finished request",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.request_max_tokens = Histogram(
            P + "request_params_max_tokens",
            "max_tokens of each finished request",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.prefill_time = Histogram(
            P + "request_prefill_time_seconds",
            "Time from first scheduled to first token (the prompt's prefill)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_time = Histogram(
            P + "request_decode_time_seconds",
            "Time from first token to the last",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            P + "request_inference_time_seconds",
            "Time from first scheduled to the end (prefill + decode)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.distinct_prefixes = Histogram(
            P + "distinct_prefixes_per_batch",
            "Distinct prefixes (tenants) in one engine step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_size = Histogram(
            P + "batch_size",
            "Requests in one engine step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.step_time = Histogram(
            P + "engine_step_seconds", "Duration of one engine step", buckets=ITL_BUCKETS, registry=r
        )
        self.rejected = Counter(
            P + "requests_rejected",
            "Generation requests refused before running, by reason",
            ["reason"],
            registry=r,
        )
        self.config_reloads = Counter(
            P + "config_reloads",
            "Reloads of the API keys file, the tenant limits file and the TLS files, by file (api_keys, "
            "tenant_limits, tls) and result (ok, error)",
            ["file", "result"],
            registry=r,
        )
        # every known label value from the start, at 0 (as vLLM's request_success): rate() and increase() then see
        # the first one, and a dashboard finds the series before anything happened
        for reason in FINISH_REASONS:
            self.request_success.labels(reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        if state is not None:
            r.register(_EngineCollector(state))

    def on_step(self, stats: Any) -> None:
        """Engine thread callback (prometheus-client is thread-safe)."""
        if stats.num_scheduled:
            self.distinct_prefixes.observe(stats.distinct_prefixes)
            self.batch_size.observe(stats.num_scheduled)
            self.step_time.observe(stats.duration_s)


def count_jobs(records: Iterable[Any]) -> dict[str, int]:
    c: _Counter[str] = _Counter()
    for rec in records:
        st = getattr(rec, "status", None)
        if st is None and isinstance(rec, dict):
            st = rec.get("status")
        c[str(getattr(st, "value", st))] += 1
    return dict(c)
