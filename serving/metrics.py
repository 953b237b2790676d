"""The service's Prometheus collectors (:class:`Metrics`), one registry per :class:`serving.backend.Backend`."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics", "multiprocess_metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def multiprocess_metrics() -> bool:
    """Whether prometheus_client records into ``$PROMETHEUS_MULTIPROC_DIR`` (``dssm serve --workers N``)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))


class Metrics:
    """The service's Prometheus collectors, in their own registry.

    Under ``dssm serve --workers N`` every worker process records into prometheus_client's
    multiprocess directory and ``/metrics`` sums them (see :func:`serving.routes.metrics_text`): counters
    and histograms add up over the workers, the in-flight gauge is the live workers' sum, and the
    gauges that describe a worker's loaded version carry a ``pid`` label, one series per live worker.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("dssm_requests", "HTTP requests by route and status", ["method", "route", "status"],
                                registry=r)
        self.latency = Histogram("dssm_request_duration_seconds", "HTTP request latency (until the response is sent)",
                                 ["method", "route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("dssm_in_flight_operations", "index operations admitted and not yet finished",
                               registry=r, multiprocess_mode="livesum")
        self.rejected = Counter("dssm_overload_rejections", "operations refused because the in-flight limit was full",
                                registry=r)
        self.index_info = Gauge("dssm_index_version_info", "1 for the live index version", ["version"], registry=r,
                                multiprocess_mode="liveall")
        self.index_documents = Gauge("dssm_index_documents", "documents in the live index version", registry=r,
                                     multiprocess_mode="liveall")
        self.index_loaded = Gauge("dssm_index_loaded_timestamp_seconds", "when the live version was swapped in",
                                  registry=r, multiprocess_mode="liveall")
        self.swaps = Counter("dssm_index_swaps", "index versions swapped in (the first load included)", registry=r)
        self.compactions = Counter("dssm_index_compactions", "background compactions that published a version",
                                   registry=r)
        self.merged_writes = Counter("dssm_merged_writes", "writes published in a version with other writes "
                                     "(group commit)", registry=r)
        self.load_failures = Counter("dssm_index_load_failures", "index versions that failed to load", registry=r)
        self.batch_size = Histogram("dssm_search_batch_size", "single queries answered per coalesced model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.load_seconds = Histogram("dssm_index_load_seconds", "time to load and warm up an index version",
                                      buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
