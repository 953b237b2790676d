"""DSSM word hashing: text → bag of hashed letter trigrams (and optional word n-grams).

One TensorFlow implementation serves the Beam pipelines, training input and the exported SavedModel,
so a text gets the same bucket ids everywhere. The steps (all TF ops, so they live inside the graph):

1. replace invalid UTF-8 with U+FFFD, then NFKC + case folding (tensorflow-text ``case_fold_utf8``, i.e. NFKC_Casefold);
2. cut to ``max_chars`` characters (bounds the cost of pathological inputs);
3. split into words on runs of anything that is not a letter, digit or combining mark;
4. wrap each word as ``#word#`` and take its letter trigrams: ``#word#`` → ``#wo wor ord rd#``;
5. optionally add the words themselves and adjacent word pairs, with a prefix no trigram can spell;
6. hash every token with ``tf.strings.to_hash_bucket_fast`` (FarmHash64) into ``num_buckets``;
7. count: one unique id per bucket per text, with its count.

:func:`ascii_buckets` (in :mod:`dssm.hashing`, re-exported here) is the same computation in plain
Python for one ASCII text (FarmHash64 from the ``pyfarmhash`` package is the hash
``to_hash_bucket_fast`` computes): one query through the TF graph costs ~0.6 ms, mostly per-call and
per-op overhead; these ~50 us. It declines (``None``) any non-ASCII text; :func:`dssm.hashing.token_bag`
and :func:`dssm.hashing.text_buckets` handle those too, declining only code points newer than
Python's Unicode tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.hashing import BIGRAM_PREFIX, NON_WORD, UNIGRAM_PREFIX, FeatureConfig, ascii_buckets, ascii_words

import tensorflow as tf  # noqa: E402  isort: skip
import tensorflow_text as tf_text  # noqa: E402  isort: skip

__all__ = ["FeatureConfig", "Featurizer", "ascii_buckets", "ascii_words"]

# The TensorFlow-free pieces live in dssm.hashing (the query path imports them without TensorFlow);
# these names keep the graph code below and its importers (dssm.rerank, dssm.rerank_fast) as they were.
_UNIGRAM_PREFIX = UNIGRAM_PREFIX
_BIGRAM_PREFIX = BIGRAM_PREFIX
_NON_WORD = NON_WORD


class Featurizer:
    """Hashes raw texts into bags of bucket ids.

    Example:
        >>> featurizer = Featurizer(FeatureConfig(num_buckets=1000))
        >>> ids, counts = featurizer.bags(tf.constant(["hello world"]))
    """

    def __init__(self, config: FeatureConfig) -> None:
        self.config = config
        self.bags = tf.function(
            self._bags, input_signature=[tf.TensorSpec([None], tf.string)], reduce_retracing=True
        )

    def normalize(self, texts: tf.Tensor) -> tf.Tensor:
        """NFKC + case fold, invalid UTF-8 replaced, cut to ``max_chars``.

        Args:
            texts: ``[batch]`` tf.string.

        Returns:
            ``[batch]`` tf.string.
        """
        # Only texts with a byte past 0x7f can hold invalid UTF-8; transcoding just those (one
        # cheap regex pass finds them) saves most of the transcode's cost (0.079 -> 0.014 s per
        # 10k debtags texts, 99% ASCII). ASCII passes through transcoding unchanged.
        other = tf.where(tf.logical_not(tf.strings.regex_full_match(texts, r"[\x00-\x7f]*")))  # [n, 1]
        valid = tf.tensor_scatter_nd_update(texts, other, tf.strings.unicode_transcode(
            tf.gather_nd(texts, other), input_encoding="UTF-8", output_encoding="UTF-8", errors="replace",
            replace_control_characters=False,
        ))
        # Cutting before NFKC bounds its cost; cutting after too, because NFKC can expand a character.
        valid = tf.strings.substr(valid, 0, self.config.max_chars, unit="UTF8_CHAR")
        folded = tf_text.case_fold_utf8(valid)  # NFKC_Casefold: NFKC + full case folding
        return tf.strings.substr(folded, 0, self.config.max_chars, unit="UTF8_CHAR")

    def tokens(self, texts: tf.Tensor) -> tf.RaggedTensor:
        """The strings that get hashed: trigrams, then (optionally) unigrams and bigrams.

        Args:
            texts: ``[batch]`` tf.string.

        Returns:
            ``[batch, None]`` tf.string ragged.
        """
        words = self._words(texts)
        wrapped = tf.strings.join(["#", words, "#"])
        chars = tf.strings.unicode_split(wrapped, "UTF-8")  # [batch, (words), (chars)]
        trigrams = tf.strings.ngrams(chars, 3, separator="")  # [batch, (words), (trigrams)]
        parts = [trigrams.merge_dims(1, 2)]
        if self.config.word_unigrams:
            parts.append(tf.strings.join([_UNIGRAM_PREFIX, words]))
        if self.config.word_bigrams:
            parts.append(tf.strings.join([_BIGRAM_PREFIX, tf.strings.ngrams(words, 2, separator=" ")]))
        return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]

    def token_ids(self, texts: tf.Tensor) -> tf.RaggedTensor:
        """The hashed :meth:`tokens`, in the same order, with the string work done once per distinct word.

        A batch's words repeat (10k debtags texts: ~800k words, a tenth of them distinct), so the
        trigram strings, the unigram strings and their hashes are made for the distinct words and
        gathered back per occurrence; only the bigrams are joined per occurrence. On 10k debtags
        texts this is ~2.5x faster than hashing :meth:`tokens` (0.34 vs 0.84 s).

        Args:
            texts: ``[batch]`` tf.string.

        Returns:
            ``[batch, None]`` int64 bucket ids, ``to_hash_bucket_fast(tokens(texts))`` exactly.
        """
        words, distinct, which = self._distinct_words(texts)
        parts = [words.with_flat_values(tf.gather(self._trigram_ids(distinct), which)).merge_dims(1, 2)]
        if self.config.word_unigrams:
            parts.append(words.with_flat_values(tf.gather(self._unigram_ids(distinct), which)))
        if self.config.word_bigrams:
            parts.append(self._bigram_ids(words))
        return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]

    def word_tokens(self, texts: tf.Tensor) -> tuple[tf.RaggedTensor, tf.RaggedTensor, tf.RaggedTensor]:
        """:meth:`token_ids` grouped by distinct word, for pooling each word's rows once.

        Args:
            texts: ``[batch]`` tf.string.

        Returns:
            ``(word_ids, text_words, text_bigrams)``: ``[distinct, None]`` int64, each distinct
            word's trigram ids then its unigram id (if ``word_unigrams``); ``[batch, None]`` int32,
            each text's words as rows of ``word_ids``; ``[batch, None]`` int64, each text's bigram
            ids (empty rows without ``word_bigrams``). A text's tokens are its words' rows plus
            its bigrams: :meth:`token_ids` up to order.
        """
        words, distinct, which = self._distinct_words(texts)
        word_ids = self._trigram_ids(distinct)
        if self.config.word_unigrams:
            word_ids = tf.concat([word_ids, self._unigram_ids(distinct)[:, tf.newaxis]], axis=1)
        if self.config.word_bigrams:
            bigrams = self._bigram_ids(words)
        else:
            bigrams = tf.RaggedTensor.from_row_splits(tf.zeros([0], tf.int64), tf.zeros_like(words.row_splits))
        return word_ids, words.with_flat_values(tf.cast(which, tf.int32)), bigrams

    def _words(self, texts: tf.Tensor) -> tf.RaggedTensor:
        """``[batch, (words)]`` tf.string: the normalised texts split on runs of non-word characters."""
        spaced = tf.strings.regex_replace(self.normalize(texts), _NON_WORD, " ")
        return tf.strings.split(tf.strings.strip(spaced))

    def _distinct_words(self, texts: tf.Tensor) -> tuple[tf.RaggedTensor, tf.Tensor, tf.Tensor]:
        """``words [batch, (words)]`` tf.string, ``distinct [distinct]`` and ``which [words]`` int64."""
        words = self._words(texts)
        distinct, which = tf.unique(words.flat_values, out_idx=tf.int64)
        return words, distinct, which

    def _trigram_ids(self, distinct: tf.Tensor) -> tf.RaggedTensor:
        """``[distinct, (trigrams)]`` int64: the hashed letter trigrams of ``#word#``."""
        chars = tf.strings.unicode_split(tf.strings.join(["#", distinct, "#"]), "UTF-8")  # [distinct, (chars)]
        trigrams = tf.strings.ngrams(chars, 3, separator="")
        return trigrams.with_flat_values(tf.strings.to_hash_bucket_fast(trigrams.flat_values, self.config.num_buckets))

    def _unigram_ids(self, distinct: tf.Tensor) -> tf.Tensor:
        """``[distinct]`` int64: each word's hashed unigram token."""
        return tf.strings.to_hash_bucket_fast(tf.strings.join([_UNIGRAM_PREFIX, distinct]), self.config.num_buckets)

    def _bigram_ids(self, words: tf.RaggedTensor) -> tf.RaggedTensor:
        """``[batch, (words - 1)]`` int64: hashed adjacent word pairs, one per occurrence."""
        bigrams = tf.strings.ngrams(words, 2, separator=" ")
        return bigrams.with_flat_values(tf.strings.to_hash_bucket_fast(
            tf.strings.join([_BIGRAM_PREFIX, bigrams.flat_values]), self.config.num_buckets))

    def _bags(self, texts: tf.Tensor) -> tuple[tf.RaggedTensor, tf.RaggedTensor]:
        """Bags of hashed tokens.

        Args:
            texts: ``[batch]`` tf.string.

        Returns:
            ``(ids, counts)``: ``[batch, None]`` int64 ids, unique within each row in order of first
            appearance, and ``[batch, None]`` float32 counts.
        """
        tokens = self.token_ids(texts)
        hashed = tokens.flat_values
        rows = tokens.value_rowids()
        # One unique over (row, id) keys dedups within rows in a single vectorised op; rows stay
        # contiguous because unique keeps first-appearance order and the keys arrive row by row.
        keys = rows * self.config.num_buckets + hashed
        unique_keys, _, counts = tf.unique_with_counts(keys, out_idx=tf.int64)
        nrows = tokens.nrows()
        ids = tf.RaggedTensor.from_value_rowids(
            unique_keys % self.config.num_buckets, unique_keys // self.config.num_buckets, nrows=nrows
        )
        weights = tf.RaggedTensor.from_value_rowids(
            tf.cast(counts, tf.float32), unique_keys // self.config.num_buckets, nrows=nrows
        )
        return ids, weights

    def bags_numpy(self, texts: Sequence[str | bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Eager convenience for Beam DoFns and tests.

        Args:
            texts: ``n`` texts (``str`` or UTF-8 ``bytes``; invalid bytes are replaced, not fatal).

        Returns:
            ``n`` pairs ``(ids int64 [m], counts float32 [m])``.
        """
        if len(texts) == 0:
            return []
        raw = [t.encode("utf-8", "surrogatepass") if isinstance(t, str) else bytes(t) for t in texts]
        ids, counts = self.bags(tf.constant(raw, dtype=tf.string))
        splits = ids.row_splits.numpy()
        id_values = ids.flat_values.numpy()
        count_values = counts.flat_values.numpy()
        return [
            (id_values[start:end], count_values[start:end])
            for start, end in zip(splits[:-1], splits[1:], strict=True)
        ]
