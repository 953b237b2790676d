"""Measure hash collisions of the featurizer's tokens, to pick the default ``num_buckets``.

For each corpus, counts every token the featurizer hashes (letter trigrams, word unigrams, word
bigrams). For each bucket count it reports the share of token *occurrences* whose bucket also holds a
more frequent token (those occurrences are "dominated": their learned vector mostly serves the other
token), overall and per token kind, plus the float32 embedding-table size at width 300.

    python bench/num_buckets.py [DATASET_DIR ...]   (default: ../shared/datasets/{quora-dev,cranfield,cisi})
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import numpy as np

import dssm  # noqa: F401
from dssm.features import FeatureConfig, Featurizer

import tensorflow as tf  # noqa: E402  isort: skip

KINDS = ("trigram", "unigram", "bigram")
POWERS = range(15, 22)


def token_counts(corpus: Path) -> collections.Counter:
    featurizer = Featurizer(FeatureConfig(num_buckets=2))
    texts = []
    with open(corpus) as handle:
        for line in handle:
            doc = json.loads(line)
            texts.append(f"{doc.get('title', '')} {doc['text']}")
    counts: collections.Counter = collections.Counter()
    for start in range(0, len(texts), 2048):
        counts.update(featurizer.tokens(tf.constant(texts[start:start + 2048])).flat_values.numpy().tolist())
    return counts


def dominated_shares(counts: collections.Counter) -> dict:
    tokens = list(counts)
    freq = np.array([counts[t] for t in tokens], dtype=np.float64)
    kind = np.array([0 if not t.startswith(b"\x01") else (1 if t[1:2] == b"u" else 2) for t in tokens])
    row = {"distinct": {k: int((kind == i).sum()) for i, k in enumerate(KINDS)}}
    for power in POWERS:
        ids = tf.strings.to_hash_bucket_fast(tf.constant(tokens), 2**power).numpy()
        order = np.lexsort((-freq, ids))  # by bucket, most frequent first
        first = np.r_[True, ids[order][1:] != ids[order][:-1]]
        dominated = np.ones(len(tokens), dtype=bool)
        dominated[order[first]] = False
        shares = {"all": freq[dominated].sum() / freq.sum()}
        shares.update({k: freq[dominated & (kind == i)].sum() / freq[kind == i].sum() for i, k in enumerate(KINDS)})
        row[f"2^{power}"] = {**{k: round(float(v), 4) for k, v in shares.items()},
                             "table_MB_at_300": round(2**power * 300 * 4 / 1e6)}
    return row


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    dirs = [Path(a) for a in sys.argv[1:]] or [
        root / "../shared/datasets" / n for n in ("quora-dev", "cranfield", "cisi")]
    results = {d.name: dominated_shares(token_counts(d / "corpus.jsonl")) for d in dirs}
    print(json.dumps(results, indent=1))
    print("\nshare of token occurrences dominated by a collision (all kinds / trigrams)")
    print(f"{'dataset':<12}" + "".join(f"{'2^' + str(p):>14}" for p in POWERS))
    for name, row in results.items():
        print(f"{name:<12}" + "".join(f"{row[f'2^{p}']['all']:>8.3f}/{row[f'2^{p}']['trigram']:.3f}" for p in POWERS))
    print(f"{'table MB':<12}" + "".join(f"{2**p * 1200 // 10**6:>14}" for p in POWERS))


main()
