"""Attach a re-ranker to an index: a new version = the live one + ``reranker/`` (``dssm attach-reranker``).

The re-ranker lives inside the version, so hot swaps, upserts (which hard-link everything they do not
regenerate) and shards carry it; its files are checksummed in the version's manifest like every other
file, and its own ``manifest.json`` (kind ``reranker``) is verified before it is copied in. Beside
the model, ``reranker/documents/`` holds every document's word ids as the re-ranker reads them
(:mod:`dssm.rerank_docs`), computed here once instead of per candidate at search time.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dssm.artifacts import RERANKER_KIND, verify_manifest
from dssm.data import document_text
from dssm.errors import ChecksumError
from dssm.index.docstore import DocStore
from dssm.index.files import link_tree
from dssm.index.layout import DOCS_DB, RERANKER_DIR
from dssm.index.versions import current_version_dir, new_version_name, publish_index_files, staging
from dssm.rerank_docs import DOCUMENTS_DIR, DocumentRows

__all__ = ["attach_reranker", "attach_main"]


def attach_reranker(index_dir: str | Path, reranker_dir: str | Path, *, documents: bool = True) -> str:
    """Publish the live version plus ``reranker_dir`` as its ``reranker/``; returns the new version's name.

    Args:
        documents: also store every document's word ids for the re-ranker (``reranker/documents/``,
            :mod:`dssm.rerank_docs`): re-ranking then reads a stored candidate without splitting
            its text. Costs one pass of the re-ranker's split over the corpus here (~20 µs a document).

    Raises:
        IndexNotFoundError: ``reranker_dir`` has no manifest (not a re-ranker, or its write did not finish).
        ChecksumError: a re-ranker file is missing or changed, it is another kind of artifact, or its
            ``config.json`` is unreadable.
    """
    reranker_dir = Path(reranker_dir)
    fast = None
    if documents:  # loaded to split the corpus below; loading verifies it
        fast = _numpy_path(reranker_dir)
    else:
        verify_manifest(reranker_dir, kind=RERANKER_KIND)
    try:
        fusion = json.loads((reranker_dir / "config.json").read_text())["fusion"]
    except (OSError, ValueError, KeyError) as exc:
        raise ChecksumError(f"{reranker_dir / 'config.json'} is not a re-ranker config: {exc}") from exc
    updates = {"reranker": {"source": str(reranker_dir.resolve()), "fusion": fusion}}
    if not documents:
        return publish_index_files(index_dir, files={}, directories={RERANKER_DIR: reranker_dir},
                                   manifest_updates=updates)
    with staging(index_dir, new_version_name()) as stage:
        staged = stage / RERANKER_DIR
        link_tree(reranker_dir, staged)
        shutil.rmtree(staged / DOCUMENTS_DIR, ignore_errors=True)  # a version's re-ranker brings its own
        store = _document_rows(current_version_dir(index_dir), fast)
        store.save(staged / DOCUMENTS_DIR, owner=DocumentRows.owner(staged))
        updates["reranker"]["documents"] = len(store)
        return publish_index_files(index_dir, files={}, directories={RERANKER_DIR: staged}, manifest_updates=updates)


def _numpy_path(reranker_dir: Path) -> Any:
    """The re-ranker's :class:`dssm.rerank_fast.NumpyReranker` (the directory verified as it loads)."""
    # deferred: TensorFlow (the re-ranker's SavedModel), imported only when a re-ranker is attached
    from dssm.rerank_export import load_reranker  # noqa: PLC0415

    fast = load_reranker(reranker_dir).fast
    if fast is None:
        raise ChecksumError(f"{reranker_dir} is a re-ranker without the numpy scoring path's weights")
    return fast


def _document_rows(version_dir: Path, fast: Any) -> DocumentRows:
    """The word ids of every document of ``version_dir``'s doc store, as the re-ranker ``fast`` reads them."""
    docs = DocStore(version_dir / DOCS_DB)
    with tqdm(total=len(docs), desc="re-ranker word ids", unit="doc") as bar:
        return DocumentRows.build((document_text(doc.title, doc.text) for _, doc in docs.iter_all()),
                                  fast.word_rows, progress=bar.update)


def attach_main(argv: list[str] | None = None) -> int:
    """``dssm attach-reranker --index INDEX_DIR --reranker RERANKER_DIR``."""
    parser = argparse.ArgumentParser(prog="dssm attach-reranker",
                                     description="Put a re-ranker (dssm train-reranker) into an index "
                                                 "as a new version.")
    parser.add_argument("--index", required=True, type=Path,
                        help="index directory (its CURRENT version is extended)")
    parser.add_argument("--reranker", required=True, type=Path,
                        help="re-ranker directory written by dssm train-reranker")
    parser.add_argument("--documents", action=argparse.BooleanOptionalAction, default=True,
                        help="store every document's word ids for the re-ranker (faster re-ranking; one pass "
                             "over the corpus now)")
    args = parser.parse_args(argv)
    version = attach_reranker(args.index, args.reranker, documents=args.documents)
    print(f"version    {version} (re-ranker attached)")
    return 0
