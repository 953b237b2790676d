"""Attach a re-ranker to an index: a new version = the live one + ``reranker/`` (``dssm attach-reranker``).

The re-ranker lives inside the version, so hot swaps, upserts (which hard-link everything they do not
regenerate) and shards carry it; its files are checksummed in the version's manifest like every other
file, and its own ``manifest.json`` (kind ``reranker``) is verified before it is copied in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dssm.artifacts import RERANKER_KIND, verify_manifest
from dssm.errors import ChecksumError
from dssm.index.layout import RERANKER_DIR
from dssm.index.versions import publish_index_files

__all__ = ["attach_reranker", "attach_main"]


def attach_reranker(index_dir: str | Path, reranker_dir: str | Path) -> str:
    """Publish the live version plus ``reranker_dir`` as its ``reranker/``; returns the new version's name.

    Raises:
        IndexNotFoundError: ``reranker_dir`` has no manifest (not a re-ranker, or its write did not finish).
        ChecksumError: a re-ranker file is missing or changed, it is another kind of artifact, or its
            ``config.json`` is unreadable.
    """
    reranker_dir = Path(reranker_dir)
    verify_manifest(reranker_dir, kind=RERANKER_KIND)
    try:
        fusion = json.loads((reranker_dir / "config.json").read_text())["fusion"]
    except (OSError, ValueError, KeyError) as exc:
        raise ChecksumError(f"{reranker_dir / 'config.json'} is not a re-ranker config: {exc}") from exc
    return publish_index_files(index_dir, files={}, directories={RERANKER_DIR: reranker_dir},
                               manifest_updates={"reranker": {"source": str(reranker_dir.resolve()),
                                                              "fusion": fusion}})


def attach_main(argv: list[str] | None = None) -> int:
    """``dssm attach-reranker --index INDEX_DIR --reranker RERANKER_DIR``."""
    parser = argparse.ArgumentParser(prog="dssm attach-reranker",
                                     description="Put a re-ranker (dssm train-reranker) into an index "
                                                 "as a new version.")
    parser.add_argument("--index", required=True, type=Path,
                        help="index directory (its CURRENT version is extended)")
    parser.add_argument("--reranker", required=True, type=Path,
                        help="re-ranker directory written by dssm train-reranker")
    args = parser.parse_args(argv)
    version = attach_reranker(args.index, args.reranker)
    print(f"version    {version} (re-ranker attached)")
    return 0
