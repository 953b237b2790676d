"""BM25's top rows from the query terms' postings (dssm.bm25_postings): the same rows as a scan of every score."""

from __future__ import annotations

import numpy as np
import pytest

from dssm.bm25 import BM25Config, BM25Index, top_rows
from dssm.bm25_postings import BM25Query, posting_rows, top_of
from dssm.data import read_beir


@pytest.fixture(scope="module")
def adi(adi_dir) -> tuple[BM25Index, list[str]]:
    data = read_beir(adi_dir)
    index = BM25Index.build(list(data.corpus), [f"{d.title} {d.text}" for d in data.corpus.values()])
    return index, list(data.queries.values()) + ["", "zzzz unknownword", "the of and", "computer computer"]


def _reference_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Every row with a score > 0, sorted by score then row: the definition, at any k."""
    rows = np.flatnonzero(scores > 0)
    return rows[np.lexsort((rows, -scores[rows]))][:k]


@pytest.mark.parametrize("k", [1, 3, 10, 100])
def test_the_top_from_postings_is_the_top_of_every_score(adi, k):
    index, queries = adi
    for text in queries:
        query = index.query(text)
        assert np.array_equal(query.scores, index.scores(text))
        assert set(query.candidates.tolist()) == set(np.flatnonzero(query.scores > 0).tolist())
        assert query.top(k).tolist() == _reference_top(query.scores, k).tolist(), text
    assert any(index.query(text).top(k).size for text in queries)


def test_search_rows_batch_returns_the_top_with_its_scores(adi):
    index, queries = adi
    for (rows, scores), text in zip(index.search_rows_batch(queries, 7), queries, strict=True):
        dense = index.scores(text)
        assert rows.tolist() == _reference_top(dense, 7).tolist()
        assert np.array_equal(scores, dense[rows])


def test_a_row_holding_every_query_term_is_not_lost_to_the_repeats():
    """Rows 0-3 hold both terms (two entries each); the (k x terms)-th entry must still leave k rows."""
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5], np.float32)
    candidates = np.array([0, 1, 2, 3, 0, 1, 2, 3, 4, 5])
    query = BM25Query(scores, candidates, repeats=2)
    assert query.top(3).tolist() == [0, 1, 2]
    assert query.top(5).tolist() == [0, 1, 2, 3, 4]
    # had one entry per row been assumed, the 3rd best entry (a second copy of row 1) would cut at 4.0
    assert BM25Query(scores, candidates, repeats=1).top(3).tolist() != [0, 1, 2]


def test_top_of_is_exact_at_a_tied_cut():
    """Rows tied at the k-th score all compete and the smaller rows win (argpartition alone picks any)."""
    scores = np.zeros(10, np.float32)
    scores[[9, 4, 7, 1, 3, 8]] = [2.0, 1.0, 1.0, 0.0, 1.0, 3.0]
    assert top_of(np.array([9, 4, 7, 1, 3, 8]), scores, 3).tolist() == [8, 9, 3]  # 3, 4, 7 tie: 3 goes
    assert top_rows(scores, 3).tolist() == [8, 9, 3]
    assert top_rows(scores, 10).tolist() == [8, 9, 3, 4, 7]  # a score of 0 is not a hit
    assert BM25Query(scores, np.array([9, 4, 7, 3, 8, 4]), repeats=2).top(3).tolist() == [8, 9, 3]


def test_posting_rows_counts_a_repeated_query_term_once():
    # term 0 is held by rows 0 and 4, term 1 by rows 2 and 4 (CSC: ascending rows per term)
    indices, indptr = np.array([0, 4, 2, 4]), np.array([0, 2, 4])
    rows, repeats = posting_rows(indices, indptr, [1, 0, 1])
    assert sorted(rows.tolist()) == [0, 2, 4, 4] and repeats == 2
    assert posting_rows(indices, indptr, [])[0].size == 0


def test_a_method_where_every_document_scores_ranks_every_document():
    """bm25l adds a non-occurrence term to every document: the postings do not say who scores."""
    index = BM25Index.build(["a", "b", "c"], ["red apple", "green pear", "red pear"], config=BM25Config(method="bm25l"))
    query = index.query("red")
    assert query.top(3).tolist() == _reference_top(query.scores, 3).tolist()
    assert query.top(3).size == 3  # the documents without "red" score too
