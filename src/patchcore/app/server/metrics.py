"""Prometheus metrics of one server (its own registry, so several apps in one process stay apart)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("patchcore_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("patchcore_request_latency_seconds", "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("patchcore_batch_size", "images per predict_batch call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.rejected = Counter("patchcore_rejected", "requests refused before scoring, by reason", ["reason"],
                                registry=r)
        self.queue_depth = Gauge("patchcore_queue_depth", "images waiting for the batch worker", registry=r)
        self.in_flight = Gauge("patchcore_in_flight", "admitted predict requests (decoding, queued, computing)",
                               registry=r)
        self.model_version = Gauge("patchcore_model_version", "served version of each model (+1 per swap)",
                                   ["model"], registry=r)
        self.bank_size = Gauge("patchcore_model_bank_rows", "memory bank rows of each model", ["model"], registry=r)
        self.updates = Counter("patchcore_updates", "incremental updates applied", ["model"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
