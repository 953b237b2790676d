"""The settings of one serving process (:class:`ServeConfig`) and the environment variables they travel in.

``dssm serve`` parses its flags into a :class:`ServeConfig`; a single process builds its backend and
app from it directly, and ``dssm serve --workers N`` hands it to each worker process as JSON
(:func:`dssm.config.config_to_dict`) in ``$DSSM_SERVE_WORKER_CONFIG``, read back with
:func:`dssm.config.config_from_dict`. Only settings a serving process applies to itself live here;
how the parent listens (host, port, worker count, event loop) stays with the command line.
"""

from __future__ import annotations

from dataclasses import dataclass

from dssm.config import field
from dssm.errors import ConfigError

__all__ = ["API_KEY_ENV", "WORKER_CONFIG_ENV", "LOG_LEVELS", "ServeConfig"]

#: The environment variable ``dssm serve --api-key`` defaults to.
API_KEY_ENV = "DSSM_API_KEY"
#: `dssm serve --workers N` hands each worker process its :class:`ServeConfig` as JSON in this variable.
WORKER_CONFIG_ENV = "DSSM_SERVE_WORKER_CONFIG"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """How one serving process serves an index (the parsed ``dssm serve`` flags it applies to itself)."""

    index: str = field("", "index directory written by `dssm index` (absolute path)")
    api_key: str | None = field(None, "key for writes (and reads with require_key_for_reads); None disables writes")
    require_key_for_reads: bool = field(False, "also require the key for /v1 reads")
    max_in_flight: int = field(64, "requests admitted at once (per process); more get 429 immediately")
    threads: int = field(8, "worker threads for batch searches, similarity and document reads")
    max_pending_writes: int = field(8, "writes admitted at once (one commits at a time, with those queued behind it); "
                                     "more get 429")
    model_threads: int = field(1, "threads that answer single queries, coalesced into batches")
    tf_threads: int = field(1, "TensorFlow intra- and inter-op threads and numpy BLAS threads "
                                   "(0 = the libraries' defaults)")
    fast_queries: bool = field(True, "answer ASCII queries from the model's numpy weights, loading TensorFlow "
                               "only when something needs it (--no-fast-queries loads the SavedModel at start)")
    write_process: bool = field(True, "encode and publish writes in a child process (serving.writer), off the "
                                "interpreter lock that answers searches; False writes in the server's process")
    switch_interval_ms: float = field(5.0, "Python's GIL switch interval in ms (<= 0 leaves it unchanged)")
    batch_window_ms: float = field(0.0, "how long the model thread waits for more concurrent queries to join a batch")
    watch_interval: float = field(1.0, "seconds between checks of CURRENT for a new version")
    log_level: str = field("info", "logging level: critical | error | warning | info | debug")
    load_before_serving: bool = field(False, "finish startup only once the first version is loaded (set in "
                                             "`--workers N` processes, which share one listening socket)")

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
