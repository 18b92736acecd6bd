"""`/metrics`: Prometheus figures of the server, in a registry of its own (one per app, so tests and
several apps in one process never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from dlmoe.sampling import GenerationStats

ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class ServeMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # the `*_created` timestamp series are noise for a dashboard
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dlmoe_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)  # fmt: skip
        self.rejected = Counter("dlmoe_requests_rejected", "requests refused before queueing", ["reason"], registry=r)
        self.cancelled = Counter("dlmoe_requests_cancelled", "requests whose client went away", registry=r)
        self.queue_depth = Gauge("dlmoe_queue_depth", "requests waiting for a batch", registry=r)
        self.running = Gauge("dlmoe_running_requests", "requests in the generate call now running", registry=r)
        self.batch_rows = Histogram("dlmoe_batch_rows", "rows per generate call", buckets=ROWS, registry=r)
        self.batch_requests = Histogram("dlmoe_batch_requests", "requests per generate call", buckets=ROWS,
                                        registry=r)  # fmt: skip
        self.batch_failures = Counter("dlmoe_batch_failures", "generate calls that raised (retried alone)",
                                      registry=r)  # fmt: skip
        self.tokens = Counter("dlmoe_generated_tokens", "generated canvas positions (EOS fill included)", registry=r)
        self.tokens_per_s = Gauge("dlmoe_tokens_per_second", "generated tokens/s of the last generate call",
                                  registry=r)  # fmt: skip
        self.forwards = Counter("dlmoe_forwards", "model forwards", registry=r)
        self.unique_experts = Histogram(
            "dlmoe_unique_experts_per_block", "routed experts per layer per denoising forward over the decoding "
            "block (dMoE's metric), one observation per generate call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )  # fmt: skip
        self.latency = Histogram("dlmoe_request_latency_seconds", "time from arrival to the response's end",
                                 ["endpoint"], buckets=SECONDS, registry=r)  # fmt: skip

    def batch_done(self, requests: int, rows: int, stats: GenerationStats | None) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        if stats is None:
            return
        self.tokens.inc(stats.generated_tokens)
        self.forwards.inc(stats.num_forwards)
        self.tokens_per_s.set(stats.tokens_per_second if stats.seconds > 0 else 0.0)
        if stats.unique_experts is not None:
            self.unique_experts.observe(stats.unique_experts)
