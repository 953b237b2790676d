"""Windows of a document at search time (:mod:`dssm.windows`): a version's stored window vectors,
loaded once per process, and the dense candidates re-scored with them.

A version with ``windows/`` scores its dense candidates as ``cos(q, d) + max_w cos(q, w)``: dense
search re-scores the ANN's top :data:`dssm.windows.WINDOW_CANDIDATES` and keeps the top ``k``;
hybrid search fuses that score (instead of the bare cosine) with BM25's. A dense hit's score is
then that sum, in [-2, 2].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dssm.data import document_text
from dssm.rerank_docs import text_keys
from dssm.windows import WINDOW_CANDIDATES, WindowRows, WindowScorer, window_texts
from serving.reranking import load_once

__all__ = ["window_scorer", "windowed_depth", "RowWindows"]

def window_scorer(windows_dir: Path | None, model_dir: Path | None, encoder: Any,
                  written: Sequence[Path] = ()) -> WindowScorer | None:
    """The version's :class:`dssm.windows.WindowScorer`, or ``None`` without ``windows/`` (or a model).

    The store is verified against its own manifest and must name the version's model, as must each
    of ``written`` (the version's stores of documents written since:
    :func:`dssm.index.written_windows.written_window_dirs`); ``encoder``'s document tower (when it has
    one) embeds the windows of texts none of them holds.

    Raises:
        ChecksumError: a file of ``windows/`` is missing or changed, or it was made for another model.
    """
    if windows_dir is None or model_dir is None or encoder is None:
        return None
    # loaded once per process while a searcher holds it: writes hard-link the same windows/ forward
    owner = WindowRows.owner(model_dir)
    store = load_once(windows_dir, lambda path: WindowRows.load(path, owner=owner))
    # newest first: a store merged by a later write holds the same windows as the ones it merged
    extra = [load_once(path, lambda p: WindowRows.load(p, owner=owner)) for path in reversed(list(written))]
    return WindowScorer(store, config=store.config, embed_documents=getattr(encoder, "embed_documents", None),
                        written=extra)


def windowed_depth(scorer: WindowScorer | None, k: int) -> int:
    """How many dense candidates a search of ``k`` hits takes from the ANN."""
    return k if scorer is None else max(k, WINDOW_CANDIDATES)


# A base row's remembered entry: not looked up yet, or a text of one window (nothing to add); -1 is a
# text the store lacks (its windows come from the scorer's per-process memory, by text).
_UNKNOWN, _ONE_WINDOW = -2, -3
_MEMO_BASES = 2  # base segments whose rows a store remembers (the live one and the one before a compaction)


class RowWindows:
    """A loaded version's windows looked up by row.

    A base segment's rows never change (writes add delta segments and tombstones; a compaction writes
    a new base under a new name), so each base row remembers its store entry, per base segment, on the
    store that a process shares across versions: a candidate seen before costs no doc-store read and
    no text fingerprint. A base row the store lacks (written after it was made, its windows in a
    store of written documents since a compaction) remembers its text's fingerprint instead, looked
    up in the version's written stores; delta rows read their text every time.

    Args:
        scorer: the version's :class:`dssm.windows.WindowScorer` (with a store).
        index: the loaded :class:`dssm.index.Index`.
    """

    def __init__(self, scorer: WindowScorer, index: Any) -> None:
        self.scorer, self.docs = scorer, index.docs
        self.base_rows = index.layout.base_documents
        store = scorer.store
        with store.computed_lock:
            memos = store.row_memos
            key = index.layout.base_version
            if key not in memos:
                memos[key] = np.full(self.base_rows, _UNKNOWN, np.int32)
                store.row_fingerprints[key] = {}
                for old in list(memos)[:-_MEMO_BASES]:
                    del memos[old]
                    store.row_fingerprints.pop(old, None)
            self.memo, self.fingerprints = memos[key], store.row_fingerprints[key]

    def scores(self, vectors: np.ndarray, rows: Sequence[np.ndarray],
               cosines: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per query, its candidate ``rows``' cosine + best window cosine (``cosines`` their whole cosines)."""
        if not len(rows):
            return []
        flat = np.concatenate([np.asarray(r, np.int64).ravel() for r in rows])
        base = flat < self.base_rows
        entries = np.full(len(flat), _UNKNOWN, np.int64)
        entries[base] = self.memo[flat[base]]
        texts: list[str | None] = [None] * len(flat)
        known = self._written(flat, np.flatnonzero(entries == -1))
        unread = (entries == _UNKNOWN) | (entries == -1)
        unread[list(known)] = False  # their windows are found: no text to read
        fetch = np.flatnonzero(unread)
        if fetch.size:
            got = [document_text(d.title, d.text) for d in self.docs.get(flat[fetch].tolist())]
            entries[fetch] = self.scorer.store.entries(got)
            config = self.scorer.config
            for i, text in zip(fetch.tolist(), got, strict=True):
                if entries[i] >= 0:
                    continue
                one = len(window_texts(text, window=config.window, stride=config.stride)) == 1
                entries[i], texts[i] = (_ONE_WINDOW, None) if one else (-1, text)
            remembered = fetch[base[fetch]]
            self.memo[flat[remembered]] = entries[remembered]
            lacking = [i for i in remembered.tolist() if entries[i] == -1]
            if lacking:  # fingerprinted once: looked up now and remembered for the next search
                keys, lengths = text_keys([texts[i] for i in lacking])
                pairs = zip(keys.tolist(), lengths.tolist(), strict=True)
                self.fingerprints.update(zip(flat[lacking].tolist(), pairs, strict=True))
                found = self._written(flat, np.asarray(lacking, np.int64))
                for i in found:
                    texts[i] = None  # its windows are known: nothing for the scorer to look up or embed
                known |= found
        entries[entries == _ONE_WINDOW] = -1  # with no text: nothing to add to its cosine
        return self.scorer.combine(vectors, entries, texts, cosines, known=known)

    def _written(self, flat: np.ndarray, lacking: np.ndarray) -> dict[int, np.ndarray]:
        """``{i: window vectors}`` of the candidates ``flat[i]`` (``i`` in ``lacking``: base rows the store
        lacks) whose remembered fingerprint a written store holds; the others read their text."""
        if not lacking.size or not self.scorer.written:
            return {}
        prints = [(i, self.fingerprints.get(int(flat[i]))) for i in lacking.tolist()]
        prints = [(i, p) for i, p in prints if p is not None]
        if not prints:
            return {}
        keys = np.fromiter((p[0] for _, p in prints), np.uint64, len(prints))
        lengths = np.fromiter((p[1] for _, p in prints), np.int64, len(prints))
        return {prints[j][0]: v for j, v in self.scorer.find_written(keys, lengths).items()}

    def top(self, vectors: np.ndarray, rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[list[np.ndarray],
                                                                                             list[np.ndarray]]:
        """Per query, its ANN candidates (``rows``/``scores`` ``[q, n]``) re-scored: ``(rows [<=k], scores [<=k])``
        best first (ties keep the ANN's order)."""
        combined = self.scores(vectors, list(rows), list(scores))
        order = [np.argsort(-values, kind="stable")[:k] for values in combined]
        return ([r[o] for r, o in zip(rows, order, strict=True)],
                [c[o] for c, o in zip(combined, order, strict=True)])

    def rescorer(self, vectors: np.ndarray) -> Callable[[int, np.ndarray, np.ndarray], np.ndarray]:
        """``(query index, rows, cosines) -> windowed scores``, for :func:`dssm.hybrid.fused_rows`'s dense side."""
        return lambda i, rows, cosines: self.scores(vectors[i:i + 1], [rows], [cosines])[0]
