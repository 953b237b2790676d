"""Pick the model that retrieves a pairs directory's validation split best (``dssm select``).

The label-free recipe has two candidate towers for a corpus: the default towers trained on its
corpus pairs (``dssm train``) and the towers fitted to it without training (``dssm lsa``), which
win on small corpora and lose on large ones (docs/quality.md). Which one a corpus gets is decided
here, unattended and on training data only: every candidate searches the validation split of the
pairs the trained towers were trained on (exact search, the trainer's own ``val_recall_at_10``,
ties broken by ``val_mrr_at_10``, then by the order given), and the best is copied to ``--output``.

A ``dssm lsa`` fit is fitted to the whole corpus, so it has seen the validation documents' text
beside the sentences cut out of them, and the split would flatter it (on a 5,000-document sample of
debian-dev: val R@10 0.97 against the trained towers' 0.79, for nDCG@10 0.600 against 0.578 on real
queries). It is therefore scored by the same fit made again on the corpus with the split's queries
cut out of their documents (:class:`dssm.lsa.Refitter`): at index time the fit sees every document
and no query, and so it does here. The copy that wins is the fit of the whole corpus.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dssm.artifacts import verify_manifest
from dssm.errors import InputError
from dssm.export import read_model_configs
from dssm.inputs import pair_files
from dssm.lsa import Refitter, bag_matrix, refitter_for
from dssm.train import TrainConfig, build_model, load_towers
from dssm.validation import (
    ValidationSet,
    evaluate_retrieval,
    read_validation_set,
    retrieval_metrics,
    validation_bags,
)

__all__ = ["score_models", "main"]


def score_models(pairs_dir: str | Path, model_dirs: Sequence[str | Path], *, max_queries: int = 2000,
                 seed: int = 0, min_label: float = 0.0) -> list[dict[str, Any]]:
    """Recall@10 and MRR@10 of each model on ``pairs_dir``'s validation split, best first.

    Args:
        pairs_dir: a ``dssm pairs`` directory with a validation split.
        model_dirs: exported model directories (``dssm train`` / ``dssm lsa``), hashed like the pairs.
        max_queries: validation queries searched (a seeded sample above it, as the trainer draws).
        seed: the sample's seed.
        min_label: pairs at or below it are not relevant.

    Returns:
        ``[{"model", "recall_at_10", "mrr_at_10", "order"}, ...]`` sorted best first.

    Raises:
        InputError: no model, or the pairs have no validation split with a relevant pair.
        ConfigError: a model hashes texts differently from the pairs.
        IndexNotFoundError / ChecksumError: a model directory is unfinished or altered.
    """
    if not model_dirs:
        raise InputError("dssm select needs at least one model directory")
    validation = read_validation_set(pair_files(pairs_dir, "validation"), min_label=min_label,
                                     max_queries=max_queries, seed=seed)
    if validation is None:
        raise InputError(f"pairs {pairs_dir} have no validation split to select on (make them with "
                         "--validation-fraction > 0)")
    scored = []
    for order, model_dir in enumerate(model_dirs):
        verify_manifest(model_dir, kind="model")
        features, model_config, _ = read_model_configs(model_dir)
        refitter = refitter_for(model_dir)
        metrics = _score_refit(refitter, validation) if refitter is not None else None
        if metrics is None:
            model = build_model(model_config, features, TrainConfig())
            load_towers(model, model_dir, batch=None)
            metrics = evaluate_retrieval(model, validation) | ({"refit": False} if refitter is not None else {})
        scored.append({"model": str(model_dir), "order": order, **metrics})
    return sorted(scored, key=lambda row: (-row["recall_at_10"], -row["mrr_at_10"], row["order"]))


def _score_refit(refitter: Refitter, validation: ValidationSet) -> dict[str, Any] | None:
    """A ``dssm lsa`` model's figures, from the same fit made on the corpus without the split's queries.

    At index time the fit has seen every document but no query. Fitted to the whole corpus, it has
    also seen each validation query (a sentence cut out of a document) beside the rest of its
    document, which trained towers never saw. So the fit is made again on the corpus with every
    validation query's text taken out of its relevant documents (matched by document id), and that
    fit is scored. ``None`` when the fit's corpus file is gone: the caller then scores the fit as it
    is, and says so.
    """
    try:
        documents = refitter.corpus_documents()
    except InputError as exc:
        print(f"warning: {exc}; the fit is scored as fitted (it saw the split's queries)", file=sys.stderr)
        return None
    cut: dict[str, list[str]] = {}
    for text, rows in zip(validation.query_texts, validation.relevant, strict=True):
        for row in rows.tolist():
            cut.setdefault(validation.document_keys[row], []).append(text)
    texts, changed = [], 0
    for doc_id, text in documents:
        for query in cut.get(doc_id, ()):
            text = text.replace(query, " ")
        changed += doc_id in cut
        texts.append(text)
    fit = refitter.fit(texts)
    num_buckets = refitter.features.num_buckets

    def embed(batches: list[Any]) -> np.ndarray:
        projected = bag_matrix(validation_bags(batches), num_buckets=num_buckets) @ fit.table
        return projected / np.maximum(np.linalg.norm(projected, axis=1, keepdims=True), 1e-12)

    return {"refit": True, "queries_cut_from_documents": changed,
            **retrieval_metrics(embed(validation.queries), embed(validation.documents), validation)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dssm select", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", required=True, help="pairs directory whose validation split decides")
    parser.add_argument("--models", required=True, nargs="+", help="candidate model directories (the first wins "
                        "ties)")
    parser.add_argument("--output", required=True, help="where the chosen model directory is copied")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--validation-queries", type=int, default=2000, help="validation queries searched "
                        "(default 2000, as `dssm train`)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation sample (default 0)")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``dssm select``: score ``--models`` on ``--pairs``' validation split; copy the best to ``--output``."""
    args = _parser().parse_args(argv)
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise InputError(f"output directory {output} exists and is not empty (pass --overwrite to replace it)")
    if any(output.resolve() == Path(m).resolve() for m in args.models):
        raise InputError(f"--output {output} is one of the candidate models")
    scored = score_models(args.pairs, args.models, max_queries=args.validation_queries, seed=args.seed)
    best = Path(scored[0]["model"])
    staging = output.with_name(f".{output.name}.tmp-select")
    shutil.rmtree(staging, ignore_errors=True)
    listed = {rel.split("/", 1)[0] for rel in verify_manifest(best, kind="model")["files"]} | {"manifest.json"}
    # Only the model's own files: a trained model directory also holds checkpoints/ and logs/.
    shutil.copytree(best, staging, ignore=lambda d, names: [n for n in names if Path(d) == best and n not in listed])
    (staging / "selection.json").write_text(json.dumps({"pairs": str(Path(args.pairs).resolve()),
                                                         "chosen": str(best.resolve()), "scores": scored}, indent=2))
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    if args.json:
        print(json.dumps(scored, indent=2))
    print(f"{'model':<50} {'val R@10':>9} {'val MRR@10':>10}")
    for row in scored:
        print(f"{row['model']:<50} {row['recall_at_10']:>9.4f} {row['mrr_at_10']:>10.4f}")
    print(f"chose {best} → {output}")
    return 0
