"""Label-free training pairs from a corpus, with BM25 as the teacher: each document → its BM25 nearest neighbours.

``python -m bench.pseudo_pairs CORPUS_DIR OUT.jsonl [--top N] [--skip N] [--exclude-holdout PAIRS_DIR]``
writes JSON lines (``query_id``, ``query``, ``document_id``, ``document``, ``label``) for
``dssm pairs --format pairs``: every corpus document, as a query, paired with its ``top`` best BM25
hits among the *other* documents (its own id and any document with the identical text left out),
ranks ``skip+1..skip+top``. No relevance judgement is read: only ``corpus.jsonl``. Issue 3's
pre-training lever: pre-train the towers on these pairs of the corpus to be indexed, then fine-tune
on the labelled pairs (``dssm train --init-from``); bench/quality_sweep.py's ``pretrain`` override
runs both steps.

The product command is ``dssm pairs --format neighbours`` (same pairs, straight to shards, with the
same :func:`dssm.bm25.neighbour_pairs`); this script stays for ``--exclude-holdout``, the bench's
"no held-out query text seen" control, which a user's pipeline has no use for.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dssm.bm25 import neighbour_pairs
from dssm.data import document_text, holdout_filter

__all__ = ["pseudo_pairs", "main"]


def pseudo_pairs(ids: list[str], texts: list[str], *, top: int = 1,
                 skip: int = 0) -> list[tuple[str, str, str, str]]:
    """``(query_id, query, document_id, document)`` for each document and its BM25 neighbours ranked skip+1..skip+top.

    :func:`dssm.bm25.neighbour_pairs` (kept under this name for the commands in docs/losses.md).
    """
    return neighbour_pairs(ids, texts, top=top, skip=skip)


def main(argv: list[str] | None = None) -> int:
    """CLI: CORPUS_DIR OUT.jsonl [--top N] [--skip N] [--exclude-holdout PAIRS_DIR]."""
    parser = argparse.ArgumentParser(prog="python -m bench.pseudo_pairs", description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", help="a BEIR directory (only corpus.jsonl is read)")
    parser.add_argument("output", help="JSON lines to write")
    parser.add_argument("--top", type=int, default=1, help="BM25 neighbours per document (default 1)")
    parser.add_argument("--skip", type=int, default=0, help="best neighbours passed over (default 0)")
    parser.add_argument("--exclude-holdout", metavar="PAIRS_DIR", help="leave out every document whose text is in "
                        "PAIRS_DIR's validation split (hashed as `dssm pairs` splits queries), so no held-out "
                        "query's text is trained on even label-free (BEIR quora's queries are also corpus texts)")
    args = parser.parse_args(argv)
    held_out = holdout_filter(Path(args.exclude_holdout)) if args.exclude_holdout else None
    ids, texts, dropped = [], [], 0
    with open(Path(args.corpus) / "corpus.jsonl", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            text = document_text(doc.get("title", ""), doc.get("text", ""))
            if held_out is not None and held_out(text):
                dropped += 1
                continue
            ids.append(str(doc["_id"]))
            texts.append(text)
    pairs = pseudo_pairs(ids, texts, top=args.top, skip=args.skip)
    with open(args.output, "w", encoding="utf-8") as handle:
        for query_id, query, document_id, document in pairs:
            handle.write(json.dumps({"query_id": query_id, "query": query, "document_id": document_id,
                                     "document": document, "label": 1}) + "\n")
    print(json.dumps({"documents": len(ids), "held_out_left_out": dropped, "pairs": len(pairs),
                      "output": args.output}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
