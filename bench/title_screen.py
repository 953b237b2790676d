"""Screen a lever of issue 11: the title's weight against the body's in the fitted towers (``dssm lsa``).

``python -m bench.title_screen --data BEIR_DIR [BEIR_DIR ...] [--weights 0,1,2,3,4] [--out FILE.json]``

A document is its title and body joined (:func:`dssm.data.document_text`): the title's words count
once, as the body's do. A field weight ``w`` counts them ``w`` times (the title repeated ``w`` times
before the body; 0 leaves it out); queries are unchanged. For each weight the fit is made again on the
weighted documents (``dssm lsa``'s defaults) and the judged queries are searched exactly among them,
nDCG@10 with the qrels' grades. The queries are evaluated ones, so this describes; it chooses nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dssm.data import BeirDataset, read_beir
from dssm.hashing import FeatureConfig
from dssm.lsa import LsaConfig, fit_texts, fitted_encoder
from dssm.metrics import evaluate_run, exact_run

__all__ = ["main"]


def _score(beir: BeirDataset, weight: int) -> float:
    """nDCG@10 of the judged queries among ``beir``'s documents, each title counted ``weight`` times."""
    texts = [" ".join([doc.title.strip()] * weight + [doc.text]).strip() or doc.title for doc in beir.corpus.values()]
    features = FeatureConfig()
    encode = fitted_encoder(fit_texts(texts, config=LsaConfig(), features=features), features)
    judged = [q for q in beir.qrels if q in beir.queries]
    run = exact_run(judged, encode([beir.queries[q] for q in judged]), list(beir.corpus), encode(texts), k=100)
    return evaluate_run("fit", run, {q: beir.qrels[q] for q in judged}, metrics=("ndcg@10",)).means["ndcg@10"]


def main(argv: list[str] | None = None) -> int:
    """Print (and write) each set's nDCG@10 at each title weight."""
    parser = argparse.ArgumentParser(prog="python -m bench.title_screen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="BEIR directories with titles")
    parser.add_argument("--weights", default="0,1,2,3,4", help="comma-separated title weights (1: today's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    weights = [int(w) for w in args.weights.split(",")]
    report: dict[str, Any] = {}
    print("| set | " + " | ".join(f"title x{w}" for w in weights) + " |")
    print("|---|" + "---:|" * len(weights))
    for directory in args.data:
        beir = read_beir(directory)  # once per set: every weight reads the same documents
        report[directory.name] = {str(w): round(_score(beir, w), 4) for w in weights}
        print(f"| {directory.name} | " + " | ".join(f"{v:.4f}" for v in report[directory.name].values()) + " |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
