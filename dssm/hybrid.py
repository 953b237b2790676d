"""Hybrid retrieval: DSSM (dense) and BM25 (sparse) fused per query.

Two fusions:

* **Reciprocal-rank fusion** (:func:`dssm.metrics.reciprocal_rank_fusion`): ranks only, no weight;
  ``score(d) = sum 1 / (60 + rank(d))``.
* **Convex combination** of normalised scores (:func:`fuse_scores`, :func:`convex_fusion`):
  ``score(d) = w * norm(dense(d)) + (1 - w) * norm(bm25(d))`` with ``w`` the weight of DSSM.
  Candidates are the union of both systems' top ``candidates`` documents; each system's score is
  computed *exactly* for every candidate (cosine from the stored embeddings, BM25 from the full score
  vector; a document without any query term has BM25 score 0), so no score is guessed.
  Normalisation is per query over the candidate set: ``minmax`` (default) maps each system's scores to
  [0, 1] (``(s - min) / (max - min)``), ``zscore`` to ``(s - mean) / std``; a constant score vector
  maps to zeros (it cannot reorder anything). Min-max is the default because BM25 scores are
  unbounded and heavy-tailed while cosines sit in [-1, 1]; after min-max both span [0, 1] per query.

The weight is tuned on validation queries only (:func:`tune_weight`); ``dssm eval`` tunes it on a
deterministic subset of queries disjoint from the evaluated ones and says which.

At search time :func:`fused_rows` is what ``Searcher.search(..., mode="hybrid")`` runs; its weight and
normalisation come from the index version's ``hybrid.json`` (:data:`HYBRID_FILE`) when present,
else :data:`DEFAULT_WEIGHT` and ``minmax``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dssm.config import config_from_dict, field
from dssm.errors import ChecksumError, ConfigError
from dssm.metrics import paired_randomization_test

__all__ = [
    "SEARCH_MODES",
    "NORMALIZATIONS",
    "DEFAULT_WEIGHT",
    "HYBRID_FILE",
    "HybridConfig",
    "normalize_scores",
    "fuse_scores",
    "convex_fusion",
    "tune_weight",
    "read_hybrid_config",
    "fused_rows",
    "rank_candidates",
    "WEIGHT_GRID",
    "PseudoQuery",
    "QUERY_WORDS",
    "cut_span",
    "crop_pseudo_queries",
    "reciprocal_ranks",
    "choose_safe_weight",
    "label_free_weight",
    "Refit",
]

SEARCH_MODES = ("dense", "bm25", "hybrid")
NORMALIZATIONS = ("minmax", "zscore")
DEFAULT_WEIGHT = 0.5
#: Hybrid weights tried when tuning: 0, 0.05, ..., 1.
WEIGHT_GRID = tuple(round(i * 0.05, 2) for i in range(21))
#: File in an index version holding the tuned :class:`HybridConfig` (written by ``dssm eval --save-weight``).
HYBRID_FILE = "hybrid.json"
#: (shortest, longest) words of a span cut out of a document as a short query (:func:`cut_span`).
QUERY_WORDS = (4, 12)


@dataclass(frozen=True)
class HybridConfig:
    """How dense and BM25 scores are combined at search time."""

    weight: float = field(DEFAULT_WEIGHT, "weight of the DSSM score; 1 - weight goes to BM25")
    normalization: str = field("minmax", "per-query score normalisation: minmax or zscore")
    candidates: int = field(100, "top documents taken from each system before fusing")

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"hybrid weight must be in [0, 1], got {self.weight}")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"normalization {self.normalization!r} is not one of {NORMALIZATIONS}")
        if self.candidates < 1:
            raise ConfigError(f"hybrid candidates must be >= 1, got {self.candidates}")


def normalize_scores(scores: np.ndarray, method: str = "minmax") -> np.ndarray:
    """Normalise one query's candidate scores (or each row of a matrix, one query per row).

    Args:
        scores: [n] scores of one system over the query's candidates, or [q, n] (per row).
        method: ``minmax`` → [0, 1]; ``zscore`` → mean 0, std 1 (population std).

    Returns:
        float64 of the same shape; zeros where a row's scores are constant (or n == 0).
    """
    if method not in NORMALIZATIONS:
        raise ConfigError(f"normalization {method!r} is not one of {NORMALIZATIONS}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    if method == "minmax":
        centre = scores.min(axis=-1, keepdims=True)
        spread = scores.max(axis=-1, keepdims=True) - centre
    else:
        centre, spread = scores.mean(axis=-1, keepdims=True), scores.std(axis=-1, keepdims=True)
    return np.where(spread > 0, (scores - centre) / np.where(spread > 0, spread, 1.0), 0.0)


def fuse_scores(dense: np.ndarray, sparse: np.ndarray, *, weight: float, normalization: str = "minmax") -> np.ndarray:
    """``weight * norm(dense) + (1 - weight) * norm(sparse)`` over aligned candidates.

    Args:
        dense: [n] DSSM cosines of the candidates, or [q, n] (normalised per row).
        sparse: BM25 scores of the same candidates, same shape.
        weight: in [0, 1], the DSSM share.
        normalization: ``minmax`` or ``zscore``.

    Returns:
        Fused scores, the inputs' shape.
    """
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"hybrid weight must be in [0, 1], got {weight}")
    dense, sparse = np.asarray(dense), np.asarray(sparse)
    if dense.shape != sparse.shape:
        raise ConfigError(f"dense and BM25 scores must align, got shapes {dense.shape} and {sparse.shape}")
    return weight * normalize_scores(dense, normalization) + (1 - weight) * normalize_scores(sparse, normalization)


def convex_fusion(dense: Mapping[str, Mapping[str, float]], sparse: Mapping[str, Mapping[str, float]], *,
                  weight: float, k: int, normalization: str = "minmax") -> dict[str, list[tuple[str, float]]]:
    """Fuse two systems' candidate scores per query into a run.

    Args:
        dense: ``{qid: {doc_id: cosine}}``.
        sparse: ``{qid: {doc_id: bm25}}``.
        weight: DSSM share in [0, 1].
        k: depth of the fused ranking.
        normalization: ``minmax`` or ``zscore``.

    The candidates of a query are the union of both dicts' doc ids. Pass exact scores for every
    candidate on both sides (``dssm eval`` does); a candidate missing from one side gets that side's
    lowest score for the query (0 for BM25 when the side is empty), i.e. the bottom of its scale.

    Returns:
        ``{qid: [(doc_id, fused), ...]}`` best first; ties broken by the dense score, then doc id.
    """
    out: dict[str, list[tuple[str, float]]] = {}
    for qid in sorted(set(dense) | set(sparse)):
        d, s = dense.get(qid, {}), sparse.get(qid, {})
        docs = sorted(set(d) | set(s))
        if not docs:
            out[qid] = []
            continue
        d_fill = min(d.values()) if d else 0.0
        s_fill = min(s.values()) if s else 0.0
        dense_scores = np.array([d.get(x, d_fill) for x in docs])
        fused = fuse_scores(dense_scores, np.array([s.get(x, s_fill) for x in docs]), weight=weight,
                            normalization=normalization)
        # Ties (documents without a query term at weight 0) by the dense score, then doc id, as search does.
        ranked = sorted(zip(docs, fused.tolist(), dense_scores.tolist(), strict=True),
                        key=lambda item: (-item[1], -item[2], item[0]))
        ranked = [(doc, score) for doc, score, _ in ranked]
        out[qid] = ranked[:k]
    return out


def tune_weight(score: Callable[[float], float], *,
                grid: Sequence[float] | None = None) -> tuple[float, dict[float, float]]:
    """Pick the weight with the best validation score.

    Args:
        score: ``weight -> mean metric on the validation queries`` (higher is better).
        grid: weights to try; default 0, 0.05, ..., 1.

    Returns:
        ``(best weight, {weight: score})``; among equal scores the weight nearest 0.5 wins (then the
        smaller), so a flat curve does not drift to an extreme.
    """
    grid = list(WEIGHT_GRID) if grid is None else list(grid)
    if not grid:
        raise ConfigError("tune_weight needs at least one weight")
    curve = {float(w): float(score(float(w))) for w in grid}
    best = max(curve.values())
    winners = [w for w, v in curve.items() if v >= best - 1e-12]
    return min(winners, key=lambda w: (abs(w - 0.5), w)), curve


def read_hybrid_config(version_dir: str | Path) -> HybridConfig:
    """The version's ``hybrid.json``, or the defaults when the version has none.

    Raises:
        ChecksumError: the file exists but is not a valid :class:`HybridConfig`.
    """

    path = Path(version_dir) / HYBRID_FILE
    if not path.is_file():
        return HybridConfig()
    try:
        return config_from_dict(HybridConfig, json.loads(path.read_text()))
    except (json.JSONDecodeError, ConfigError, TypeError) as exc:
        raise ChecksumError(f"{path} is not a valid hybrid configuration: {exc}") from exc


def fused_rows(*, query_vectors: np.ndarray, texts: Sequence[str], k: int, mode: str, ann: Any, embeddings: np.ndarray,
               bm25: Any, config: HybridConfig, rescore: Callable[[int, np.ndarray, np.ndarray], np.ndarray] | None
               = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows and scores per query for ``mode`` ``bm25`` or ``hybrid`` over one index version.

    Args:
        query_vectors: [q, dim] float32 query embeddings (``hybrid`` only; may be ``None`` for ``bm25``).
        texts: the q query texts (for BM25).
        k: results per query.
        mode: ``bm25`` or ``hybrid``.
        ann: ``(vectors [q, dim], k) -> (rows [q, k], scores [q, k])`` (the index's ScaNN search).
        embeddings: [n, dim] float32 stored document embeddings (row order of the index).
        bm25: the version's :class:`dssm.bm25.BM25Index` (rows, no ids needed).
        config: weight, normalisation and candidate depth.
        rescore: ``(query index, rows, cosines) -> dense scores`` of the candidates (:mod:`dssm.windows`).

    Returns:
        Per query ``(rows int64 [<=k], scores float64 [<=k])`` best first. ``bm25`` returns only
        documents with a query term (score > 0); ``hybrid`` scores are fused values.
    """
    if mode == "bm25":
        return [(rows[:k], scores[:k].astype(np.float64)) for rows, scores in bm25.search_rows_batch(texts, k)]
    if mode != "hybrid":
        raise ConfigError(f"mode {mode!r} is not one of {SEARCH_MODES}")
    depth = max(k, config.candidates)
    dense_rows, _ = ann(query_vectors, depth)
    out = []
    for i, text in enumerate(texts):
        sparse = bm25.query(text)  # once per query: its top rows and the candidates' scores both come from it
        rows = np.union1d(np.asarray(dense_rows[i], dtype=np.int64), sparse.top(depth))
        cosines = np.asarray(embeddings[rows], dtype=np.float32) @ query_vectors[i]
        cosines = cosines if rescore is None else rescore(i, rows, cosines)
        out.append(rank_candidates(rows, cosines, sparse.scores[rows], weight=config.weight,
                                   normalization=config.normalization, k=k))
    return out


def rank_candidates(rows: np.ndarray, cosines: np.ndarray, sparse: np.ndarray, *, weight: float,
                    normalization: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One query's candidates fused and ranked: ``(rows [<=k], fused [<=k])`` best first.

    Ties (e.g. documents without a query term at weight 0) go by cosine, then row. Search
    (:func:`fused_rows`) and the weight tuning (:func:`label_free_weight`) both rank with it.
    """
    fused = fuse_scores(cosines, sparse, weight=weight, normalization=normalization)
    order = np.lexsort((rows, -cosines, -fused))[:k]
    return rows[order], fused[order]


# ----------------------------------------------------------------------------- label-free weight (issue 11)


@dataclass(frozen=True)
class PseudoQuery:
    """A span cut out of a corpus document: ``query`` is the span, ``rest`` the document without it."""

    row: int
    query: str
    rest: str


def cut_span(words: Sequence[str], draw: Callable[[int, int], int], *,
             query_words: tuple[int, int] = QUERY_WORDS) -> tuple[str, str]:
    """``(span, rest)``: a span of ``query_words`` words (at most half of ``words``) cut out of them.

    ``draw(low, high)`` gives an integer in ``[low, high]``, called for the length, then for the
    start. The caller makes sure ``len(words) >= 2 * query_words[0]``. The tuner's pseudo-queries
    (:func:`crop_pseudo_queries`) and the pairs job's span queries (``dssm pairs --span-queries``)
    are both cut by it.
    """
    shortest, longest = query_words
    length = draw(shortest, min(longest, len(words) // 2))
    start = draw(0, len(words) - length)
    return " ".join(words[start:start + length]), " ".join([*words[:start], *words[start + length:]])


def crop_pseudo_queries(texts: Sequence[str], *, count: int, seed: int = 0, min_words: int = 8,
                        query_words: tuple[int, int] = QUERY_WORDS,
                        rows: Sequence[int] | None = None) -> list[PseudoQuery]:
    """Pseudo-queries for tuning without labels: a contiguous span of words cut out of a document.

    The span is *removed* from its document (Contriever's independent cropping, one side kept), so
    the query shares only what the rest of the document shares with it — topic words, not the span
    itself — which is closer to a real query than a copied sentence and does not hand BM25 an exact
    match.

    Args:
        texts: document texts in row order.
        count: pseudo-queries wanted (fewer when fewer documents are long enough).
        seed: RNG seed; the documents and spans repeat for the same corpus and seed.
        min_words: documents shorter than this are never used.
        query_words: (shortest, longest) span in words; a span keeps at least half the document.
        rows: cut only from these rows (e.g. documents the towers never trained on); all rows when ``None``.

    Returns:
        Up to ``count`` :class:`PseudoQuery`, at most one per document, in row order.
    """
    shortest, longest = query_words
    if not 1 <= shortest <= longest:
        raise ConfigError(f"query_words must be 1 <= shortest <= longest, got {query_words}")
    rng = np.random.default_rng(seed)
    candidates = range(len(texts)) if rows is None else sorted({int(r) for r in rows})
    eligible = [row for row in candidates if len(texts[row].split()) >= max(min_words, 2 * shortest)]
    chosen = sorted(rng.choice(eligible, size=min(count, len(eligible)), replace=False).tolist()) if eligible else []
    out = []
    for row in chosen:
        query, rest = cut_span(texts[row].split(), lambda low, high: int(rng.integers(low, high + 1)),
                               query_words=query_words)
        out.append(PseudoQuery(row=row, query=query, rest=rest))
    return out


def reciprocal_ranks(fused_rows_per_query: Sequence[np.ndarray], targets: Sequence[int], *, k: int = 10) -> np.ndarray:
    """[q] 1/rank of each query's target row within its top ``k`` (0 when absent)."""
    out = np.zeros(len(targets), dtype=np.float64)
    for i, (rows, target) in enumerate(zip(fused_rows_per_query, targets, strict=True)):
        hit = np.flatnonzero(np.asarray(rows[:k]) == target)
        if hit.size:
            out[i] = 1.0 / (hit[0] + 1)
    return out


def choose_safe_weight(curve: Mapping[float, np.ndarray], *, alpha: float = 0.05, trials: int = 10_000,
                       seed: int = 0, one_se: bool = False) -> tuple[float, dict[str, Any]]:
    """The weight with the best mean per-query value, kept only if it beats BM25 alone significantly.

    Args:
        curve: ``{weight: [q] per-query values (e.g. reciprocal rank)}``; must hold weight 0 (BM25 alone).
        alpha: the best weight is kept only when its gain over weight 0 has a paired-randomisation
            p-value below this; otherwise 0, so a tower that does not help cannot make the default
            search worse than BM25.
        trials: randomisation trials.
        seed: RNG seed of the test.
        one_se: take the smallest weight whose mean is within one standard error of the best's (the
            paired per-query difference), not the best itself: Breiman's one-standard-error rule,
            leaning to BM25's side when the curve is flat. :func:`label_free_weight` sets it for
            pseudo-queries, whose best weight was above real queries' on every development corpus.

    Returns:
        ``(weight, {"best": w*, "gain": mean gain of w* over 0, "p": p-value, "curve": {w: mean}})``;
        with ``one_se``, ``w*`` is the weight that rule took and ``"top"`` the best mean's weight.
    """
    if 0.0 not in curve:
        raise ConfigError("choose_safe_weight needs the weight 0 (BM25 alone) in the curve")
    means = {float(w): float(np.mean(v)) if len(v) else 0.0 for w, v in curve.items()}
    best = max(means.values())
    # Among equal means the smaller weight: the one closer to BM25, the safe side.
    best_w = top_w = min(w for w, m in means.items() if m >= best - 1e-12)
    if one_se:
        best_w = _within_one_standard_error(curve, top_w)
    base, top = np.asarray(curve[0.0], np.float64), np.asarray(curve[best_w], np.float64)
    gain = float(top.mean() - base.mean()) if top.size else 0.0
    p = 1.0
    if best_w != 0.0 and gain > 0:

        p = paired_randomization_test(dict(enumerate(top.tolist())), dict(enumerate(base.tolist())),
                                      trials=trials, seed=seed)
    weight = best_w if (gain > 0 and p < alpha) else 0.0
    return weight, {"best": best_w, "gain": round(gain, 6), "p": round(p, 6),
                    "curve": {f"{w:.2f}": round(m, 6) for w, m in sorted(means.items())}} | (
                        {"top": top_w, "rule": "one standard error"} if one_se else {})


def _within_one_standard_error(curve: Mapping[float, np.ndarray], top_w: float) -> float:
    """The smallest weight whose per-query values trail ``top_w``'s by at most one standard error of the mean."""
    top = np.asarray(curve[top_w], np.float64)
    for w in sorted(float(w) for w in curve if w < top_w):
        behind = top - np.asarray(curve[w], np.float64)
        se = float(behind.std(ddof=1) / np.sqrt(behind.size)) if behind.size > 1 else 0.0
        if behind.mean() <= se:
            return w
    return top_w


# ``texts -> (embed_queries, embed_documents)``: towers fitted to ``texts`` (label_free_weight's ``refit``).
# A fit to the whole corpus has seen each pseudo-query span beside the rest of its document and finds
# that document far better than a real query's: on a 5,000-document sample of debian-dev the weight
# came out 1.0 and the default search scored 0.60 against BM25's 0.83 (0.825 with the refit).
Refit = Callable[[list[str]], tuple[Callable[[list[str]], np.ndarray], Callable[[list[str]], np.ndarray]]]


def label_free_weight(*, texts: Sequence[str], embeddings: np.ndarray | None,
                      embed_queries: Callable[[list[str]], np.ndarray] | None,
                      embed_documents: Callable[[list[str]], np.ndarray] | None, bm25_config: Any = None,
                      queries: int = 500, max_docs: int = 50_000, candidates: int = 100, normalization: str = "minmax",
                      alpha: float = 0.05, seed: int = 0, pairs: Sequence[tuple[str, str]] | None = None,
                      refit: Refit | None = None, max_rounds: int = 8,
                      query_rows: Sequence[int] | None = None) -> tuple[HybridConfig, dict[str, Any]]:
    """Choose the hybrid weight of a corpus without any evaluated query (what ``dssm index`` stores).

    Pseudo-queries are spans cut out of documents (:func:`crop_pseudo_queries`); each one's target is
    its document *without* the span, re-encoded by the document tower and re-indexed by BM25, inside a
    tuning corpus of every document (or ``max_docs`` of them, the targets included). With ``pairs``
    (labelled ``(query, document)`` pairs held out from training, ``dssm index --hybrid-pairs``) the
    queries are theirs instead and each target is its document: the corpus row with the same text, or
    the document added to the tuning corpus. Each weight of the 0, 0.05, ..., 1 grid fuses the two
    systems exactly as search does (union of each one's top ``candidates``, per-query normalisation),
    scored by the target's reciprocal rank in the top 10. :func:`choose_safe_weight` keeps the best
    weight only if it beats BM25 alone (weight 0) significantly, so a useless tower gets weight 0 and
    hybrid search is then BM25's ranking.

    A corpus with fewer long-enough documents than ``queries`` gets several **rounds**: every document
    gives one span per round (fresh spans, a fresh tuning corpus and refit each time), and each
    document's reciprocal ranks are averaged over the rounds before the test, whose unit stays the
    document. One span per document made the weight of a small corpus a draw: on 100-document samples
    of debian-dev one round in six kept weight 0 where the average of rounds found a clear gain.

    Args:
        texts: [n] document texts in row order (title and body joined, as BM25 indexes them).
        embeddings: [n, dim] the index's L2-normalised document embeddings, same rows (``None`` with ``refit``).
        embed_queries: texts -> [len, dim] query-tower embeddings (``None`` with ``refit``).
        embed_documents: texts -> [len, dim] document-tower embeddings (``None`` with ``refit``).
        bm25_config: the index's :class:`dssm.bm25.BM25Config` (default settings when ``None``).
        queries: pseudo-queries to cut (or labelled pairs to use, at most).
        max_docs: largest tuning corpus (bounds the BM25 re-index on large corpora).
        candidates: depth taken from each system before fusing (as :class:`HybridConfig`).
        normalization: ``minmax`` or ``zscore``.
        alpha: significance level of :func:`choose_safe_weight`.
        seed: RNG seed (pseudo-queries, tuning sample, test).
        pairs: labelled tuning pairs; ``None`` cuts pseudo-queries.
        refit: towers fitted to the corpus (``dssm lsa``) are fitted again to the tuning corpus (spans
            removed) by :data:`Refit`, which then encodes every tuning document and query.
        max_rounds: most rounds of pseudo-queries on a small corpus (``ceil(queries / documents)``
            are run, up to this; 1 turns rounds off). Labelled pairs always take one.
        query_rows: rows of ``texts`` the pseudo-queries may be cut from (``None``: all). Trained
            towers have learnt their training documents' spans, and rank those far better than any
            real query (debian-dev's 34k descriptions, towers pre-trained on their spans: weight 0.80
            and a default search of 0.643 against BM25's 0.710); ``dssm index --hybrid-pairs
            CORPUS_PAIRS`` passes the documents of the corpus pairs' validation split, which the
            towers never trained on.

    Returns:
        ``(HybridConfig, report)``; the report holds the curve, the p-value and the counts.
    """
    n = _checked_towers(texts, embeddings, embed_queries, embed_documents, refit=refit)
    if max_rounds < 1:
        raise ConfigError(f"max_rounds must be at least 1, got {max_rounds}")
    rng = np.random.default_rng(seed + 1)
    rounds, report = _tuning_rounds(texts, pairs, count=queries, seed=seed, rng=rng, max_rounds=max_rounds,
                                    query_rows=query_rows)
    report.update(documents=n, alpha=alpha, seed=seed)
    if len(rounds[0].queries) < 30:  # too few to tell a gain from noise
        report.update(weight=0.0, reason=f"only {len(rounds[0].queries)} tuning queries (documents with enough "
                                         "words to cut a query from, or labelled pairs)")
        return HybridConfig(weight=0.0, normalization=normalization, candidates=candidates), report
    curves = []
    # Several rounds happen only when every eligible document gives its span, so the rounds' targets
    # are the same rows in the same order and average position by position.
    for tuning in rounds:
        sub_texts, matrix, local, query_vectors = _tuning_corpus(
            tuning, texts, embeddings, max_docs=max_docs, rng=rng, refit=refit,
            embed_queries=embed_queries, embed_documents=embed_documents)
        curves.append(_fusion_curve(sub_texts, matrix, tuning.queries, local, query_vectors, bm25_config=bm25_config,
                                    candidates=candidates, normalization=normalization))
    curve = {w: np.mean([c[w] for c in curves], axis=0) for w in WEIGHT_GRID}
    weight, chosen_weight = choose_safe_weight(curve, alpha=alpha, seed=seed, one_se=pairs is None)
    report.update(weight=weight, tuning_documents=len(sub_texts), metric="mrr@10", **chosen_weight)
    if refit is not None:
        report["refit"] = True
    return HybridConfig(weight=weight, normalization=normalization, candidates=candidates), report


class _TuningRound(NamedTuple):
    """One set of tuning queries: their texts, target rows (``>= n`` for ``extra``), cut documents, added ones."""

    queries: list[str]
    targets: np.ndarray
    replaced: dict[int, str]
    extra: list[str]


def _tuning_rounds(texts: Sequence[str], pairs: Sequence[tuple[str, str]] | None, *, count: int, seed: int,
                   rng: np.random.Generator, max_rounds: int,
                   query_rows: Sequence[int] | None) -> tuple[list[_TuningRound], dict[str, Any]]:
    """:func:`label_free_weight`'s rounds of tuning queries, and the report's first entries."""
    if pairs is not None:
        rounds = [_pairs_round(texts, pairs, count=count, rng=rng)]
        return rounds, {"method": "labelled pairs held out from training", "pairs": len(rounds[0].queries),
                        "pairs_documents_added": len(rounds[0].extra)}
    rounds = [_pseudo_round(texts, count=count, seed=seed, rows=query_rows)]
    wanted = min(max_rounds, -(-count // len(rounds[0].queries))) if rounds[0].queries else 1
    rounds += [_pseudo_round(texts, count=count, seed=seed + r, rows=query_rows) for r in range(1, wanted)]
    report: dict[str, Any] = {"method": "label-free: spans cut out of documents",
                              "pseudo_queries": len(rounds[0].queries), "rounds": len(rounds)}
    if query_rows is not None:
        report["query_documents"] = len(set(map(int, query_rows)))
    return rounds, report


def _pairs_round(texts: Sequence[str], pairs: Sequence[tuple[str, str]], *, count: int,
                 rng: np.random.Generator) -> _TuningRound:
    """Up to ``count`` labelled pairs; a document not in ``texts`` is added after the corpus rows."""
    chosen = [pairs[i] for i in sorted(rng.permutation(len(pairs))[:count].tolist())]
    row_of = {text: row for row, text in enumerate(texts)}
    extra = sorted({d for _, d in chosen if d not in row_of})
    row_of.update({d: len(texts) + i for i, d in enumerate(extra)})
    return _TuningRound([q for q, _ in chosen], np.array([row_of[d] for _, d in chosen], dtype=np.int64), {}, extra)


def _pseudo_round(texts: Sequence[str], *, count: int, seed: int, rows: Sequence[int] | None) -> _TuningRound:
    pseudo = crop_pseudo_queries(texts, count=count, seed=seed, rows=rows)
    return _TuningRound([q.query for q in pseudo], np.array([q.row for q in pseudo], np.int64),
                        {q.row: q.rest for q in pseudo}, [])


def _tuning_corpus(tuning: _TuningRound, texts: Sequence[str], embeddings: np.ndarray | None, *, max_docs: int,
                   rng: np.random.Generator, refit: Refit | None,
                   embed_queries: Callable[[list[str]], np.ndarray] | None,
                   embed_documents: Callable[[list[str]], np.ndarray] | None,
                   ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``(texts, [m, dim] rows, [q] target row in them, [q, dim] queries)`` of one round's tuning corpus."""
    n, targets = len(texts), tuning.targets
    inside = np.unique(targets[targets < n])
    if n > max_docs:
        others = np.setdiff1d(np.arange(n), inside)
        keep = np.sort(np.concatenate([inside, rng.choice(others, max(max_docs - inside.size, 0), replace=False)]))
    else:
        keep = np.arange(n)
    sub_texts = [tuning.replaced.get(int(r), texts[r]) for r in keep] + tuning.extra
    local = np.where(targets < n, np.searchsorted(keep, np.minimum(targets, n - 1)), len(keep) + targets - n)
    if refit is not None:
        embed_queries, embed_documents = refit(sub_texts)
        matrix = _unit(embed_documents(sub_texts))
    else:
        matrix = _tuning_matrix(embeddings, keep, tuning.replaced, tuning.extra, embed_documents)
    return sub_texts, matrix, local, _unit(embed_queries(tuning.queries))


def _checked_towers(texts: Sequence[str], embeddings: np.ndarray | None, *encoders: Any, refit: Refit | None) -> int:
    """``len(texts)``, once :func:`label_free_weight` has what it ranks with: a refit, or the index's rows and towers.

    Raises:
        ConfigError: neither, or rows that do not match ``texts``.
    """
    n = len(texts)
    if refit is None and (embeddings is None or any(encoder is None for encoder in encoders)):
        raise ConfigError("label_free_weight needs the index's embeddings and both towers, or a refit")
    if embeddings is not None and embeddings.shape[0] != n:
        raise ConfigError(f"{n} texts but {embeddings.shape[0]} embeddings")
    return n


def _tuning_matrix(embeddings: np.ndarray, keep: np.ndarray, replaced: dict[int, str], extra: list[str],
                   embed_documents: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """``[len(keep) + len(extra), dim]``: the index's rows kept, re-encoded where a span was cut out, then ``extra``."""
    matrix = np.array(embeddings[keep], dtype=np.float32)
    if replaced:
        rows = np.fromiter(replaced, dtype=np.int64)
        matrix[np.searchsorted(keep, rows)] = _unit(embed_documents([replaced[int(r)] for r in rows]))
    if extra:
        matrix = np.concatenate([matrix, _unit(embed_documents(extra))])
    return matrix


def _fusion_curve(texts: list[str], matrix: np.ndarray, queries: list[str], targets: np.ndarray,
                  query_vectors: np.ndarray, *, bm25_config: Any, candidates: int,
                  normalization: str) -> dict[float, np.ndarray]:
    """``{weight: [q] reciprocal rank@10 of each query's target row}`` over the weight grid.

    A document whose text is the query's own (a duplicate-question corpus holds its questions; ``dssm
    eval --skip-self`` skips them the same way) is left out of that query's ranking: every system and
    weight puts it first, so it only pushes every target down one place and blunts the comparison.
    """
    # deferred: bm25s and PyStemmer, imported only when this runs
    from dssm.bm25 import BM25Index

    bm25 = BM25Index.build([str(i) for i in range(len(texts))], texts, config=bm25_config)
    rows_of: dict[str, list[int]] = {}
    for row, text in enumerate(texts):
        rows_of.setdefault(text, []).append(row)
    ranked: dict[float, list[np.ndarray]] = {w: [] for w in WEIGHT_GRID}
    depth = min(candidates, len(texts))
    for i, query in enumerate(queries):
        own = np.array([r for r in rows_of.get(query, ()) if r != targets[i]], dtype=np.int64)
        cosines = matrix @ query_vectors[i]
        sparse = bm25.query(query)  # BM25's half as fused_rows takes it
        rows = np.union1d(np.argpartition(-cosines, depth - 1)[:depth], sparse.top(depth))
        for w in WEIGHT_GRID:
            top = rank_candidates(rows, cosines[rows], sparse.scores[rows], weight=w, normalization=normalization,
                                  k=10 + own.size)[0]
            ranked[w].append(top[~np.isin(top, own)][:10] if own.size else top)
    return {w: reciprocal_ranks(ranked[w], targets.tolist()) for w in WEIGHT_GRID}


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)
