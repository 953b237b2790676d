"""The hashing settings and its pure-Python form: what queries and Beam workers need without TensorFlow.

:class:`FeatureConfig` says how texts are hashed (saved beside every artifact). The TensorFlow
featurizer (:class:`dssm.features.Featurizer`, the one implementation training and the SavedModel
run) lives in :mod:`dssm.features`; :func:`ascii_buckets` (ASCII), :meth:`TokenBagger.bag_ids` (the
query hot path: a word-cached bag) and :func:`token_bag` (any text) are the same computation in plain
Python (FarmHash64 from the ``pyfarmhash`` package is the hash ``tf.strings.to_hash_bucket_fast``
computes). They decline (``None``) the rare text they cannot featurize exactly (see
:func:`unicode_words`), and :class:`TokenBagger` sends only those to the graph. This module imports
no TensorFlow, so the query path (:mod:`dssm.query_numpy`) and the pairs job's workers can run
without it.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import farmhash
import numpy as np

from dssm.config import field
from dssm.errors import ConfigError

__all__ = [
    "FeatureConfig", "UNIGRAM_PREFIX", "BIGRAM_PREFIX", "NON_WORD", "ascii_buckets", "ascii_words", "unicode_words",
    "text_buckets", "token_bag", "TokenBagger",
]

# \x01 never survives the split on non-word runs (it is not a letter or digit), so no trigram or word
# can equal these.
UNIGRAM_PREFIX = "\x01u"
BIGRAM_PREFIX = "\x01b"
NON_WORD = r"[^\p{L}\p{N}\p{M}]+"
# NON_WORD's complement on case-folded ASCII: the only ASCII letters left are a-z, the digits are 0-9,
# and no ASCII character is a combining mark.
_ASCII_WORD = re.compile(r"[a-z0-9]+")
# Default_Ignorable_Code_Point (Unicode's DerivedCoreProperties; stable since 6.x): NFKC_Casefold
# removes these, Python's NFKC and casefold() keep them. Some are marks or letters (variation
# selectors, Hangul fillers), so keeping them would change words.
_IGNORABLE_RANGES = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F),
    (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)
_IGNORABLE = {c: None for low, high in _IGNORABLE_RANGES for c in range(low, high + 1)}


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


@functools.lru_cache(maxsize=1 << 16)
def _fold_char(ch: str) -> str:
    """NFKC_Casefold's mapping of one character, fully decomposed (``""`` for an ignorable).

    ICU maps each character before it reorders combining marks: U+0345 (a mark that folds to the
    letter iota) must fold where it stands, so Python's NFKC cannot run first on the whole text.
    """
    folded = ch
    while True:  # to a fixed point: a folded character may decompose or fold again
        again = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", folded).casefold())
        if again == folded:
            return folded.translate(_IGNORABLE)
        folded = again


def unicode_words(text: str, config: FeatureConfig) -> list[str] | None:
    """The words ``Featurizer.tokens`` splits any text into, without TensorFlow (``None`` where not exact).

    The graph's steps in Python's :mod:`unicodedata`: cut to ``max_chars`` code points, ICU's
    NFKC_Casefold (each character's full case folding and compatibility decomposition, with the
    Default_Ignorable_Code_Points dropped, then canonical reordering and composition), cut again,
    then the runs of letters, digits and marks (``NON_WORD``'s complement). It declines a text with
    a lone surrogate (the graph would replace its invalid UTF-8) or any code point Python's Unicode
    database leaves unassigned (category ``Cn``): the graph's ICU and RE2 tables are newer, and every
    code point where the two disagree is one of those (``tests/test_features_unicode.py`` checks
    every code point, and mixed random texts).
    """
    if not isinstance(text, str):
        return None
    if text.isascii():
        return ascii_words(text, config)
    cut = text[:config.max_chars]
    categories = [unicodedata.category(ch) for ch in cut]
    if "Cn" in categories or "Cs" in categories:
        return None
    folded = unicodedata.normalize("NFKC", "".join(map(_fold_char, cut)))
    words, current = [], []
    for ch in folded[:config.max_chars]:
        if unicodedata.category(ch)[0] in "LNM":
            current.append(ch)
        elif current:
            words.append("".join(current))
            current = []
    if current:
        words.append("".join(current))
    return words


def _buckets(words: list[str], config: FeatureConfig) -> np.ndarray:
    """``[tokens]`` int64: trigrams of ``#word#``, then word unigrams and bigrams, hashed like the graph."""
    tokens = [wrapped[i:i + 3] for wrapped in ["#" + w + "#" for w in words] for i in range(len(wrapped) - 2)]
    if config.word_unigrams:
        tokens += [UNIGRAM_PREFIX + w for w in words]
    if config.word_bigrams:
        tokens += [f"{BIGRAM_PREFIX}{a} {b}" for a, b in zip(words[:-1], words[1:], strict=True)]
    hashes = np.fromiter(map(farmhash.fingerprint64, tokens), np.uint64, len(tokens))
    return (hashes % np.uint64(config.num_buckets)).astype(np.int64)


def _hash_word(word: str, num_buckets: int) -> tuple[list[int], int]:
    """``(buckets of the trigrams of #word#, bucket of the word as a unigram)``: what of :func:`_buckets`
    depends on one word alone, for :class:`TokenBagger`'s word cache."""
    wrapped = "#" + word + "#"
    return ([farmhash.fingerprint64(wrapped[i:i + 3]) % num_buckets for i in range(len(wrapped) - 2)],
            farmhash.fingerprint64(UNIGRAM_PREFIX + word) % num_buckets)


def _bigram_buckets(words: list[str], num_buckets: int) -> list[int]:
    fingerprint = farmhash.fingerprint64
    return [fingerprint(f"{BIGRAM_PREFIX}{a} {b}") % num_buckets for a, b in zip(words[:-1], words[1:], strict=True)]


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
    return None if words is None else _buckets(words, config)


def text_buckets(text: str, config: FeatureConfig) -> np.ndarray | None:
    """:func:`ascii_buckets` for any text :func:`unicode_words` accepts (``None`` where the graph must run)."""
    words = unicode_words(text, config)
    return None if words is None else _buckets(words, config)


def token_bag(text: str, config: FeatureConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """``Featurizer.bags``'s row for one text without TensorFlow, or ``None`` (see :func:`unicode_words`).

    Returns:
        ``(ids int64 [m], counts float32 [m])``: distinct buckets in order of first appearance (as
        ``tf.unique_with_counts`` gives them) and how often each occurs.
    """
    buckets = text_buckets(text, config)
    if buckets is None:
        return None
    ids, counts = _count(buckets.tolist())
    return np.asarray(ids, np.int64), np.asarray(counts, np.float32)


def _count(tokens: list[int]) -> tuple[list[int], list[float]]:
    """Distinct buckets in order of first appearance (as ``tf.unique_with_counts``) and their counts."""
    counts = Counter(tokens)  # insertion-ordered: first appearance
    # floats: protobuf's float list takes Python floats five times faster than ints
    return list(counts), list(map(float, counts.values()))


class TokenBagger:
    """``Featurizer.bags_numpy`` that imports TensorFlow only for a text :func:`token_bag` declines.

    A Beam worker featurizing ordinary text (any script Python's Unicode database knows) never loads
    TensorFlow, whose import is most of a worker's start-up; the graph featurizer is built on the
    first declined text and kept. Each word's trigram and unigram buckets are cached (words repeat:
    with the cache and Python lists, a Quora text costs ~22 µs instead of ~40); the cache is dropped
    when it reaches ``cache_words`` entries.

    Args:
        config: the hashing.
        cache_words: most words whose buckets are kept.
    """

    def __init__(self, config: FeatureConfig, *, cache_words: int = 200_000) -> None:
        self.config = config
        self._cache_words = cache_words
        self._words: dict[str, tuple[list[int], int]] = {}
        self._graph: Any = None

    def _word(self, word: str) -> tuple[list[int], int]:
        entry = _hash_word(word, self.config.num_buckets)
        if len(self._words) >= self._cache_words:
            self._words.clear()
        self._words[word] = entry
        return entry

    def bag_lists(self, text: str) -> tuple[list[int], list[float]] | None:
        """:func:`token_bag` as Python lists ``(ids, counts)``, or ``None`` (the graph must featurize it).

        The token order is :func:`_buckets`'s, built from cached per-word buckets. One builder for
        both made the query path's hashing (no cache, numpy modulo) 24 -> 31 µs per Quora question.
        """
        words = unicode_words(text, self.config)
        if words is None:
            return None
        cache = self._words
        entries = [cache.get(word) or self._word(word) for word in words]
        tokens = [bucket for trigrams, _ in entries for bucket in trigrams]
        if self.config.word_unigrams:
            tokens += [unigram for _, unigram in entries]
        if self.config.word_bigrams:
            tokens += _bigram_buckets(words, self.config.num_buckets)
        return _count(tokens)

    def bag_ids(self, text: str) -> np.ndarray | None:
        """:func:`text_buckets`'s ids as a bag, or ``None`` (the graph must featurize the text): the same
        ids with the same repeats, grouped by word, from the word cache.

        For a consumer that sums rows, where the order is irrelevant (the numpy query tower): a query
        costs a dictionary lookup per word plus its bigrams' hashes, about a third of
        :func:`text_buckets`'s time on 8–40-word queries.
        """
        words = unicode_words(text, self.config)
        if words is None:
            return None
        cache, unigrams = self._words, self.config.word_unigrams
        ids: list[int] = []
        for word in words:
            trigrams, unigram = cache.get(word) or self._word(word)
            ids += trigrams
            if unigrams:
                ids.append(unigram)
        if self.config.word_bigrams:
            ids += _bigram_buckets(words, self.config.num_buckets)
        return np.array(ids, dtype=np.int64)

    def bags(self, texts: Sequence[str]) -> list[tuple[Any, Any]]:
        """``n`` pairs ``(ids, counts)``: Python lists where Python featurized, numpy arrays from the graph."""
        bags: list[Any] = [self.bag_lists(text) for text in texts]
        missing = [i for i, bag in enumerate(bags) if bag is None]
        if missing:
            if self._graph is None:
                # deferred: TensorFlow, only for texts Python cannot featurize exactly
                from dssm.features import Featurizer
                self._graph = Featurizer(self.config)
            for i, bag in zip(missing, self._graph.bags_numpy([texts[i] for i in missing]), strict=True):
                bags[i] = bag
        return bags

    def bags_numpy(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``n`` pairs ``(ids int64 [m], counts float32 [m])``, equal to the graph's ``bags_numpy``."""
        return [(np.asarray(ids, np.int64), np.asarray(counts, np.float32)) for ids, counts in self.bags(texts)]
