"""Writes by document: :func:`upsert_documents` encodes only the given documents with the live
version's document tower (and their windows, where the version stores windows),
:func:`delete_documents` takes ids; both go through :func:`dssm.index.updates.update_index` (a delta
segment, or a compaction past ``max_delta``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dssm.data import document_text
from dssm.errors import IndexNotFoundError, InputError
from dssm.index.docstore import Doc
from dssm.index.documents import as_documents
from dssm.index.layout import MODEL_DIR
from dssm.index.updates import DEFAULT_REBALANCE_FRACTION, UpdateResult, update_index
from dssm.index.versions import DEFAULT_KEEP_VERSIONS, current_version_dir
from dssm.index.written_windows import embed_written_windows

__all__ = ["upsert_documents", "delete_documents"]


def _document_encoder(index_dir: Path, encoder: Any | None) -> Any:
    if encoder is not None:
        return encoder
    # deferred: TensorFlow, imported only when this runs
    from dssm.export import load_encoder

    model = current_version_dir(index_dir) / MODEL_DIR
    if not model.is_dir():
        raise IndexNotFoundError(f"index version {model.parent} has no model/: upsert vectors with update_index")
    return load_encoder(model)


def upsert_documents(index_dir: str | Path, documents: Sequence[Any], *, encoder: Any | None = None,
                     rebalance: bool | None = None, rebalance_fraction: float = DEFAULT_REBALANCE_FRACTION,
                     batch_size: int = 4096, keep_versions: int = DEFAULT_KEEP_VERSIONS,
                     max_delta: int | None = None) -> UpdateResult:
    """Add or replace documents, encoding only them with the live version's document tower.

    Args:
        index_dir: the index directory.
        documents: in any form :func:`dssm.index.documents.as_documents` accepts.
        encoder: an object with ``embed_documents(texts) -> [n, dim]``; default the live version's
            ``model/`` (the model its other rows were encoded with).
        rebalance: see :func:`update_index`.
        rebalance_fraction: see :func:`update_index`.
        batch_size: texts per model call.
        keep_versions: see :func:`update_index`.
        max_delta: see :func:`update_index`.

    Returns:
        The :class:`UpdateResult` (the new version is live).
    """

    index_dir = Path(index_dir)
    docs = [Doc(*fields) for fields in as_documents(documents)]
    if not docs:
        raise InputError("no documents to upsert")
    current_version_dir(index_dir)  # a clear error before loading a model
    encoder = _document_encoder(index_dir, encoder)
    texts = [document_text(d.title or "", d.text) for d in docs]
    vectors = np.concatenate([np.asarray(encoder.embed_documents(texts[s:s + batch_size]), dtype=np.float32)
                              for s in range(0, len(texts), batch_size)])
    # A version that stores windows gets the written documents' too, embedded here by the same tower.
    windows = embed_written_windows(current_version_dir(index_dir), texts, encoder.embed_documents)
    return update_index(index_dir, upsert_ids=[d.id for d in docs], upsert_titles=[d.title or "" for d in docs],
                        upsert_texts=[d.text for d in docs], upsert_vectors=vectors, upsert_windows=windows,
                        rebalance=rebalance, rebalance_fraction=rebalance_fraction, keep_versions=keep_versions,
                        max_delta=max_delta)


def delete_documents(index_dir: str | Path, ids: Sequence[str], *, rebalance: bool | None = None,
                     rebalance_fraction: float = DEFAULT_REBALANCE_FRACTION, keep_versions: int = DEFAULT_KEEP_VERSIONS,
                     max_delta: int | None = None) -> UpdateResult:
    """Delete documents by id into a new live version (every id must exist; otherwise nothing changes)."""
    if isinstance(ids, str):
        raise InputError("delete_documents takes a list of ids, got one string")
    return update_index(index_dir, delete_ids=list(ids), rebalance=rebalance, rebalance_fraction=rebalance_fraction,
                        keep_versions=keep_versions, max_delta=max_delta)
