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

Stored state (``BM25_DIR`` = ``bm25/`` inside an index version, written by :func:`write_bm25_state`
while the version is staged, so the version's manifest checksums it like every other file)::

    bm25/params.json   {"format": 1, "config": BM25Config, "documents": n, "vocabulary": v,
                        "avgdl": mean tokens per document (states written since delta segments)}
    bm25/vocab.json    the terms, term id = position in the list
    bm25/data.npy      float32 [nnz]  precomputed BM25 term weights (bm25s' CSC matrix, term-major)
    bm25/indices.npy   int32   [nnz]  document row of each weight
    bm25/indptr.npy    int64   [v+1]  term id → slice of data/indices
    bm25/tf.npy        int32   [nnz]  term count of each weight, and bm25/lengths.npy int32 [n]
                                      tokens per document (states written since incremental updates)

No pickle: JSON and ``.npy`` written and read with ``allow_pickle=False``. Document ``i`` of the state
is row ``i`` of the index version (``docs.sqlite``, ``embeddings.npy``); ids are not duplicated here.
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
from bm25s.scoring import _select_idf_scorer
from bm25s.stopwords import STOPWORDS_EN
from tqdm import tqdm

from dssm.artifacts import load_npy
from dssm.bm25_postings import BM25Query, posting_rows, rows_by_score, top_rows
from dssm.config import config_from_dict, config_to_dict, field
from dssm.data import document_text
from dssm.errors import ChecksumError, ConfigError, IndexNotFoundError, InputError

__all__ = ["BM25_DIR", "BM25Config", "BM25Index", "BM25Reference", "idf_function", "tokenize", "top_rows",
           "rows_by_score", "term_counts", "csc_state", "write_bm25_state", "update_bm25_state", "load_bm25_state",
           "has_bm25_state", "neighbour_pairs"]

#: Directory of the BM25 state inside an index version.
BM25_DIR = "bm25"
_STATE_FORMAT = 1
_METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")
_STORABLE = ("lucene", "robertson", "atire")  # no per-term non-occurrence array to persist

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
    # deferred: PyStemmer, imported only when this runs
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


class BM25Index:
    """A ``bm25s`` index over a list of documents, searched by raw query text.

    Document ``i`` is row ``i``; ``ids`` maps rows to document ids (for a state loaded from an index
    version, the caller passes the version's ids or leaves them ``None`` and works with rows).
    """

    def __init__(self, retriever: bm25s.BM25, ids: list[str] | None, config: BM25Config, *, size: int,
                 avgdl: float | None = None):
        self._retriever = retriever
        self._ids = ids
        self.config = config
        self.size = size
        self.avgdl = avgdl  # mean tokens per document, when the stored state recorded it

    @cached_property
    def reference(self) -> BM25Reference:
        """This state's corpus statistics, for weighting a delta segment's documents comparably."""
        indptr = np.asarray(self._retriever.scores["indptr"])
        return BM25Reference(documents=self.size, avgdl=self.avgdl, vocab=self._retriever.vocab_dict,
                             df=np.diff(indptr))

    @classmethod
    def build(cls, ids: Sequence[str], texts: Sequence[str], *, config: BM25Config | None = None,
              show_progress: bool = False) -> BM25Index:
        """Tokenise and index documents.

        Args:
            ids: document ids, one per text (unique).
            texts: document texts (use :func:`dssm.data.document_text` to join title and body).
            config: BM25 settings; defaults to :class:`BM25Config`.
            show_progress: let bm25s draw its progress bar.

        Raises:
            InputError: no documents, or ``ids`` and ``texts`` differ in length, or an id repeats.
        """
        config = config or BM25Config()
        if config.method not in _METHODS:
            raise ConfigError(f"unknown BM25 method {config.method!r}; use one of {_METHODS}")
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
        if any(tokens):
            retriever.index(tokens, show_progress=show_progress)
        else:  # no document has a term (bm25s cannot index that): an empty matrix scores everything 0
            _set_state(retriever, data=np.zeros(0, np.float32), indices=np.zeros(0, np.int32),
                       indptr=np.zeros(1, np.int64), num_docs=len(ids), terms=[])
        return cls(retriever, ids, config, size=len(ids))

    def __len__(self) -> int:
        return self.size

    @property
    def ids(self) -> list[str] | None:
        """Document ids by row (``None`` for a state loaded without them)."""
        return self._ids

    # ------------------------------------------------------------------------------- persistence

    def save(self, directory: str | Path) -> None:
        """Write the state to ``directory`` (created; must not exist) as JSON + ``.npy``, no pickle.

        Only the bm25s methods without a non-occurrence correction (lucene, robertson, atire) are
        stored: bm25l and bm25+ add a per-term array we do not persist.
        """
        if getattr(self._retriever, "nonoccurrence_array", None) is not None:
            raise ConfigError(f"BM25 method {self.config.method!r} cannot be stored; use lucene, robertson or atire")
        scores = self._retriever.scores
        columns = len(scores["indptr"]) - 1
        # bm25s appends an empty-string term after building the matrix (it has no column); our
        # tokeniser never yields "", so only the terms with a column are stored.
        terms = [""] * columns
        for term, term_id in self._retriever.vocab_dict.items():
            if int(term_id) < columns:
                terms[int(term_id)] = term
        _save_state(directory, data=scores["data"], indices=scores["indices"], indptr=scores["indptr"], terms=terms,
                    config=self.config, n=self.size)

    @classmethod
    def load(cls, directory: str | Path, *, ids: Sequence[str] | None = None, mmap: bool = True) -> BM25Index:
        """Read a state written by :meth:`save` (arrays with ``allow_pickle=False``, memory-mapped).

        Checksums are the caller's business: inside an index version the version manifest covers
        these files and :func:`dssm.index.load_index` has verified them.

        Args:
            directory: the state directory.
            ids: document ids by row, if the caller wants ids back from :meth:`search_batch`.
            mmap: memory-map the arrays instead of reading them.

        Raises:
            IndexNotFoundError: no state there.
            ChecksumError: the files disagree with each other (wrong sizes or format).
        """

        directory = Path(directory)
        params_path = directory / "params.json"
        if not params_path.is_file():
            raise IndexNotFoundError(f"no BM25 state at {directory} (no params.json)")
        try:
            params = json.loads(params_path.read_text())
            terms = json.loads((directory / "vocab.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ChecksumError(f"BM25 state {directory} is unreadable: {exc}") from exc
        if params.get("format") != _STATE_FORMAT:
            raise ChecksumError(f"BM25 state {directory} has format {params.get('format')!r}, "
                                f"this version reads {_STATE_FORMAT}")
        config = config_from_dict(BM25Config, params["config"])
        mode = "r" if mmap else None
        # Plain ndarray views of the maps: a query slices them once per term, and np.memmap's own slicing
        # (a new memmap object each time) was ~0.09 ms of a 0.7 ms hybrid query on debian-dev.
        arrays = {name: np.asarray(load_npy(directory / f"{name}.npy", mmap_mode=mode))
                  for name in ("data", "indices", "indptr")}
        n = int(params["documents"])
        if len(terms) != params["vocabulary"] or arrays["indptr"].shape != (len(terms) + 1,) \
                or arrays["data"].shape != arrays["indices"].shape or int(arrays["indptr"][-1]) != arrays["data"].size:
            raise ChecksumError(f"BM25 state {directory}: vocabulary and arrays disagree")
        if ids is not None and len(ids) != n:
            raise ChecksumError(f"BM25 state {directory} holds {n} documents, {len(ids)} ids given")
        retriever = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
        _set_state(retriever, **arrays, num_docs=n, terms=terms)
        avgdl = params.get("avgdl")
        return cls(retriever, None if ids is None else [str(i) for i in ids], config, size=n,
                   avgdl=None if avgdl is None else float(avgdl))

    # ------------------------------------------------------------------------------------ search

    def _tokens(self, texts: Sequence[str]) -> list[list[str]]:
        return tokenize(texts, stopwords=self.config.stopwords, stem=self.config.stem)

    def scores(self, text: str) -> np.ndarray:
        """BM25 score of every document for one query: [n] float32 (0 where no query term occurs)."""
        return self.token_scores(self._tokens([text])[0])

    def token_scores(self, tokens: list[str]) -> np.ndarray:
        """:meth:`scores` of a query already split by :func:`tokenize` with this state's settings."""
        return self._id_scores(self._retriever.get_tokens_ids(tokens))

    def _id_scores(self, term_ids: list[int]) -> np.ndarray:
        if not term_ids:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self._retriever.get_scores_from_ids(term_ids), dtype=np.float32)

    def query(self, text: str) -> BM25Query:
        """One query's scores and the rows that can score (:mod:`dssm.bm25_postings`)."""
        return self.token_query(self._tokens([text])[0])

    def token_query(self, tokens: list[str]) -> BM25Query:
        """:meth:`query` of a query already split by :func:`tokenize` with this state's settings."""
        term_ids = self._retriever.get_tokens_ids(tokens)
        scores = self._id_scores(term_ids)
        if getattr(self._retriever, "nonoccurrence_array", None) is not None:  # bm25l, bm25+: every row scores
            return BM25Query(scores, np.arange(self.size, dtype=np.int64), 1)
        arrays = self._retriever.scores
        rows, repeats = posting_rows(arrays["indices"], arrays["indptr"], term_ids)
        return BM25Query(scores, rows, repeats)

    def search_rows_batch(self, texts: Sequence[str], k: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-``k`` rows for each query: ``(rows int64 [<=k], scores float32 [<=k])`` best first, score > 0.

        Raises:
            ConfigError: ``k < 1``.
        """
        return rows_by_score(self.query, texts, k)

    def search_batch(self, texts: Sequence[str], k: int = 10) -> list[list[tuple[str, float]]]:
        """Top-``k`` documents for each query text.

        Args:
            texts: query strings, [batch].
            k: hits per query (capped at the corpus size).

        Returns:
            Per query, ``(doc_id, score)`` by descending score; documents sharing no term with the
            query (score 0) are left out, so a list may be shorter than ``k``.

        Raises:
            ConfigError: ``k < 1``, or the index was loaded without ids (use :meth:`search_rows_batch`).
        """
        if self._ids is None:
            raise ConfigError("this BM25 state was loaded without document ids; use search_rows_batch")
        return [[(self._ids[int(r)], float(s)) for r, s in zip(rows, scores, strict=True)]
                for rows, scores in self.search_rows_batch(texts, k)]

    def search(self, text: str, k: int = 10) -> list[tuple[str, float]]:
        """Top-``k`` ``(doc_id, score)`` for one query text."""
        return self.search_batch([text], k)[0]


def _save_state(directory: str | Path, *, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, terms: list[str],
                config: BM25Config, n: int, avgdl: float | None = None, tf: np.ndarray | None = None,
                lengths: np.ndarray | None = None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=False)
    if tf is not None and lengths is not None:  # what update_bm25_state recomputes weights from
        np.save(directory / "tf.npy", np.asarray(tf, dtype=np.int32), allow_pickle=False)
        np.save(directory / "lengths.npy", np.asarray(lengths, dtype=np.int32), allow_pickle=False)
    np.save(directory / "data.npy", np.asarray(data, dtype=np.float32), allow_pickle=False)
    np.save(directory / "indices.npy", np.asarray(indices, dtype=np.int32), allow_pickle=False)
    np.save(directory / "indptr.npy", np.asarray(indptr, dtype=np.int64), allow_pickle=False)
    (directory / "vocab.json").write_text(json.dumps(terms, ensure_ascii=False))
    params = {"format": _STATE_FORMAT, "config": config_to_dict(config), "documents": n, "vocabulary": len(terms)}
    if avgdl is not None:
        params["avgdl"] = float(avgdl)
    (directory / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")


def _set_state(retriever: bm25s.BM25, *, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, num_docs: int,
               terms: list[str]) -> None:
    """Give a bm25s retriever a precomputed matrix and vocabulary (what ``index`` would have set)."""
    retriever.scores = {"data": data, "indices": indices, "indptr": indptr, "num_docs": num_docs}
    retriever.vocab_dict = {term: i for i, term in enumerate(terms)}
    retriever.unique_token_ids_set = set(range(len(terms)))
    retriever.nonoccurrence_array = None


@dataclass(frozen=True)
class BM25Reference:
    """A stored state's corpus statistics: delta segments (``dssm.index.segments.SegmentedBM25``)
    weight their documents with them, so that their scores compare with the stored ones."""

    documents: int
    avgdl: float | None
    vocab: Any  # Mapping[str, int]: the base's term -> column
    df: np.ndarray  # [v] int64 document frequency of each base column


def idf_function(method: str) -> Any:
    """bm25s' ``idf(df, N)`` for a scoring method (delta segments weight their documents with it)."""
    return _select_idf_scorer(method)


def term_counts(texts: list[str], vocab: dict[str, int], config: BM25Config
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row in chunk, term id, count) per distinct (document, term) of ``texts``, plus token counts.

    New terms are added to ``vocab`` in order of first appearance.
    """
    tokens = tokenize(texts, stopwords=config.stopwords, stem=config.stem)
    sizes = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    flat = np.fromiter((vocab.setdefault(term, len(vocab)) for words in tokens for term in words),
                       dtype=np.int64, count=int(sizes.sum()))
    local = np.repeat(np.arange(len(tokens), dtype=np.int64), sizes)
    # One key per (document, term): unique() sorts by document, then term, and counts repeats.
    keys, counts = np.unique(local << 32 | flat, return_counts=True)
    return (keys >> 32).astype(np.int32), (keys & 0xFFFFFFFF).astype(np.int32), counts.astype(np.int32), sizes


def _stream_state(docs: Iterable[Any], config: BM25Config, *, chunk: int = 8192) -> tuple[Any, ...]:
    """The BM25 matrix of a document stream, built chunk by chunk.

    Returns (data, indices, indptr, terms, n, avgdl, term counts in data's order, [n] lengths).

    ``bm25s.BM25.index`` wants every document's token list at once (about 0.5 KB of Python objects
    per document), then a COO triple and its CSC copy. Here each chunk of documents is tokenised,
    mapped to term ids and reduced to (document, term, count) triples in compact int32 arrays, so
    memory is the vocabulary plus 12 bytes per distinct (document, term) pair. The weights repeat
    bm25s' arithmetic (float32 idf from a float64 ``math.log``; term-frequency component in float64;
    product rounded to float32), so the matrix equals what ``bm25s`` builds, with terms numbered in
    order of first appearance.
    """
    vocab: dict[str, int] = {}
    doc_parts: list[np.ndarray] = []
    term_parts: list[np.ndarray] = []
    tf_parts: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    n = 0
    pending: list[str] = []
    docs = iter(docs)
    while True:
        pending = [document_text(doc.title, doc.text) for doc in itertools.islice(docs, chunk)]
        if not pending:
            break
        rows, term_ids, counts, sizes = term_counts(pending, vocab, config)
        doc_parts.append(rows + np.int32(n))
        term_parts.append(term_ids)
        tf_parts.append(counts)
        lengths.append(sizes)
        n += len(pending)
    doc_idx = np.concatenate(doc_parts) if doc_parts else np.zeros(0, np.int32)
    del doc_parts
    term_idx = np.concatenate(term_parts) if term_parts else np.zeros(0, np.int32)
    del term_parts
    tf = np.concatenate(tf_parts) if tf_parts else np.zeros(0, np.int32)
    del tf_parts
    doc_len = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    del lengths
    terms = list(vocab)
    del vocab
    data, indices, indptr, tf_sorted = csc_state(doc_idx, term_idx, tf, doc_len, terms=len(terms), n=n, config=config)
    return data, indices, indptr, terms, n, float(np.asarray(doc_len).mean()) if n else 0.0, tf_sorted, doc_len


def csc_state(doc_idx: np.ndarray, term_idx: np.ndarray, tf: np.ndarray, doc_len: np.ndarray, *, terms: int, n: int,
               config: BM25Config) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(data, indices, indptr, tf) in CSC order from (document, term, count) triples and [n] lengths."""
    if not terms or not tf.size:
        return np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(terms + 1, np.int64), np.zeros(0, np.int32)
    # bm25s: avgdl is the mean token count (duplicates included) as float64; idf is math.log in
    # float64 stored as float32; tfc is float64 (the numpy float64 avgdl promotes it).
    avg = np.asarray(doc_len).mean()
    df = np.bincount(term_idx, minlength=terms)
    idf_fn = idf_function(config.method)
    values, inverse = np.unique(df, return_inverse=True)
    idf = np.asarray([idf_fn(int(v), N=n) if v else 0.0 for v in values], dtype=np.float32)[inverse]
    # Term-major (CSC) order, documents ascending within a term. Keys are distinct; the stable sort finds an
    # update's already term-sorted runs (24M postings: 0.48 s vs quicksort's 2.27 s; 0.8× on a full build).
    order = np.argsort(np.asarray(term_idx, np.int64) << 32 | np.asarray(doc_idx, np.int64), kind="stable")
    indices = np.asarray(doc_idx[order], dtype=np.int32)
    data = np.empty(order.size, np.float32)
    k1, b, step = config.k1, config.b, 1 << 20
    for start in range(0, order.size, step):  # bounded float64 temporaries
        part = order[start:start + step]
        tfa = tf[part].astype(np.float64)
        lens = doc_len[indices[start:start + step]]
        if config.method == "atire":
            tfc = (tfa * (k1 + 1)) / (tfa + k1 * (1 - b + b * lens / avg))
        else:  # lucene, robertson
            tfc = tfa / (k1 * ((1 - b) + b * lens / avg) + tfa)
        data[start:start + part.size] = idf[term_idx[part]].astype(np.float64) * tfc
    indptr = np.zeros(terms + 1, np.int64)
    np.cumsum(df, out=indptr[1:])
    return data, indices, indptr, np.asarray(tf[order], dtype=np.int32)


def update_bm25_state(old_dir: str | Path, version_dir: str | Path, *, source: np.ndarray,
                      new_docs: dict[int, Any]) -> bool:
    """Write ``version_dir / BM25_DIR`` from a version's state without tokenising its unchanged documents.

    Row ``r`` of the new version holds the old version's row ``source[r]`` when ``source[r] >= 0``,
    else the document ``new_docs[r]`` (``id``, ``title``, ``text``). Only those are tokenised; the old
    rows keep their stored term counts and lengths, and every weight is recomputed from the new
    corpus statistics, so the state equals :func:`write_bm25_state` over the new rows (up to the
    numbering of terms).

    Returns:
        ``False`` (nothing written) if the old state predates stored term counts: rebuild it then.
    """
    old = Path(old_dir) / BM25_DIR
    if not (old / "tf.npy").is_file():
        return False
    params = json.loads((old / "params.json").read_text())
    config = config_from_dict(BM25Config, params["config"])
    terms = json.loads((old / "vocab.json").read_text())
    indptr = load_npy(old / "indptr.npy")
    old_rows, old_tf, old_len = (load_npy(old / f"{name}.npy") for name in ("indices", "tf", "lengths"))
    # int32 (as stored): one entry per posting (23M at 1M documents), so bytes are most of the cost
    inverse = np.full(old_len.size, -1, np.int32)
    kept = np.flatnonzero(source >= 0)
    inverse[source[kept]] = kept
    moved = inverse[old_rows]
    keep = moved >= 0
    old_terms = np.repeat(np.arange(len(terms), dtype=np.int32), np.diff(indptr))
    vocab = {term: i for i, term in enumerate(terms)}
    rows = sorted(new_docs)
    local, term_ids, counts, sizes = term_counts(
        [document_text(new_docs[r].title, new_docs[r].text) for r in rows], vocab, config)
    doc_len = np.zeros(source.size, np.int64)
    doc_len[kept] = old_len[source[kept]]
    doc_len[rows] = sizes
    doc_idx = np.concatenate([moved[keep], np.asarray(rows, np.int32)[local]]) if rows else moved[keep]
    data, indices, new_indptr, tf = csc_state(doc_idx, np.concatenate([old_terms[keep], term_ids]),
                                               np.concatenate([old_tf[keep], counts]), doc_len, terms=len(vocab),
                                               n=int(source.size), config=config)
    _save_state(Path(version_dir) / BM25_DIR, data=data, indices=indices, indptr=new_indptr, terms=list(vocab),
                config=config, n=int(source.size), avgdl=float(doc_len.mean()) if source.size else 0.0,
                tf=tf, lengths=doc_len)
    return True


def write_bm25_state(version_dir: str | Path, docs: Iterable[Any], *, config: BM25Config | None = None,
                     chunk: int = 8192) -> int:
    """Build and save the BM25 state of a staged index version into ``version_dir / BM25_DIR``.

    Call it before the version's manifest is written, so the manifest covers the files. The documents
    are streamed (never all held; see :func:`_stream_state`); the stored matrix equals the one
    :meth:`BM25Index.build` + :meth:`BM25Index.save` write, up to the numbering of terms.

    Args:
        version_dir: the staged version directory.
        docs: the version's documents in row order, objects with ``id``, ``title`` and ``text``
            (``dssm.index.Doc``, ``dssm.data.Document``).
        config: BM25 settings (default :class:`BM25Config`).
        chunk: documents tokenised at a time.

    Returns:
        The number of documents indexed.

    Raises:
        ConfigError: a BM25 method whose state cannot be stored (bm25l, bm25+).
    """
    config = config or BM25Config()
    if config.method not in _STORABLE:
        raise ConfigError(f"BM25 method {config.method!r} cannot be stored; use one of {_STORABLE}")
    data, indices, indptr, terms, n, avgdl, tf, lengths = _stream_state(docs, config, chunk=chunk)
    _save_state(Path(version_dir) / BM25_DIR, data=data, indices=indices, indptr=indptr, terms=terms, config=config,
                n=n, avgdl=avgdl, tf=tf, lengths=lengths)
    return n


def has_bm25_state(version_dir: str | Path) -> bool:
    """Whether an index version carries BM25 state (versions built before it existed do not)."""
    return (Path(version_dir) / BM25_DIR / "params.json").is_file()


def load_bm25_state(version_dir: str | Path, *, ids: Sequence[str] | None = None) -> BM25Index:
    """Load ``version_dir / BM25_DIR`` (see :meth:`BM25Index.load`)."""
    return BM25Index.load(Path(version_dir) / BM25_DIR, ids=ids)


def neighbour_pairs(ids: Sequence[str], texts: Sequence[str], *, top: int = 1, skip: int = 0,
                    config: BM25Config | None = None, batch: int = 1024,
                    progress: bool = True) -> list[tuple[str, str, str, str]]:
    """Label-free training pairs with BM25 as the teacher: each document → its nearest other documents.

    One BM25 index over all of ``texts`` (global: a document's neighbours come from the whole corpus),
    then every document is searched as a query. Its own row and every document with exactly the same
    text are passed over (a copy teaches the towers nothing and is the easiest hit), then the best
    ``skip`` remaining hits, and the next ``top`` are its neighbours, best first (ties by row). A
    document sharing no term with any other has no neighbour and yields no pair.

    Cost: one index build plus one BM25 search per document, on one core. Each search sums the
    postings of the query's terms and scans a dense score vector over all ``n`` documents, so the
    whole run grows as ``n`` searches of ``O(n)`` each: quadratic for large corpora (see
    ``pipelines/make_pairs.py`` for measured times). Memory: the term matrix plus the texts. No I/O.

    Args:
        ids: document ids, [n], unique.
        texts: document texts, [n] (:func:`dssm.data.document_text` for title + body).
        top: neighbours kept per document (>= 1).
        skip: best neighbours passed over first (>= 0; near-copies, if they are too easy).
        config: BM25 settings (default :class:`BM25Config`).
        batch: queries per progress step.
        progress: draw a tqdm bar (on stderr).

    Returns:
        ``(query_id, query_text, document_id, document_text)`` for every document that has
        neighbours, up to ``top`` per document, in row order then rank order.

    Raises:
        ConfigError: ``top < 1`` or ``skip < 0``.
        InputError: as :meth:`BM25Index.build` (no documents, lengths differ, an id repeats).
    """

    if top < 1 or skip < 0:
        raise ConfigError(f"neighbours: top must be >= 1 and skip >= 0, got top={top}, skip={skip}")
    ids, texts = [str(i) for i in ids], list(texts)
    index = BM25Index.build(ids, texts, config=config)
    want = skip + top
    out: list[tuple[str, str, str, str]] = []
    with tqdm(total=len(texts), desc="bm25 neighbours", unit="doc", disable=not progress) as bar:
        for start in range(0, len(texts), batch):
            chunk = texts[start:start + batch]
            # 2 * want + 1: room for the document itself and a few copies of its text; a query whose
            # full list still leaves too few is searched again deeper (below), so copies never cost a neighbour.
            k = 2 * want + 1
            for offset, (rows, _) in enumerate(index.search_rows_batch(chunk, k=k)):
                row = start + offset
                kept = _other_rows(rows, row, texts)
                depth = k
                while len(kept) < want and len(rows) == depth and depth < len(texts):
                    depth = min(2 * depth, len(texts))
                    rows = index.search_rows_batch([texts[row]], k=depth)[0][0]
                    kept = _other_rows(rows, row, texts)
                out.extend((ids[row], texts[row], ids[r], texts[r]) for r in kept[skip:want])
            bar.update(len(chunk))
    return out


def _other_rows(rows: np.ndarray, row: int, texts: Sequence[str]) -> list[int]:
    """``rows`` without ``row`` and without any row whose text equals ``row``'s."""
    return [int(r) for r in rows if int(r) != row and texts[int(r)] != texts[row]]
