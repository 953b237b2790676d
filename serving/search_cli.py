"""``dssm search``: search an index from the command line (a table, or JSON with ``--json``)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dssm.errors import InputError
from dssm.hybrid import SEARCH_MODES
from serving.reranking import MAX_RERANK
from serving.searcher import Hit, Searcher

__all__ = ["format_hits", "hits_json", "main"]


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def format_hits(query: str, hits: Sequence[Hit], *, width: int | None = None) -> str:
    """A readable table: rank, score, id, text (cut to the terminal width)."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    id_width = min(24, max([2] + [len(h.id) for h in hits]))
    lines = [f"query: {query}", f"{'#':>3}  {'score':>7}  {'id':<{id_width}}  text"]
    text_width = max(20, width - (3 + 2 + 7 + 2 + id_width + 2))
    for rank, hit in enumerate(hits, 1):
        lines.append(f"{rank:>3}  {hit.score:>7.4f}  {_one_line(hit.id, id_width):<{id_width}}  "
                     f"{_one_line(hit.text, text_width)}")
    if not hits:
        lines.append("(no results)")
    return "\n".join(lines)


def hits_json(query: str, hits: Sequence[Hit]) -> dict[str, Any]:
    """The ``--json`` shape: ``{"query": str, "hits": [{"id", "score", "text"}]}``."""
    return {"query": query, "hits": [{"id": h.id, "score": h.score, "text": h.text} for h in hits]}


def main(argv: list[str] | None = None) -> int:
    """``dssm search --index INDEX_DIR [-k 10] [--json] "query text"``."""
    parser = argparse.ArgumentParser(prog="dssm search", description="Search an index built by `dssm index`.")
    parser.add_argument("--index", required=True, type=Path, help="index directory (follows its CURRENT)")
    parser.add_argument("-k", type=int, default=10, help="number of results (default: 10)")
    parser.add_argument("--json", action="store_true",
                        help='print {"query": ..., "hits": [{"id", "score", "text"}]} instead of a table')
    parser.add_argument("--mode", choices=SEARCH_MODES, default=None,
                        help="dense: DSSM + ScaNN; bm25: the index's BM25 state; hybrid: both, scores fused "
                             "(weight from the version's hybrid.json, default 0.5) (default: the index's default "
                             "mode: hybrid with the weight `dssm index` chose label-free, dense for an index "
                             "without one)")
    parser.add_argument("--rerank", type=int, default=0, metavar="N",
                        help=f"re-order the first stage's top N (at least -k) with the index's re-ranker "
                             f"(dssm attach-reranker), 0..{MAX_RERANK} (default: 0, no re-ranking)")
    parser.add_argument("--fast-queries", action=argparse.BooleanOptionalAction, default=True,
                        help="embed ASCII queries from the model's numpy weights without loading TensorFlow "
                             "(default); --no-fast-queries loads the SavedModel")
    parser.add_argument("query", nargs="+", help="query text (several words are joined by spaces)")
    args = parser.parse_args(argv)
    if args.k < 1:
        raise InputError(f"-k must be >= 1, got {args.k}")
    query = " ".join(args.query)
    searcher = Searcher.load(args.index, fast_queries=args.fast_queries)
    hits = searcher.search(query, k=args.k, mode=args.mode, rerank=args.rerank)
    if args.json:
        json.dump(hits_json(query, hits), sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(format_hits(query, hits))
    return 0
