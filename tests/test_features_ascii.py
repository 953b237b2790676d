"""ascii_buckets / ascii_bag: the single-query fast path's pure-Python featurizer equals the TF graph on ASCII."""

from __future__ import annotations

import functools
import random
import string
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dssm.features import FeatureConfig, Featurizer, ascii_buckets
from dssm.hashing import TokenBagger

import tensorflow as tf  # noqa: E402  isort: skip

# Small max_chars so long texts are cut; the other configs switch the word n-grams off.
CONFIGS = [
    FeatureConfig(num_buckets=1 << 12, max_chars=50),
    FeatureConfig(num_buckets=1 << 17, word_unigrams=False, word_bigrams=False),
    FeatureConfig(num_buckets=97, word_unigrams=True, word_bigrams=False, max_chars=7),
    FeatureConfig(num_buckets=2**31, word_unigrams=False, word_bigrams=True),
]
# Every ASCII character, weighted towards letters, digits and separators so texts have words.
ALPHABET = string.ascii_letters + string.digits + "     " + "".join(map(chr, range(128)))


def ascii_bag(text: str, config: FeatureConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """``Featurizer.bags``'s row for one text, from :func:`ascii_buckets` (ids in first-appearance order, counts)."""
    buckets = ascii_buckets(text, config)
    if buckets is None:
        return None
    counts = Counter(buckets.tolist())  # insertion-ordered: first appearance, like tf.unique_with_counts
    return (np.fromiter(counts.keys(), np.int64, len(counts)),
            np.fromiter(counts.values(), np.float32, len(counts)))


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "\t\n", "a", "A b C", "x" * 120, "word " * 30, "\x00\x07 control\x7f", "don't-stop_now",
             "ab12 34cd 5", "!!!", "a  a  a a"]
    for _ in range(n):
        length = rng.choice([1, 3, 10, 40, 80])
        texts.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, length))))
    return texts


@functools.cache
def _bagger(config: FeatureConfig) -> TokenBagger:
    return TokenBagger(config)  # one per config: its word cache is reused across texts


@functools.cache
def _featurizer(config: FeatureConfig) -> Featurizer:
    return Featurizer(config)  # one per config: a new Featurizer retraces its tf.function


def _assert_same_bags(config: FeatureConfig, texts: list[str]) -> None:
    featurizer = _featurizer(config)
    tokens = featurizer.tokens(tf.constant([t.encode() for t in texts]))
    hashed = tf.strings.to_hash_bucket_fast(tokens, config.num_buckets).to_list()
    for text, buckets in zip(texts, hashed, strict=True):  # every token, in the graph's order
        got = ascii_buckets(text, config)
        assert got is not None and got.dtype == np.int64 and got.tolist() == buckets, text
        bag = _bagger(config).bag_ids(text)  # the query tower's cached form: the same multiset, grouped by word
        assert bag is not None and bag.dtype == np.int64 and sorted(bag.tolist()) == sorted(buckets), text
    expected = featurizer.bags_numpy(texts)
    for text, (ids, counts) in zip(texts, expected, strict=True):
        got = ascii_bag(text, config)
        assert got is not None, text
        assert got[0].dtype == np.int64 and got[1].dtype == np.float32
        assert got[0].tolist() == ids.tolist(), text  # same ids in the same (first-appearance) order
        assert got[1].tolist() == counts.tolist(), text


@pytest.mark.parametrize("config", CONFIGS, ids=["cut50", "trigrams-only", "unigrams-cut7", "bigrams-2^31"])
def test_equals_the_graph_on_random_ascii(config: FeatureConfig) -> None:
    _assert_same_bags(config, _random_texts(800, seed=config.num_buckets))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(max_codepoint=127), max_size=80), min_size=1, max_size=20))
def test_equals_the_graph_on_generated_ascii(texts: list[str]) -> None:
    _assert_same_bags(CONFIGS[0], texts)


def test_repeated_tokens_are_counted_once_per_id() -> None:
    ids, counts = ascii_bag("abc abc", CONFIGS[0])
    # "#ab abc bc#" twice, "abc" as a word twice, the bigram "abc abc" once (no collisions in 4096 here).
    assert sorted(counts.tolist()) == [1.0, 2.0, 2.0, 2.0, 2.0] and len(set(ids.tolist())) == len(ids)


@pytest.mark.parametrize("text", ["café", "ＨＥＬＬＯ", "naïve text", "emoji 🙂", "\u00a0nbsp", "\udcff"])
def test_declines_non_ascii(text: str) -> None:
    assert ascii_bag(text, CONFIGS[0]) is None and ascii_buckets(text, CONFIGS[0]) is None


def test_declines_non_strings() -> None:
    assert ascii_bag(b"bytes", CONFIGS[0]) is None  # type: ignore[arg-type]
