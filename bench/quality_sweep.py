"""Model-shape sweep on quora-dev: train with config overrides, exact-search the held-out queries.

``python -m bench.quality_sweep PAIRS_DIR NAME '{"model": {...}, "train": {...}}'`` prints one JSON line
(nDCG@10 and Recall@10 of the queries in PAIRS_DIR's validation split, a query's own id skipped).
PAIRS_DIR comes from ``dssm pairs --input ../shared/datasets/quora-dev/pairs.tsv --format quora
--validation-fraction 0.2``. Used for the width sweep in the stop-9 note (issue 3): 300-300-128 0.704,
512/[512] dropout 0.2 0.731, 1024/[1024] 0.740, 2048/[2048] 0.741; BM25 0.7455 on the same 942 queries.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.data import read_beir
from dssm.evaluate import drop_self, holdout_filter, ndcg_at_k, recall_at_k, select_queries
from dssm.model import ModelConfig
from dssm.train import TrainConfig, train

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["sweep_one", "main"]

DATA = "../shared/datasets/quora-dev"


def sweep_one(pairs_dir: str, name: str, overrides: dict, *, data: str = DATA) -> dict:
    """Train one configuration and score it; returns the JSON-able result."""
    model_overrides = dict(overrides.get("model", {}))
    if "hidden_dims" in model_overrides:
        model_overrides["hidden_dims"] = tuple(model_overrides["hidden_dims"])
    start = time.perf_counter()
    model, history = train(pairs_dir, model_config=ModelConfig(**model_overrides),
                           train_config=TrainConfig(**{"verbose": 0, **overrides.get("train", {})}))
    train_seconds = time.perf_counter() - start
    beir = read_beir(data)
    qids = select_queries(beir.queries, beir.qrels, keep=holdout_filter(Path(pairs_dir)))
    doc_ids = list(beir.corpus)
    doc_texts = [(d.title + " " + d.text).strip() for d in beir.corpus.values()]

    def embed(fn: object, texts: list[str]) -> np.ndarray:
        return np.concatenate([fn(tf.constant(texts[i:i + 2048])).numpy() for i in range(0, len(texts), 2048)])

    scores = embed(model.embed_queries, [beir.queries[q] for q in qids]) @ embed(model.embed_documents, doc_texts).T
    # The 11 best, so that 10 remain once a query's own text (in the corpus, BEIR quora) is dropped.
    top = np.argpartition(-scores, 11, axis=1)[:, :11]
    run = {q: [(doc_ids[t], float(scores[row, t])) for t in top[row][np.argsort(-scores[row, top[row]])]]
           for row, q in enumerate(qids)}
    run = drop_self(run, k=10)
    ranked = {q: [d for d, _ in hits] for q, hits in run.items()}
    ndcg = [ndcg_at_k(ranked[q], beir.qrels[q], 10) for q in qids]
    recall = [recall_at_k(ranked[q], beir.qrels[q], 10) for q in qids]
    return {"name": name, "ndcg10": round(float(np.mean(ndcg)), 4), "recall10": round(float(np.mean(recall)), 4),
            "queries": len(qids), "train_seconds": round(train_seconds, 1), "overrides": overrides,
            "best_epoch": history.get("best_epoch") if isinstance(history, dict) else None}


def main(argv: list[str] | None = None) -> int:
    """CLI: PAIRS_DIR NAME OVERRIDES_JSON → one JSON line on stdout."""
    pairs_dir, name, overrides = (argv if argv is not None else sys.argv[1:])[:3]
    print(json.dumps(sweep_one(pairs_dir, name, json.loads(overrides))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
