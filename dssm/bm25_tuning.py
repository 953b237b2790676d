"""BM25's ``k1`` and ``b`` chosen on labelled pairs held out from training (``dssm index --hybrid-pairs``).

Lucene's defaults (``k1=1.5, b=0.75``) were set for news and web text. On a corpus of short queries
for medium-length descriptions the saturation point sits lower: on debian-dev's labelled validation
split (1,368 synopses among all 34,090 descriptions; its dev queries not looked at) MRR@10 went
0.6745 at the defaults → 0.6995 at ``k1=0.6, b=0.5``, while on quora-dev's tenth (401 questions)
the whole grid stayed within 0.006 of the defaults. So ``dssm index`` searches a small grid on the
same held-out pairs the hybrid weight is tuned on, and keeps the best setting **only if it beats the
configured one with a paired randomisation p < alpha, corrected for having been picked from the grid**
(:func:`dssm.metrics.grid_max_p_value`): without that evidence BM25 keeps Lucene's settings.

The documents are tokenised once; every grid point reweights the same (document, term, count)
triples into the matrix a stored state holds (:func:`dssm.bm25.csc_state`, bm25s' own arithmetic), so
the ranking equals what a :class:`dssm.bm25.BM25Index` built with that setting returns.
Label-free corpora keep the configured setting: pseudo-queries cut from documents are not a user's
queries, and the tuner would learn their length, not the users'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from dssm.bm25 import BM25Config, csc_state, term_counts
from dssm.errors import ConfigError
from dssm.metrics import grid_max_p_value

__all__ = ["K1_GRID", "B_GRID", "tune_bm25", "grid_max_p_value", "reciprocal_ranks_at"]

K1_GRID: tuple[float, ...] = (0.3, 0.6, 0.9, 1.2, 1.5, 2.0)
B_GRID: tuple[float, ...] = (0.3, 0.5, 0.75, 0.9)
_QUERY_BLOCK = 256  # queries scored at a time: a [256, n] float32 block


def tune_bm25(texts: Sequence[str], pairs: Sequence[tuple[str, str]], *, base: BM25Config | None = None,
              k1_grid: Sequence[float] = K1_GRID, b_grid: Sequence[float] = B_GRID, alpha: float = 0.05,
              seed: int = 0, min_queries: int = 30) -> tuple[BM25Config, dict[str, Any]]:
    """The BM25 setting that ranks held-out labelled pairs best, or ``base`` without significant evidence.

    Args:
        texts: [n] the tuning corpus (title and body joined, as BM25 indexes them).
        pairs: ``(query, document text)`` labelled pairs nothing trained on; a document not in
            ``texts`` is added to the tuning corpus. A row whose text is the query's own is left out
            of that query's ranking (duplicate-question corpora hold their questions).
        base: the setting to beat (default :class:`BM25Config`); its method, stopwords and stemming are kept.
        k1_grid, b_grid: the settings searched (``base``'s own is always scored).
        alpha: the best setting replaces ``base`` only with a p-value (:func:`grid_max_p_value`) below this.
        seed: RNG seed of the test.
        min_queries: fewer pairs than this keep ``base`` (too few to tell a gain from noise).

    Returns:
        ``(config, report)``: the report holds every setting's MRR@10, the best one, its gain over
        ``base`` and the p-value.

    Raises:
        ConfigError: an empty grid or a non-positive ``k1`` / ``b`` outside [0, 1].
    """
    base = base or BM25Config()
    grid = sorted({(float(k1), float(b)) for k1 in k1_grid for b in b_grid} | {(base.k1, base.b)})
    if not k1_grid or not b_grid or any(k1 <= 0 or not 0 <= b <= 1 for k1, b in grid):
        raise ConfigError(f"BM25 tuning grid needs k1 > 0 and 0 <= b <= 1, got k1 {list(k1_grid)}, b {list(b_grid)}")
    report: dict[str, Any] = {"pairs": len(pairs), "metric": "mrr@10", "alpha": alpha,
                              "base": {"k1": base.k1, "b": base.b}}
    if len(pairs) < min_queries:
        return base, report | {"k1": base.k1, "b": base.b, "reason": f"only {len(pairs)} tuning pairs"}
    row_of: dict[str, int] = {}
    for row, text in enumerate(texts):
        row_of.setdefault(text, row)
    corpus = list(texts) + sorted({d for _, d in pairs if d not in row_of})
    row_of.update({d: row for row, d in enumerate(corpus) if d not in row_of})
    targets = np.array([row_of[d] for _, d in pairs], dtype=np.int64)
    vocab: dict[str, int] = {}
    docs, terms, counts, lengths = term_counts(corpus, vocab, base)
    order = np.lexsort((docs, terms))  # term-major once: csc_state's stable sort then finds it sorted
    docs, terms, counts = docs[order], terms[order], counts[order]
    query_terms = _query_matrix([q for q, _ in pairs], vocab, base)
    own = _own_rows([q for q, _ in pairs], corpus, targets)
    curve = {(k1, b): reciprocal_ranks_at(_weights(docs, terms, counts, lengths, vocab_size=len(vocab),
                                                   config=dataclasses.replace(base, k1=k1, b=b)),
                                          query_terms, targets, own)
             for k1, b in grid}
    means = {key: float(v.mean()) for key, v in curve.items()}
    top = max(means.values())
    # Among ties the setting nearest the base, then the smaller k1: the least change for the same ranking.
    best = min((key for key, m in means.items() if m >= top - 1e-12),
               key=lambda key: (abs(key[0] - base.k1) + abs(key[1] - base.b), key))
    gain = means[best] - means[(base.k1, base.b)]
    p = 1.0
    if best != (base.k1, base.b) and gain > 0:
        others = [key for key in grid if key != (base.k1, base.b)]
        p = grid_max_p_value(np.stack([curve[key] - curve[(base.k1, base.b)] for key in others]), seed=seed)
    chosen = best if gain > 0 and p < alpha else (base.k1, base.b)
    report.update(k1=chosen[0], b=chosen[1], best={"k1": best[0], "b": best[1]}, gain=round(gain, 6), p=round(p, 6),
                  documents=len(corpus), curve={f"k1={k1:g},b={b:g}": round(m, 6) for (k1, b), m in means.items()})
    return dataclasses.replace(base, k1=chosen[0], b=chosen[1]), report


def _query_matrix(queries: Sequence[str], vocab: dict[str, int], config: BM25Config) -> Any:
    """``[q, v]`` sparse counts of each query's known terms (a repeated term counts twice, as in bm25s)."""
    # deferred: scipy, imported only when this runs
    from scipy import sparse

    rows, cols, values, _ = term_counts(list(queries), dict(vocab), config)  # unknown terms go to the copy only
    keep = cols < len(vocab)
    return sparse.csr_matrix((values[keep].astype(np.float32), (rows[keep], cols[keep])),
                             shape=(len(queries), len(vocab)))


def _weights(docs: np.ndarray, terms: np.ndarray, counts: np.ndarray, lengths: np.ndarray, *, vocab_size: int,
             config: BM25Config) -> Any:
    """``[v, n]`` sparse BM25 weight of every (term, document): the stored state's own matrix
    (:func:`dssm.bm25.csc_state`, document-major CSC = term-major CSR)."""
    # deferred: scipy, imported only when this runs
    from scipy import sparse

    data, indices, indptr, _ = csc_state(docs, terms, counts, lengths, terms=vocab_size, n=lengths.size, config=config)
    return sparse.csr_matrix((data, indices, indptr), shape=(vocab_size, lengths.size))


def _own_rows(queries: Sequence[str], corpus: Sequence[str], targets: np.ndarray) -> list[np.ndarray]:
    """Per query, the rows other than its target whose text is the query's own."""
    rows_of: dict[str, list[int]] = {}
    for row, text in enumerate(corpus):
        rows_of.setdefault(text, []).append(row)
    return [np.array([r for r in rows_of.get(q, ()) if r != t], dtype=np.int64)
            for q, t in zip(queries, targets, strict=True)]


def reciprocal_ranks_at(weights: Any, query_terms: Any, targets: np.ndarray, own: Sequence[np.ndarray], *,
                        k: int = 10) -> np.ndarray:
    """``[q]`` reciprocal rank of each target in its query's BM25 top ``k`` (0 if below, or if it scores 0).

    Ties are broken by row, as :func:`dssm.bm25.top_rows` ranks them; ``own`` rows are left out.

    Args:
        weights: ``[v, n]`` term × document weights (sparse).
        query_terms: ``[q, v]`` query term counts (sparse).
        targets: ``[q]`` each query's relevant row.
        own: per query, rows left out of its ranking.
    """
    out = np.zeros(targets.size, dtype=np.float64)
    for start in range(0, targets.size, _QUERY_BLOCK):
        scores = np.asarray((query_terms[start:start + _QUERY_BLOCK] @ weights).todense(), dtype=np.float32)
        for i, row in enumerate(scores):
            target = targets[start + i]
            mine = row[target]
            if mine <= 0:
                continue
            skip = own[start + i]
            above = int((row > mine).sum()) + int((row[:target] == mine).sum())
            if skip.size:
                above -= int(((row[skip] > mine) | ((row[skip] == mine) & (skip < target))).sum())
            if above < k:
                out[start + i] = 1.0 / (above + 1)
    return out
