"""unicode_words / token_bag / TokenBagger: the pure-Python featurizer equals the TF graph on any text it accepts."""

from __future__ import annotations

import csv
import random
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dssm.features import _NON_WORD as NON_WORD_PATTERN
from dssm.features import FeatureConfig, Featurizer
from dssm.hashing import TokenBagger, token_bag, unicode_words

import tensorflow as tf  # noqa: E402  isort: skip

ROOT = Path(__file__).resolve().parents[1]
QUORA = ROOT.parent / "shared" / "datasets" / "quora-dev" / "pairs.tsv"
CONFIG = FeatureConfig(num_buckets=1 << 12, max_chars=60)


def graph_words(featurizer: Featurizer, texts: list[str]) -> list[list[str]]:
    spaced = tf.strings.regex_replace(featurizer.normalize(tf.constant(texts)), NON_WORD_PATTERN, " ")
    return [[w.decode("utf-8") for w in row] for row in tf.strings.split(tf.strings.strip(spaced)).to_list()]


def assert_same_bags(ours: list[tuple[np.ndarray, np.ndarray]], graph: list[tuple[np.ndarray, np.ndarray]],
                     texts: list[str]) -> None:
    for (ids, counts), (want_ids, want_counts), text in zip(ours, graph, texts, strict=True):
        assert ids.dtype == np.int64 and counts.dtype == np.float32
        assert ids.tolist() == want_ids.tolist() and counts.tolist() == want_counts.tolist(), repr(text)


def test_every_assigned_code_point_splits_like_the_graph_and_unassigned_ones_are_declined() -> None:
    featurizer = Featurizer(FeatureConfig())
    config = FeatureConfig()
    assigned = [c for c in range(0x80, 0x110000)
                if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")]
    # Private-use code points: a sample (they have no properties to get wrong, and there are 137k).
    assigned += [c for c in range(0xE000, 0xF900, 97)] + [c for c in range(0xF0000, 0x10FFFE, 997)]
    mismatched = []
    for start in range(0, len(assigned), 50_000):
        chunk = assigned[start:start + 50_000]
        # Each character inside a word, alone, doubled, and next to ASCII (NFKC composes across them).
        texts = [f"ab{chr(c)}cd {chr(c)} x{chr(c)}{chr(c)}Y" for c in chunk]
        for c, text, want in zip(chunk, texts, graph_words(featurizer, texts), strict=True):
            if unicode_words(text, config) != want:
                mismatched.append(hex(c))
    assert not mismatched, mismatched[:20]
    for unassigned in ("\u0cf3", "\U00011f00", "\U0001fbfa", "\ud800"):  # newer than Python's tables; a surrogate
        assert unicode_words(f"word {unassigned} word", config) is None
        assert token_bag(f"word {unassigned}", config) is None


def _mixed_texts(n: int, seed: int) -> list[str]:
    """Texts mixing scripts, combining marks, compatibility forms, ignorables and case pairs."""
    rng = random.Random(seed)
    pools = [
        "abcXYZ019 ,.-'\t",
        "éÉèñÑüÜßẞçÇøØåÅæÆœŒıİĳﬁﬂﬀ",  # case folding that changes length, ligatures
        "\u0301\u0308\u0327\u20dd\u0345",  # combining marks (composition with the letter before)
        "가각갂힣\u1100\u1161\u11a8",  # precomposed Hangul and conjoining jamo
        "ＡＢｃ１２３！＂ｶﾅ㌀㍿①⑴½",  # fullwidth, halfwidth, squared and circled forms
        "\u00ad\u200b\u200d\u2060\ufe0f\ufeff\u034f\u180b",  # default ignorables
        "ΣσςὈὀᾈᾀΐ",  # Greek final sigma and iota subscripts
        "русскийТЕКСТ中文日本語हिन्दीالعربيةעברית",
        "\u2028\u3000\u00a0\x00\x07",  # separators and controls
    ]
    texts = []
    for _ in range(n):
        length = rng.randint(0, 80)
        texts.append("".join(rng.choice(rng.choice(pools)) for _ in range(length)))
    return texts


@pytest.mark.parametrize("config", [CONFIG, FeatureConfig(num_buckets=97, word_bigrams=False, max_chars=7),
                                    FeatureConfig(num_buckets=2**31, word_unigrams=False)])
def test_mixed_unicode_texts_get_the_graphs_bags(config: FeatureConfig) -> None:
    texts = _mixed_texts(3000, seed=config.max_chars)
    featurizer = Featurizer(config)
    bagger = TokenBagger(config)
    assert all(token_bag(t, config) is not None for t in texts)
    assert_same_bags(bagger.bags_numpy(texts), featurizer.bags_numpy(texts), texts)
    # The word cache gives the same answers on a second pass.
    assert_same_bags(bagger.bags_numpy(texts[::-1]), featurizer.bags_numpy(texts[::-1]), texts[::-1])
    # The query tower's cached bag: the same ids with the same counts.
    for text, (ids, counts) in zip(texts, featurizer.bags_numpy(texts), strict=True):
        assert Counter(bagger.bag_ids(text).tolist()) == dict(zip(ids.tolist(), counts.tolist(), strict=True))


def test_quora_texts_including_every_non_ascii_one_get_the_graphs_bags() -> None:
    rows = list(csv.DictReader(open(QUORA, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    texts = [t for r in rows for t in (r["text1"], r["text2"])]
    non_ascii = [t for t in texts if not t.isascii()]
    assert len(non_ascii) > 50
    sample = non_ascii + texts[:2000]
    assert_same_bags(TokenBagger(FeatureConfig()).bags_numpy(sample), Featurizer(FeatureConfig()).bags_numpy(sample),
                     sample)


def test_declined_texts_go_to_the_graph_and_the_rest_stays_in_python() -> None:
    texts = ["plain words", "caf\u00e9 au lait", "new \u0cf3 letter", "lone \ud800 surrogate", ""]
    bagger = TokenBagger(CONFIG)
    bags = bagger.bags(texts)
    assert isinstance(bags[0][0], list) and isinstance(bags[1][0], list)  # Python's lists
    assert isinstance(bags[2][0], np.ndarray) and isinstance(bags[3][0], np.ndarray)  # the graph's arrays
    assert_same_bags(bagger.bags_numpy(texts), Featurizer(CONFIG).bags_numpy(texts), texts)


def test_the_bagger_never_imports_tensorflow_for_text_python_can_featurize() -> None:
    code = ("import sys; from dssm.hashing import TokenBagger, FeatureConfig; "
            "bags = TokenBagger(FeatureConfig()).bags(['caf\\u00e9 \\u4e2d\\u6587', 'plain text', '\\uff21\\uff22']); "
            "assert len(bags) == 3 and all(len(ids) for ids, _ in bags); "
            "sys.exit(3 if 'tensorflow' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
