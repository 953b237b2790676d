"""BM25 baseline (``bm25s``) with one documented tokenisation for documents and queries.

Tokenisation (:func:`tokenize`), the same for both sides:

1. Unicode NFKC + case fold (the featurizer's normalisation, so both systems see the same text);
2. words = maximal runs of Unicode letters/digits/underscore (regex ``\\w+``; single characters are kept,
   because "windows 7" and "c" carry meaning in Quora questions);
3. Lucene's 33-word English stop list (``bm25s.stopwords.STOPWORDS_EN``, the list Elasticsearch's
   ``english`` analyzer uses) is removed;
4. Snowball English stemming (PyStemmer), if ``stem`` is on (the default).

This mirrors the Elasticsearch ``english`` analyzer behind BEIR's published BM25 numbers, so our
baseline is the one users run today rather than a weakened one. Scoring is ``bm25s``' Lucene variant
with ``k1=1.5, b=0.75`` by default. Documents are ``title + " " + text``.

Hits with score 0 (no query term in the document) are not returned: their order would be arbitrary,
and counting them as retrieved would credit BM25 with random recall.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

from dssm.config import field
from dssm.errors import ConfigError, InputError

__all__ = ["BM25Config", "BM25Index", "tokenize", "document_text"]

_WORD = re.compile(r"\w+")
_STOPWORDS = frozenset(STOPWORDS_EN)


@dataclass(frozen=True)
class BM25Config:
    """Settings of the BM25 baseline."""

    k1: float = field(1.5, "BM25 term-frequency saturation")
    b: float = field(0.75, "BM25 document-length normalisation")
    method: str = field("lucene", "bm25s scoring variant (lucene, robertson, atire, bm25l, bm25+)")
    stopwords: bool = field(True, "drop Lucene's 33 English stopwords")
    stem: bool = field(True, "Snowball English stemming (PyStemmer)")


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer  # PyStemmer; imported lazily so `dssm --help` stays fast

    return Stemmer.Stemmer("english")


def tokenize(texts: Sequence[str], *, stopwords: bool = True, stem: bool = True) -> list[list[str]]:
    """Split texts into BM25 terms (see the module docstring for the exact rules).

    Args:
        texts: raw strings, documents or queries alike.
        stopwords: drop Lucene's English stop list.
        stem: apply Snowball English stemming.

    Returns:
        One list of terms per text, in text order (possibly empty).
    """
    out = []
    stemmer = _stemmer() if stem else None
    for text in texts:
        words = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
        if stopwords:
            words = [w for w in words if w not in _STOPWORDS]
        if stemmer is not None:
            words = stemmer.stemWords(words)
        out.append(words)
    return out


def document_text(title: str, text: str) -> str:
    """The text BM25 indexes for a document: title and body joined by a space (either may be empty)."""
    return f"{title} {text}".strip() if title else text


class BM25Index:
    """A ``bm25s`` index over a list of documents, searched by raw query text."""

    def __init__(self, retriever: bm25s.BM25, ids: list[str], config: BM25Config):
        self._retriever = retriever
        self._ids = ids
        self.config = config

    @classmethod
    def build(cls, ids: Sequence[str], texts: Sequence[str], *, config: BM25Config | None = None,
              show_progress: bool = False) -> BM25Index:
        """Tokenise and index documents.

        Args:
            ids: document ids, one per text (unique).
            texts: document texts (use :func:`document_text` to join title and body).
            config: BM25 settings; defaults to :class:`BM25Config`.
            show_progress: let bm25s draw its progress bar.

        Raises:
            InputError: no documents, or ``ids`` and ``texts`` differ in length, or an id repeats.
        """
        config = config or BM25Config()
        if config.method not in ("lucene", "robertson", "atire", "bm25l", "bm25+"):
            raise ConfigError(f"unknown BM25 method {config.method!r}")
        ids = [str(i) for i in ids]
        if len(ids) != len(texts):
            raise InputError(f"BM25: {len(ids)} ids but {len(texts)} texts")
        if not ids:
            raise InputError("BM25: the corpus is empty")
        if len(set(ids)) != len(ids):
            dup = next(i for i, n in Counter(ids).items() if n > 1)
            raise InputError(f"BM25: document id {dup!r} occurs more than once")
        tokens = tokenize(texts, stopwords=config.stopwords, stem=config.stem)
        retriever = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
        retriever.index(tokens, show_progress=show_progress)
        return cls(retriever, ids, config)

    def __len__(self) -> int:
        return len(self._ids)

    def search_batch(self, texts: Sequence[str], k: int = 10) -> list[list[tuple[str, float]]]:
        """Top-``k`` documents for each query text.

        Args:
            texts: query strings, [batch].
            k: hits per query (capped at the corpus size).

        Returns:
            Per query, ``(doc_id, score)`` by descending score; documents sharing no term with the
            query (score 0) are left out, so a list may be shorter than ``k``.
        """
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        if not texts:
            return []
        tokens = tokenize(texts, stopwords=self.config.stopwords, stem=self.config.stem)
        k = min(k, len(self._ids))
        rows, scores = self._retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        out = []
        for row, score in zip(np.asarray(rows), np.asarray(scores), strict=True):
            out.append([(self._ids[int(r)], float(s)) for r, s in zip(row, score, strict=True) if s > 0])
        return out

    def search(self, text: str, k: int = 10) -> list[tuple[str, float]]:
        """Top-``k`` ``(doc_id, score)`` for one query text."""
        return self.search_batch([text], k)[0]
