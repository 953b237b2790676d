"""What a search answers: a :class:`Hit`, a :class:`Similarity` (the types :mod:`serving.searcher` returns)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["Hit", "Similarity", "text_similarity"]


class Hit(NamedTuple):
    """One result; unpacks as ``(doc_id, score, text)``."""

    id: str
    score: float
    text: str


class Similarity(NamedTuple):
    """Cosine of two texts (query tower on both sides) and the duplicate verdict when the index has a threshold."""

    cosine: float
    is_duplicate: bool | None
    threshold: float | None


def text_similarity(embed: Callable[[Sequence[str]], np.ndarray], text1: str, text2: str,
                    threshold: float | None) -> Similarity:
    """Cosine of two texts' query-tower embeddings and the duplicate verdict against ``threshold``.

    The one implementation behind :meth:`Searcher.similarity`, :meth:`ShardedSearcher.similarity`
    and the serving backend's.

    Args:
        embed: texts → [n, dim] L2-normalised embeddings (validating the texts).
        text1: first text.
        text2: second text.
        threshold: cosine at or above which the texts are duplicates; ``None``: no verdict.
    """
    vectors = embed([text1, text2])
    cosine = float(np.dot(vectors[0], vectors[1]))
    return Similarity(cosine, None if threshold is None else cosine >= threshold, threshold)
