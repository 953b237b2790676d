"""The interaction re-ranker: query and document read together, word by word (issue 13).

A tower model (``dssm.model``) embeds each side alone so documents can be indexed; this model sees
both texts at once and scores their word-by-word similarity, so it only re-ranks a short list from a
first stage. It shares the towers' hashing (``dssm.features``) and starts from a tower's embedding
table: a word's vector is the tower's first layer on the word's own bag (its letter trigrams and the
word itself), so the words the towers learned to relate start out related here.

Two designs, selected by :attr:`RerankConfig.design`:

- ``knrm`` (Xiong et al. 2017, K-NRM): cosine of every query word with every document word, pooled
  by RBF kernels (one at exact match, the rest spread over [-1, 1]) into soft match counts per query
  word; ``log1p`` of those, weighted by a learned per-word importance, summed over the query, then a
  linear layer;
- ``conv-knrm`` (Dai et al. 2018): the same kernel pooling over word n-grams (a convolution of
  window 1 and 2 over the word vectors), every query n-gram size against every document n-gram size.

Texts are cut to ``max_query_words`` / ``max_document_words`` words (longer candidates are truncated,
never refused). Everything is TensorFlow ops, so the exported SavedModel's ``score(queries,
documents)`` signature takes raw strings (``dssm.rerank_export``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.config import field
from dssm.errors import ConfigError
from dssm.features import _NON_WORD, _UNIGRAM_PREFIX, FeatureConfig, Featurizer

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["RerankConfig", "Reranker", "DESIGNS", "kernel_centres", "listwise_loss", "split_words"]

DESIGNS = ("knrm", "conv-knrm")
_ACTIVATIONS = ("tanh", "relu", "linear")


@dataclass(frozen=True)
class RerankConfig:
    """Shape of the re-ranker. Saved as ``config.json["rerank"]`` beside the exported model."""

    design: str = field("conv-knrm", f"interaction design, one of {DESIGNS}: conv-knrm won on held-out training "
                                      "queries (debian-dev MRR@10 0.777 vs 0.771); knrm costs ~1/3 as much "
                                      "(docs/rerank.md)")
    dim: int = field(128, "width of the word (and n-gram) vectors that are compared")
    kernels: int = field(11, "RBF kernels: one at exact match (cosine 1) and the rest evenly over [-1, 1)")
    sigma: float = field(0.1, "width of the soft-match kernels")
    exact_sigma: float = field(0.001, "width of the exact-match kernel")
    max_query_words: int = field(32, "query words kept (the rest are cut)")
    max_document_words: int = field(200, "document words kept: longer candidates are truncated, never refused")
    train_table: bool = field(False, "also train the embedding table (slower; otherwise the tower's table "
                                      "is kept frozen)")
    activation: str = field("tanh", f"activation of the word layer, as the tower's first layer, one of {_ACTIVATIONS}")

    def __post_init__(self) -> None:
        if self.design not in DESIGNS:
            raise ConfigError(f"design must be one of {DESIGNS}, got {self.design!r}")
        if self.dim < 1:
            raise ConfigError(f"dim must be positive, got {self.dim}")
        if self.kernels < 2:
            raise ConfigError(f"kernels must be at least 2 (exact match + one soft kernel), got {self.kernels}")
        if not (self.sigma > 0 and self.exact_sigma > 0):
            raise ConfigError(f"sigma and exact_sigma must be > 0, got {self.sigma}, {self.exact_sigma}")
        if self.max_query_words < 1 or self.max_document_words < 1:
            raise ConfigError(f"max_query_words and max_document_words must be positive, got "
                              f"{self.max_query_words}, {self.max_document_words}")
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")


def kernel_centres(count: int) -> np.ndarray:
    """``[count]`` kernel means: 1.0 (exact match), then ``count - 1`` centres of equal bins over [-1, 1].

    Example: 11 kernels → 1.0, 0.9, 0.7, ..., -0.9 (K-NRM's choice).
    """
    soft = count - 1
    step = 2.0 / soft
    return np.asarray([1.0] + [1.0 - step / 2 - i * step for i in range(soft)], np.float32)


def split_words(featurizer: Featurizer, texts: tf.Tensor, limit: int) -> tf.RaggedTensor:
    """``[batch]`` strings → ``[batch, (words <= limit)]``: normalised (NFKC + case fold) and split on
    non-word runs exactly as ``Featurizer.tokens`` splits them, then cut to ``limit`` words."""
    spaced = tf.strings.regex_replace(featurizer.normalize(texts), _NON_WORD, " ")
    return tf.strings.split(tf.strings.strip(spaced))[:, :limit]


def listwise_loss(scores: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
    """Softmax cross-entropy with the positive in column 0 (ListNet with one relevant document).

    Args:
        scores: ``[queries, 1 + negatives]`` float32, column 0 is the positive.
        valid: ``[queries, 1 + negatives]`` bool, False for padding (fewer candidates than columns).

    Returns:
        scalar float32, the mean over queries of ``-log softmax(scores)[0]`` over valid columns.
    """
    masked = tf.where(valid, scores, tf.fill(tf.shape(scores), tf.constant(-1e9, scores.dtype)))
    return tf.reduce_mean(tf.reduce_logsumexp(masked, axis=1) - masked[:, 0])


class Reranker(tf.keras.Model):
    """Scores (query, document) text pairs by kernel-pooled word interactions.

    Args:
        config: the re-ranker's shape.
        feature_config: the hashing (the first-stage model's, so the vocabulary is shared).
        embedding_dim: width of the embedding table (the tower's ``embedding_dim`` to start from it).
    """

    def __init__(self, config: RerankConfig, *, feature_config: FeatureConfig, embedding_dim: int,
                 name: str | None = "reranker") -> None:
        super().__init__(name=name)
        self.config = config
        self.feature_config = feature_config
        self.featurizer = Featurizer(feature_config)
        self.table = self.add_weight(
            name="table", shape=[feature_config.num_buckets, embedding_dim],
            initializer=tf.keras.initializers.TruncatedNormal(stddev=0.05), trainable=config.train_table)
        self.table_bias = self.add_weight(name="table_bias", shape=[embedding_dim], initializer="zeros",
                                          trainable=True)
        # BM25's idf of each word's unigram bucket, from the corpus the model re-ranks (set_document_frequencies);
        # an input to the query-word importance, which is what BM25 has and hashed trigram vectors lack.
        self.idf = self.add_weight(name="idf", shape=[feature_config.num_buckets], initializer="zeros",
                                   trainable=False)
        self.project = tf.keras.layers.Dense(config.dim, use_bias=False, name="project")
        self.term_weight = tf.keras.layers.Dense(1, name="term_weight")
        windows = (1, 2) if config.design == "conv-knrm" else (1,)
        self.grams = [tf.keras.layers.Conv1D(config.dim, w, activation="relu", name=f"gram_{w}") for w in windows] \
            if config.design == "conv-knrm" else []
        # Zero start: every pair scores 0 and the first steps learn which kernels matter (a random head
        # starts from an arbitrary ranking that hundreds of steps must first undo).
        self.head = tf.keras.layers.Dense(1, kernel_initializer="zeros", name="head")
        centres = kernel_centres(config.kernels)
        widths = np.full_like(centres, config.sigma)
        widths[0] = config.exact_sigma
        self._mu = tf.constant(centres)
        # Set by cache_vocabulary after training: the documents' word vectors, looked up instead of computed.
        self.vocab_table: tf.lookup.StaticHashTable | None = None
        self.vocab_vectors: tf.Variable | None = None
        self._two_sigma_sq = tf.constant(2.0 * widths**2)

    def init_from_tower(self, table: np.ndarray | tf.Variable, bias: np.ndarray) -> None:
        """Start from a tower's first layer: its ``[num_buckets, embedding_dim]`` table and ``[embedding_dim]`` bias."""
        if tuple(table.shape) != tuple(self.table.shape):
            raise ConfigError(f"tower table shape {tuple(table.shape)} does not match the re-ranker's "
                              f"{tuple(self.table.shape)} (num_buckets, embedding_dim)")
        self.table.assign(table)
        self.table_bias.assign(bias)

    def set_document_frequencies(self, frequencies: np.ndarray, documents: int) -> None:
        """Store BM25's idf, ``log(1 + (n - df + 0.5) / (df + 0.5))``, per unigram bucket.

        Args:
            frequencies: ``[num_buckets]`` documents containing each bucket's word (:meth:`document_frequencies`).
            documents: ``n``, the number of documents counted.
        """
        df = np.asarray(frequencies, np.float64)
        if df.shape != (self.feature_config.num_buckets,) or documents < 1 or df.max(initial=0) > documents:
            raise ConfigError(f"document frequencies of shape {df.shape} (max {df.max(initial=0)}) do not fit "
                              f"num_buckets={self.feature_config.num_buckets} and documents={documents}")
        self.idf.assign(np.log1p((documents - df + 0.5) / (df + 0.5)).astype(np.float32))

    def document_frequencies(self, texts: tf.Tensor) -> tf.Tensor:
        """``[batch]`` strings → ``[num_buckets]`` int64: in how many of them each unigram bucket occurs."""
        words = self._words(texts, self.feature_config.max_chars)
        ids = tf.strings.to_hash_bucket_fast(tf.strings.join([_UNIGRAM_PREFIX, words.flat_values]),
                                             self.feature_config.num_buckets)
        keys, _ = tf.unique(words.value_rowids() * self.feature_config.num_buckets + ids)
        return tf.math.bincount(keys % self.feature_config.num_buckets, minlength=self.feature_config.num_buckets,
                                maxlength=self.feature_config.num_buckets, dtype=tf.int64)

    def cache_vocabulary(self, words: np.ndarray, *, batch: int = 4096) -> None:
        """Precompute the unit vectors of ``words`` (a corpus's distinct words, :meth:`distinct_words`).

        Call after training (the vectors are those of the current weights). Documents' words found in
        the cache are looked up instead of hashed and pooled, which is most of a re-ranking call's cost;
        other words (documents added later) are computed as before, to the same values.
        """
        words = np.unique(np.asarray(words, dtype=object))
        unit = tf.function(self._unit_vectors, reduce_retracing=True)
        parts = [unit(tf.constant(words[i:i + batch].tolist(), tf.string)).numpy()
                 for i in range(0, len(words), batch)]
        vectors = np.concatenate(parts) if parts else np.zeros((0, self.config.dim), np.float32)
        init = tf.lookup.KeyValueTensorInitializer(tf.constant(words.tolist() or [b""], tf.string),
                                                   tf.range(max(len(words), 1), dtype=tf.int64))
        self.vocab_table = tf.lookup.StaticHashTable(init, default_value=-1)
        self.vocab_vectors = tf.Variable(vectors if len(words) else np.zeros((1, self.config.dim), np.float32),
                                         trainable=False, name="vocab_vectors")

    def distinct_words(self, texts: tf.Tensor) -> tf.Tensor:
        """``[batch]`` strings → ``[n]`` their distinct words, as :meth:`call` reads documents."""
        return tf.unique(self._words(texts, self.config.max_document_words).flat_values)[0]

    # ---- text → word vectors ---------------------------------------------------------------------
    def _words(self, texts: tf.Tensor, limit: int) -> tf.RaggedTensor:
        """``[batch]`` strings → ``[batch, (words <= limit)]`` normalised words, as the featurizer splits them."""
        return split_words(self.featurizer, texts, limit)

    def _word_vectors(self, words: tf.Tensor) -> tf.Tensor:
        """``[n]`` distinct words → ``[n, embedding_dim]``: the tower's first layer on each word's own bag."""
        wrapped = tf.strings.join(["#", words, "#"])
        trigrams = tf.strings.ngrams(tf.strings.unicode_split(wrapped, "UTF-8"), 3, separator="")
        tokens = trigrams
        if self.feature_config.word_unigrams:
            tokens = tf.concat([trigrams, tf.expand_dims(tf.strings.join([_UNIGRAM_PREFIX, words]), 1)], axis=1)
        ids = tf.strings.to_hash_bucket_fast(tokens.flat_values, self.feature_config.num_buckets)
        rows = tf.gather(self.table, ids)
        pooled = tf.math.segment_sum(rows, tokens.value_rowids())
        lengths = tf.cast(tokens.row_lengths(), pooled.dtype)
        pooled = pooled / tf.sqrt(tf.maximum(lengths, 1.0))[:, None]
        x = pooled + self.table_bias
        if self.config.activation == "tanh":
            x = tf.tanh(x)
        elif self.config.activation == "relu":
            x = tf.nn.relu(x)
        return x

    def _unit_vectors(self, words: tf.Tensor) -> tf.Tensor:
        """``[n]`` distinct words → ``[n, dim]`` unit vectors (projected word features)."""
        return tf.math.l2_normalize(self.project(self._word_vectors(words)), axis=-1)

    def _document_words(self, texts: tf.Tensor) -> tf.RaggedTensor:
        """``[batch]`` documents → ``[batch, (words), dim]`` unit vectors, from the vocabulary cache when set."""
        words = self._words(texts, self.config.max_document_words)
        distinct, index = tf.unique(words.flat_values)
        if self.vocab_table is None:
            vectors = self._unit_vectors(distinct)
        else:
            rows = self.vocab_table.lookup(distinct)
            unknown = tf.where(rows < 0)[:, 0]
            vectors = tf.tensor_scatter_nd_update(tf.gather(self.vocab_vectors, tf.maximum(rows, 0)),
                                                  unknown[:, None], self._unit_vectors(tf.gather(distinct, unknown)))
        return tf.RaggedTensor.from_row_splits(tf.gather(vectors, index), words.row_splits)

    def _side(self, texts: tf.Tensor, limit: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.RaggedTensor]:
        """``[batch]`` strings → (``[batch, L]`` mask, ``[batch, L, dim]`` unit word vectors, ``[batch, L]``
        word-importance logits, the same vectors as a ``[batch, (words), dim]`` ragged tensor).

        Everything per word is computed once per distinct word of the batch and then gathered: a
        re-ranked query's 100 candidates share most of their words, and the projection on the padded
        ``[batch, L, embedding_dim]`` tensor instead cost ~80% of a 100-candidate call.
        """
        words = self._words(texts, limit)
        distinct, index = tf.unique(words.flat_values)
        idf = tf.gather(self.idf, tf.strings.to_hash_bucket_fast(tf.strings.join([_UNIGRAM_PREFIX, distinct]),
                                                                 self.feature_config.num_buckets))
        features = self._word_vectors(distinct)
        vectors = tf.math.l2_normalize(self.project(features), axis=-1)  # [distinct, dim], as _unit_vectors
        logits = tf.squeeze(self.term_weight(tf.concat([features, idf[:, None]], axis=1)), -1)  # [distinct]
        ragged = tf.RaggedTensor.from_row_splits(tf.gather(vectors, index), words.row_splits)
        dense = ragged.to_tensor()
        weight_logits = tf.RaggedTensor.from_row_splits(tf.gather(logits, index), words.row_splits).to_tensor()
        mask = tf.sequence_mask(words.row_lengths(), maxlen=tf.shape(dense)[1], dtype=tf.float32)
        return mask, dense, weight_logits, ragged

    # ---- interaction ----------------------------------------------------------------------------
    def _pool(self, query: tf.Tensor, query_mask: tf.Tensor, document: tf.Tensor, document_mask: tf.Tensor,
              weight: tf.Tensor) -> tf.Tensor:
        """Kernel pooling: ``[batch, Lq, dim]`` x ``[batch, Ld, dim]`` unit vectors → ``[batch, kernels]``."""
        cosine = tf.einsum("bqd,bkd->bqk", query, document)  # [batch, Lq, Ld]
        kernels = tf.exp(-tf.square(cosine[..., None] - self._mu) / self._two_sigma_sq)  # [batch, Lq, Ld, K]
        soft_tf = tf.reduce_sum(kernels * document_mask[:, None, :, None], axis=2)  # [batch, Lq, K]
        return tf.reduce_sum(tf.math.log1p(soft_tf) * (weight * query_mask)[..., None], axis=1)

    def _pool_ragged(self, query: tf.Tensor, query_weight: tf.Tensor, document: tf.RaggedTensor) -> tf.Tensor:
        """:meth:`_pool` over the documents' real words only (no padding to the longest candidate).

        Args:
            query: ``[batch, Lq, dim]`` unit vectors of each pair's query.
            query_weight: ``[batch, Lq]`` importance, 0 on padding.
            document: ``[batch, (words), dim]`` unit vectors.

        Returns:
            ``[batch, kernels]``.
        """
        rows = document.value_rowids()  # [words]: the pair each document word belongs to
        cosine = tf.einsum("nd,nqd->nq", document.flat_values, tf.gather(query, rows))  # [words, Lq]
        kernels = tf.exp(-tf.square(cosine[..., None] - self._mu) / self._two_sigma_sq)  # [words, Lq, K]
        soft_tf = tf.math.unsorted_segment_sum(kernels, rows, num_segments=document.nrows())  # [batch, Lq, K]
        return tf.reduce_sum(tf.math.log1p(soft_tf) * query_weight[..., None], axis=1)

    def _grams(self, vectors: tf.Tensor, mask: tf.Tensor) -> list[tuple[tf.Tensor, tf.Tensor]]:
        """Word vectors → per n-gram size (unit ``[batch, L - n + 1, dim]`` vectors, their mask)."""
        out = []
        for n, conv in enumerate(self.grams, start=1):
            padded = tf.pad(vectors, [[0, 0], [0, n - 1], [0, 0]])
            grams = tf.math.l2_normalize(conv(padded), axis=-1)
            # an n-gram is real only if its last word is (masks shifted by n - 1)
            gram_mask = mask if n == 1 else mask * tf.pad(mask[:, n - 1:], [[0, 0], [0, n - 1]])
            out.append((grams, gram_mask))
        return out

    def call(self, inputs: tuple[tf.Tensor, tf.Tensor], training: bool | None = None) -> tf.Tensor:
        """Score pairs.

        Args:
            inputs: ``(queries, documents)``, each ``[batch]`` tf.string.
            training: unused (no dropout); Keras passes it.

        Returns:
            ``[batch]`` float32 scores, higher is more relevant; comparable across documents of one query.
        """
        queries, documents = inputs
        # A re-ranked query's candidates all share it: its side is computed once and gathered per pair.
        distinct, of_pair = tf.unique(queries)
        q_mask, q_vectors, q_logits, _ = self._side(distinct, self.config.max_query_words)
        q_mask, q_vectors, q_logits = (tf.gather(x, of_pair) for x in (q_mask, q_vectors, q_logits))
        weight = tf.nn.softplus(q_logits)  # [batch, Lq]
        d_words = self._document_words(documents)
        if not self.grams:
            pooled = self._pool_ragged(q_vectors, weight * q_mask, d_words)
        else:
            d_vectors = d_words.to_tensor()
            d_mask = tf.sequence_mask(d_words.row_lengths(), maxlen=tf.shape(d_vectors)[1], dtype=tf.float32)
            q_grams, d_grams = self._grams(q_vectors, q_mask), self._grams(d_vectors, d_mask)
            pooled = tf.concat([self._pool(qv, qm, dv, dm, weight) for qv, qm in q_grams for dv, dm in d_grams],
                               axis=1)
        return tf.squeeze(self.head(pooled), -1)
