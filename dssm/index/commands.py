"""``dssm upsert``, ``dssm delete`` and ``dssm compact``: change documents of a live index without a rebuild
(a new version).

Only the given documents are encoded, with the document tower stored in the live version; see
:func:`dssm.index.updates.update_index` for the row bookkeeping and when the ScaNN partitions are rebalanced.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dssm.data import iter_corpus, open_text
from dssm.errors import InputError
from dssm.index.updates import DEFAULT_REBALANCE_FRACTION, compact_index
from dssm.index.versions import DEFAULT_KEEP_VERSIONS
from dssm.index.writes import delete_documents, upsert_documents

__all__ = ["add_update_arguments", "print_update", "read_ids", "upsert_main", "delete_main", "compact_main"]


def add_update_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``dssm upsert`` and ``dssm delete``."""
    parser.add_argument("--index", required=True, type=Path, help="index directory (its CURRENT version is updated)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--rebalance", dest="rebalance", action="store_true", default=None,
                       help="rebuild the ScaNN partitions and codebooks from the updated matrix (no re-encoding)")
    group.add_argument("--no-rebalance", dest="rebalance", action="store_false",
                       help="never rebalance (the update fails if recall drops below the build's --min-recall)")
    parser.add_argument("--rebalance-fraction", type=float, default=DEFAULT_REBALANCE_FRACTION,
                        help="rebalance automatically once the rows changed since the last full build exceed this "
                             f"fraction of that build's documents (default: {DEFAULT_REBALANCE_FRACTION})")
    parser.add_argument("--keep-versions", type=int, default=DEFAULT_KEEP_VERSIONS,
                        help="then keep this many newest versions (plus the live one and any a reader holds); "
                             "0 keeps every version (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_write_arguments(parser: argparse.ArgumentParser) -> None:
    add_update_arguments(parser)
    parser.add_argument("--max-delta", type=int, default=None,
                        help="live delta documents + deleted base rows the index may hold before this write compacts "
                             "them into the base (default: 1%% of the base, at least 1,000; 0 compacts every write)")


def print_update(result: object, *, as_json: bool) -> None:
    """The result as JSON or as a short table."""
    summary = result.summary()  # type: ignore[attr-defined]
    if as_json:
        json.dump(summary, sys.stdout)
        sys.stdout.write("\n")
        return
    for key in ("base_version", "version", "documents", "deleted", "inserted", "replaced", "rebalanced",
                "rebalance_reason", "recall_at_10", "rows_changed_since_build", "compacted", "delta_documents",
                "tombstones"):
        print(f"{key:<24} {summary[key]}")


def upsert_main(argv: list[str] | None = None) -> int:
    """``dssm upsert --index INDEX_DIR --corpus PATH [--id-column ...] [--rebalance]``."""
    parser = argparse.ArgumentParser(prog="dssm upsert",
                                     description="Add or replace documents of a live index without a rebuild "
                                                 "(a new version).")
    _add_write_arguments(parser)
    parser.add_argument("--corpus", required=True, type=Path,
                        help="documents to add or replace (BEIR corpus.jsonl, CSV/TSV/JSONL/Parquet)")
    parser.add_argument("--id-column", default=None, help="id column (default: _id, id or docid, the first present)")
    parser.add_argument("--text-column", default=None,
                        help="text column (default: text, else contents as in Pyserini's JsonCollection)")
    parser.add_argument("--title-column", default="title", help="title column, if any (default: title)")
    args = parser.parse_args(argv)
    documents = list(iter_corpus(args.corpus, id_column=args.id_column, text_column=args.text_column,
                                 title_column=args.title_column))
    if not documents:
        raise InputError(f"corpus {args.corpus} holds no documents")
    result = upsert_documents(args.index, documents, rebalance=args.rebalance,
                              rebalance_fraction=args.rebalance_fraction, keep_versions=args.keep_versions,
                              max_delta=args.max_delta)
    print_update(result, as_json=args.json)
    return 0


def read_ids(path: Path) -> list[str]:
    """Ids from a file, one per line (surrounding whitespace and blank lines ignored).

    Raises:
        InputError: the file is missing or holds no ids.
    """
    if not path.is_file():
        raise InputError(f"ids file not found: {path}")
    with open_text(path, newline=None) as handle:  # a .gz file too, as every input
        ids = [line.strip() for line in handle.read().splitlines() if line.strip()]
    if not ids:
        raise InputError(f"ids file {path} holds no ids")
    return ids


def delete_main(argv: list[str] | None = None) -> int:
    """``dssm delete --index INDEX_DIR --ids FILE [--rebalance]``."""
    parser = argparse.ArgumentParser(prog="dssm delete",
                                     description="Delete documents from a live index by id without a rebuild "
                                                 "(a new version).")
    _add_write_arguments(parser)
    parser.add_argument("--ids", required=True, type=Path, help="file with one document id per line")
    args = parser.parse_args(argv)
    result = delete_documents(args.index, read_ids(args.ids), rebalance=args.rebalance,
                              rebalance_fraction=args.rebalance_fraction, keep_versions=args.keep_versions,
                              max_delta=args.max_delta)
    print_update(result, as_json=args.json)
    return 0


def _handshake(stage: Path) -> None:
    """``--handshake``: announce the staged version on stdout, then wait for the caller's line.

    Raises:
        InputError: stdin ended first: the caller (the service) is gone, so nothing is published.
    """
    print(f"staged {stage}", flush=True)
    if not sys.stdin.readline():
        raise InputError(f"stdin closed before the go-ahead for {stage}: the caller is gone; nothing was published")


def compact_main(argv: list[str] | None = None) -> int:
    """``dssm compact --index INDEX_DIR``: fold the delta segments and tombstones into a new base."""
    parser = argparse.ArgumentParser(prog="dssm compact",
                                     description="Fold recent writes (delta segments, deleted rows) into the "
                                                 "index's base (ScaNN, doc store, BM25); a new version.")
    add_update_arguments(parser)
    parser.add_argument("--handshake", action="store_true",
                        help="before publishing, print 'staged PATH' (the new version, complete and durable) and "
                             "wait for a line on stdin (publish nothing if stdin ends): the service loads the new "
                             "base meanwhile, so its swap does not wait for it")
    args = parser.parse_args(argv)
    result = compact_index(args.index, rebalance=args.rebalance, rebalance_fraction=args.rebalance_fraction,
                           keep_versions=args.keep_versions, staged=_handshake if args.handshake else None)
    if result is None:
        print(f"nothing to compact: the live version of {args.index} has no delta segments or deleted rows")
        return 0
    print_update(result, as_json=args.json)
    return 0
