"""The featurizer: DSSM word hashing, determinism, and robustness to arbitrary Unicode."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dssm.errors import ConfigError
from dssm.features import FeatureConfig, Featurizer

import tensorflow as tf  # noqa: E402  isort: skip
import tensorflow_text as tf_text  # noqa: E402  isort: skip

SMALL = FeatureConfig(num_buckets=1 << 12)


@pytest.fixture(scope="module")
def featurizer() -> Featurizer:
    return Featurizer(SMALL)


def _tokens(featurizer: Featurizer, text: str) -> list[bytes]:
    return featurizer.tokens(tf.constant([text])).flat_values.numpy().tolist()


def test_letter_trigrams_follow_the_dssm_paper() -> None:
    trigrams_only = Featurizer(FeatureConfig(num_buckets=1 << 12, word_unigrams=False, word_bigrams=False))
    assert _tokens(trigrams_only, "word") == [b"#wo", b"wor", b"ord", b"rd#"]
    assert _tokens(trigrams_only, "a") == [b"#a#"]


def test_words_and_bigrams_are_added_with_prefixes(featurizer: Featurizer) -> None:
    tokens = _tokens(featurizer, "Good day")
    assert tokens[:8] == [b"#go", b"goo", b"ood", b"od#", b"#da", b"day", b"ay#"] + [b"\x01ugood"]
    assert tokens[8:] == [b"\x01uday", b"\x01bgood day"]


def test_normalisation_nfkc_casefold_and_punctuation(featurizer: Featurizer) -> None:
    # Full-width letters, a ligature and German sharp s fold to the same tokens as plain text.
    assert _tokens(featurizer, "ＨＥＬＬＯ, ﬁne STRASSE!") == _tokens(featurizer, "hello fine straße")
    assert _tokens(featurizer, "   ") == []


def test_bags_count_repeated_tokens(featurizer: Featurizer) -> None:
    ids, counts = featurizer.bags_numpy(["abc abc"])[0]
    tokens = _tokens(featurizer, "abc abc")
    hashed = tf.strings.to_hash_bucket_fast(tokens, SMALL.num_buckets).numpy()
    expected = {}
    for h in hashed:
        expected[int(h)] = expected.get(int(h), 0) + 1
    assert dict(zip(ids.tolist(), counts.tolist(), strict=True)) == expected
    assert len(set(ids.tolist())) == len(ids)
    # "#ab abc bc#" twice + unigram twice + one bigram
    assert counts.sum() == 9


def test_batch_rows_are_independent(featurizer: Featurizer) -> None:
    texts = ["first text", "", "second one here", "first text"]
    together = featurizer.bags_numpy(texts)
    for text, (ids, counts) in zip(texts, together, strict=True):
        alone_ids, alone_counts = featurizer.bags_numpy([text])[0]
        np.testing.assert_array_equal(ids, alone_ids)
        np.testing.assert_array_equal(counts, alone_counts)
    np.testing.assert_array_equal(together[0][0], together[3][0])


def test_ids_stay_in_range_and_invalid_utf8_is_replaced(featurizer: Featurizer) -> None:
    (ids, _), = featurizer.bags_numpy([b"caf\xc3\xa9 \xff\xfe broken"])
    assert ids.min() >= 0 and ids.max() < SMALL.num_buckets
    (clean_ids, _), = featurizer.bags_numpy(["broken"])
    assert set(clean_ids.tolist()) <= set(ids.tolist())


def test_max_chars_cuts_long_texts() -> None:
    featurizer = Featurizer(FeatureConfig(num_buckets=1 << 12, max_chars=10, word_bigrams=False))
    (_, counts), = featurizer.bags_numpy(["x" * 100_000])
    # "#xxxxxxxxxx#" → 10 trigrams, plus the unigram
    assert counts.sum() == 11


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="num_buckets"):
        FeatureConfig(num_buckets=1)
    with pytest.raises(ConfigError, match="max_chars"):
        FeatureConfig(max_chars=0)


_TEXTS = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=50).map(lambda s: s * 40),
    st.sampled_from(["", "😀🚀 emoji only", "مرحبا بالعالم", "שלום עולם", "\x00\x07\x1b[31m\u202e",
                     "a" * 100_000, "Ǆ ﬀ ⅻ ㎏ ①"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_TEXTS, min_size=1, max_size=4))
def test_arbitrary_unicode_never_crashes_and_is_deterministic(featurizer: Featurizer, texts: list[str]) -> None:
    first = featurizer.bags_numpy(texts)
    second = featurizer.bags_numpy(list(reversed(texts)))[::-1]
    assert len(first) == len(texts)
    for (ids_a, counts_a), (ids_b, counts_b) in zip(first, second, strict=True):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(counts_a, counts_b)
        assert ids_a.dtype == np.int64 and counts_a.dtype == np.float32
        assert ((ids_a >= 0) & (ids_a < SMALL.num_buckets)).all()
        assert (counts_a >= 1).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_TEXTS, min_size=1, max_size=4))
def test_token_ids_hash_the_tokens_in_order(featurizer: Featurizer, texts: list[str]) -> None:
    # token_ids makes the strings once per distinct word of the batch: repeated words across and
    # within texts must still give every occurrence its own ids, in the order tokens() lists them.
    batch = tf.constant([t.encode("utf-8", "surrogatepass") for t in texts + texts[:1] * 2])
    expected = tf.strings.to_hash_bucket_fast(featurizer.tokens(batch), SMALL.num_buckets)
    got = featurizer.token_ids(batch)
    np.testing.assert_array_equal(got.row_splits.numpy(), expected.row_splits.numpy())
    np.testing.assert_array_equal(got.flat_values.numpy(), expected.flat_values.numpy())


@pytest.mark.parametrize("unigrams,bigrams", [(False, False), (True, False), (False, True)])
def test_token_ids_follow_the_config(unigrams: bool, bigrams: bool) -> None:
    config = FeatureConfig(num_buckets=1 << 12, word_unigrams=unigrams, word_bigrams=bigrams)
    featurizer = Featurizer(config)
    batch = tf.constant(["the cat saw the cat", "", "cat"])
    expected = tf.strings.to_hash_bucket_fast(featurizer.tokens(batch), config.num_buckets)
    assert featurizer.token_ids(batch).to_list() == expected.to_list()


def test_normalize_transcodes_only_what_needs_it(featurizer: Featurizer) -> None:
    # ASCII skips the transcode; invalid bytes, non-ASCII and control characters must come out as
    # transcoding the whole batch would give them.
    batch = tf.constant([b"ab\xffc", b"Plain ASCII", "Éé ﬀ".encode(), b"\x00x\x1b", b"", b"\xc3", b"caf\xc3\xa9"])
    every = tf.strings.unicode_transcode(batch, input_encoding="UTF-8", output_encoding="UTF-8", errors="replace",
                                         replace_control_characters=False)
    expected = tf_text.case_fold_utf8(every)
    assert featurizer.normalize(batch).numpy().tolist() == expected.numpy().tolist()
    assert featurizer.normalize(batch).numpy()[0] == "ab\ufffdc".encode()
