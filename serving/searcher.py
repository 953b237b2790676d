"""Search an index by text: query tower → ScaNN → SQLite doc store (→ the re-ranker, with ``rerank=N``).

The :class:`Searcher` is transport-free (the HTTP app wraps it; ``dssm search`` is :mod:`serving.search_cli`).
One query costs one query-tower embedding (an ASCII query: :class:`dssm.query_numpy.QueryTower` in numpy
from the model's ``query_tower/`` weights, without TensorFlow; otherwise the exported ``embed_query``
signature), one ScaNN search and one SQLite ``SELECT ... WHERE row IN``.

Example::

    searcher = Searcher.load("work/index")
    for doc_id, score, text in searcher.search("how do I learn python", k=5):
        ...
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.data import document_text
from dssm.errors import IndexNotFoundError, InputError
from dssm.hybrid import HYBRID_FILE, SEARCH_MODES, fused_rows, read_hybrid_config
from dssm.index import Index, current_version_dir, delete_documents, load_index, shard_of, upsert_documents
from dssm.index.documents import as_documents
from dssm.index.written_windows import written_window_dirs
from dssm.query_numpy import load_query_encoder
from serving.hits import Hit, Similarity, text_similarity
from serving.reranking import check_rerank, load_reranker_once, read_every_shards_words, rerank_results
from serving.windowing import RowWindows, window_scorer, windowed_depth

__all__ = ["DocumentNotFoundError", "Hit", "QueryEncoder", "Searcher", "ShardedSearcher", "Similarity", "searchable",
           "text_similarity", "model_fingerprint", "merge_top_k"]


class DocumentNotFoundError(IndexNotFoundError, KeyError):
    """A document id is not in the index version (a ``KeyError`` too, as for a missing mapping key)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class QueryEncoder(Protocol):
    """What the searcher needs from a model (``dssm.export.Encoder`` fits)."""

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """texts → [n, dim] float32, L2-normalised."""
        ...


def model_fingerprint(model_dir: Path | None) -> str | None:
    """sha256 of ``model_dir/manifest.json`` (which lists every model file's sha256); ``None`` without one.

    Two index versions (or shards) with equal fingerprints hold the same query model.
    """
    if model_dir is None:
        return None
    try:
        return hashlib.sha256((Path(model_dir) / "manifest.json").read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def searchable(text: str) -> bool:
    """Whether a query has anything to search: a letter or digit (the featurizer splits on everything else).

    A query without one ("?!", "---") would embed as the bias alone and rank arbitrary documents, so
    searches answer it with no hits.
    """
    return any(ch.isalnum() for ch in text)


def _searchable_only(texts: list[str], run: Callable[[list[str]], list[list[Hit]]]) -> list[list[Hit]]:
    """``run`` over the searchable texts; no hits for the others (each text checked as a query first)."""
    for text in texts:
        _check_query(text)
    keep = [i for i, text in enumerate(texts) if searchable(text)]
    if len(keep) == len(texts):
        return run(texts)
    out: list[list[Hit]] = [[] for _ in texts]
    for i, hits in zip(keep, run([texts[i] for i in keep]) if keep else [], strict=True):
        out[i] = hits
    return out


def _check_query(text: Any) -> None:
    if not isinstance(text, str):
        raise InputError(f"query must be a string, got {type(text).__name__}: {text!r}")
    if not text.strip():
        raise InputError(f"query is empty or only whitespace: {text!r}")


class Searcher:
    """Text search over one loaded index version.

    Thread-safe for concurrent searches (ScaNN search is read-only; the doc store keeps one SQLite
    connection per thread).
    """

    def __init__(self, *, index: Index, encoder: QueryEncoder | None, reranker: Any = None, windows: Any = None):
        self.index = index
        self.encoder = encoder
        self.reranker = reranker
        self.windows = windows  # the version's dssm.windows.WindowScorer (serving.windowing), or None

    @classmethod
    def load(cls, index_dir: str | Path, *, encoder: QueryEncoder | None = None, verify: bool = True,
             fast_queries: bool = True, reranker: bool = True) -> Searcher:
        """Load the version ``CURRENT`` names, verify its checksums, and load its query model.

        Args:
            index_dir: the index directory written by ``dssm index``.
            encoder: use this instead of the index's own ``model/`` (tests, or a model shared between
                several indexes); default loads ``model/`` (see ``fast_queries``).
            verify: check every file's sha256 first (leave on).
            fast_queries: embed ASCII queries in numpy: from the model's ``query_tower/`` without
                TensorFlow (:func:`dssm.query_numpy.load_query_encoder`), or for an older model from its
                loaded SavedModel's variables. ``False`` loads the SavedModel and uses its signature.
            reranker: load the version's re-ranker when it has one (a corrupt one is refused by name);
                ``False`` serves without it (its files unchecked; searches with ``rerank`` are refused).

        Raises:
            IndexNotFoundError: no index there, or the index has no model and no ``encoder`` is given.
            ChecksumError: a file is corrupted or truncated (named in the message).
        """
        # model/ is verified where it is read: load_encoder checks it against its own manifest, and a
        # given encoder (a hot swap reusing the live model) never reads it.
        # Likewise reranker/: load_reranker verifies it against its own manifest, or it is the one
        # already loaded from the same (hard-linked) files, which a write's reload does not load again.
        # And windows/: WindowRows.load verifies it against its own manifest (serving.windowing).
        index = load_index(index_dir, verify=verify, reranker=False, model=False, windows=False)
        if encoder is None and index.model_dir is not None:
            encoder = _load_query_encoder(index.model_dir, fast_queries=fast_queries)
        use = reranker and index.reranker_dir is not None
        return cls(index=index, encoder=encoder, reranker=load_reranker_once(index.reranker_dir) if use else None,
                   windows=window_scorer(index.windows_dir, index.model_dir, encoder,
                                         written_window_dirs(index.version_dir)))

    def use_encoder(self, encoder: QueryEncoder | None) -> None:
        """Embed with ``encoder`` from now on: queries, and the windows of texts no window store holds
        (a :class:`ShardedSearcher` loads its shards beside a placeholder, then gives them its one)."""
        self.encoder = encoder
        if self.windows is not None:
            self.windows.embed_documents = getattr(encoder, "embed_documents", None)

    @property
    def version(self) -> str:
        """The loaded index version."""
        return self.index.version

    def __len__(self) -> int:
        return self.index.size

    def get_document(self, doc_id: str) -> Any:
        """The stored document ``doc_id`` as a :class:`dssm.index.Doc` ``(id, title, text)``.

        Raises:
            InputError: ``doc_id`` is not a non-blank string.
            DocumentNotFoundError: no document with that id in this version.
        """
        _check_id(doc_id)
        docs = self.index.docs
        row = docs.row_of(doc_id)
        if row is None:
            raise DocumentNotFoundError(f"document {doc_id!r} is not in index version {self.version}")
        return docs.get([row])[0]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32 query-tower embeddings of ``texts`` (checked like search queries)."""
        return self._embed(texts)

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.encoder is None:
            raise IndexNotFoundError(f"index {self.index.version_dir} has no model/: it can be searched by "
                                     "vector only (search_vectors)")
        for text in texts:
            _check_query(text)
        vectors = np.asarray(self.encoder.embed_queries(list(texts)), dtype=np.float32)
        if vectors.shape != (len(texts), self.index.dim):
            raise InputError(f"the query model returned shape {vectors.shape}, the index expects "
                             f"[{len(texts)}, {self.index.dim}] (model and index do not match)")
        return vectors

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Top-k documents for query embeddings.

        Args:
            vectors: [q, dim] float32 query embeddings.
            k: results per query (at most the index size).

        Returns:
            q lists of :class:`Hit`, best first; with the version's windows (:mod:`serving.windowing`),
            the ANN's top candidates re-scored by ``cos(q, d) + max_w cos(q, w)``.
        """
        rows, scores = self.index.search_vectors(vectors, windowed_depth(self.windows, k))
        if self.windows is not None:
            rows, scores = self.row_windows.top(vectors, rows, scores, k)
        docs = self.index.docs.get([int(r) for part in rows for r in part])
        hits, pos = [], 0
        for row_scores in scores:
            hits.append([Hit(docs[pos + j].id, float(s), docs[pos + j].text) for j, s in enumerate(row_scores)])
            pos += len(row_scores)
        return hits

    @functools.cached_property
    def row_windows(self) -> RowWindows | None:
        """The version's windows looked up by row (:class:`serving.windowing.RowWindows`), or ``None``."""
        return RowWindows(self.windows, self.index) if self.windows is not None else None

    def search(self, text: str, k: int = 10, *, mode: str | None = None, rerank: int = 0) -> list[Hit]:
        """Top-k documents for one query text, best first.

        Args:
            text: the query.
            k: number of hits.
            mode: ``dense`` (DSSM + ScaNN), ``bm25``, or ``hybrid`` (DSSM and BM25 scores fused, see
                :mod:`dssm.hybrid`); the last two need the version's BM25 state. ``None``: the
                version's :attr:`default_mode`.
            rerank: ``N > 0`` re-orders the first stage's top ``max(N, k)`` with the version's
                re-ranker (:mod:`serving.reranking`); 0 returns the first stage as is.

        Raises:
            InputError: ``text`` is empty or not a string, ``k < 1``, an unknown mode, or a bad ``rerank``.
            IndexNotFoundError: ``bm25``/``hybrid`` on a version without BM25 state; ``rerank`` on a
                version without a re-ranker.
        """
        mode = mode or self.default_mode
        if mode != "dense" or rerank:
            return self.search_batch([text], k, mode=mode, rerank=rerank)[0]
        return _searchable_only([text], lambda kept: self.search_vectors(self._embed(kept), k))[0]

    def search_batch(self, texts: Sequence[str], k: int = 10, *, mode: str | None = None,
                     rerank: int = 0) -> list[list[Hit]]:
        """Top-k documents for each query text (one model call and one ScaNN batch for all; see :meth:`search`)."""
        if isinstance(texts, str):
            raise InputError("search_batch takes a list of query texts, got one string")
        mode = mode or self.default_mode
        if mode not in SEARCH_MODES:
            raise InputError(f"mode must be 'dense', 'bm25' or 'hybrid', got {mode!r}")
        check_rerank(rerank, reranker=self.reranker, version=self.version)
        if not texts:
            return []
        depth = max(k, rerank) if rerank else k
        if mode == "dense":
            results = _searchable_only(list(texts), lambda kept: self.search_vectors(self._embed(kept), depth))
        else:
            results = _searchable_only(list(texts), lambda kept: self._search_fused(kept, depth, mode))
        if not rerank:
            return results
        return rerank_results(self.reranker, texts, results, k=k, mode=mode, full_texts=self.document_texts, hit=Hit)

    def document_texts(self, doc_ids: Sequence[str]) -> list[str]:
        """The full texts (title and body, as the towers read them) of these documents, in order."""
        return [document_text(doc.title, doc.text) for doc in self.index.docs.by_ids(list(doc_ids))]

    # -- incremental updates (each publishes a new version; this searcher keeps serving its own)

    @property
    def index_dir(self) -> Path:
        """The index directory this version belongs to (``INDEX_DIR/versions/<version>``)."""
        return self.index.version_dir.parent.parent

    def upsert(self, documents: Sequence[Any]) -> str:
        """Add or replace documents; returns the new live version's name.

        A document is ``(id, title, text)``, ``(id, text)``, a mapping with ``id``, ``text`` and an
        optional ``title``, or an object with those attributes (``serving.client.Document``): the
        forms :meth:`serving.client.SearchClient.upsert` takes.

        Only these documents are encoded, with the document tower of this searcher's encoder when it
        has one (``dssm.export.Encoder`` does), else the live version's ``model/``. This object keeps
        answering from the version it loaded (versions are immutable); load the new one to see the
        change (the serving backend reloads after every write).
        """

        # Our encoder is the model of the version we loaded; if a rebuild has since replaced the live
        # version with another model, encode with the live version's model instead. Writes since our
        # load (delta segments) keep the model: its manifest, hence its fingerprint, is the same.
        live = current_version_dir(self.index_dir)
        same = live.name == self.version or (
            self.index.model_dir is not None
            and model_fingerprint(live / "model") == model_fingerprint(self.index.model_dir))
        encoder = self.encoder if same and hasattr(self.encoder, "embed_documents") else None
        return upsert_documents(self.index_dir, as_documents(documents), encoder=encoder).version

    def delete(self, doc_ids: str | Sequence[str]) -> str:
        """Delete one document id or several (all must exist, or nothing changes); returns the new live version."""

        return delete_documents(self.index_dir, _id_list(doc_ids)).version

    # -- BM25 / hybrid modes and similarity (issue 6; the fusion itself lives in dssm.hybrid)

    @functools.cached_property
    def bm25(self) -> Any:
        """The version's BM25 state over its rows (delta segments included), or ``None`` without one."""
        return self.index.bm25()

    @property
    def supports_hybrid(self) -> bool:
        """Whether ``mode="bm25"``/``"hybrid"`` can be served (the version holds BM25 state and a model)."""
        return self.encoder is not None and self.index.has_bm25()  # without building it (delta postings)

    @functools.cached_property
    def default_mode(self) -> str:
        """The mode of a search that names none: ``hybrid`` when the version can serve it and stores a
        chosen weight (``hybrid.json``: the label-free weight ``dssm index`` stores, or ``dssm eval
        --save-weight``'s), else ``dense``. A weight of 0 makes hybrid rank as BM25 does, so the default
        search does not fall below BM25 where the tower does not help (issue 11)."""
        return "hybrid" if self.stored_hybrid_config is not None and self.supports_hybrid else "dense"

    @functools.cached_property
    def stored_hybrid_config(self) -> Any:
        """The weight the version stores (``hybrid.json``) as a :class:`dssm.hybrid.HybridConfig`, or ``None``."""

        return self.hybrid_config if (self.index.version_dir / HYBRID_FILE).is_file() else None

    @functools.cached_property
    def hybrid_config(self) -> Any:
        """The version's :class:`dssm.hybrid.HybridConfig` (``hybrid.json``, else the defaults)."""

        return read_hybrid_config(self.index.version_dir)

    @property
    def duplicate_threshold(self) -> float | None:
        """The cosine at or above which two texts are duplicates (``dssm thresholds --save``), or ``None``."""
        value = self.index.manifest.get("duplicate_threshold")
        return None if value is None else float(value)

    def _search_fused(self, texts: list[str], k: int, mode: str) -> list[list[Hit]]:
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        if self.bm25 is None:
            raise IndexNotFoundError(f"index version {self.index.version_dir} holds no BM25 state (built before "
                                     f"it existed): mode={mode!r} needs it; rebuild the index or use mode='dense'")
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"query is empty, only whitespace or not a string: {text!r}")
        vectors = self._embed(texts) if mode == "hybrid" else None
        windowed = self.windows is not None and mode == "hybrid"
        rescore = self.row_windows.rescorer(vectors) if windowed else None
        results = fused_rows(query_vectors=vectors, texts=texts, k=k, mode=mode, ann=self.index.search_vectors,
                             embeddings=self.index.embeddings(), bm25=self.bm25, config=self.hybrid_config,
                             rescore=rescore)
        docs = self.index.docs.get([int(r) for rows, _ in results for r in rows])
        hits, pos = [], 0
        for rows, scores in results:
            hits.append([Hit(docs[pos + j].id, float(s), docs[pos + j].text) for j, s in enumerate(scores)])
            pos += len(rows)
        return hits

    def similarity(self, text1: str, text2: str) -> Similarity:
        """Cosine of the two texts' query-tower embeddings, and ``is_duplicate`` if a threshold is stored.

        Both sides go through the query tower: duplicate questions are two texts of the same kind, and
        with shared (Siamese) towers the two towers are one anyway.
        """
        return text_similarity(self._embed, text1, text2, self.duplicate_threshold)


def _load_query_encoder(model_dir: Path, *, fast_queries: bool) -> QueryEncoder:
    """The model's TensorFlow-free encoder when it has numpy weights (and fast queries are on), else its SavedModel."""
    if fast_queries:
        encoder = load_query_encoder(model_dir)
        if encoder is not None:
            return encoder
    # deferred: TensorFlow, imported only when this runs
    from dssm.export import load_encoder

    return load_encoder(model_dir, fast_queries=fast_queries)


def merge_top_k(results: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """The best ``k`` of several best-first hit lists, by score (ties keep shard order: stable)."""
    merged = [hit for hits in results for hit in hits]
    merged.sort(key=lambda h: -h.score)
    return merged[:k]


class ShardedSearcher:
    """Search fanned out over several index directories (shards of one corpus), top-k merged by score.

    Each shard is a complete index (its own ScaNN, doc store, BM25 state and model copy), typically
    built by ``dssm index --shard i/N`` so a document id lives in exactly one shard. The query is
    embedded once; every shard returns its own top-k (a shard's top-k contains every global top-k
    document it holds, so merging the lists by score gives the global top-k of the union, exactly
    for brute force and with each shard's recall for ANN). Dense scores are cosines, comparable
    across shards; ``mode="bm25"`` merges per-shard BM25 scores, whose IDF is computed per shard (close
    to the global IDF for hash-sharded corpora, not equal); ``mode="hybrid"`` is refused because
    its per-shard score normalisation makes fused scores incomparable across shards.

    Same methods as :class:`Searcher` (``search``, ``search_batch``, ``search_vectors``, ``similarity``,
    ``upsert``, ``delete``, ``get_document``); writes are routed to shards by
    :func:`dssm.index.shard_of`. Searches run the shards in a thread pool (ScaNN and SQLite release
    the GIL).
    """

    def __init__(self, shards: Sequence[Searcher], *, encoder: QueryEncoder | None):
        if not shards:
            raise InputError("ShardedSearcher needs at least one shard")
        dims = {s.index.dim for s in shards}
        if len(dims) != 1:
            raise InputError(f"shards have different embedding widths {sorted(dims)}: not one corpus's index")
        self.shards = list(shards)
        self.encoder = encoder
        self.dim = dims.pop()

        self._pool = ThreadPoolExecutor(max_workers=len(self.shards), thread_name_prefix="shard")

    @classmethod
    def load(cls, index_dirs: Sequence[str | Path], *, encoder: QueryEncoder | None = None,
             verify: bool = True) -> ShardedSearcher:
        """Load every shard's ``CURRENT`` version (checksums verified) and one query model.

        The model comes from the first shard's ``model/``; every shard must hold the same model
        (same ``model/manifest.json``), since one query embedding is searched in all of them.

        Raises:
            InputError: no shards, the same directory twice, or shards with different models/widths.
        """

        dirs = [Path(d) for d in index_dirs]
        if len({d.resolve() for d in dirs}) != len(dirs):
            raise InputError(f"the same index directory is given twice: {[str(d) for d in dirs]}")
        # One re-ranker serves all shards (re-ranking happens after the merge): only the first loads its copy.
        shards = [Searcher.load(d, encoder=encoder or _NoEncoder(), verify=verify, reranker=i == 0)
                  for i, d in enumerate(dirs)]
        windowed = [str(d) for d, shard in zip(dirs, shards, strict=True) if shard.windows is not None]
        if windowed and len(windowed) != len(shards):  # cosine + best window's vs bare cosines: not one order
            raise InputError(f"shards {windowed} store windows and the others do not: build every shard with "
                             "the same --windows")
        fingerprints = {model_fingerprint(shard.index.model_dir) for shard in shards}
        if len(fingerprints) != 1:
            raise InputError(f"shards {[str(d) for d in dirs]} hold different models; one query embedding "
                             "cannot search them all")
        if len({model_fingerprint(shard.index.reranker_dir) for shard in shards}) != 1:
            shards[0].reranker = None  # shards with different (or no) re-rankers: rerank is refused
        elif shards[0].reranker is not None:
            read_every_shards_words(shards[0].reranker, [shard.index.reranker_dir for shard in shards])
        if encoder is None and shards[0].index.model_dir is not None:
            encoder = _load_query_encoder(shards[0].index.model_dir, fast_queries=True)
        for shard in shards:
            shard.use_encoder(encoder)
        return cls(shards, encoder=encoder)

    @property
    def version(self) -> str:
        """The shards' versions joined by ``+`` (changes when any shard changes)."""
        return "+".join(s.version for s in self.shards)

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    @property
    def supports_hybrid(self) -> bool:
        """Always ``False``: fused scores are normalised per shard and cannot be merged."""
        return False

    @property
    def duplicate_threshold(self) -> float | None:
        """The shards' common duplicate threshold, or ``None`` if they do not all carry the same one."""
        values = {s.duplicate_threshold for s in self.shards}
        return values.pop() if len(values) == 1 else None

    def _fan_out(self, call: Any) -> list[Any]:
        return list(self._pool.map(call, self.shards))

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Top-k documents of all shards for query embeddings [q, dim]."""
        per_shard = self._fan_out(lambda shard: shard.search_vectors(vectors, k))
        return [merge_top_k([hits[i] for hits in per_shard], k) for i in range(len(vectors))]

    #: Fused scores cannot be merged across shards (see :meth:`search_batch`), so searches that name
    #: no mode are dense.
    default_mode = "dense"

    @property
    def reranker(self) -> Any:
        """The shards' common re-ranker (loaded once, applied after the merge), or ``None``."""
        return self.shards[0].reranker

    def search(self, text: str, k: int = 10, *, mode: str | None = None, rerank: int = 0) -> list[Hit]:
        """Top-k documents of all shards for one query (see :meth:`Searcher.search`)."""
        return self.search_batch([text], k, mode=mode, rerank=rerank)[0]

    def search_batch(self, texts: Sequence[str], k: int = 10, *, mode: str | None = None,
                     rerank: int = 0) -> list[list[Hit]]:
        """Top-k documents of all shards for each query (one model call for all shards); ``rerank`` re-orders
        the merged top ``max(rerank, k)`` once."""
        if isinstance(texts, str):
            raise InputError("search_batch takes a list of query texts, got one string")
        mode = mode or self.default_mode
        if mode == "hybrid":
            raise InputError("mode='hybrid' is not available over shards: fused scores are normalised per shard "
                             "and cannot be merged; use 'dense' or 'bm25'")
        if mode not in ("dense", "bm25"):
            raise InputError(f"mode must be 'dense', 'bm25' or 'hybrid', got {mode!r}")
        check_rerank(rerank, reranker=self.reranker, version=self.version)
        if not texts:
            return []
        depth = max(k, rerank) if rerank else k
        if mode == "dense":
            results = _searchable_only(
                list(texts), lambda kept: self.search_vectors(self.shards[0]._embed(kept), depth))
        else:
            per_shard = self._fan_out(lambda shard: shard.search_batch(list(texts), depth, mode="bm25"))
            results = [merge_top_k([hits[i] for hits in per_shard], depth) for i in range(len(texts))]
        if not rerank:
            return results
        return rerank_results(self.reranker, texts, results, k=k, mode=mode, full_texts=self.document_texts, hit=Hit)

    def document_texts(self, doc_ids: Sequence[str]) -> list[str]:
        """Full texts of these documents, each read from the shard that holds it."""
        texts: dict[str, str] = {}
        by_shard: dict[int, list[str]] = {}
        for doc_id in doc_ids:
            by_shard.setdefault(self.shard_index(doc_id), []).append(doc_id)
        for shard, ids in by_shard.items():
            texts.update(zip(ids, self.shards[shard].document_texts(ids), strict=True))
        return [texts[doc_id] for doc_id in doc_ids]

    def similarity(self, text1: str, text2: str) -> Similarity:
        """See :meth:`Searcher.similarity` (the threshold is the shards' common one)."""
        return text_similarity(self.shards[0]._embed, text1, text2, self.duplicate_threshold)

    def get_document(self, doc_id: str) -> Any:
        """The stored document ``doc_id`` (a :class:`dssm.index.Doc`), from whichever shard holds it.

        Raises:
            InputError: ``doc_id`` is not a non-blank string.
            DocumentNotFoundError: no shard holds it (a ``KeyError`` too).
        """
        _check_id(doc_id)
        for shard in self.shards:
            row = shard.index.docs.row_of(doc_id)
            if row is not None:
                return shard.index.docs.get([row])[0]
        raise DocumentNotFoundError(f"document {doc_id!r} is in none of the {len(self.shards)} shards "
                                    f"(version {self.version})")

    def shard_index(self, doc_id: str) -> int:
        """Which shard a document id belongs to (:func:`dssm.index.shard_of` over the shard count)."""

        return shard_of(doc_id, len(self.shards))

    def upsert(self, documents: Sequence[Any]) -> str:
        """Add or replace ``(id, title, text)`` documents, each in its hash shard; returns the new version."""
        groups: dict[int, list[Any]] = {}
        for doc in as_documents(documents):
            groups.setdefault(self.shard_index(doc[0]), []).append(doc)
        for i, docs in sorted(groups.items()):
            self.shards[i].upsert(docs)
        return "+".join(_live_version(s.index_dir) for s in self.shards)

    def delete(self, doc_ids: str | Sequence[str]) -> str:
        """Delete one document id or several from their hash shards; returns the new version."""
        groups: dict[int, list[str]] = {}
        for doc_id in _id_list(doc_ids):
            groups.setdefault(self.shard_index(doc_id), []).append(doc_id)
        for i, ids in sorted(groups.items()):
            self.shards[i].delete(ids)
        return "+".join(_live_version(s.index_dir) for s in self.shards)


def _check_id(doc_id: object) -> None:
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise InputError(f"document id must be a non-blank string, got {doc_id!r}")


def _id_list(doc_ids: str | Sequence[str]) -> list[str]:
    # One id may be passed bare, as SearchClient.delete allows; a string is never split into characters.
    ids = [doc_ids] if isinstance(doc_ids, str) else list(doc_ids)
    if not ids:
        raise InputError("no document ids to delete")
    for doc_id in ids:
        _check_id(doc_id)
    return ids


class _NoEncoder:
    """Placeholder while shards load, so the model is loaded once for all of them."""

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        raise IndexNotFoundError("no query model loaded")


def _live_version(index_dir: Path) -> str:
    return current_version_dir(index_dir).name
