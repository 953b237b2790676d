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

:func:`ascii_buckets` is the same computation in plain Python for one ASCII
text (FarmHash64 from the ``pyfarmhash`` package is the hash ``to_hash_bucket_fast`` computes): one
query through the TF graph costs ~0.6 ms, mostly per-call and per-op overhead; these ~50 us. They
decline (``None``) any non-ASCII text, whose Unicode normalisation only the graph does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import farmhash
import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.config import field
from dssm.errors import ConfigError

import tensorflow as tf  # noqa: E402  isort: skip
import tensorflow_text as tf_text  # noqa: E402  isort: skip

__all__ = ["FeatureConfig", "Featurizer", "ascii_buckets", "ascii_words"]

# \x01 never survives step 3 (it is not a letter or digit), so no trigram or word can equal these.
_UNIGRAM_PREFIX = "\x01u"
_BIGRAM_PREFIX = "\x01b"
_NON_WORD = r"[^\p{L}\p{N}\p{M}]+"
# _NON_WORD's complement on case-folded ASCII: the only ASCII letters left are a-z, the digits are 0-9,
# and no ASCII character is a combining mark.
_ASCII_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class FeatureConfig:
    """How texts are hashed. Saved as ``features.json`` beside every artifact that depends on it."""

    num_buckets: int = field(
        2**17,
        "hash buckets shared by trigrams and word n-grams. 2^17 leaves about 3% of token occurrences "
        "(0.6% of trigram occurrences) sharing a bucket with a more frequent token on quora-dev, cisi and "
        "cranfield, for a 157 MB table at width 300; 2^16 doubles that share, 2^18 doubles the table "
        "(python bench/num_buckets.py)",
    )
    word_unigrams: bool = field(True, "also hash whole words into the same space")
    word_bigrams: bool = field(True, "also hash adjacent word pairs into the same space")
    max_chars: int = field(20000, "texts are cut to this many characters before hashing")

    def __post_init__(self) -> None:
        if not 2 <= self.num_buckets <= 2**31:
            raise ConfigError(f"num_buckets must be in [2, 2^31], got {self.num_buckets}")
        if self.max_chars < 1:
            raise ConfigError(f"max_chars must be positive, got {self.max_chars}")


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
        valid = tf.strings.unicode_transcode(
            texts, input_encoding="UTF-8", output_encoding="UTF-8", errors="replace",
            replace_control_characters=False,
        )
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
        spaced = tf.strings.regex_replace(self.normalize(texts), _NON_WORD, " ")
        words = tf.strings.split(tf.strings.strip(spaced))  # [batch, (words)]
        wrapped = tf.strings.join(["#", words, "#"])
        chars = tf.strings.unicode_split(wrapped, "UTF-8")  # [batch, (words), (chars)]
        trigrams = tf.strings.ngrams(chars, 3, separator="")  # [batch, (words), (trigrams)]
        parts = [trigrams.merge_dims(1, 2)]
        if self.config.word_unigrams:
            parts.append(tf.strings.join([_UNIGRAM_PREFIX, words]))
        if self.config.word_bigrams:
            parts.append(tf.strings.join([_BIGRAM_PREFIX, tf.strings.ngrams(words, 2, separator=" ")]))
        return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]

    def _bags(self, texts: tf.Tensor) -> tuple[tf.RaggedTensor, tf.RaggedTensor]:
        """Bags of hashed tokens.

        Args:
            texts: ``[batch]`` tf.string.

        Returns:
            ``(ids, counts)``: ``[batch, None]`` int64 ids, unique within each row in order of first
            appearance, and ``[batch, None]`` float32 counts.
        """
        tokens = self.tokens(texts)
        hashed = tf.strings.to_hash_bucket_fast(tokens.flat_values, self.config.num_buckets)
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


def ascii_words(text: str, config: FeatureConfig) -> list[str] | None:
    """The words ``Featurizer.tokens`` splits one ASCII text into, without TensorFlow (``None`` if not ASCII).

    On ASCII, NFKC is the identity, case folding is ``str.lower`` and the non-word runs the graph
    splits on are everything but ``[a-z0-9]``; the cut to ``max_chars`` counts bytes = characters.
    """
    if not isinstance(text, str) or not text.isascii():
        return None
    return _ASCII_WORD.findall(text[:config.max_chars].lower())


def ascii_buckets(text: str, config: FeatureConfig) -> np.ndarray | None:
    """The bucket of every token ``Featurizer.tokens`` gives one ASCII text, without TensorFlow.

    On ASCII the graph's steps reduce to Python string operations: invalid UTF-8 cannot occur and
    control characters are kept by the transcode (then split on like any non-word character);
    NFKC is the identity and case folding is ``str.lower``; cutting counts characters, which are
    bytes. ``tests/test_features_ascii.py`` checks the equality on random ASCII texts.

    Args:
        text: the text; a non-``str`` or a text with any non-ASCII character gives ``None``.
        config: the hashing (the model's ``features``).

    Returns:
        ``[tokens]`` int64 bucket ids in the graph's token order, repeats kept (the query tower sums
        rows, so it needs no counting); ``None`` when the caller must use the graph.
    """
    words = ascii_words(text, config)
    if words is None:
        return None
    tokens = [wrapped[i:i + 3] for wrapped in ["#" + w + "#" for w in words] for i in range(len(wrapped) - 2)]
    if config.word_unigrams:
        tokens += [_UNIGRAM_PREFIX + w for w in words]
    if config.word_bigrams:
        tokens += [f"{_BIGRAM_PREFIX}{a} {b}" for a, b in zip(words[:-1], words[1:], strict=True)]
    hashes = np.fromiter(map(farmhash.fingerprint64, tokens), np.uint64, len(tokens))
    return (hashes % np.uint64(config.num_buckets)).astype(np.int64)

