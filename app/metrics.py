"""Prometheus metrics of the service (default registry, exposed at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "sparseshot_http_requests_total",
    "HTTP requests by method, route template and status.",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "sparseshot_http_request_duration_seconds",
    "HTTP request latency by method and route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
JOBS = Gauge("sparseshot_jobs", "Training jobs by status (computed at scrape).", ["status"])
QUEUE_DEPTH = Gauge("sparseshot_queue_depth", "Messages waiting in the training queue (-1: unknown).")
MODEL_CACHE_HITS = Counter("sparseshot_model_cache_hits_total", "Adapted-model cache hits when serving.")
MODEL_CACHE_MISSES = Counter(
    "sparseshot_model_cache_misses_total", "Adapted-model cache misses when serving."
)
IMAGES_REJECTED = Counter(
    "sparseshot_images_rejected_total", "Uploaded images rejected, by reason.", ["reason"]
)
