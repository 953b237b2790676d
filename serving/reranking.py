"""Second stage of a search: re-order a first stage's top candidates with the version's re-ranker.

``rerank=N`` on a search means: take the first stage's top ``max(N, k)`` (dense, bm25 or hybrid), score
each candidate's full text (title and body, as the towers and BM25 read it) against the query with the
interaction re-ranker, order them by ``w · minmax(first stage) + (1 - w) · minmax(re-ranker)`` with the
``w`` the re-ranker stored for that mode (``LoadedReranker.fuse``, which also adds the first-stage
term of a re-ranker trained with one), and return the top ``k``. A hit's score is then that fused
score, in [0, 1]. All queries of a batch are scored in one model call.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dssm.errors import IndexNotFoundError, InputError
from dssm.index import file_identity

__all__ = ["MAX_RERANK", "check_rerank", "rerank_results", "load_once", "load_reranker_once",
           "read_every_shards_words"]

# Candidates a re-ranked search may read per query: the re-ranker reads every word of each, so this
# bounds one request's cost (docs/rerank.md has the cost per candidate).
MAX_RERANK = 200


def check_rerank(rerank: Any, *, reranker: Any, version: str) -> int:
    """``rerank`` as an int, refusing bad values and a version without a re-ranker.

    Raises:
        InputError: not an int in ``0..MAX_RERANK``.
        IndexNotFoundError: ``rerank > 0`` and the version has no re-ranker.
    """
    if not isinstance(rerank, int) or isinstance(rerank, bool) or not 0 <= rerank <= MAX_RERANK:
        raise InputError(f"rerank must be an integer in 0..{MAX_RERANK}, got {rerank!r}")
    if rerank and reranker is None:
        raise IndexNotFoundError(f"index version {version} has no re-ranker: attach one with `dssm attach-reranker` "
                                 "(or `dssm index --reranker`), or search without rerank")
    return rerank


def rerank_results(reranker: Any, texts: Sequence[str], results: Sequence[Sequence[Any]], *, k: int, mode: str,
                   full_texts: Callable[[list[str]], list[str]],
                   hit: Callable[[str, float, str], Any]) -> list[list[Any]]:
    """Re-order each query's candidates and keep the top ``k``.

    Args:
        reranker: a :class:`dssm.rerank_export.LoadedReranker`.
        texts: the queries.
        results: per query, the first stage's hits ``(id, score, text)`` best first.
        k: hits kept per query.
        mode: the first stage's mode (selects the stored fusion weight).
        full_texts: ids → their documents' full texts (title and body).
        hit: ``(id, score, text) -> Hit``.

    Returns:
        Per query, up to ``k`` hits best first, scored by the fused score.
    """
    if len(texts) != len(results):
        raise InputError(f"{len(texts)} queries but {len(results)} result lists")
    ids = [h[0] for hits in results for h in hits]
    documents = full_texts(ids) if ids else []
    queries = [text for text, hits in zip(texts, results, strict=True) for _ in hits]
    scores = reranker.score_pairs(queries, documents) if ids else np.zeros(0, np.float32)
    out, start = [], 0
    for hits in results:
        part = scores[start:start + len(hits)]
        start += len(hits)
        order, fused = reranker.fuse(np.asarray([h[1] for h in hits], np.float32), part, mode=mode)
        out.append([hit(hits[i][0], float(s), hits[i][2]) for i, s in zip(order[:k], fused[:k], strict=True)])
    return out


# Artifacts loaded from a version's directory, by the identity of its files, while a searcher holds
# one: every write publishes a version that hard-links the same reranker/ (or windows/), and loading
# and verifying them again per write cost seconds.
_LOADED: weakref.WeakValueDictionary[tuple[Any, ...], Any] = weakref.WeakValueDictionary()
_LOADED_LOCK = threading.Lock()


def load_once(directory: Path, load: Callable[[Path], Any]) -> Any:
    """``load(directory)``, or what this process already loaded from the very same files (each the same
    inode, size and mtime: hard links from an earlier version; a file changed in place since is a
    miss, and loaded — so verified — again). ``load``'s result must be weakly referenceable."""
    key = file_identity(directory.parent, (directory.name,))
    with _LOADED_LOCK:
        found = _LOADED.get(key)
    if found is not None:
        return found
    loaded = load(directory)
    with _LOADED_LOCK:
        _LOADED[key] = loaded
    return loaded


def load_reranker_once(directory: Path) -> Any:
    """The re-ranker in ``directory``: :func:`dssm.rerank_export.load_reranker` (checksums verified),
    or the one this process already loaded from the same files (:func:`load_once`)."""

    def load(path: Path) -> Any:
        # deferred: TensorFlow, imported only when this runs
        from dssm.rerank_export import load_reranker

        return load_reranker(path)

    return load_once(directory, load)


def read_every_shards_words(reranker: Any, directories: Sequence[Path | None]) -> None:
    """Give ``reranker`` (loaded from the first shard) every shard's stored word ids, each verified.

    Only the first shard of a :class:`serving.searcher.ShardedSearcher` loads the re-ranker, so its
    store (``reranker/documents/``, :mod:`dssm.rerank_docs`) holds that shard's documents only; the
    others' candidates would be split at search time. The shards carry the same re-ranker (the caller
    checks their manifests), so any shard's stored ids are right for its texts, and a re-ranker object
    another searcher of this process shares only gains texts it can look up.

    Args:
        reranker: a :class:`dssm.rerank_export.LoadedReranker` of the first shard's ``reranker/`` (its
            own store, loaded and verified with it, is used as is).
        directories: each shard's ``reranker/`` (``None`` for one without), the first shard's first.

    Raises:
        ChecksumError: a shard's stored ids are corrupt or belong to another re-ranker.
    """
    fast = getattr(reranker, "fast", None)
    if fast is None:
        return
    # deferred: only a sharded index with a re-ranker needs it
    from dssm.rerank_docs import DOCUMENTS_DIR, CombinedRows, DocumentRows

    stores = [reranker.documents] if reranker.documents is not None else []
    stores += [DocumentRows.load(d / DOCUMENTS_DIR, owner=DocumentRows.owner(d))
               for d in directories[1:] if d is not None and (d / DOCUMENTS_DIR).is_dir()]
    fast.use_documents(CombinedRows(stores) if stores else None)
