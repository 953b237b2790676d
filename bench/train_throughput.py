"""Training throughput in pairs/s: our trainer vs a naive Keras DSSM of the same shape.

Every figure trains the default tower (embedding bag 300 → 300 → 128, tanh, shared towers, in-batch
softmax, the default optimizer) at batch 1024 on quora-dev's pairs (all 10,000 rows of pairs.tsv,
labels ignored: throughput does not depend on them), hashed with the default ``FeatureConfig``.

* ``ours``: ``model.fit`` on the trainer's own input pipeline over in-memory pairs: the same batches
  as the peers (full batches of 1024 in file order), each batch's bag plan made by
  :func:`dssm.inputs.make_dataset`'s mapping while the previous step runs, as in ``dssm train``.
  pairs/s per epoch (one pass over the 9 batches), median over the epochs after the first (tracing).
* ``naive``: the textbook Keras version on the same batches, eager-featurized beforehand:
  ``tf.nn.embedding_lookup_sparse`` for the bag and Keras' Adam, whose sparse update still decays
  the moments of the whole ``[num_buckets, 300]`` table every step.
* ``--pipeline``: :func:`dssm.train.train` end to end from GZIP TFRecord shards written by ``dssm
  pairs`` (parsing, the in-memory shuffle, plans included; no validation), median epoch pairs/s after
  the first. This is what ``dssm train --batch-size 1024`` prints.

The machine is shared: besides wall-clock pairs/s the report gives pairs per CPU second of this
process (less sensitive to other jobs, but it counts thread-pool spinning too) and how busy the
machine's cores were with other processes during the measurement (from /proc/stat).

    python bench/train_throughput.py [--batch-size 1024] [--epochs 6] [--pipeline] [--no-naive] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dssm  # noqa: E402, F401
from bench.harness import DATASETS, Figure, Stats, machine_facts  # noqa: E402

__all__ = ["run", "main", "measure_fit", "measure_naive", "measure_pipeline"]


def _pairs() -> list[tuple[str, str, str]]:
    with open(DATASETS / "quora-dev" / "pairs.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["text1"], r["text2"], r["id"]) for r in rows]


class _Busy:
    """CPU seconds of this process and of the whole machine between ``start()`` and ``stop()``."""

    def __init__(self) -> None:
        self.wall = self.cpu = self.machine = 0.0
        self._start: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @staticmethod
    def _machine_busy() -> float:
        # /proc/stat "cpu" line: user nice system idle iowait irq softirq steal ..., in clock ticks.
        try:
            fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        except OSError:
            return float("nan")
        busy = sum(fields) - fields[3] - fields[4]
        return busy / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self._start = (time.perf_counter(), time.process_time(), self._machine_busy())

    def stop(self) -> None:
        wall, cpu, machine = self._start
        self.wall = time.perf_counter() - wall
        self.cpu = time.process_time() - cpu
        self.machine = self._machine_busy() - machine

    @property
    def others_cores(self) -> float:
        """Cores kept busy by other processes, on average over the interval."""
        return max(self.machine - self.cpu, 0.0) / max(self.wall, 1e-9)


def _stats(values: list[float]) -> Stats:
    return Stats(statistics.median(values), min(values), max(values), len(values))


def _pair_table(featurizer: Any, pairs: list[tuple[str, str, str]]) -> dict[str, Any]:
    """All pairs featurized once: ragged ``[pairs, None]`` bags and ``[pairs]`` document ids."""
    import tensorflow as tf

    q_ids, q_counts = featurizer.bags(tf.constant([p[0] for p in pairs]))
    d_ids, d_counts = featurizer.bags(tf.constant([p[1] for p in pairs]))
    return {"query_ids": q_ids, "query_counts": q_counts, "document_ids": d_ids, "document_counts": d_counts,
            "document_id": tf.constant([p[2] for p in pairs])}


def _batches(table: dict[str, Any], batch_size: int) -> list[dict[str, Any]]:
    """Full batches in file order (the rest dropped), as the peers get them."""
    n = int(table["document_id"].shape[0])
    return [{key: value[start:start + batch_size] for key, value in table.items()}
            for start in range(0, n - batch_size + 1, batch_size)]


def measure_fit(*, batch_size: int = 1024, epochs: int = 6, mixed_precision: bool = False,
                plans: bool = True) -> dict[str, Any]:
    """Our trainer (``model.fit``) on the full in-memory batches, plans made by the input pipeline.

    Returns:
        ``{"wall": Stats, "cpu": Stats, "others_cores": float, "loss": [...]}``: per-epoch pairs per
        wall second and per CPU second of this process (epochs after the first), the cores other
        processes kept busy meanwhile, and the loss after each epoch (it must fall).
    """
    from dssm.features import FeatureConfig, Featurizer
    from dssm.inputs import add_bag_plans
    from dssm.model import ModelConfig, bag_groups
    from dssm.train import TrainConfig, build_model

    import tensorflow as tf  # noqa: E402  isort: skip

    tf.keras.utils.set_random_seed(0)
    feature_config, model_config = FeatureConfig(), ModelConfig()
    train_config = TrainConfig(mixed_precision=mixed_precision, batch_size=batch_size)
    table = _pair_table(Featurizer(feature_config), _pairs())
    steps = int(table["document_id"].shape[0]) // batch_size
    if steps == 0:
        raise ValueError(f"need at least {batch_size} pairs for one batch")
    groups = bag_groups(model_config, ["query", "document"]) if plans else []

    def take(step: tf.Tensor) -> dict[str, tf.Tensor]:
        step = step % steps
        return {key: value[step * batch_size:(step + 1) * batch_size] for key, value in table.items()}

    # All epochs in one dataset read by one iterator, as dssm.train.train feeds fit.
    ds = add_bag_plans(tf.data.Dataset.range(steps * epochs).map(take), groups).prefetch(tf.data.AUTOTUNE)
    model = build_model(model_config, feature_config, train_config)
    timer = _epoch_timer(steps * batch_size)
    model.fit(ds, epochs=epochs, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    return {"wall": _stats(timer.wall[1:]), "cpu": _stats(timer.cpu[1:]),
            "others_cores": statistics.median(timer.others[1:]), "loss": timer.loss}


def _epoch_timer(pairs: int) -> Any:
    """A Keras callback recording pairs per wall / CPU second, others' busy cores and the loss per epoch."""
    import tensorflow as tf

    class EpochTimer(tf.keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.wall: list[float] = []
            self.cpu: list[float] = []
            self.others: list[float] = []
            self.loss: list[float] = []
            self._busy = _Busy()

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self._busy.start()

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self._busy.stop()
            self.wall.append(pairs / self._busy.wall)
            self.cpu.append(pairs / max(self._busy.cpu, 1e-9))
            self.others.append(self._busy.others_cores)
            self.loss.append(float((logs or {}).get("loss", float("nan"))))

    return EpochTimer()


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


def measure_naive(*, batch_size: int = 1024, repeats: int = 3) -> dict[str, Any]:
    """pairs/s of the naive Keras DSSM over passes through the same batches (after a warm-up pass)."""
    from dssm.features import FeatureConfig, Featurizer
    from dssm.model import ModelConfig

    import tensorflow as tf  # noqa: E402  isort: skip

    tf.keras.utils.set_random_seed(0)
    feature_config, model_config = FeatureConfig(), ModelConfig()
    batches = _batches(_pair_table(Featurizer(feature_config), _pairs()), batch_size)
    step = _naive_step(model_config, feature_config)
    for batch in batches:
        step(batch)
    pairs = len(batches) * batch_size
    wall, cpu, others = [], [], []
    busy = _Busy()
    for _ in range(repeats):
        busy.start()
        for batch in batches:
            loss = step(batch)
        float(loss)
        busy.stop()
        wall.append(pairs / busy.wall)
        cpu.append(pairs / busy.cpu)
        others.append(busy.others_cores)
    return {"wall": _stats(wall), "cpu": _stats(cpu), "others_cores": statistics.median(others)}


def measure_pipeline(*, batch_size: int = 1024, epochs: int = 6) -> dict[str, Any]:
    """:func:`dssm.train.train` from shards written by ``dssm pairs`` (all rows as pairs), no validation.

    Returns:
        ``{"wall": Stats of the epochs after the first, "others_cores": ..., "loss": [...]}``.
    """
    from dssm.model import ModelConfig
    from dssm.train import TrainConfig, train
    from pipelines import make_pairs

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        source = DATASETS / "quora-dev" / "pairs.tsv"
        make_pairs.run(["--input", str(source), "--format", "pairs", "--query-column", "text1",
                        "--document-column", "text2", "--validation-fraction", "0", "--output", f"{tmp}/pairs"])
        busy = _Busy()
        busy.start()
        _, history = train(f"{tmp}/pairs", model_config=ModelConfig(),
                           train_config=TrainConfig(epochs=epochs, batch_size=batch_size, validation=False,
                                                    verbose=0))
        busy.stop()
    rates = history["pairs_per_sec"][1:] or history["pairs_per_sec"]
    return {"wall": _stats(rates), "others_cores": busy.others_cores, "loss": history["loss"]}


def run(*, quick: bool) -> list[Figure]:
    """Figures for ``python -m bench`` (bench/part_train.py): ours first, then the naive peer."""
    ours = measure_fit(epochs=3 if quick else 6)
    naive = measure_naive(repeats=1 if quick else 3)
    note = (f"per-epoch median after the first; {ours['cpu'].median:,.0f} pairs per CPU second of ours; other "
            f"processes kept {ours['others_cores']:.1f} of the cores busy meanwhile")
    return [Figure("train", "training, batch 1024, default tower (CPU): fit on the input pipeline", "pairs/s",
                   ours["wall"],
                   "naive Keras (embedding_lookup_sparse + Adam)", naive["wall"], note=note)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=6, help="passes over the batches (the first is not counted)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive Keras peer")
    parser.add_argument("--no-plans", action="store_true", help="ours without the pipeline's bag plans (in-step)")
    parser.add_argument("--pipeline", action="store_true", help="also time dssm.train.train() from shards")
    parser.add_argument("--mixed-precision", action="store_true", help="ours in mixed_bfloat16 (CPU)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch traces the step and is not counted)")
    results: dict[str, dict[str, Any]] = {"ours": measure_fit(batch_size=args.batch_size, epochs=args.epochs,
                                                              mixed_precision=args.mixed_precision,
                                                              plans=not args.no_plans)}
    if not args.no_naive:
        results["naive"] = measure_naive(batch_size=args.batch_size)
    if args.pipeline:
        results["train() from shards"] = measure_pipeline(batch_size=args.batch_size, epochs=args.epochs)
    report = {"batch_size": args.batch_size, "mixed_precision": args.mixed_precision, "plans": not args.no_plans,
              "load_average": os.getloadavg(), "machine": machine_facts(),
              **{name: {key: value.to_dict() if isinstance(value, Stats) else value for key, value in r.items()}
                 for name, r in results.items()}}
    print(f"{'':<22} {'median':>9} {'min':>9} {'max':>9}  {'per CPU s':>9}  {'others':>6}   "
          f"pairs/s, batch {args.batch_size}")
    for name, r in results.items():
        wall = r["wall"]
        cpu = f"{r['cpu'].median:>9,.0f}" if "cpu" in r else f"{'':>9}"
        print(f"{name:<22} {wall.median:>9,.0f} {wall.min:>9,.0f} {wall.max:>9,.0f}  {cpu}  "
              f"{r['others_cores']:>6.2f}")
    print("others = cores kept busy by other processes during the measurement (of "
          f"{os.cpu_count()}); load average now {tuple(round(x, 2) for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
