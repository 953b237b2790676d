"""Tagging over a *tags index*: an index whose documents are labels (id = label, text = description).

A text is tagged by scoring it against every label vector of the index (an exact ``[texts, dim] ×
[dim, labels]`` product: label sets are small, so no ANN is involved and every label gets a score).
The vectors are the document tower's embeddings of the descriptions (zero-shot, ``dssm tag --labels``),
their prototypes with a few examples (few-shot), or the vectors ``dssm train-tags`` learned.

A tags index built by ``dssm train-tags`` stores its decision threshold (a cosine, chosen on held-out
training texts) in the version's manifest under ``tagging``; :meth:`Tagger.tag` then also says which
labels are *predicted* (score ≥ threshold). A zero-shot index has no threshold unless one is given.
Used by ``dssm tag``, ``dssm eval-tags`` and ``POST /v1/tag``.

Modes, as for search: ``dense`` (the towers' cosines, the default), ``bm25`` (BM25 of the text as a
query over the label descriptions: the tags index's own BM25 state, as every index version carries)
and ``hybrid`` (per text, ``w · minmax(cosines) + (1 − w) · minmax(BM25)``,
:func:`dssm.hybrid.fuse_scores`, ``w`` = :data:`DEFAULT_TAG_WEIGHT`). On debtags, zero-shot (towers
trained on the texts without labels, 3 seeds), the lexical side helps: precision@1 0.300 dense, 0.344
BM25, 0.369 hybrid (``python -m bench.tagging_table --zero-shot-only``, docs/tagging.md). The stored
threshold is a cosine of the towers, so it applies to ``dense`` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from dssm.errors import IndexNotFoundError, InputError
from dssm.hybrid import fuse_scores

__all__ = ["TagHit", "Tagger", "TAG_MODES", "DEFAULT_TAG_WEIGHT"]

TAG_MODES = ("dense", "bm25", "hybrid")
#: The towers' share in ``hybrid`` tagging: fixed at 0.5 beforehand, not tuned on any evaluated text.
DEFAULT_TAG_WEIGHT = 0.5


class TagHit(NamedTuple):
    """One label for a text: its name, cosine score, description and whether it passes the threshold."""

    label: str
    score: float
    description: str
    predicted: bool | None


class Tagger:
    """Scores texts against every label of a loaded tags index (a :class:`serving.searcher.Searcher`).

    Args:
        searcher: the tags index, loaded with its model.
        mode: ``dense``, ``bm25`` or ``hybrid`` (see the module docstring).

    Raises:
        InputError: an unknown mode.
        IndexNotFoundError: ``bm25``/``hybrid`` on a version without BM25 state.
    """

    def __init__(self, searcher: Any, *, mode: str = "dense") -> None:
        if mode not in TAG_MODES:
            raise InputError(f"tagging mode must be one of {TAG_MODES}, got {mode!r}")
        self.searcher, self.mode = searcher, mode
        index = searcher.index
        rows = index.live_rows()  # a labels index written to since its build has delta rows and tombstones
        self.vectors = np.asarray(index.embeddings(mmap=False)[rows], dtype=np.float32)  # [labels, dim]
        docs = index.docs.get(rows.tolist())
        self.labels = [d.id for d in docs]
        self.descriptions = [d.text for d in docs]
        tagging = index.manifest.get("tagging") or {}
        stored = tagging.get("threshold") if mode == "dense" else None  # a cosine: dense scores only
        self.threshold: float | None = None if stored is None else float(stored)
        self._rows = rows
        self._bm25 = None if mode == "dense" else searcher.bm25  # [logical rows] scores; live ones taken
        if mode != "dense" and self._bm25 is None:
            raise IndexNotFoundError(f"tags index version {searcher.version} has no BM25 state for mode {mode!r}")

    def scores(self, texts: Sequence[str], *, batch_size: int = 4096) -> np.ndarray:
        """``[len(texts), num_labels]`` float32 scores of each text with each label: cosines (``dense``),
        BM25 scores or fused scores in [0, 1] (``hybrid``).

        :data:`dssm.query_numpy.BULK_TEXTS` texts or more are embedded by the SavedModel (the encoder's
        rule: faster in bulk); a few texts (``dssm tag TEXT``, ``POST /v1/tag``) by the numpy query path,
        without TensorFlow.
        """
        out = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            if self.mode != "bm25":
                out[start:start + len(chunk)] = self.searcher.embed(chunk) @ self.vectors.T
            if self._bm25 is not None:
                sparse = np.stack([self._bm25.scores(text)[self._rows] for text in chunk])  # [chunk, labels]
                out[start:start + len(chunk)] = sparse if self.mode == "bm25" else fuse_scores(
                    out[start:start + len(chunk)], sparse, weight=DEFAULT_TAG_WEIGHT)
        return out

    def tag(self, text: str, *, k: int | None = None, threshold: float | None = None,
            predicted_only: bool = False) -> list[TagHit]:
        """Labels for ``text``, best first.

        Args:
            text: the text to tag.
            k: at most this many labels (None: all).
            threshold: decision threshold (cosine); default the index's stored one.
            predicted_only: only the labels at or above the threshold.

        Raises:
            InputError: ``k < 1``, or ``predicted_only`` without a threshold (given or stored).
        """
        if k is not None and k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        threshold = self.threshold if threshold is None else float(threshold)
        if predicted_only and threshold is None:
            raise InputError("this tags index stores no threshold (it was not built by `dssm train-tags`); "
                             "give one to return only the predicted labels")
        row = self.scores([text])[0]
        order = np.argsort(-row, kind="stable")
        hits = []
        for j in order:
            passed = None if threshold is None else bool(row[j] >= threshold)
            if predicted_only and not passed:
                break
            hits.append(TagHit(self.labels[j], float(row[j]), self.descriptions[j], passed))
            if k is not None and len(hits) == k:
                break
        return hits
