"""WorkerMetrics: the worker's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class CacheStats(Protocol):
    """What the metrics read of a cache (the engine's caches have it; the HTTP edge imports no torch)."""

    hits: int
    misses: int

    @property
    def size(self) -> int: ...

    @property
    def evictions(self) -> int: ...


class PrefixCacheStats(CacheStats, Protocol):
    reused_tokens: int


#: Content type of `/metrics` (Prometheus text format).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_CHUNK_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


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

        self.queue_time = Histogram(
            "llava_worker_queue_time_seconds",
            "From a request's entry into the engine to the start of its prefill.",
            buckets=_QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.prefill_chunk_tokens = Histogram(
            "llava_worker_prefill_chunk_tokens",
            "Tokens in each piece of prefill work (a vision-tower pass counts its image tokens).",
            buckets=_CHUNK_BUCKETS,
            registry=self.registry,
        )

    def watch_caches(self, image_cache: CacheStats, prefix_cache: PrefixCacheStats) -> None:
        """Exports the engine's caches: hits, misses, bytes held, evictions, prompt tokens reused."""
        self.registry.register(_CacheCollector(image_cache, prefix_cache))

    # The engine's observer (see `EngineObserver`); called on the engine thread, which prometheus allows.

    def prefill_chunk(self, tokens: int) -> None:
        self.prefill_chunk_tokens.observe(tokens)

    def queued(self, seconds: float) -> None:
        self.queue_time.observe(seconds)

    def count(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


class _CacheCollector(Collector):
    """Reads the caches' counters at scrape time (plain ints the engine thread updates)."""

    def __init__(self, image_cache: CacheStats, prefix_cache: PrefixCacheStats) -> None:
        self._image_cache = image_cache
        self._prefix_cache = prefix_cache

    def collect(self) -> Iterator[Metric]:
        for name, cache in (("image", self._image_cache), ("prefix", self._prefix_cache)):
            what = "image features" if name == "image" else "prompt prefixes (KV states)"
            yield CounterMetricFamily(f"llava_worker_{name}_cache_hits", f"Lookups of {what} found.", cache.hits)
            yield CounterMetricFamily(
                f"llava_worker_{name}_cache_misses", f"Lookups of {what} not found.", cache.misses
            )
            yield CounterMetricFamily(
                f"llava_worker_{name}_cache_evictions", f"Entries of {what} evicted for room.", cache.evictions
            )
            yield GaugeMetricFamily(f"llava_worker_{name}_cache_bytes", f"Bytes of {what} held.", cache.size)
        yield CounterMetricFamily(
            "llava_worker_prefix_reused_tokens",
            "Prompt tokens whose KV states came from the prefix cache instead of a prefill.",
            self._prefix_cache.reused_tokens,
        )
