"""Training throughput in pairs/s: our train step vs a naive Keras DSSM of the same shape.

Both sides train the default tower (embedding bag 300 → 300 → 128, tanh, shared towers, in-batch
softmax) at batch 1024 on the same pre-featurized quora-dev pairs (all 10,000 rows, labels ignored:
throughput does not depend on them), hashed with the default ``FeatureConfig``. The figure is
pairs per wall-clock second over whole passes through the batches, after a warm-up pass.

* ours: :class:`dssm.model.DSSMModel` with the default optimizer (``TrainConfig().optimizer``);
* peer: the textbook Keras version: ``tf.nn.embedding_lookup_sparse`` for the bag and Keras' Adam,
  whose sparse update still decays the moments of the whole ``[num_buckets, 300]`` table every step.

``--pipeline`` also times :func:`dssm.train.train` end to end from GZIP TFRecord shards (parsing,
shuffling, batching included) for two epochs and reports the second epoch's pairs/s.

    python bench/train_throughput.py [--batch-size 1024] [--repeats 5] [--pipeline] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dssm  # noqa: E402, F401
from bench.harness import DATASETS, Figure, Stats, machine_facts  # noqa: E402

__all__ = ["run", "main"]


def _pairs() -> list[tuple[str, str, str]]:
    with open(DATASETS / "quora-dev" / "pairs.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["text1"], r["text2"], r["id"]) for r in rows]


def _batches(featurizer, pairs, batch_size: int):  # noqa: ANN001, ANN202 - TF objects
    import tensorflow as tf

    batches = []
    for start in range(0, len(pairs) - batch_size + 1, batch_size):
        chunk = pairs[start:start + batch_size]
        q_ids, q_counts = featurizer.bags(tf.constant([p[0] for p in chunk]))
        d_ids, d_counts = featurizer.bags(tf.constant([p[1] for p in chunk]))
        batches.append({"query_ids": q_ids, "query_counts": q_counts, "document_ids": d_ids,
                        "document_counts": d_counts, "document_id": tf.constant([p[2] for p in chunk])})
    return batches


def _naive_step(model_config, feature_config):  # noqa: ANN001, ANN202
    """The straightforward Keras DSSM: embedding_lookup_sparse + Dense layers + Adam."""
    import tensorflow as tf

    table = tf.Variable(tf.random.truncated_normal([feature_config.num_buckets, model_config.embedding_dim],
                                                   stddev=model_config.embedding_init_stddev))
    bias = tf.Variable(tf.zeros([model_config.embedding_dim]))
    dense = [tf.keras.layers.Dense(d, activation="tanh") for d in model_config.hidden_dims]
    optimizer = tf.keras.optimizers.Adam(1e-3)

    def tower(ids, counts):  # noqa: ANN001, ANN202
        x = tf.nn.embedding_lookup_sparse(table, ids.to_sparse(), counts.to_sparse(), combiner="sum")
        x = tf.tanh(x + bias)
        for layer in dense:
            x = layer(x)
        return tf.math.l2_normalize(x, axis=-1)

    @tf.function
    def step(batch):  # noqa: ANN001, ANN202
        with tf.GradientTape() as tape:
            q = tower(batch["query_ids"], batch["query_counts"])
            d = tower(batch["document_ids"], batch["document_counts"])
            logits = tf.matmul(q, d, transpose_b=True) / model_config.temperature
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.range(tf.shape(q)[0]), logits))
        variables = [table, bias] + [v for layer in dense for v in layer.trainable_variables]
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    return step


def _time_passes(step, batches, *, repeats: int) -> tuple[Stats, Stats]:  # noqa: ANN001
    """``(pairs per wall second, pairs per CPU second of this process)`` over ``repeats`` passes.

    The machine is shared: wall-clock rates fall when other jobs run; CPU seconds consumed by this
    process move less (but include the thread pool's spin-waiting), so both are reported.
    """
    import statistics

    for batch in batches[:2]:
        step(batch)  # trace + first touch of the table
    pairs = sum(int(b["query_ids"].nrows()) for b in batches)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            loss = step(batch)
        float(loss["loss"] if isinstance(loss, dict) else loss)
        wall.append(pairs / (time.perf_counter() - start))
        cpu.append(pairs / (time.process_time() - start_cpu))
    return (Stats(statistics.median(wall), min(wall), max(wall), len(wall)),
            Stats(statistics.median(cpu), min(cpu), max(cpu), len(cpu)))


def measure_step(*, batch_size: int = 1024, repeats: int = 5, naive: bool = True,
                 mixed_precision: bool = False) -> dict[str, Stats]:
    """pairs/s (wall and per CPU second) of our train step and the naive peer's, on in-memory batches."""
    from dssm.features import FeatureConfig, Featurizer
    from dssm.model import ModelConfig
    from dssm.train import TrainConfig, build_model

    import tensorflow as tf  # noqa: E402  isort: skip

    tf.keras.utils.set_random_seed(0)
    feature_config, model_config = FeatureConfig(), ModelConfig()
    train_config = TrainConfig(mixed_precision=mixed_precision)
    batches = _batches(Featurizer(feature_config), _pairs(), batch_size)
    model = build_model(model_config, feature_config, train_config)
    out = {}
    out["ours"], out["ours_per_cpu_second"] = _time_passes(tf.function(model.train_step), batches, repeats=repeats)
    if naive:
        out["naive"], out["naive_per_cpu_second"] = _time_passes(_naive_step(model_config, feature_config), batches,
                                                                  repeats=max(1, repeats // 2))
    return out


def measure_pipeline(*, batch_size: int = 1024) -> float:
    """pairs/s of the second epoch of ``dssm.train.train`` from shards written by ``dssm pairs``."""
    from dssm.model import ModelConfig
    from dssm.train import TrainConfig, train
    from pipelines import make_pairs

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        source = DATASETS / "quora-dev" / "pairs.tsv"
        make_pairs.run(["--input", str(source), "--format", "quora", "--output", f"{tmp}/pairs"])
        _, history = train(f"{tmp}/pairs", model_config=ModelConfig(),
                           train_config=TrainConfig(epochs=2, batch_size=batch_size, validation=False, verbose=0))
        return history["pairs_per_sec"][-1]


def run(*, quick: bool) -> list[Figure]:
    """Figures for ``python -m bench`` (a ``part_train`` module can return this)."""
    stats = measure_step(repeats=2 if quick else 5)
    return [Figure("train", "train step, batch 1024, default tower (CPU)", "pairs/s", stats["ours"],
                   "naive Keras (embedding_lookup_sparse + Adam)", stats["naive"])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-naive", action="store_true", help="skip the naive Keras peer")
    parser.add_argument("--pipeline", action="store_true", help="also time train() from shards")
    parser.add_argument("--mixed-precision", action="store_true", help="our step in mixed_bfloat16 (CPU)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    stats = measure_step(batch_size=args.batch_size, repeats=args.repeats, naive=not args.no_naive,
                         mixed_precision=args.mixed_precision)
    result = {"batch_size": args.batch_size, "mixed_precision": args.mixed_precision,
              "load_average": os.getloadavg(), "machine": machine_facts(),
              **{k: v.to_dict() for k, v in stats.items()}}
    if args.pipeline:
        result["pipeline_pairs_per_sec"] = measure_pipeline(batch_size=args.batch_size)
    print(f"{'':<22} {'median':>10} {'min':>10} {'max':>10}   pairs/s, batch {args.batch_size}")
    for name, s in stats.items():
        print(f"{name:<22} {s.median:>10,.0f} {s.min:>10,.0f} {s.max:>10,.0f}")
    if "pipeline_pairs_per_sec" in result:
        print(f"train() from shards, epoch 2: {result['pipeline_pairs_per_sec']:,.0f} pairs/s")
    print(f"load average during the run: {result['load_average']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
