"""Model-shape sweep on quora-dev: train with config overrides, exact-search the held-out queries.

``python -m bench.quality_sweep PAIRS_DIR NAME '{"model": {...}, "train": {...}}'`` prints one JSON line
(nDCG@10 and Recall@10 of the queries in PAIRS_DIR's validation split, a query's own id skipped).
PAIRS_DIR comes from ``dssm pairs --input ../shared/datasets/quora-dev/pairs.tsv --format quora
--validation-fraction 0.2``. Used for the width sweep in the stop-9 note (issue 3): 300-300-128 0.704,
512/[512] dropout 0.2 0.731, 1024/[1024] 0.740, 2048/[2048] 0.741; BM25 0.7455 on the same 942 queries.
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.data import read_beir, split_of
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
    with open(f"{pairs_dir}/pairs_config.json") as handle:
        split = json.load(handle)
    qids = [q for q, text in beir.queries.items() if q in beir.qrels and split_of(
        text, validation_fraction=split["validation_fraction"], salt=split["split_salt"]) == "validation"]
    doc_ids = list(beir.corpus)
    doc_texts = [(d.title + " " + d.text).strip() for d in beir.corpus.values()]

    def embed(fn: object, texts: list[str]) -> np.ndarray:
        return np.concatenate([fn(tf.constant(texts[i:i + 2048])).numpy() for i in range(0, len(texts), 2048)])

    scores = embed(model.embed_queries, [beir.queries[q] for q in qids]) @ embed(model.embed_documents, doc_texts).T
    row_of = {d: i for i, d in enumerate(doc_ids)}
    ndcg, recall = [], []
    for row, q in enumerate(qids):
        if q in row_of:
            scores[row, row_of[q]] = -np.inf
        top = np.argpartition(-scores[row], 10)[:10]
        top = [doc_ids[t] for t in top[np.argsort(-scores[row, top])]]
        relevant = {d for d, g in beir.qrels[q].items() if g > 0 and d != q}
        ideal = sum(1 / math.log2(i + 2) for i in range(min(len(relevant), 10)))
        ndcg.append(sum(1 / math.log2(i + 2) for i, d in enumerate(top) if d in relevant) / ideal if ideal else 0.0)
        recall.append(len(relevant & set(top)) / len(relevant) if relevant else 0.0)
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
