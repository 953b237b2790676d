"""The hashing settings and its pure-Python form for ASCII text: what a query needs without TensorFlow.

:class:`FeatureConfig` says how texts are hashed (saved beside every artifact). The TensorFlow
featurizer (:class:`dssm.features.Featurizer`, the one implementation the pipelines, training and
the SavedModel run) lives in :mod:`dssm.features`; :func:`ascii_buckets` is the same computation in
plain Python for one ASCII text (FarmHash64 from the ``pyfarmhash`` package is the hash
``tf.strings.to_hash_bucket_fast`` computes). It declines (``None``) any non-ASCII text, whose
Unicode normalisation only the graph does. This module imports no TensorFlow, so the query path
(:mod:`dssm.query_numpy`) can run without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import farmhash
import numpy as np

from dssm.config import field
from dssm.errors import ConfigError

__all__ = ["FeatureConfig", "UNIGRAM_PREFIX", "BIGRAM_PREFIX", "NON_WORD", "ascii_buckets", "ascii_words"]

# \x01 never survives the split on non-word runs (it is not a letter or digit), so no trigram or word
# can equal these.
UNIGRAM_PREFIX = "\x01u"
BIGRAM_PREFIX = "\x01b"
NON_WORD = r"[^\p{L}\p{N}\p{M}]+"
# NON_WORD's complement on case-folded ASCII: the only ASCII letters left are a-z, the digits are 0-9,
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
        tokens += [UNIGRAM_PREFIX + w for w in words]
    if config.word_bigrams:
        tokens += [f"{BIGRAM_PREFIX}{a} {b}" for a, b in zip(words[:-1], words[1:], strict=True)]
    hashes = np.fromiter(map(farmhash.fingerprint64, tokens), np.uint64, len(tokens))
    return (hashes % np.uint64(config.num_buckets)).astype(np.int64)
