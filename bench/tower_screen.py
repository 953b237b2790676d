"""Screen tower shapes of issue 11: the bag tower against a convolutional (C-DSSM) and an attention-pooled one.

``python -m bench.tower_screen --data BEIR_DIR --pairs PAIRS_TSV [--designs bag,attention,cnn,bag+cnn]
[--epochs 10] [--seed 0] [--out FILE.json]``

A controlled comparison, not the recipe: every design reads the same words hashed the same way
(each word's letter trigrams and the word itself, :func:`dssm.hashing.FeatureConfig`'s defaults, plus
the bigram starting at that word), starts from scratch (no pre-training), and trains on the same
batches with the same objective (in-batch softmax at temperature 0.1, accidental hits on the same
document masked), optimizer (Adagrad 0.05), batch (256) and fixed number of epochs. Only the pooling
differs:

* ``bag``: every token's row summed and divided by the square root of the token count, then
  300 → 128 tanh layers: the default tower's shape (``ModelConfig``'s ``sqrtn``).
* ``attention``: each word's vector (its tokens' rows summed) weighted by a learned additive
  attention (``v · tanh(W x)``, softmax over the text's words), then the same layers.
* ``cnn``: C-DSSM (Shen et al. 2014): a convolution of 300 filters over 3 consecutive word
  vectors, tanh, max over positions, then a 128 tanh layer.
* ``bag+cnn``: the bag's pooled vector plus the convolution's max-pooled one, then the bag's layers.

Queries: the labelled pairs' validation split (the rows ``dssm pairs`` would put there:
:func:`dssm.data.split_of` of the query; training data, so a choice may be made on it), each query's
relevant documents those its validation pairs name, searched exactly among the whole corpus; and,
described only, the BEIR directory's judged queries. Texts are cut to 24 words (queries) and 128
(documents): debian-dev's descriptions average ~56 words. Runs on the CPU (~9 s an epoch for
``bag``, ~18 s for ``attention`` and ~44 s for ``cnn`` on debian-dev's 24,892 training pairs here).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dssm.data import document_text, iter_rows, read_beir, split_of
from dssm.hashing import FeatureConfig, _bigram_buckets, _hash_word, unicode_words
from dssm.metrics import evaluate_run, exact_run, format_table, paired_randomization_test

__all__ = ["DESIGNS", "main"]

DESIGNS = ("bag", "attention", "cnn", "bag+cnn")
_QUERY_WORDS, _DOC_WORDS, _TOKENS_PER_WORD = 24, 128, 11


class _Words:
    """Texts as word ids ``[n, L]`` and bigram buckets ``[n, L]`` (0 pads); each word's token buckets in ``rows``."""

    def __init__(self, features: FeatureConfig) -> None:
        self.features = features
        self.index: dict[str, int] = {}
        self.rows: list[list[int]] = [[0] * _TOKENS_PER_WORD]

    def _word(self, word: str) -> int:
        found = self.index.get(word)
        if found is None:
            trigrams, unigram = _hash_word(word, self.features.num_buckets)
            tokens = [b + 1 for b in trigrams[:_TOKENS_PER_WORD - 1]] + [unigram + 1]
            found = self.index[word] = len(self.rows)
            self.rows.append(tokens + [0] * (_TOKENS_PER_WORD - len(tokens)))
        return found

    def encode(self, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        words = np.zeros((len(texts), length), np.int32)
        bigrams = np.zeros((len(texts), length), np.int32)
        for n, text in enumerate(texts):
            split = (unicode_words(text, self.features) or [])[:length]
            words[n, :len(split)] = [self._word(w) for w in split]
            if len(split) > 1:
                bigrams[n, :len(split) - 1] = np.asarray(_bigram_buckets(split, self.features.num_buckets)) + 1
        return words, bigrams


def _tower(design: str, *, word_rows: np.ndarray, num_buckets: int) -> Any:
    import tensorflow as tf

    rows_of = tf.constant(word_rows)

    class Tower(tf.keras.Model):
        def __init__(self) -> None:
            super().__init__()
            init = tf.keras.initializers.TruncatedNormal(stddev=0.05)
            self.table = tf.Variable(init((num_buckets + 1, 300)), name="table")
            self.conv = tf.keras.layers.Conv1D(300, 3, padding="same", activation="tanh") if "cnn" in design else None
            self.attend = (tf.keras.layers.Dense(128, "tanh"), tf.keras.layers.Dense(1, use_bias=False)
                           ) if design == "attention" else None
            widths = (128,) if design == "cnn" else (300, 128)
            self.layers_ = [tf.keras.layers.Dense(w, "tanh") for w in widths]

        def call(self, words: Any, bigrams: Any) -> Any:
            distinct, where = tf.unique(tf.reshape(words, [-1]))
            tokens = tf.gather(rows_of, distinct)  # [distinct words, tokens per word]
            per_word = tf.reduce_sum(tf.gather(self.table, tokens) * tf.cast(tokens > 0, tf.float32)[..., None], 1)
            x = tf.reshape(tf.gather(per_word, where), tf.concat([tf.shape(words), [-1]], 0))  # [b, L, 300]
            x += tf.gather(self.table, bigrams) * tf.cast(bigrams > 0, tf.float32)[..., None]
            mask = tf.cast(words > 0, tf.float32)  # [b, L]
            count = (tf.reduce_sum(tf.cast(tf.gather(rows_of, words) > 0, tf.float32), [1, 2])
                     + tf.reduce_sum(tf.cast(bigrams > 0, tf.float32), 1))
            bag = tf.reduce_sum(x, 1) / tf.sqrt(tf.maximum(count, 1.0))[:, None]
            if self.attend is not None:
                logits = tf.squeeze(self.attend[1](self.attend[0](x)), -1) - 1e4 * (1.0 - mask)
                pooled = tf.reduce_sum((tf.nn.softmax(logits, -1) * mask)[..., None] * x, 1)
            elif self.conv is not None:
                best = tf.reduce_max(self.conv(x * mask[..., None]) - 1e4 * (1.0 - mask[..., None]), 1)
                best = tf.where(tf.reduce_sum(mask, 1, keepdims=True) > 0, best, 0.0)
                pooled = best + bag if design == "bag+cnn" else best
            else:
                pooled = bag
            for layer in self.layers_:
                pooled = layer(pooled)
            return tf.math.l2_normalize(pooled, -1)

    return Tower()


def _train(design: str, data: dict[str, Any], *, epochs: int, seed: int, words: _Words) -> tuple[Any, list[dict]]:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    tower = _tower(design, word_rows=np.asarray(words.rows, np.int32), num_buckets=words.features.num_buckets)
    optimizer = tf.keras.optimizers.Adagrad(0.05)

    @tf.function(reduce_retracing=True)
    def step(qw: Any, qb: Any, dw: Any, db: Any, keys: Any) -> Any:
        with tf.GradientTape() as tape:
            scores = tf.matmul(tower(qw, qb), tower(dw, db), transpose_b=True) / 0.1
            same = tf.equal(keys[:, None], keys[None, :]) & ~tf.eye(tf.shape(keys)[0], dtype=tf.bool)
            scores = tf.where(same, -1e9, scores)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.range(tf.shape(keys)[0]), scores))
        grads = tape.gradient(loss, tower.trainable_variables)
        optimizer.apply_gradients(zip(grads, tower.trainable_variables, strict=True))
        return loss

    rng = np.random.default_rng(seed)
    (qw, qb), (dw, db), keys = data["train_queries"], data["train_documents"], data["train_keys"]
    history = []
    for epoch in range(epochs):
        start, order, losses = time.perf_counter(), rng.permutation(len(keys)), []
        for i in range(0, len(order) - 255, 256):
            batch = order[i:i + 256]
            losses.append(float(step(qw[batch], qb[batch], dw[batch], db[batch], keys[batch])))
        history.append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4),
                        "seconds": round(time.perf_counter() - start, 1)})
        print(design, history[-1], flush=True)
    return tower, history


def _embed(tower: Any, encoded: tuple[np.ndarray, np.ndarray], *, batch: int = 512) -> np.ndarray:
    """``[n, 128]`` unit rows of the texts ``encoded`` (word ids, bigram buckets) holds."""
    import tensorflow as tf

    words, bigrams = encoded
    return np.concatenate([tower(tf.constant(words[i:i + batch]), tf.constant(bigrams[i:i + batch])).numpy()
                           for i in range(0, len(words), batch)])


def _load(data_dir: Path, pairs: Path, words: _Words, fraction: float) -> dict[str, Any]:
    beir = read_beir(data_dir)
    corpus, queries, qrels = beir.corpus, beir.queries, beir.qrels
    ids = list(corpus)
    position = {doc_id: str(i) for i, doc_id in enumerate(ids)}
    train_q, train_d, train_k, val = [], [], [], {}
    for record in iter_rows(pairs):
        row = record.fields
        if record.error or not row.get("query") or not row.get("document"):
            continue
        doc_id = str(row.get("doc_id"))
        if doc_id not in position:
            continue
        if split_of(str(row["query"]), validation_fraction=fraction) == "validation":
            val.setdefault(str(row["query"]), {})[position[doc_id]] = 1
        else:
            train_q.append(str(row["query"]))
            train_d.append(str(row["document"]))
            train_k.append(int(position[doc_id]))
    judged = [q for q in qrels if q in queries and any(d in position for d in qrels[q])]
    return {
        "corpus": words.encode([document_text(d.title, d.text) for d in corpus.values()], _DOC_WORDS),
        "train_queries": words.encode(train_q, _QUERY_WORDS), "train_documents": words.encode(train_d, _DOC_WORDS),
        "train_keys": np.asarray(train_k, np.int64),
        "val_ids": list(val), "val": words.encode(list(val), _QUERY_WORDS), "val_qrels": val,
        "eval_ids": judged, "eval": words.encode([queries[q] for q in judged], _QUERY_WORDS),
        "eval_qrels": {q: {position[d]: r for d, r in qrels[q].items() if d in position} for q in judged},
    }


def main(argv: list[str] | None = None) -> int:
    """Train each design on the pairs' training split, score both query sets, print and write the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.tower_screen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="BEIR directory: corpus, judged queries")
    parser.add_argument("--pairs", type=Path, required=True, help="labelled pairs: query, document, doc_id columns")
    parser.add_argument("--designs", default=",".join(DESIGNS), help=f"comma-separated, of {DESIGNS}")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validation-fraction", type=float, default=0.1, help="as `dssm pairs`'s")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    designs = [d for d in args.designs.split(",") if d]
    unknown = sorted(set(designs) - set(DESIGNS))
    if unknown:
        parser.error(f"unknown design(s) {unknown}; known: {DESIGNS}")
    words = _Words(FeatureConfig())
    data = _load(args.data, args.pairs, words, args.validation_fraction)
    print(f"{len(data['train_keys']):,} training pairs, {len(data['val_ids']):,} validation queries, "
          f"{len(data['eval_ids']):,} judged queries, {len(data['corpus'][0]):,} documents", flush=True)
    report: dict[str, Any] = {"data": str(args.data), "pairs": str(args.pairs), "epochs": args.epochs,
                              "seed": args.seed, "designs": {}}
    results = {"val": [], "eval": []}
    for design in designs:
        tower, history = _train(design, data, epochs=args.epochs, seed=args.seed, words=words)
        corpus = _embed(tower, data["corpus"])
        rows = [str(row) for row in range(len(corpus))]  # documents are named by their row, as the qrels name them
        entry: dict[str, Any] = {"history": history}
        for split in results:
            run = exact_run(data[f"{split}_ids"], _embed(tower, data[split]), rows, corpus, k=100)
            result = evaluate_run(design, run, data[f"{split}_qrels"], metrics=("ndcg@10", "mrr@10", "recall@10"))
            results[split].append(result)
            entry[split] = result.means
        report["designs"][design] = entry
    for split, label in (("val", "pairs' validation split (training data)"), ("eval", "judged queries (described)")):
        print(f"\n{label}:\n{format_table(results[split])}")
        base = results[split][0]
        for other in results[split][1:]:
            p = paired_randomization_test(base.per_query["mrr@10"], other.per_query["mrr@10"])
            report.setdefault("p_mrr@10", {})[f"{split}: {other.name} vs {base.name}"] = p
            print(f"p({other.name} vs {base.name}, mrr@10) = {p:.4g}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
