"""The server's Prometheus metrics (prometheus_client, one registry per app so tests and replicas stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("scr_requests", "chat completion requests by outcome", ["status"], registry=r)
        self.errors = Counter("scr_request_errors", "refused or failed requests by error code", ["code"], registry=r)
        self.queue_depth = Gauge("scr_queue_depth", "requests waiting for a runtime", registry=r)
        self.in_flight = Gauge("scr_requests_in_flight", "requests being computed", registry=r)
        self.tokens = Counter("scr_generated_tokens", "tokens generated (rate() = tokens/s)", registry=r)
        self.tokens_per_second = Histogram("scr_decode_tokens_per_second", "decode speed per request",
                                           buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000), registry=r)
        self.ttft = Histogram("scr_time_to_first_token_seconds", "request start to first token (queue included)",
                              buckets=_SECONDS, registry=r)
        self.diagnostic = Histogram("scr_diagnostic_seconds", "SCR's diagnostic pass per request",
                                    buckets=_SECONDS, registry=r)
        self.duration = Histogram("scr_request_duration_seconds", "request start to last token",
                                  buckets=_SECONDS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
