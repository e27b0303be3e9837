"""WorkerMetrics: the worker's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Content type of `/metrics` (Prometheus text format).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class WorkerMetrics:
    """Request outcomes, queue, tokens and latencies.

    A registry per worker (not the process-wide default) keeps several workers in one process, as
    in the tests, from colliding.
    """

    def __init__(self, queue_length: Callable[[], int], running: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llava_worker_requests",
            "Requests by outcome: stop, length, cancelled, error, invalid, exceeds_context, rejected.",
            ["outcome"],
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "llava_worker_generated_tokens", "Tokens generated, for every request.", registry=self.registry
        )
        Gauge(
            "llava_worker_queue_length", "Requests running plus requests waiting for a slot.", registry=self.registry
        ).set_function(lambda: float(queue_length()))
        Gauge("llava_worker_running_requests", "Requests in the decode batch.", registry=self.registry).set_function(
            lambda: float(running())
        )
        self.time_to_first_token = Histogram(
            "llava_worker_time_to_first_token_seconds",
            "From the request's arrival to its first generated text.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.time_between_tokens = Histogram(
            "llava_worker_time_between_tokens_seconds",
            "Average time per token between successive outputs of a request.",
            buckets=_TBT_BUCKETS,
            registry=self.registry,
        )

    def count(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
