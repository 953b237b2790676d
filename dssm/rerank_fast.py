"""The exported re-ranker's forward pass in numpy (no graph call per pair).

:class:`NumpyReranker` computes exactly what ``dssm.rerank.Reranker.call`` computes at inference, from
the weights of a loaded re-ranker SavedModel, but organised around what re-ranking looks like: one
query against ~100 candidates that share most of their words. A word's vector (and its cosines with
the query) is computed once per *distinct* word of a query's candidates and gathered per word
position, instead of once per word position of a padded ``[candidates, longest, dim]`` tensor as
the graph does. The graph's string
ops (Unicode normalisation, regex split, ragged gathers) are ~half of a graph call; on ASCII they
reduce to bytes operations in C (``translate`` to the featurizer's ASCII split). Texts with other characters
are split by :func:`dssm.hashing.unicode_words` (the graph's NFKC_Casefold in Python, checked against
it on every code point), and the rare text it declines by the graph's own ops
(:func:`dssm.rerank.split_words`, one eager call for all of them); everything after the split is numpy.

Document-side work goes through the RBF kernels once per distinct word (unigrams) or once per
position (bigrams, rarely repeated), as one ``[K, rows, q]`` array whose soft kernels are a chain of
products (two exponentials per cosine instead of one per kernel, :class:`KernelChain`); the rows are
then summed per document by a sparse ``[documents, rows]`` count matrix. The few MB of work arrays
a query needs are kept per thread and reused (:class:`_Scratch`): fresh ones cost more in page faults
than the arithmetic. For ``conv-knrm`` a cached word's n-gram-layer output and its halves of a
bigram's pre-activation are kept once computed (``[3, words, dim]`` float32, at most 3× the
vocabulary cache), so candidates' words cost a lookup instead of three ``[dim, dim]`` products.

Words in the exported vocabulary cache (``Reranker.cache_vocabulary``: the indexed corpus's words)
take their vector from it; other words are computed from the tower table as the graph computes them.
Scores equal the SavedModel's ``score`` signature to float32 rounding (``tests/test_rerank.py``).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Mapping, Sequence
from itertools import repeat
from typing import Any

import farmhash
import numpy as np
import scipy.sparse as sp
import threadpoolctl

from dssm.errors import ConfigError
from dssm.export import l2_normalize_rows, numpy_activation, row_reader
from dssm.features import _UNIGRAM_PREFIX, FeatureConfig, Featurizer, ascii_words
from dssm.hashing import unicode_words
from dssm.query_numpy import relu
from dssm.rerank import RerankConfig, kernel_centres, split_words
from dssm.rerank_math import KernelChain, distinct_ids, rbf_kernels

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["NumpyReranker"]

# dssm.features' ASCII split as a byte table: A-Z to a-z, a-z and 0-9 kept, every other byte a space.
_ASCII_TABLE = bytes(c + 32 if 65 <= c <= 90 else c if (97 <= c <= 122 or 48 <= c <= 57) else 32 for c in range(256))
# Joins translated ASCII documents: a NUL byte is never left by the table, so the marker is its own word.
_MARKER = b" \x00 "
_MARKER_ROW = -2
# Largest work array (float32 elements, 64 MB) a thread keeps between calls (_Scratch).
_SCRATCH_CAP = 1 << 24


class NumpyReranker:
    """Scores (query, document) pairs as the exported re-ranker does, in numpy.

    Args:
        config, features: the re-ranker's shape and hashing (its ``config.json``).
        table: ``[num_buckets, embedding_dim]`` float32 tower table (array or ``tf.Variable``).
        table_bias: ``[embedding_dim]``.
        idf: ``[num_buckets]`` BM25 idf per unigram bucket (array or ``tf.Variable``).
        project: ``[embedding_dim, dim]``, the word projection (no bias).
        term_weight: ``(kernel [embedding_dim + 1, 1], bias [1])``, the query-word importance.
        grams: ``conv-knrm`` only: ``(kernel [window, dim, dim], bias [dim])`` for windows 1 and 2.
        head: ``(kernel [features, 1], bias [1])``; features = kernels (knrm) or 4 × kernels.
        vocabulary: cached word (UTF-8 bytes) → row of ``vocab_vectors`` (empty when the model has no cache).
        vocab_vectors: ``[words, dim]`` unit vectors (array or ``tf.Variable``), or ``None``.

    Raises:
        ConfigError: a weight's shape does not match the configs.
    """

    def __init__(self, *, config: RerankConfig, features: FeatureConfig, table: Any, table_bias: np.ndarray,
                 idf: Any, project: np.ndarray, term_weight: tuple[np.ndarray, np.ndarray],
                 grams: Sequence[tuple[np.ndarray, np.ndarray]], head: tuple[np.ndarray, np.ndarray],
                 vocabulary: Mapping[bytes, int], vocab_vectors: Any) -> None:
        buckets, width, dim = features.num_buckets, int(table.shape[1]), config.dim
        pooled = config.kernels * (4 if config.design == "conv-knrm" else 1)
        expected = {"table": (buckets, width), "table_bias": (width,), "idf": (buckets,), "project": (width, dim),
                    "term_weight": (width + 1, 1), "head": (pooled, 1)}
        got = {"table": tuple(table.shape), "table_bias": table_bias.shape, "idf": tuple(idf.shape),
               "project": project.shape, "term_weight": term_weight[0].shape, "head": head[0].shape}
        windows = [kernel.shape for kernel, _ in grams]
        if config.design == "conv-knrm":
            expected["grams"], got["grams"] = [(1, dim, dim), (2, dim, dim)], windows
        elif grams:
            expected["grams"], got["grams"] = [], windows
        if vocab_vectors is not None and tuple(vocab_vectors.shape)[1:] != (dim,):
            expected["vocab_vectors"], got["vocab_vectors"] = ("words", dim), tuple(vocab_vectors.shape)
        if got != expected:
            raise ConfigError(f"re-ranker weights {got} do not match its config (expected {expected})")
        self.config, self.features = config, features
        # idf is one float per bucket (0.5 MB at 2^17): a numpy copy saves an eager TensorFlow read per query
        self._table, self._idf = row_reader(table), np.asarray(idf, np.float32).__getitem__
        self._vectors = row_reader(vocab_vectors) if vocab_vectors is not None else None
        self._bias, self._project = table_bias, project
        self._term_kernel, self._term_bias = term_weight[0][:, 0], term_weight[1]
        self._grams = [(kernel, bias) for kernel, bias in grams]
        if self._grams:
            # conv-knrm: a word's unigram n-gram vector and its two halves of a bigram's pre-activation
            # come from one product with [k1 | k2's first | k2's second]; for cached words they are kept
            # (filled on first use: memory only for the words candidates contain).
            (k1, _), (k2, _) = self._grams
            self._conv_kernel = np.concatenate([k1[0], k2[0], k2[1]], axis=1)
            words = 0 if vocab_vectors is None else int(vocab_vectors.shape[0])
            # [part, words, dim]: each part's rows contiguous, so a query's gathers of them are too
            self._conv_table = np.empty((3, words, dim), np.float32)
            self._conv_filled = np.zeros(words, bool)
        self._head_kernel, self._head_bias = head[0][:, 0], head[1]
        # a cached word's query-side [unit vector | importance logit] (_query), filled on first use
        self._query_table = np.empty((len(vocabulary), dim + 1), np.float32)
        self._query_filled = np.zeros(len(vocabulary), bool)
        self._vocabulary_size = len(vocabulary)
        # word (UTF-8 bytes) -> row, plus the marker that joins ASCII documents for one split
        self._rows_of = {**vocabulary, _MARKER.strip(): _MARKER_ROW}
        self._graph_split: Any = None  # traced on the first text that needs TensorFlow's normalisation
        self._activation = numpy_activation(config.activation)
        self._scratch = _Scratch()
        self._store: Any = None  # use_documents
        widths = np.full(config.kernels, config.sigma, np.float32)
        widths[0] = config.exact_sigma
        self._mu = kernel_centres(config.kernels)
        self._neg_inv_two_sigma_sq = (-1.0 / (2.0 * widths.astype(np.float32) ** 2)).astype(np.float32)
        self._chain = KernelChain.of(self._mu, config.sigma)

    @classmethod
    def from_loaded(cls, loaded: Any, *, config: RerankConfig, features: FeatureConfig) -> NumpyReranker | None:
        """The re-ranker of a loaded SavedModel (``loaded.reranker``), or ``None`` if its layout is unknown.

        Reads the attribute names ``dssm.rerank_export`` saves (``table``, ``table_bias``, ``idf``,
        ``project``, ``term_weight``, ``grams``, ``head``, ``vocab_table``, ``vocab_vectors``); the
        vocabulary's words are read once from the lookup table.
        """
        try:
            model = loaded.reranker
            vocabulary: dict[bytes, int] = {}
            vectors = getattr(model, "vocab_vectors", None)
            table = getattr(model, "vocab_table", None)
            if table is not None and vectors is not None:
                keys, values = tf.raw_ops.LookupTableExportV2(table_handle=table.resource_handle, Tkeys=tf.string,
                                                              Tvalues=tf.int64)
                vocabulary = dict(zip(keys.numpy().tolist(), values.numpy().tolist(), strict=True))
            return cls(config=config, features=features, table=model.table, table_bias=model.table_bias.numpy(),
                       idf=model.idf, project=model.project.kernel.numpy(),
                       term_weight=(model.term_weight.kernel.numpy(), model.term_weight.bias.numpy()),
                       grams=[(g.kernel.numpy(), g.bias.numpy()) for g in list(model.grams)],
                       head=(model.head.kernel.numpy(), model.head.bias.numpy()),
                       vocabulary=vocabulary, vocab_vectors=vectors if vocabulary else None)
        except (AttributeError, TypeError, KeyError, ConfigError, tf.errors.OpError):
            return None

    # ---- words → vectors ------------------------------------------------------------------------
    def _features(self, words: Sequence[str]) -> np.ndarray:
        """``n`` words → ``[n, embedding_dim]``: the tower's first layer on each word's own bag."""
        tokens: list[str] = []
        lengths = np.empty(len(words), np.int64)
        for i, word in enumerate(words):
            wrapped = f"#{word}#"
            tokens += [wrapped[j:j + 3] for j in range(len(wrapped) - 2)]
            if self.features.word_unigrams:
                tokens.append(_UNIGRAM_PREFIX + word)
            lengths[i] = len(wrapped) - 2 + int(self.features.word_unigrams)
        ids = np.fromiter(map(farmhash.fingerprint64, tokens), np.uint64, len(tokens))
        rows = self._table((ids % np.uint64(self.features.num_buckets)).astype(np.int64))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        pooled = np.add.reduceat(rows, starts, axis=0) / np.sqrt(lengths.astype(np.float32))[:, None]
        return self._activation(pooled + self._bias).astype(np.float32, copy=False)

    def _unit(self, features: np.ndarray) -> np.ndarray:
        return l2_normalize_rows(features @ self._project)

    def _query(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """A query's words → (``[Lq, dim]`` unit vectors, ``[Lq]`` importance = softplus of the logits).

        A cached word's pair is kept once computed (``[words, dim + 1]``, filled on first use like the
        conv-knrm rows): computing it reads the tower table through TensorFlow, ~0.3 ms a query.
        """
        dim = self.config.dim
        if not words:
            return np.zeros((0, dim), np.float32), np.zeros(0, np.float32)
        rows = np.fromiter((self._rows_of.get(w.encode("utf-8", "surrogatepass"), -1) for w in words), np.int64,
                           len(words))
        kept = rows >= 0
        kept[kept] = self._query_filled[rows[kept]]
        out = np.empty((len(words), dim + 1), np.float32)
        out[kept] = self._query_table[rows[kept]]
        todo = np.flatnonzero(~kept)
        if todo.size:
            fresh = [words[i] for i in todo.tolist()]
            features = self._features(fresh)
            buckets = np.fromiter((farmhash.fingerprint64(_UNIGRAM_PREFIX + w) for w in fresh), np.uint64, len(fresh))
            idf = self._idf((buckets % np.uint64(self.features.num_buckets)).astype(np.int64))
            out[todo, :dim] = self._unit(features)
            out[todo, dim] = features @ self._term_kernel[:-1] + idf * self._term_kernel[-1] + self._term_bias
            cached = todo[rows[todo] >= 0]
            # Concurrent callers may compute the same rows: they write equal values, then mark them.
            self._query_table[rows[cached]] = out[cached]
            self._query_filled[rows[cached]] = True
        return out[:, :dim], np.logaddexp(np.float32(0), out[:, dim]).astype(np.float32)

    def _distinct_words(self, rows: np.ndarray, unknown: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Document word ids → (the distinct ones' vectors (scratch), ``[words]`` index into them).

        The vectors are the words' unit vectors (``knrm``: ``[U, dim]``) or :meth:`_conv_words` of them
        (``conv-knrm``: ``[3, U, dim]``).

        Args:
            rows: ``[words]`` vocabulary rows; a word not in the vocabulary is ``len(vocabulary) + j``.
            unknown: word ``j`` of those ids.
        """
        distinct, index = distinct_ids(rows)
        cached = int(np.searchsorted(distinct, self._vocabulary_size))
        if self._grams:
            words = self._scratch.get("words", (3, len(distinct), self.config.dim))
            part = (slice(None), slice(None, cached))
            rest = (slice(None), slice(cached, None))
        else:
            words = self._scratch.get("words", (len(distinct), self.config.dim))
            part, rest = slice(None, cached), slice(cached, None)
        if cached:
            self._cached_words(distinct[:cached], out=words[part])
        if cached < len(distinct):
            vectors = self._unit(self._features([unknown[j] for j in (distinct[cached:] - self._vocabulary_size)]))
            words[rest] = self._conv_words(vectors) if self._grams else vectors
        return words, index

    def _cached_words(self, rows: np.ndarray, *, out: np.ndarray) -> None:
        """Rows of cached words → ``out``: their unit vectors, or (conv-knrm) their kept :meth:`_conv_words`."""
        if not self._grams:
            out[:] = self._vectors(rows)
            return
        missing = rows[~self._conv_filled[rows]]
        if missing.size:
            # Concurrent callers may compute the same rows: they write equal values, then mark them.
            self._conv_table[:, missing] = self._conv_words(self._vectors(missing))
            self._conv_filled[missing] = True
        # mode='clip' (the rows are valid): with out= and the default 'raise', numpy buffers the copy (2x slower)
        np.take(self._conv_table, rows, axis=1, out=out, mode="clip")

    def _conv_words(self, vectors: np.ndarray) -> np.ndarray:
        """``[n, dim]`` word unit vectors → ``[3, n, dim]``: the unigram n-gram layer's unit output, then
        the word's contribution as a bigram's first word (with the layer's bias) and as its second
        (before the activation)."""
        dim, (_, b1), (_, b2) = self.config.dim, *self._grams
        out = (vectors @ self._conv_kernel).reshape(len(vectors), 3, dim).transpose(1, 0, 2).copy()
        out[0] = l2_normalize_rows(relu(out[0] + b1))
        out[1] += b2  # the bigram layer's bias, added once here instead of once per bigram
        return out

    def use_documents(self, store: Any) -> None:
        """Take stored documents' word ids from ``store`` (a :class:`dssm.rerank_docs.DocumentRows` built
        by :meth:`word_rows` of this model) instead of splitting their texts; ``None`` stops."""
        self._store = store

    def word_rows(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        """Each text's vocabulary rows as scoring reads it (cut to ``max_document_words``), or ``None``
        if it holds a word outside the vocabulary: what :class:`dssm.rerank_docs.DocumentRows` stores."""
        rows, _ = self._split_rows(texts)
        return [r if not r.size or int(r.max()) < self._vocabulary_size else None for r in rows]

    def _document_rows(self, documents: Sequence[str]) -> tuple[list[np.ndarray], list[str]]:
        """Each document's word ids: stored ones (:meth:`use_documents`), the others by :meth:`_split_rows`."""
        stored = self._store.lookup(documents) if self._store is not None else [None] * len(documents)
        missing = [i for i, rows in enumerate(stored) if rows is None]
        if not missing:
            return stored, []  # type: ignore[return-value]
        split, unknown = self._split_rows([documents[i] for i in missing])
        for i, rows in zip(missing, split, strict=True):
            stored[i] = rows
        return stored, unknown  # type: ignore[return-value]

    def _split_rows(self, documents: Sequence[str]) -> tuple[list[np.ndarray], list[str]]:
        """Each document's word ids, cut to ``max_document_words``, and the words outside the vocabulary.

        An ASCII document is split with bytes operations, in C: ``translate`` lower-cases A–Z and turns
        every other non-alphanumeric byte into a space (``dssm.features``' ASCII split, exactly), then all
        of them are joined by a marker no translated text holds and split and looked up at once. Other
        documents are split by :meth:`_unicode_split`. A word outside the vocabulary
        gets id ``len(vocabulary) + j``, ``j`` its place in the returned list.
        """
        limit, cut = self.config.max_document_words, self.features.max_chars
        plain = [i for i, text in enumerate(documents) if isinstance(text, str) and text.isascii()]
        unknown: dict[bytes, int] = {}
        out: list[np.ndarray] = [np.zeros(0, np.int64)] * len(documents)

        def rows_of(words: list[bytes]) -> np.ndarray:
            rows = np.fromiter(map(self._rows_of.get, words, repeat(-1)), np.int64, len(words))
            for i in np.flatnonzero(rows == -1).tolist():
                rows[i] = self._vocabulary_size + unknown.setdefault(words[i], len(unknown))
            return rows

        if plain:
            rows = rows_of(_MARKER.join(documents[i][:cut].encode("ascii").translate(_ASCII_TABLE)
                                        for i in plain).split())
            ends = np.append(np.flatnonzero(rows == _MARKER_ROW), len(rows)).tolist()
            start = 0
            for i, end in zip(plain, ends, strict=True):
                out[i] = rows[start:min(end, start + limit)]
                start = end + 1
        if len(plain) < len(documents):
            other = [i for i, text in enumerate(documents) if not (isinstance(text, str) and text.isascii())]
            for i, words in zip(other, self._unicode_split([documents[i] for i in other], limit), strict=True):
                out[i] = rows_of(words)
        return out, [word.decode("utf-8") for word in unknown]

    # ---- interaction ----------------------------------------------------------------------------
    def _soft_counts(self, cosine: np.ndarray, members: sp.csr_matrix) -> np.ndarray:
        """Kernel values of ``[n, q]`` cosines summed per document → ``[docs, K, q]``.

        ``members`` (``[docs, n]``, CSR) says how often each row occurs in each document: the
        positions of a document (rows of distinct words) or its n-grams (one row each). Summing is a
        sparse product per kernel, whose inner loop runs along the ``q`` contiguous columns.
        """
        values, scale, used = self._kernels(cosine)
        soft = np.zeros((members.shape[0], self.config.kernels, cosine.shape[1]), np.float32)
        for k in range(used):
            soft[:, k] = members @ values[k]
        if scale is not None:
            soft *= scale[:, None]
        return soft

    def _kernels(self, cosine: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int]:
        """``[n, q]`` cosines → :func:`rbf_kernels` of them, in this thread's scratch."""
        out = self._scratch.get("kernels", (self.config.kernels, *cosine.shape))
        step = self._scratch.get("kernel_step", cosine.shape)
        return rbf_kernels(cosine, mu=self._mu, neg_inv_two_sigma_sq=self._neg_inv_two_sigma_sq, chain=self._chain,
                           out=out, step=step)

    @staticmethod
    def _pool(soft: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """``[docs, K, q]`` soft match counts, ``[q]`` query-word importance → ``[docs, K]``."""
        return np.log1p(soft) @ weight

    @staticmethod
    def _members(columns: np.ndarray, lengths: np.ndarray) -> sp.csr_matrix:
        """``[docs, n]`` CSR: document ``i`` holds ``columns`` ``[sum(lengths[:i]), sum(lengths[:i + 1]))``,
        a column once per occurrence (repeated columns add up in products)."""
        indptr = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        return sp.csr_matrix((np.ones(len(columns), np.float32), columns, indptr),
                             shape=(len(lengths), int(columns.max(initial=-1)) + 1))

    def _group(self, query: list[str], documents: list[np.ndarray], unknown: Sequence[str]) -> np.ndarray:
        """One query's words against its candidates' word ids (:meth:`_document_rows`) → ``[candidates]`` scores."""
        q_vectors, weight = self._query(query)
        lengths = np.fromiter(map(len, documents), np.int64, len(documents))
        flat = np.concatenate(documents) if documents else np.zeros(0, np.int64)
        words, index = self._distinct_words(flat, unknown)
        if not self._grams:
            soft = self._soft_counts(words @ q_vectors.T, self._members(index, lengths))
            pooled = self._pool(soft, weight)
        else:
            pooled = self._conv_pool(q_vectors, weight, words, index, lengths)
        return (pooled @ self._head_kernel + self._head_bias).astype(np.float32)

    def _conv_pool(self, q_vectors: np.ndarray, weight: np.ndarray, words: np.ndarray, index: np.ndarray,
                   lengths: np.ndarray) -> np.ndarray:
        """Conv-KNRM's four n-gram pairings → ``[docs, 4 * K]`` in the graph's order (q1d1, q1d2, q2d1, q2d2).

        Args:
            words: ``[3, U, dim]`` :meth:`_conv_words` of the candidates' distinct words.
            index: ``[positions]`` the distinct word at each position, grouped by document.
            lengths: ``[docs]`` positions per document.
        """
        (k1, b1), (k2, b2) = self._grams
        dim = self.config.dim
        # query n-grams: a bigram is real only if its second word is (the last one is padding)
        q_next = np.vstack([q_vectors[1:], np.zeros((1, dim), np.float32)])
        q_grams = [l2_normalize_rows(relu(q_vectors @ k1[0] + b1)),
                   l2_normalize_rows(relu(q_vectors @ k2[0] + q_next @ k2[1] + b2))]
        q_all = np.vstack(q_grams).T  # [dim, 2 Lq]
        q_weight = [weight, np.concatenate([weight[:-1], np.zeros(min(len(weight), 1), np.float32)])]
        # document unigrams: kernels once per distinct word, counted per document
        soft = [self._soft_counts(words[0] @ q_all, self._members(index, lengths))]  # [docs, K, 2 Lq]
        # document bigrams (a word and the next word of its document), one per position that has a
        # next word (most pairs occur once among a query's candidates, so no de-duplication); a
        # document of n words has n - 1
        starts = np.cumsum(lengths) - lengths
        has_next = np.ones(len(index), bool)
        has_next[(starts + lengths - 1)[lengths > 0]] = False
        positions = np.flatnonzero(has_next)
        pre = np.take(words[1], index[positions], axis=0, out=self._scratch.get("bigrams", (len(positions), dim)),
                      mode="clip")
        pre += np.take(words[2], index[positions + 1], axis=0,
                       out=self._scratch.get("second", (len(positions), dim)), mode="clip")
        relu(pre, out=pre)  # the n-gram layers' activation
        # cosines of the unit bigram vectors: the norms divide the [n, 2 Lq] products, not the [n, dim] vectors
        cosine = pre @ q_all
        cosine /= np.sqrt(np.maximum(np.einsum("ij,ij->i", pre, pre), np.float32(1e-12)))[:, None]
        bigrams = np.arange(len(positions))
        soft.append(self._soft_counts(cosine, self._members(bigrams, np.maximum(lengths - 1, 0))))
        lq = len(weight)
        return np.concatenate([self._pool(soft[di][:, :, qi * lq:(qi + 1) * lq], q_weight[qi])
                               for qi in range(2) for di in range(2)], axis=1)

    def _split_function(self) -> Any:
        """``(texts [n] string, limit int32) → (words [m] string, words per text [n])``, one graph call.

        A concrete function: ~20 eager ops, or a ``tf.function``'s Python dispatch, cost more than the
        split itself for the few texts that take this path.
        """
        if self._graph_split is None:
            featurizer = Featurizer(self.features)

            @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([], tf.int32)])
            def graph_split(texts: tf.Tensor, limit: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                words = split_words(featurizer, texts, limit)
                return words.flat_values, words.row_lengths()

            self._graph_split = graph_split.get_concrete_function()
        return self._graph_split

    def _split_bytes(self, texts: Sequence[str | bytes], limit: int) -> list[list[bytes]]:
        """Words (UTF-8 bytes) of texts :func:`dssm.hashing.unicode_words` declines (a lone surrogate, a
        code point newer than Python's Unicode tables), by the graph's ops (:func:`dssm.rerank.split_words`,
        one call for all of them). The words are valid UTF-8 from then on and hashed in Python like any
        other (FarmHash64 of their UTF-8 bytes, trigrams of code points, as ``tf.strings.unicode_split``
        gives)."""
        raw = [text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text) for text in texts]
        words, lengths = self._split_function()(tf.constant(raw, tf.string), tf.constant(limit, tf.int32))
        return [part.tolist() for part in np.split(words.numpy(), np.cumsum(lengths.numpy())[:-1])]

    def _split(self, texts: Sequence[str], limit: int) -> list[list[str]]:
        """Each text's words, cut to ``limit`` (ASCII split, else :meth:`_unicode_split`)."""
        out: list[list[str]] = [ascii_words(text, self.features) or [] for text in texts]
        other = [i for i, text in enumerate(texts) if not (isinstance(text, str) and text.isascii())]
        if other:
            for i, words in zip(other, self._unicode_split([texts[i] for i in other], limit), strict=True):
                out[i] = [w.decode("utf-8") for w in words]
        return [words[:limit] for words in out]

    def _unicode_split(self, texts: Sequence[str | bytes], limit: int) -> list[list[bytes]]:
        """Words (UTF-8 bytes) of non-ASCII texts, cut to ``limit``: :func:`dssm.hashing.unicode_words` (the
        graph's NFKC_Casefold and split in Python), and the graph's ops (:meth:`_split_bytes`) for a text
        it declines. In the re-ranking loop this beat one graph call for a query's few such candidates
        (p50 7.3 vs 7.9–8.3 ms per query of 100 debian-dev candidates, conv-knrm, measured A/B)."""
        out: list[list[bytes] | None] = [None] * len(texts)
        for i, text in enumerate(texts):
            words = unicode_words(text, self.features) if isinstance(text, str) else None
            if words is not None:
                out[i] = [word.encode("utf-8") for word in words[:limit]]
        declined = [i for i, words in enumerate(out) if words is None]
        if declined:
            for i, words in zip(declined, self._split_bytes([texts[i] for i in declined], limit), strict=True):
                out[i] = words
        return out  # type: ignore[return-value]

    def score_pairs(self, queries: Sequence[str], documents: Sequence[str]) -> np.ndarray:
        """``n`` (query, document) pairs → ``[n]`` float32 scores.

        Pairs are grouped by query text; each group is scored in one pass over its documents' words.
        """
        distinct_queries = list(dict.fromkeys(queries))
        q_words = dict(zip(distinct_queries, self._split(distinct_queries, self.config.max_query_words), strict=True))
        d_rows, unknown = self._document_rows(documents)
        groups: dict[str, list[int]] = {}
        for i, text in enumerate(queries):
            groups.setdefault(text, []).append(i)
        scores = np.empty(len(documents), np.float32)
        # One BLAS thread, as each serving worker runs TensorFlow on one: these are small matrices, and
        # OpenBLAS's second thread spin-waiting against a busy core made them ~10x slower (measured).
        with _blas_controller().limit(limits=1, user_api="blas"):
            for text, members in groups.items():
                scores[members] = self._group(q_words[text], [d_rows[i] for i in members], unknown)
        return scores


class _Scratch(threading.local):
    """Work arrays kept per thread and reused by later calls (views of them never leave a call).

    Re-ranking one query's 100 candidates makes a few float32 arrays of 0.3–4 MB (positions × kernels ×
    query words, positions × dim). Allocated afresh each call, every one is new memory from the
    kernel, zero-filled page by page on first touch: 5.5 of 15 ms per query here (measured: the
    same code ran in 9 ms with glibc told to keep freed memory). Arrays above ``_SCRATCH_CAP``
    elements (a batch far larger than a re-ranking) are not kept.
    """

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """An uninitialised float32 array of ``shape``, a view of this thread's ``name`` buffer."""
        size = math.prod(shape)
        array = self.arrays.get(name)
        if array is None or array.size < size:
            array = np.empty(size + size // 4, np.float32)  # headroom: the next query's candidates differ
            if array.size <= _SCRATCH_CAP:
                self.arrays[name] = array
        return array[:size].reshape(shape)


@functools.cache
def _blas_controller() -> threadpoolctl.ThreadpoolController:
    return threadpoolctl.ThreadpoolController()
