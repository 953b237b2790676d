"""Windows of a document at search time (:mod:`dssm.windows`): a version's stored window vectors,
loaded once per process, and the dense candidates re-scored with them.

A version with ``windows/`` scores its dense candidates as ``cos(q, d) + max_w cos(q, w)``: dense
search re-scores the ANN's top :data:`dssm.windows.WINDOW_CANDIDATES` and keeps the top ``k``;
hybrid search fuses that score (instead of the bare cosine) with BM25's. A dense hit's score is
then that sum, in [-2, 2].
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dssm.data import document_text
from dssm.index import file_identity
from dssm.windows import WINDOW_CANDIDATES, WindowRows, WindowScorer

__all__ = ["window_scorer", "windowed_depth", "rescore_hits", "row_rescorer"]

# Stores by the identity of their files, while a searcher holds one: every write publishes a version
# that hard-links the same windows/, and verifying its checksums per write would hash it again.
_LOADED: weakref.WeakValueDictionary[tuple[Any, ...], WindowRows] = weakref.WeakValueDictionary()
_LOADED_LOCK = threading.Lock()


def window_scorer(windows_dir: Path | None, model_dir: Path | None, encoder: Any) -> WindowScorer | None:
    """The version's :class:`dssm.windows.WindowScorer`, or ``None`` without ``windows/`` (or a model).

    The store is verified against its own manifest and must name the version's model; ``encoder``'s
    document tower (when it has one) embeds the windows of texts written after the store was made.

    Raises:
        ChecksumError: a file of ``windows/`` is missing or changed, or it was made for another model.
    """
    if windows_dir is None or model_dir is None or encoder is None:
        return None
    key = file_identity(windows_dir.parent, (windows_dir.name,))
    with _LOADED_LOCK:
        store = _LOADED.get(key)
    if store is None:
        store = WindowRows.load(windows_dir, owner=WindowRows.owner(model_dir))
        with _LOADED_LOCK:
            _LOADED[key] = store
    return WindowScorer(store, config=store.config, embed_documents=getattr(encoder, "embed_documents", None))


def windowed_depth(scorer: WindowScorer | None, k: int) -> int:
    """How many dense candidates a search of ``k`` hits takes from the ANN."""
    return k if scorer is None else max(k, WINDOW_CANDIDATES)


def rescore_hits(scorer: WindowScorer, vectors: np.ndarray, docs: Sequence[Sequence[Any]],
                 scores: Sequence[np.ndarray], k: int) -> list[list[tuple[Any, float]]]:
    """Per query, its top ``k`` of ``docs`` (:class:`dssm.index.Doc`, ANN order) by the windowed score.

    Args:
        vectors: [q, dim] the queries' vectors.
        docs: per query, its ANN candidates; ``scores`` their cosines.

    Returns:
        Per query, up to ``k`` ``(doc, score)`` best first (ties keep the ANN's order).
    """
    texts = [[document_text(d.title, d.text) for d in group] for group in docs]
    combined = scorer.combined(vectors, texts, scores)
    out = []
    for group, values in zip(docs, combined, strict=True):
        order = np.argsort(-values, kind="stable")[:k]
        out.append([(group[i], float(values[i])) for i in order])
    return out


Rescore = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


def row_rescorer(scorer: WindowScorer, vectors: np.ndarray, documents: Callable[[list[int]], Sequence[Any]]) -> Rescore:
    """``(query index, rows, cosines) -> windowed scores``, for :func:`dssm.hybrid.fused_rows`'s dense side.

    Args:
        vectors: [q, dim] the queries' vectors.
        documents: rows -> their :class:`dssm.index.Doc` (the version's doc store).
    """

    def rescore(i: int, rows: np.ndarray, cosines: np.ndarray) -> np.ndarray:
        texts = [document_text(d.title, d.text) for d in documents([int(r) for r in rows])]
        return scorer.combined(vectors[i:i + 1], [texts], [cosines])[0]

    return rescore
