"""Helpers for the serving tests: index versions of adi, a shared encoder, a real uvicorn server.

The model is conftest's session ``tiny_model_dir`` (trained once per test run on adi's pairs); its
encoder is loaded once here and shared by the test-side index builds.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn

__all__ = ["API_KEY", "shared_encoder", "adi_rows", "build_version", "shared_encoder_loader", "untrained_reranker",
           "ServerThread", "wait_until", "metric_value"]

API_KEY = "test-key-0123"
_ENCODERS: dict[str, Any] = {}


def shared_encoder(model_dir: Path) -> Any:
    """The model's :class:`dssm.export.Encoder`, loaded once per session."""
    key = str(model_dir)
    if key not in _ENCODERS:
        from dssm.export import load_encoder

        _ENCODERS[key] = load_encoder(model_dir)
    return _ENCODERS[key]


def shared_encoder_loader(model_dir: Path) -> Callable[[Path, Any], Any]:
    """A Backend loader that reuses the session's encoder instead of loading the SavedModel again."""
    from serving.searcher import Searcher

    encoder = shared_encoder(model_dir)
    return lambda index_dir, reuse: Searcher.load(index_dir, encoder=reuse or encoder)


def adi_rows(adi_dir: Path) -> list[dict[str, str]]:
    """adi's corpus as ``{"id", "title", "text"}`` rows."""
    rows = []
    with open(adi_dir / "corpus.jsonl") as handle:
        for line in handle:
            row = json.loads(line)
            rows.append({"id": row["_id"], "title": row.get("title", ""), "text": row["text"]})
    return rows


def build_version(index_dir: Path, model_dir: Path, rows: Sequence[dict[str, str]], *,
                  extra: dict[str, Any] | None = None) -> str:
    """Embed ``rows`` with the document tower and publish them as a new version; returns its name."""
    from dssm import index as ix

    encoder = shared_encoder(model_dir)
    embeddings = encoder.embed_documents([r["text"] for r in rows])
    result = ix.build_index(index_dir, embeddings=np.asarray(embeddings), ids=[r["id"] for r in rows],
                            texts=[r["text"] for r in rows], titles=[r["title"] for r in rows],
                            model_dir=model_dir, extra=extra)
    return result.version


def untrained_reranker(model_dir: Path, output: Path, *, fusion: dict[str, float] | None = None) -> Path:
    """A re-ranker shaped like ``model_dir``'s model (started from its table, not trained), exported to ``output``.

    ``fusion`` defaults to 0 for every mode: the re-ranker alone orders the candidates, so a test sees
    its effect. Seconds to make, for plumbing tests; tests/test_rerank.py trains a real one.
    """
    import tensorflow as tf

    from dssm.export import SAVED_MODEL, read_model_configs
    from dssm.rerank import RerankConfig, Reranker
    from dssm.rerank_export import export_reranker

    features, tower, _ = read_model_configs(model_dir)
    tf.keras.utils.set_random_seed(0)
    model = Reranker(RerankConfig(dim=8), feature_config=features, embedding_dim=tower.embedding_dim)
    model((tf.constant(["a"]), tf.constant(["b"])))
    loaded = tf.saved_model.load(str(model_dir / SAVED_MODEL))
    model.init_from_tower(loaded.query_tower.bag.table, loaded.query_tower.bag_bias.numpy())
    # a head that counts exact matches, so the order differs from the first stage's in a predictable way
    model.head.kernel.assign(np.eye(model.head.kernel.shape[0], 1, dtype=np.float32))
    return export_reranker(model, output, fusion=fusion or {"dense": 0.0, "bm25": 0.0, "hybrid": 0.0},
                           train={}, history={})


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread, on a port bound before the server starts.

    Args:
        app: the ASGI app.
        start: start at once; with ``False`` the port is bound (connections are refused until
            :meth:`start`), which lets a test see the client retry a refused connection.
    """

    def __init__(self, app: Any, *, start: bool = True) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=30, what="uvicorn to start")

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=15)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample from Prometheus text (0.0 if absent), parsed with prometheus-client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return 0.0
