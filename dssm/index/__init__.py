"""The index layer: versions of an index directory under one writers' lock, the document store, ScaNN
builds and the recall gate, full builds, incremental updates and shards.

Used by ``pipelines/`` (the encode job builds versions), ``serving/`` (the Searcher loads them) and the
offline tools; it imports only the model core (``dssm.artifacts``, ``dssm.config``, ``dssm.bm25``,
``dssm.export`` for the document tower). Modules:

- :mod:`~dssm.index.layout`: names of a directory's parts; :mod:`~dssm.index.files`: fsync, hard links.
- :mod:`~dssm.index.versions`: version names, staging, :class:`IndexWriteLock`, :func:`publish_version`,
  :func:`publish_index_files`, :func:`prune_versions`.
- :mod:`~dssm.index.ann`: :class:`ScannConfig`, ScaNN builds, exact top-k; :mod:`~dssm.index.recall`: the gate.
- :mod:`~dssm.index.docstore`: ``docs.sqlite``; :mod:`~dssm.index.documents`: accepted document forms.
- :mod:`~dssm.index.build`: full builds; :mod:`~dssm.index.memory`: their memory accounting.
- :mod:`~dssm.index.load`: :func:`load_index`; :mod:`~dssm.index.reranker`: ``dssm attach-reranker``;
  :mod:`~dssm.index.updates`: upserts and deletes (delta segments, compaction); :mod:`~dssm.index.writes`:
  the same by document (encoding them) and by id;
  :mod:`~dssm.index.shards`: shard routing; :mod:`~dssm.index.commands`: ``dssm upsert`` / ``dssm delete``.
"""

from __future__ import annotations

from dssm.index.ann import (  # noqa: I001
    SCANN_MODES,
    ScannConfig,
    build_scann,
    build_scann_in_chunks,
    exact_top_k,
    l2_normalize_inplace,
    resolve_scann_params,
)
from dssm.index.build import (  # noqa: I001
    BuildResult,
    Finalize,
    build_index,
    build_index_from_documents,
    build_index_from_shards,
    count_shard_rows,
)
from dssm.index.docstore import Doc, DocStore, DocStoreWriter
from dssm.index.documents import as_documents, document_fields
from dssm.index.files import file_identity
from dssm.index.layout import CURRENT, DOCS_DB, EMBEDDINGS, MODEL_DIR, SCANN_DIR, STAGING, VERSIONS, WINDOWS_DIR
from dssm.index.load import Index, load_index, preload_base
from dssm.index.recall import MUTATED_FIRST_GROWTH, RecallProbe, tune_leaves_to_search, tune_reorder_k, tune_search
from dssm.index.reranker import attach_reranker
from dssm.index.shards import parse_shard_spec, shard_of
from dssm.index.updates import UpdateResult, compact_index, update_index
from dssm.index.versions import (  # noqa: I001
    DEFAULT_KEEP_VERSIONS,
    IndexWriteLock,
    VersionLease,
    check_added_file_name,
    clean_stale_staging,
    current_version_dir,
    list_versions,
    new_version_name,
    prune_versions,
    publish_index_files,
    publish_version,
    retain_versions,
    staging,
    staging_dir,
    version_in_use,
)
from dssm.index.writes import delete_documents, upsert_documents

# The layer's public names (fsync and link helpers, memory and row-reading helpers stay inside it).
__all__ = [
    "CURRENT", "VERSIONS", "STAGING", "DOCS_DB", "EMBEDDINGS", "SCANN_DIR", "MODEL_DIR", "WINDOWS_DIR",
    "SCANN_MODES",
    "ScannConfig", "resolve_scann_params", "build_scann", "build_scann_in_chunks", "l2_normalize_inplace",
    "exact_top_k", "MUTATED_FIRST_GROWTH", "RecallProbe", "tune_leaves_to_search", "tune_reorder_k", "tune_search",
    "Doc", "DocStoreWriter", "DocStore", "document_fields",
    "as_documents", "new_version_name", "staging_dir", "staging", "clean_stale_staging", "IndexWriteLock",
    "publish_version", "current_version_dir", "list_versions", "prune_versions", "check_added_file_name",
    "publish_index_files", "BuildResult", "Finalize", "build_index", "build_index_from_documents",
    "count_shard_rows", "build_index_from_shards", "Index", "load_index", "preload_base", "attach_reranker",
    "UpdateResult", "update_index", "compact_index",
    "upsert_documents", "delete_documents", "shard_of", "parse_shard_spec", "DEFAULT_KEEP_VERSIONS", "VersionLease",
    "retain_versions", "version_in_use", "file_identity",
]
