"""Model-shape sweep on quora-dev: train with config overrides, exact-search the held-out queries.

``python -m bench.quality_sweep PAIRS_DIR NAME '{"model": {...}, "train": {...}}'`` prints one JSON line
(nDCG@10 and Recall@10 of the queries in PAIRS_DIR's validation split, a query's own id skipped).
PAIRS_DIR comes from ``dssm pairs --input ../shared/datasets/quora-dev/pairs.tsv --format quora
--validation-fraction 0.2``. Used for the width sweep in the stop-9 note (issue 3): 300-300-128 0.704,
512/[512] dropout 0.2 0.731, 1024/[1024] 0.740, 2048/[2048] 0.741; BM25 0.7455 on the same 942 queries.

Caution: PAIRS_DIR's validation split *is* the held-out query set, so the trainer's defaults (early
stopping and keep_best on ``val_recall_at_10``) pick the epoch on the test queries. Honest figures
pass ``"train": {"epochs": 10, "early_stopping_patience": 0, "keep_best": false}`` (as
bench/losses_table.py does); the figures above were measured without it.

Overrides ``pretrain`` (a label-free first run on the BM25-neighbour pairs of the corpus, from
``dssm pairs --input DATA/corpus.jsonl --format neighbours --validation-fraction 0.05`` or
bench/pseudo_pairs.py + ``dssm pairs --format pairs``, whose towers the main run starts from: the
default recipe, which ``dssm demo`` runs) and ``mine`` (a second round on hard negatives
mined with the first round's model) are described in :func:`sweep_one` and :func:`mine_round`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.data import holdout_filter, read_beir
from dssm.export import export_model
from dssm.losses import LossConfig
from dssm.metrics import drop_self, ndcg_at_k, recall_at_k, select_queries
from dssm.model import ModelConfig, apply_loss_defaults
from dssm.train import TrainConfig, train

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["pretrain", "mine_round", "sweep_one", "main"]

DATA = "../shared/datasets/quora-dev"


def _model_config(overrides: dict) -> ModelConfig:
    overrides = dict(overrides)
    if "hidden_dims" in overrides:
        overrides["hidden_dims"] = tuple(overrides["hidden_dims"])
    return apply_loss_defaults(ModelConfig(**overrides))[0]


def pretrain(overrides: dict, output: Path) -> dict:
    """Train on ``overrides["pretrain"]["pairs"]`` (label-free pair shards, e.g. ``--format neighbours``) and export.

    The pre-training run takes the main run's model overrides (so the towers match) updated by
    ``pretrain["model"]``, the main run's seed, and ``pretrain["train"]`` / ``pretrain["loss"]``.
    Returns its summary (seconds, best epoch).
    """
    spec = overrides["pretrain"]
    train_config = TrainConfig(**{"verbose": 0, "seed": overrides.get("train", {}).get("seed", 0),
                                  **spec.get("train", {})})
    start = time.perf_counter()
    model, history = train(spec["pairs"], model_config=_model_config({**overrides.get("model", {}),
                                                                     **spec.get("model", {})}),
                           train_config=train_config, loss_config=LossConfig(**spec.get("loss", {})))
    export_model(model, output, train_config=train_config, history=history)
    return {"seconds": round(time.perf_counter() - start, 1), "best_epoch": history.get("best_epoch")}


def mine_round(model: object, spec: dict, *, pairs_dir: str, train_config: TrainConfig, data: str,
               scratch: Path) -> tuple[dict, str]:
    """Index the corpus with the first round's ``model`` and mine hard negatives for ``pairs_dir`` (``dssm mine``).

    ``spec``: ``negatives_per_query`` and ``skip_top`` (``dssm mine``'s flags) and ``init``, where the
    second round starts: ``"round1"`` (the first round's weights, the default), ``"pretrain"`` (the
    pre-trained towers, as the first round did) or ``"scratch"``.

    Returns:
        ``({"pairs": mined pairs dir, ...}, init_from for the second round)``.
    """
    from pipelines.encode_corpus import main as index_main
    from pipelines.mine_negatives import main as mine_main

    init = spec.get("init", "round1")
    if init not in ("round1", "pretrain", "scratch"):
        raise ValueError(f"mine.init must be round1, pretrain or scratch, got {init!r}")
    export_model(model, scratch / "round1", train_config=train_config)
    for step, argv in ((index_main, ["--model", str(scratch / "round1"), "--corpus", str(Path(data) / "corpus.jsonl"),
                                     "--output", str(scratch / "index")]),
                       (mine_main, ["--index", str(scratch / "index"), "--pairs", pairs_dir, "--output",
                                    str(scratch / "mined"), "--negatives-per-query",
                                    str(spec.get("negatives_per_query", 1)), "--skip-top",
                                    str(spec.get("skip_top", 0))])):
        if step(argv):
            raise RuntimeError(f"{step.__module__} {argv} failed")
    init_from = {"round1": str(scratch / "round1"), "pretrain": train_config.init_from, "scratch": ""}[init]
    return {"pairs": str(scratch / "mined"), "init": init}, init_from


def sweep_one(pairs_dir: str, name: str, overrides: dict, *, data: str = DATA) -> dict:
    """Train one configuration and score it; returns the JSON-able result.

    ``overrides`` holds ``model``, ``train`` and ``loss`` (config fields) and optionally ``pretrain``
    (``{"pairs": DIR, "model": ..., "train": ..., "loss": ...}``): a first run whose towers the main
    run starts from (``init_from``), and ``mine`` (see :func:`mine_round`): a second round on the
    pairs with hard negatives mined by the first round's model, which is the one scored.
    """
    train_overrides = dict(overrides.get("train", {}))
    pretrained = mined = None
    with tempfile.TemporaryDirectory(prefix="quality-sweep-") as scratch:
        if "pretrain" in overrides:
            pretrained = pretrain(overrides, Path(scratch) / "pretrained")
            train_overrides["init_from"] = str(Path(scratch) / "pretrained")
        start = time.perf_counter()
        train_config = TrainConfig(**{"verbose": 0, **train_overrides})
        model_config = _model_config(overrides.get("model", {}))
        loss_config = LossConfig(**overrides.get("loss", {}))
        model, history = train(pairs_dir, model_config=model_config, train_config=train_config,
                               loss_config=loss_config)
        train_seconds = time.perf_counter() - start
        if "mine" in overrides:
            mined, init_from = mine_round(model, overrides["mine"], pairs_dir=pairs_dir, train_config=train_config,
                                          data=data, scratch=Path(scratch))
            start = time.perf_counter()
            model, history = train(mined["pairs"], model_config=model_config, loss_config=loss_config,
                                   train_config=dataclasses.replace(train_config, init_from=init_from))
            mined["train_seconds"] = round(time.perf_counter() - start, 1)
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
            "best_epoch": history.get("best_epoch") if isinstance(history, dict) else None,
            **({"pretrain": pretrained} if pretrained else {}), **({"mine": mined} if mined else {})}


def main(argv: list[str] | None = None) -> int:
    """CLI: PAIRS_DIR NAME OVERRIDES_JSON → one JSON line on stdout."""
    pairs_dir, name, overrides = (argv if argv is not None else sys.argv[1:])[:3]
    print(json.dumps(sweep_one(pairs_dir, name, json.loads(overrides))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
