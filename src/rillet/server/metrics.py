"""Prometheus metrics in vLLM's style under a `rillet:` prefix, on a per-app registry.

Under several API servers (rillet.server.api_servers sets PROMETHEUS_MULTIPROC_DIR before they
start) the counters and histograms live in that directory's files and a scrape of any server
sums those of all; the engine's gauges are read from the local view of the shared core."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rillet.engine.engine_client import EngineClient

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

logger = logging.getLogger("rillet.server")

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0)


class _EngineCollector(Collector):
    """Gauges read from `engine.stats()` at scrape time."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.engine.stats()
        except Exception:  # engine not started or gone: export nothing rather than fail the scrape
            logger.debug("engine stats unavailable", exc_info=True)
            return
        for kind, name, doc, value in (
            (GaugeMetricFamily, "num_requests_running", "Requests generating in the engine.", stats.num_running),
            (GaugeMetricFamily, "num_requests_waiting", "Requests queued for a slot.", stats.num_waiting),
            (GaugeMetricFamily, "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).",
             stats.kv_cache_usage),
            (CounterMetricFamily, "num_preemptions", "Sequences preempted for lack of KV cache.",
             stats.num_preemptions_total),
            (CounterMetricFamily, "engine_aborted_requests", "Requests aborted inside the engine.",
             stats.num_aborted_total),
            (CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             stats.prefix_cache_queries_total),
            (CounterMetricFamily, "prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache.",
             stats.prefix_cache_hits_total),
        ):
            yield kind(f"rillet:{name}", doc, value=value)
        if stats.backend:  # an info metric, as Prometheus spells them: the labels carry the facts
            info = GaugeMetricFamily("rillet:engine_backend_info", "How the model runs: device, activation dtype, "
                                     "weight format, the CPU kernels' instruction set and the tensor-parallel size.",
                                     labels=sorted(stats.backend))
            info.add_metric([stats.backend[k] for k in sorted(stats.backend)], 1)
            yield info


class Metrics:
    def __init__(self, engine: EngineClient) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            "rillet:time_to_first_token_seconds", "Arrival to first generated token.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "rillet:inter_token_latency_seconds", "Gap between successive outputs of a choice.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            "rillet:e2e_request_latency_seconds", "Arrival to the end of the request.",
            buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("rillet:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("rillet:generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter("rillet:request_success", "Requests finished normally.",
                                       ["finished_reason"], registry=r)
        self.request_aborted = Counter("rillet:request_aborted",
                                       "Requests aborted before finishing (client disconnect, shutdown).",
                                       registry=r)
        self.request_error = Counter("rillet:request_error", "Requests ended by an engine error.", registry=r)
        self.request_rejected = Counter("rillet:request_rejected",
                                        "Requests refused at admission (queue full, not ready, draining).",
                                        ["reason"], registry=r)
        self._engine_collector = _EngineCollector(engine)
        r.register(self._engine_collector)

    def render(self) -> bytes:
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return generate_latest(self.registry)
        registry = CollectorRegistry()  # every API server's counters, summed, and the engine's gauges
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
        registry.register(self._engine_collector)
        return generate_latest(registry)
