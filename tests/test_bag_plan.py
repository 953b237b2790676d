"""The embedding bag's fast paths: bag plans made by the input pipeline, the optimizer reusing the rows the
forward pass gathered, and the in-memory shuffled batches of ``make_dataset``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import dssm  # noqa: F401
from dssm.bags import (
    BAG_PLANS,
    CSR_PLAN_KEYS,
    EmbeddingBag,
    _expand,
    bag_plan,
    bag_plan_csr,
    bag_plan_numpy,
    gathered_rows,
    plan_key,
)
from dssm.features import FeatureConfig, Featurizer
from dssm.inputs import make_dataset, pair_files
from dssm.model import ModelConfig, bag_groups
from dssm.optim import RowwiseAdagrad
from dssm.train import TrainConfig, build_model

import tensorflow as tf  # noqa: E402  isort: skip

FEATURES = FeatureConfig(num_buckets=4096)
SMALL = ModelConfig(embedding_dim=16, hidden_dims=(12, 8))
FAST = TrainConfig(epochs=2, batch_size=64, learning_rate=0.1, verbose=0)


def _ragged(rows: list[list[float]], dtype: tf.DType) -> tf.RaggedTensor:
    return tf.ragged.constant(rows, dtype=dtype, ragged_rank=1) if rows else tf.RaggedTensor.from_row_lengths(
        tf.zeros([0], dtype), tf.zeros([0], tf.int64))


def _numpy_plan(ids: tf.RaggedTensor, counts: tf.RaggedTensor) -> dict[str, tf.Tensor]:
    out = bag_plan_numpy(ids.flat_values.numpy(), ids.row_splits.numpy().astype(np.int64),
                         counts.flat_values.numpy())
    return {key: tf.constant(value) for key, value in
            zip(("unique_ids", "position", "rows", "grad_bags", "grad_rows"), out, strict=True)}


def _csr_plan(ids: tf.RaggedTensor, counts: tf.RaggedTensor) -> dict[str, tf.Tensor]:
    out = bag_plan_csr(ids.flat_values.numpy(), ids.row_splits.numpy().astype(np.int64), counts.flat_values.numpy())
    return {key: tf.constant(value) for key, value in zip(CSR_PLAN_KEYS, out, strict=True)}


PLANS = {"numpy": _numpy_plan, "csr": _csr_plan}


def _entries(ids: list[list[int]], counts: list[list[float]]) -> list[tuple[int, int]]:
    """(bag, id) per entry, each id listed count times, in bag order: what every plan must describe."""
    return [(row, i) for row, (row_ids, row_counts) in enumerate(zip(ids, counts, strict=True))
            for i, c in zip(row_ids, row_counts, strict=True) for _ in range(int(round(c)))]


CASES = {
    "counts": ([[3, 7, 1], [7], [], [49, 3, 0, 12], [1, 2]], [[1.0, 2.0, 1.0], [3.0], [], [1.0, 1.0, 2.0, 1.0],
                                                              [1.0, 4.0]]),
    "trailing empty rows": ([[5], [], []], [[1.0], [], []]),
    "zero count": ([[4, 8], [8]], [[0.0, 2.0], [1.0]]),
    "ids beyond 2^24": ([[2**40 + 1, 3], [3, 2**33]], [[1.0, 1.0], [2.0, 1.0]]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_numpy_and_tensorflow_plans_describe_the_same_entries(case: str) -> None:
    ids_list, counts_list = CASES[case]
    ids, counts = _ragged(ids_list, tf.int64), _ragged(counts_list, tf.float32)
    expected = _entries(ids_list, counts_list)
    for plan in (bag_plan(ids, counts), _numpy_plan(ids, counts)):
        unique = plan["unique_ids"].numpy()
        assert len(set(unique.tolist())) == len(unique)
        got = list(zip(plan["rows"].numpy().tolist(), unique[plan["position"].numpy()].tolist(), strict=True))
        assert got == expected
    plan = _numpy_plan(ids, counts)
    assert np.all(np.diff(plan["unique_ids"].numpy()) > 0)  # ascending: the table is walked in address order
    # The transposed order: the same (bag, block row) entries, grouped by block row, bags ascending within one.
    grad = list(zip(plan["grad_rows"].numpy().tolist(), plan["grad_bags"].numpy().tolist(), strict=True))
    assert grad == sorted(zip(plan["position"].numpy().tolist(), plan["rows"].numpy().tolist(), strict=True))


@pytest.mark.parametrize("case", sorted(CASES))
def test_csr_plan_is_the_count_matrix_and_its_transpose(case: str) -> None:
    ids_list, counts_list = CASES[case]
    plan = {key: value.numpy() for key, value in
            _csr_plan(_ragged(ids_list, tf.int64), _ragged(counts_list, tf.float32)).items()}
    unique = plan["unique_ids"]
    assert np.all(np.diff(unique) > 0)
    # The count matrix [bags, distinct ids], one entry per (bag, id) with a positive count.
    got: dict[tuple[int, int], float] = {}
    for (bag, row), weight in zip(plan["bag_index"].tolist(), plan["bag_weight"].tolist(), strict=True):
        assert weight > 0
        got[bag, int(unique[row])] = got.get((bag, int(unique[row])), 0.0) + weight
    expected: dict[tuple[int, int], float] = {}
    for bag, i in _entries(ids_list, counts_list):
        expected[bag, i] = expected.get((bag, i), 0.0) + 1.0
    assert got == expected
    assert set(unique.tolist()) == {i for _, i in expected}
    # The transpose: the same entries grouped by row of unique_ids, bags ascending within a row.
    transposed = list(zip(plan["row_index"].tolist(), plan["row_weight"].tolist(), strict=True))
    assert transposed == sorted(([row, bag], w) for (bag, row), w in
                                zip(plan["bag_index"].tolist(), plan["bag_weight"].tolist(), strict=True))


def test_radix_order_beyond_16_bit_block_rows() -> None:
    """More than 65,536 distinct ids take the two-pass radix sort; the order must still be exact."""
    rng = np.random.default_rng(0)
    ids = rng.permutation(200_000)[:70_000 * 2].astype(np.int64) % 150_000
    splits = np.arange(0, len(ids) + 1, 20, dtype=np.int64)
    unique_ids, position, rows, grad_bags, grad_rows = bag_plan_numpy(ids, splits, np.ones(len(ids), np.float32))
    assert len(unique_ids) > 1 << 16
    np.testing.assert_array_equal(unique_ids[position], ids)
    order = np.lexsort((rows, position))
    np.testing.assert_array_equal(grad_rows, position[order])
    np.testing.assert_array_equal(grad_bags, rows[order])


def test_expand_repeats_each_index_by_its_count() -> None:
    for times in ([2, 0, 1, 3], [0, 0], [], [1, 1, 1], [0, 4]):
        expected = np.repeat(np.arange(len(times)), times)
        np.testing.assert_array_equal(_expand(tf.constant(times, tf.int32)).numpy(), expected)


@pytest.mark.parametrize("kind", sorted(PLANS))
@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_pipeline_plan_gives_the_same_output_and_gradient(combiner: str, kind: str) -> None:
    ids_list, counts_list = CASES["counts"]
    ids, counts = _ragged(ids_list, tf.int64), _ragged(counts_list, tf.float32)
    bag = EmbeddingBag(50, 4, combiner=combiner, init_stddev=0.1)
    upstream = tf.constant(np.random.default_rng(1).normal(size=(5, 4)), tf.float32)
    results = []
    for plan in (None, PLANS[kind](ids, counts)):
        with tf.GradientTape() as tape:
            out = bag(ids, counts, plan=plan)
            loss = tf.reduce_sum(out * upstream)
        grad = tape.gradient(loss, bag.table)
        assert isinstance(grad, tf.IndexedSlices)
        results.append((out.numpy(), tf.convert_to_tensor(grad).numpy()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6, atol=1e-7)


def test_csr_plan_pools_in_the_layers_compute_dtype() -> None:
    """Under mixed_bfloat16 the products run in float32 (no bfloat16 kernel) and come back as bfloat16."""
    ids_list, counts_list = CASES["counts"]
    ids, counts = _ragged(ids_list, tf.int64), _ragged(counts_list, tf.float32)
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        bag = EmbeddingBag(50, 4, combiner="sum", init_stddev=0.1)
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)
    with tf.GradientTape() as tape:
        out = bag(ids, counts, plan=_csr_plan(ids, counts))
        loss = tf.reduce_sum(tf.cast(out, tf.float32))
    grad = tape.gradient(loss, bag.table)
    assert out.dtype == tf.bfloat16 and isinstance(grad, tf.IndexedSlices) and grad.values.dtype == tf.float32
    np.testing.assert_allclose(out.numpy().astype(np.float32), bag(ids, counts).numpy().astype(np.float32),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kind", sorted(PLANS))
def test_rowwise_adagrad_reuses_the_forward_rows_and_matches_a_plain_update(kind: str) -> None:
    ids = tf.ragged.constant([[3, 7, 1], [7, 9]], dtype=tf.int64)
    counts = tf.ragged.constant([[1.0, 2.0, 1.0], [1.0, 1.0]])
    plan = PLANS[kind](ids, counts)
    # Named like a tower's bag: RowwiseAdagrad recognises embedding tables by name.
    bags = [EmbeddingBag(12, 4, combiner="sum", init_stddev=0.1, name="embedding_bag") for _ in range(2)]
    bags[0](ids, counts)
    bags[1](ids, counts)
    bags[1].table.assign(bags[0].table)
    optimizers = [RowwiseAdagrad(0.5), RowwiseAdagrad(0.5)]
    for bag, optimizer in zip(bags, optimizers, strict=True):
        optimizer.build([bag.table])  # slots outside the tf.function (traced once per optimizer)
        assert optimizer._accumulators[0].shape == (12,)  # one accumulator per row: the row-wise update

    @tf.function
    def step(bag: EmbeddingBag, optimizer: RowwiseAdagrad, *, keep_mark: bool) -> bool:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(bag(ids, counts, plan=plan) - 1.0))
        grad = tape.gradient(loss, bag.table)
        reused = gathered_rows(grad.indices) is not None
        if not keep_mark:  # the same slices through a fresh indices tensor: the optimizer gathers itself
            grad = tf.IndexedSlices(grad.values, tf.identity(grad.indices), grad.dense_shape)
        optimizer.apply_gradients([(grad, bag.table)])
        return reused

    initial = bags[0].table.numpy()
    assert step(bags[0], optimizers[0], keep_mark=True)
    assert step(bags[1], optimizers[1], keep_mark=False)
    np.testing.assert_allclose(bags[0].table.numpy(), bags[1].table.numpy(), rtol=1e-6, atol=1e-7)
    touched, untouched = [1, 3, 7, 9], [0, 2, 4, 5, 6, 8, 10, 11]
    assert not np.allclose(bags[0].table.numpy()[touched], initial[touched])
    np.testing.assert_array_equal(bags[0].table.numpy()[untouched], initial[untouched])


def test_gathered_rows_is_none_for_eager_and_foreign_tensors() -> None:
    assert gathered_rows(tf.constant([1, 2], tf.int64)) is None


def test_bag_groups_follow_tower_sharing() -> None:
    names = ["query", "document", "negative"]
    assert bag_groups(SMALL, names) == [("query", "document", "negative")]
    separate = dataclasses.replace(SMALL, shared_towers=False)
    assert bag_groups(separate, names) == [("query",), ("document", "negative")]
    assert bag_groups(separate, ["query", "document"]) == [("query",), ("document",)]
    assert plan_key(("query", "document")) == "query+document"


def _shards(tmp_path: Path, quora_dir: Path, n: int) -> list[str]:
    from test_train import quora_pairs, write_pair_shards  # tests/ is on sys.path under pytest

    pairs = [(q, d, 1.0) for q, d, _ in quora_pairs(quora_dir, n)]
    return pair_files(write_pair_shards(tmp_path / "pairs", pairs, validation_every=n + 1, shards=3), "train")


def _pair_keys(batch: dict) -> list[tuple[int, ...]]:
    return [tuple(row) for row in batch["query_ids"].to_list()]


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_in_memory_batches_hold_every_pair_once_per_epoch_in_a_new_order(
        tmp_path: Path, quora_dir: Path, drop_remainder: bool) -> None:
    files = _shards(tmp_path, quora_dir, 150)
    reference = [key for batch in make_dataset(files, batch_size=1000, training=False, config=FAST)
                 for key in _pair_keys(batch)]
    assert len(reference) == 150
    ds = make_dataset(files, batch_size=64, training=True, config=FAST, epochs=(0, 3), drop_remainder=drop_remainder)
    batches = list(ds)
    per_epoch = 150 // 64 if drop_remainder else 3
    assert len(batches) == 3 * per_epoch
    epochs = [[key for batch in batches[e * per_epoch:(e + 1) * per_epoch] for key in _pair_keys(batch)]
              for e in range(3)]
    for keys in epochs:
        if drop_remainder:
            assert len(keys) == 128 and len(set(keys)) == len(keys) and set(keys) <= set(reference)
        else:
            assert sorted(keys) == sorted(reference)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    # Epoch e depends only on (seed, e): a dataset starting at epoch 1 repeats the second epoch.
    later = [key for batch in make_dataset(files, batch_size=64, training=True, config=FAST, epochs=(1, 2),
                                           drop_remainder=drop_remainder) for key in _pair_keys(batch)]
    assert later == epochs[1]
    streamed = [key for batch in make_dataset(files, batch_size=64, training=True, epochs=(0, 1),
                                              config=dataclasses.replace(FAST, cache=False))
                for key in _pair_keys(batch)]
    assert sorted(streamed) == sorted(reference)


def test_batches_carry_plans_of_their_bags_and_train_like_plain_batches(tmp_path: Path, quora_dir: Path) -> None:
    files = _shards(tmp_path, quora_dir, 80)
    groups = bag_groups(SMALL, ["query", "document"])
    batch = next(iter(make_dataset(files, batch_size=40, training=True, config=FAST, bag_groups=groups)))
    plan = batch[BAG_PLANS][plan_key(groups[0])]
    ids = tf.concat([batch["query_ids"], batch["document_ids"]], axis=0)
    counts = tf.concat([batch["query_counts"], batch["document_counts"]], axis=0)
    for key, value in _csr_plan(ids, counts).items():
        np.testing.assert_array_equal(plan[key].numpy(), value.numpy())

    plain = {key: value for key, value in batch.items() if key != BAG_PLANS}
    weights = []
    for features in (batch, plain):
        tf.keras.utils.set_random_seed(3)
        model = build_model(SMALL, FEATURES, FAST)
        logs = tf.function(model.train_step)(features)
        weights.append((float(logs["loss"]), [w.numpy() for w in model.weights]))
    assert weights[0][0] == pytest.approx(weights[1][0], rel=1e-6)
    for with_plan, without in zip(weights[0][1], weights[1][1], strict=True):
        np.testing.assert_allclose(with_plan, without, rtol=1e-5, atol=1e-6)


def test_featurizer_bags_round_trip_through_a_plan() -> None:
    """Real hashed bags (repeated trigrams have counts > 1) pool the same with and without a plan."""
    featurizer = Featurizer(FEATURES)
    ids, counts = featurizer.bags(tf.constant(["banana bandana ananas", "", "the the the end"]))
    assert float(tf.reduce_max(counts.flat_values)) > 1
    bag = EmbeddingBag(FEATURES.num_buckets, 8, combiner="sum", init_stddev=0.1)
    np.testing.assert_allclose(bag(ids, counts).numpy(), bag(ids, counts, plan=_numpy_plan(ids, counts)).numpy(),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("plan", [bag_plan_numpy, bag_plan_csr])
def test_plans_rank_large_ids_like_small_ones(plan) -> None:
    """Ids past 2^24 (tables of 2^25+ buckets) take np.unique's path and give the same plan, ids aside."""
    small = np.array([5, 2, 9, 2, 5, 7], np.int64)
    large = small + 2**30
    splits = np.array([0, 3, 6], np.int64)
    counts = np.array([1, 2, 1, 1, 3, 1], np.float32)
    a, b = plan(small, splits, counts), plan(large, splits, counts)
    np.testing.assert_array_equal(a[0] + 2**30, b[0])
    for x, y in zip(a[1:], b[1:], strict=True):
        np.testing.assert_array_equal(x, y)
        assert x.dtype == y.dtype
