"""The embedding bag and its internals: bag plans, the sparse/ragged table lookups and their pooling.

This module owns the towers' first layer, :class:`EmbeddingBag` (a text's sparse bag of hashed ids,
counts as weights, times a ``[num_buckets, dim]`` table, touching only the rows the batch uses so the
table's gradient stays ``tf.IndexedSlices``), the *bag plans* that map a batch's bags onto its
distinct table rows (:func:`bag_plan` in the graph; :func:`bag_plan_numpy` and :func:`bag_plan_csr`
made ahead of the step by the input pipeline, :func:`dssm.inputs.make_dataset`, and stored in a batch
under :data:`BAG_PLANS` by :func:`plan_key`), the pooling kernels with their hand-written gradients,
and :func:`gathered_rows`, which lets the optimizer reuse the rows the forward pass read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["EmbeddingBag", "bag_plan", "bag_plan_numpy", "bag_plan_csr", "CSR_PLAN_KEYS", "plan_key", "BAG_PLANS",
           "gathered_rows", "candidate_keys", "bag_keys", "pair_keys"]

# Key of the batch's dict of precomputed bag plans (see dssm.model.bag_groups and dssm.inputs.make_dataset).
BAG_PLANS = "bag_plans"


def plan_key(names: Sequence[str]) -> str:
    """The key of the plan for the concatenation of these bags (``"query+document"``)."""
    return "+".join(names)


class EmbeddingBag(tf.keras.layers.Layer):
    """``[batch, None]`` ragged ids with counts → ``[batch, dim]`` count-weighted sums of table rows.

    The batch's ids are de-duplicated first and only those rows gathered, so the table's gradient is
    ``tf.IndexedSlices`` over the batch's distinct ids (a 1024-pair batch of Quora questions touches
    ~18k distinct rows of 131k) and a sparse optimizer updates only those rows. The pooling is one
    fused ``SparseSegmentSum`` over the small gathered block (no ``[ids, dim]`` intermediate, which
    would cost more memory traffic than all the dense layers together). Counts are occurrence
    counts, so an id with count ``c`` is simply listed ``c`` times.

    How the ids map onto the block is a :func:`bag_plan`. The layer makes one in the graph when
    called without; the trainer's input pipeline makes them ahead of the step (see
    ``dssm.inputs.make_dataset``): a :func:`bag_plan_csr`, the bags as a sparse count matrix and its
    transpose, so the pooling and its gradient are CSR sparse x dense products (about half the CPU
    time of the segment sums at batch 1024), or a :func:`bag_plan_numpy`, segment sums with the
    transposed order the gradient needs, which otherwise costs an in-step sort.
    """

    def __init__(self, num_buckets: int, dim: int, *, combiner: str, init_stddev: float,
                 name: str | None = None) -> None:
        super().__init__(name=name)
        self.num_buckets = num_buckets
        self.dim = dim
        self.combiner = combiner
        self.init_stddev = init_stddev

    def build(self, input_shape: object) -> None:
        # Variables stay float32 under mixed precision (Keras keeps variable_dtype float32).
        self.table = self.add_weight(
            name="table", shape=[self.num_buckets, self.dim],
            initializer=tf.keras.initializers.TruncatedNormal(stddev=self.init_stddev), trainable=True)
        super().build(input_shape)

    def call(self, ids: tf.RaggedTensor, counts: tf.RaggedTensor, plan: dict[str, tf.Tensor] | None = None
             ) -> tf.Tensor:
        """Pool the bags.

        Args:
            ids: ``[batch, None]`` int64.
            counts: ``[batch, None]`` float32.
            plan: :func:`bag_plan` of exactly these bags (computed here when None).

        Returns:
            ``[batch, dim]``.
        """
        nrows = tf.cast(ids.nrows(), tf.int32)
        if plan is None:
            plan = bag_plan(ids, counts)
        block = tf.cast(_gather_rows(self.table, plan["unique_ids"]), self.compute_dtype)  # [distinct ids, dim]
        if "bag_index" in plan:  # a bag_plan_csr: sparse matrix products both ways
            pooled = _pool_csr(block, plan, nrows)
        else:
            transposed = (plan["grad_bags"], plan["grad_rows"]) if "grad_bags" in plan else None
            pooled = _pool(block, plan["position"], plan["rows"], nrows, transposed)
        if self.combiner == "sum":
            return pooled
        return self._scaled(pooled, tf.math.unsorted_segment_sum(tf.round(tf.cast(counts.flat_values, pooled.dtype)),
                                                                 tf.cast(counts.value_rowids(), tf.int32), nrows))

    def _scaled(self, pooled: tf.Tensor, total: tf.Tensor) -> tf.Tensor:
        """``[batch, dim]`` sums → the combiner's pooling, given each bag's ``[batch]`` token count (not for sum)."""
        scale = total if self.combiner == "mean" else tf.sqrt(total)
        return pooled / tf.maximum(scale, 1)[:, tf.newaxis]

    def pool_words(self, word_ids: tf.RaggedTensor, text_words: tf.RaggedTensor, text_bigrams: tf.RaggedTensor
                   ) -> tf.Tensor:
        """Pool texts given as :meth:`dssm.features.Featurizer.word_tokens`, for inference.

        The same sums as :meth:`call` on the texts' bags (to float rounding: the terms are grouped
        differently), reading far fewer table rows: each distinct word's rows are summed once, then
        every text sums its words' vectors and its bigrams' rows. No de-duplication within texts,
        ``unique`` over the batch or gathered block, and no sparse gradient, so training keeps
        :meth:`call`. On 10k debtags texts (451 characters; 5.0M token rows, 2.2M read this way)
        featurize-and-embed went from 2.08 s (bags) to 0.45 s.

        Args:
            word_ids: ``[distinct, None]`` int64 table rows of each distinct word.
            text_words: ``[batch, None]`` int32 rows of ``word_ids`` per text, one per occurrence.
            text_bigrams: ``[batch, None]`` int64 table rows per text, one per occurrence.

        Returns:
            ``[batch, dim]`` in the layer's compute dtype.
        """
        table = tf.convert_to_tensor(self.table)
        nrows = tf.cast(text_words.nrows(), tf.int32)
        distinct = tf.cast(word_ids.nrows(), tf.int32)
        words = _segment_sum(table, tf.cast(word_ids.flat_values, tf.int32),
                             tf.cast(word_ids.value_rowids(), tf.int32), distinct)  # [distinct, dim]
        word_rows = tf.cast(text_words.value_rowids(), tf.int32)
        pooled = _segment_sum(words, text_words.flat_values, word_rows, nrows) + _segment_sum(
            table, tf.cast(text_bigrams.flat_values, tf.int32), tf.cast(text_bigrams.value_rowids(), tf.int32), nrows)
        if self.combiner != "sum":
            tokens = tf.cast(word_ids.row_lengths(), pooled.dtype)
            pooled = self._scaled(pooled, tf.math.unsorted_segment_sum(tf.gather(tokens, text_words.flat_values),
                                                                       word_rows, nrows)
                                  + tf.cast(text_bigrams.row_lengths(), pooled.dtype))
        return tf.cast(pooled, self.compute_dtype)


# Attribute of the gathered ids tensor holding the rows the forward pass read.
_ROWS_ATTRIBUTE = "_dssm_table_rows"


def _gather_rows(table: tf.Variable, ids: tf.Tensor) -> tf.Tensor:
    """``table[ids]``, remembered on the gather's ``ids`` for the optimizer (see :func:`gathered_rows`).

    The optimizer's update reads the same rows again (``table[row] -= ...`` needs the old values;
    TF's scatter_sub kernel costs three times a gather plus a scatter_update of the same rows).
    """
    ids = tf.identity(ids)  # this gather's own tensor, so nothing else can carry the mark
    rows = tf.gather(table, ids)
    # Not for an autocast (mixed precision) read: the update needs the variable's own dtype.
    if not tf.executing_eagerly() and rows.dtype == getattr(table, "true_dtype", table.dtype):
        setattr(ids, _ROWS_ATTRIBUTE, rows)
    return rows


def gathered_rows(indices: tf.Tensor) -> tf.Tensor | None:
    """The table rows an :class:`EmbeddingBag` read this step, if ``indices`` is its table gradient's.

    The table's gradient is ``IndexedSlices(values, reshape(ids))`` from the gather's registered
    gradient, with the embedding bag's distinct ids. The rows the forward pass read at
    ``ids`` are still the table's content when the optimizer applies that gradient (one update per
    step, after the forward pass), so the update need not gather them again. Anything else (eager
    tensors, gradients summed or all-gathered across replicas) gives None.
    """
    if tf.executing_eagerly() or not hasattr(indices, "op"):
        return None
    source = indices.op.inputs[0] if indices.op.type == "Reshape" else indices
    return getattr(source, _ROWS_ATTRIBUTE, None)


def bag_plan(ids: tf.RaggedTensor, counts: tf.RaggedTensor) -> dict[str, tf.Tensor]:
    """How a batch of bags maps onto its distinct table rows, in TensorFlow ops (any device, in-graph).

    Args:
        ids: ``[batch, None]`` int64 bucket ids.
        counts: ``[batch, None]`` float32 occurrence counts (rounded; an id counted ``c`` times is
            an entry ``c`` times).

    Returns:
        ``unique_ids`` ``[distinct]`` int64 (in order of first appearance here, ascending from
        :func:`bag_plan_numpy`); ``position`` ``[entries]`` int32 (row of
        ``unique_ids`` per entry) and ``rows`` ``[entries]`` int32 (bag per entry, ascending), with
        every id repeated by its count. :func:`bag_plan_numpy` also gives the transposed order.
    """
    times = tf.maximum(tf.cast(tf.round(counts.flat_values), tf.int32), 0)
    entries = _expand(times)  # [entries] index into flat_values, each repeated by its count
    flat = tf.gather(ids.flat_values, entries)
    rows = tf.gather(tf.cast(ids.value_rowids(), tf.int32), entries)
    unique_ids, position = tf.unique(flat, out_idx=tf.int32)
    return {"unique_ids": unique_ids, "position": position, "rows": rows}


def _expand(times: tf.Tensor) -> tf.Tensor:
    """``[sum(times)]`` int32: ``i`` repeated ``times[i]`` times, in order; O(output) unlike ``tf.repeat``.

    ``tf.repeat`` builds an ``[entries, max(times)]`` mask. Here every entry after the first marks
    where its run starts and a cumulative sum of the marks numbers the runs (a zero-length run puts
    its mark on the same spot as the next one, so it is skipped).
    """
    ends = tf.cumsum(times)
    total = tf.reduce_sum(times)
    marks = tf.math.unsorted_segment_sum(tf.ones_like(ends[:-1]), ends[:-1], total + 1)[:total]
    return tf.cumsum(marks)


def bag_plan_numpy(ids: np.ndarray, row_splits: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`bag_plan` in numpy plus the transposed order its gradient needs (the input pipeline's version).

    The distinct ids come from a presence mask over the id range instead of a hash table or a sort,
    and the transposed order from NumPy's radix sort on 16-bit keys: a few milliseconds per
    1024-pair batch, where TensorFlow's comparison sort alone takes ~10.

    Args:
        ids: ``[values]`` int64 flat ids of the ragged bags.
        row_splits: ``[batch + 1]`` int64 row splits.
        counts: ``[values]`` float32 counts.

    Returns:
        ``(unique_ids, position, rows, grad_bags, grad_rows)``: the first three as in :func:`bag_plan`;
        ``grad_rows`` ``[entries]`` int32 is ``position`` sorted ascending and ``grad_bags`` the
        matching ``rows`` (the entries grouped by table row, bags ascending within a row).
    """
    times = np.maximum(np.rint(counts), 0).astype(np.int64)
    rows = np.repeat(np.arange(len(row_splits) - 1, dtype=np.int32), np.diff(row_splits))
    if not np.all(times == 1):
        entries = np.repeat(np.arange(len(ids)), times)
        ids, rows = ids[entries], rows[entries]
    unique_ids, position = _distinct_positions(ids, np.int32)
    order = _radix_argsort(position, len(unique_ids))
    return (unique_ids.astype(np.int64), position, rows, rows[order], position[order])


def _distinct_positions(ids: np.ndarray, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """``(unique_ids ascending, position of each id in unique_ids as dtype)`` for the bag plans.

    Hashed ids are small non-negative ints, so a presence table ranks them in linear time; anything
    else (ids past 2^24 or negative) falls back to ``np.unique``.
    """
    if len(ids) and 0 <= ids.min() and ids.max() < 2**24:
        present = np.zeros(int(ids.max()) + 1, np.bool_)
        present[ids] = True
        unique_ids = np.flatnonzero(present)
        rank = np.zeros(len(present), dtype)
        rank[unique_ids] = np.arange(len(unique_ids), dtype=dtype)
        return unique_ids, rank[ids]
    unique_ids, position = np.unique(ids, return_inverse=True)
    return unique_ids, position.astype(dtype).reshape(-1)


# The arrays of a bag_plan_csr, in its return order (the keys of the plan dict the input pipeline makes).
CSR_PLAN_KEYS = ("unique_ids", "bag_index", "bag_weight", "row_index", "row_weight")


def bag_plan_csr(ids: np.ndarray, row_splits: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """The bags as a sparse ``[bags, distinct ids]`` count matrix, and its transpose, for :func:`_pool_csr`.

    The input pipeline's plan (``dssm.inputs.make_dataset``). The pooling is then one CSR sparse x
    dense product (``SparseMatrixMatMul``) each way instead of segment sums over one entry per
    occurrence: the CPU kernel shards rows over the intra-op threads and weights by the count, and
    at batch 1024 the pair takes about half the CPU time of the segment sums (the gradient's
    product about a third).

    Args:
        ids: ``[values]`` int64 flat ids of the ragged bags.
        row_splits: ``[batch + 1]`` int64 row splits.
        counts: ``[values]`` float32 counts (rounded; entries with a count below 1 are dropped).

    Returns:
        ``(unique_ids, bag_index, bag_weight, row_index, row_weight)`` (:data:`CSR_PLAN_KEYS`):
        ``unique_ids`` ``[distinct]`` int64 ascending; ``bag_index`` ``[nnz, 2]`` int64
        ``(bag, row of unique_ids)`` in bag order with ``bag_weight`` ``[nnz]`` float32 the counts;
        ``row_index``/``row_weight`` the same entries as ``(row of unique_ids, bag)``, grouped by
        row (ascending), bags ascending within a row.
    """
    times = np.maximum(np.rint(counts), 0).astype(np.float32)
    bags = np.repeat(np.arange(len(row_splits) - 1, dtype=np.int64), np.diff(row_splits))
    if not np.all(times > 0):
        keep = times > 0
        ids, bags, times = ids[keep], bags[keep], times[keep]
    unique_ids, position = _distinct_positions(ids, np.int64)
    order = _radix_argsort(position.astype(np.int32), len(unique_ids))
    # Stacked from 1-d gathers: fancy-indexing the [nnz, 2] rows instead costs ~6x as much.
    row_index = np.stack([position[order], bags[order]], axis=1)
    return (unique_ids.astype(np.int64), np.stack([bags, position], axis=1), times, row_index, times[order])


def _pool_csr(block: tf.Tensor, plan: dict[str, tf.Tensor], nrows: tf.Tensor) -> tf.Tensor:
    """``out[b] = sum of weight * block[row]`` over the plan's ``(b, row)`` entries; a :func:`bag_plan_csr` plan.

    Args:
        block: ``[distinct, dim]`` gathered table rows.
        plan: ``bag_index``/``bag_weight`` and ``row_index``/``row_weight`` (see :func:`bag_plan_csr`).
        nrows: number of bags.

    Returns:
        ``[nrows, dim]``, in ``block``'s dtype (the products run in float32: the kernel has no bfloat16).
    """
    dtype = block.dtype
    distinct = tf.shape(block, out_type=tf.int64)[0]
    bags = tf.cast(nrows, tf.int64)

    def product(index: tf.Tensor, weight: tf.Tensor, shape: tf.Tensor, dense: tf.Tensor) -> tf.Tensor:
        matrix = tf.raw_ops.SparseTensorToCSRSparseMatrix(indices=index, values=weight, dense_shape=shape)
        out = tf.raw_ops.SparseMatrixMatMul(a=matrix, b=tf.cast(dense, tf.float32))
        out.set_shape([None, dense.shape[1]])
        return tf.cast(out, dtype)

    @tf.custom_gradient
    def pool(block: tf.Tensor) -> tuple[tf.Tensor, object]:
        def grad(upstream: tf.Tensor) -> tf.Tensor:
            # The transpose from the plan: SparseMatrixMatMul(adjoint_a=True) transposes in the step.
            return product(plan["row_index"], plan["row_weight"], tf.stack([distinct, bags]), upstream)

        return product(plan["bag_index"], plan["bag_weight"], tf.stack([bags, distinct]), block), grad

    return pool(block)


def _radix_argsort(keys: np.ndarray, bound: int) -> np.ndarray:
    """Stable argsort of non-negative int32 ``keys < bound`` by 16-bit radix passes (NumPy's stable uint16 sort)."""
    low = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    if bound <= 1 << 16:
        return low
    high = np.argsort((keys[low] >> 16).astype(np.uint16), kind="stable")
    return low[high]


def _pool(block: tf.Tensor, position: tf.Tensor, rows: tf.Tensor, nrows: tf.Tensor,
          transposed: tuple[tf.Tensor, tf.Tensor] | None) -> tf.Tensor:
    """``out[r] = sum of block[position[e]] over entries e with rows[e] == r``, with a fast gradient.

    Args:
        block: ``[distinct, dim]`` gathered table rows.
        position: ``[entries]`` int32 row of ``block`` per entry.
        rows: ``[entries]`` int32 bag per entry, sorted ascending.
        nrows: number of bags.
        transposed: ``(bags, block_rows)`` ``[entries]`` int32: the entries grouped by block row
            (ascending), as :func:`bag_plan_numpy` gives them; sorted here when None.

    Returns:
        ``[nrows, dim]``.
    """

    @tf.custom_gradient
    def pool(block: tf.Tensor) -> tuple[tf.Tensor, object]:
        pooled = _segment_sum(block, position, rows, nrows)

        def grad(upstream: tf.Tensor) -> tf.Tensor:
            # The transpose of the pooling is the same fused kernel with the entries grouped by
            # block row instead of by bag. TF's registered gradient (SparseSegmentSumGrad) takes ~4x
            # longer here and was half of the whole train step.
            if transposed is not None:
                bags, block_rows = transposed
            else:
                # One int64 sort regroups them. Key = (last block row - position) << 32 | bag:
                # counting down lets a descending sort (TopK itself, no negations) give ascending
                # block rows, and shifts decode it without division.
                last = tf.cast(tf.shape(block)[0], tf.int64) - 1
                keys = tf.sort(tf.bitwise.left_shift(last - tf.cast(position, tf.int64), 32)
                               | tf.cast(rows, tf.int64), direction="DESCENDING")
                bags = tf.cast(keys & 0xFFFFFFFF, tf.int32)
                block_rows = tf.cast(last - tf.bitwise.right_shift(keys, 32), tf.int32)
            return _segment_sum(upstream, bags, block_rows, tf.shape(block)[0])

        return pooled, grad

    return pool(block)


_SEGMENT_CHUNKS = 4


def _segment_sum(data: tf.Tensor, indices: tf.Tensor, segment_ids: tf.Tensor, num_segments: tf.Tensor) -> tf.Tensor:
    """``tf.sparse.segment_sum`` split into independent ops over disjoint segment ranges.

    The CPU kernel runs on one thread; as ``_SEGMENT_CHUNKS`` separate ops the executor's inter-op
    pool runs them on all cores. Chunks end at segment boundaries, so each output row comes from
    exactly one chunk and the results are simply concatenated.

    Args:
        data: ``[rows, dim]``.
        indices: ``[entries]`` int32 rows of ``data``.
        segment_ids: ``[entries]`` int32, ascending.
        num_segments: output rows.

    Returns:
        ``[num_segments, dim]``.
    """
    entries = tf.shape(segment_ids)[0]
    targets = tf.range(1, _SEGMENT_CHUNKS) * entries // _SEGMENT_CHUNKS
    # First segment of each chunk (after the first): the segment at the target entry, moved back to
    # where that segment starts so no segment straddles two chunks.
    first = tf.gather(tf.concat([segment_ids, [num_segments]], axis=0), targets)  # targets < entries, or 0 if none
    bounds = tf.concat([[0], first, [num_segments]], axis=0)  # [chunks + 1] segment bounds
    starts = tf.concat([[0], tf.searchsorted(segment_ids, first, side="left", out_type=tf.int32), [entries]], axis=0)
    parts = []
    for k in range(_SEGMENT_CHUNKS):
        lo, hi = starts[k], starts[k + 1]
        parts.append(tf.sparse.segment_sum(data, indices[lo:hi], segment_ids[lo:hi] - bounds[k],
                                           num_segments=bounds[k + 1] - bounds[k]))
    return tf.concat(parts, axis=0)


# ----------------------------------------------------------------------------- accidental-hit keys


def candidate_keys(ids: tf.Tensor | None, batch: tf.Tensor, *, tag: int) -> tf.Tensor:
    """``[batch]`` int64 keys for accidental-hit masking.

    String ids are hashed (FarmHash64 into [0, 2^62)): comparing a 1024×1024 grid of strings costs
    more than the whole softmax. Without ids, every row gets a distinct negative key (unique per
    replica and per ``tag``), so nothing is masked.
    """
    if ids is not None:
        return tf.strings.to_hash_bucket_fast(ids, 2**62)
    ctx = tf.distribute.get_replica_context()
    replica = tf.cast(ctx.replica_id_in_sync_group if ctx is not None else 0, tf.int64)
    return -1 - ((replica * 2 + tag) * 2**32 + tf.range(tf.cast(batch, tf.int64)))


def bag_keys(ids: tf.RaggedTensor, counts: tf.RaggedTensor) -> tf.Tensor:
    """``[batch]`` int64 fingerprint of each bag: equal bags (same ids with the same counts) get equal keys.

    Identical texts (after the featurizer's normalisation) have identical bags, so this masks them
    as accidental hits even when their ids differ, or when the batch has no ids. Each (id, count)
    entry is mixed by SplitMix64's finaliser and the row's entries summed (mod 2^64: unsigned
    arithmetic wraps), so the key does not depend on entry order and two different bags collide
    with probability ~2^-62.
    """
    x = tf.bitcast(ids.flat_values, tf.uint64) * tf.constant(0x9E3779B97F4A7C15, tf.uint64) + tf.cast(
        tf.round(counts.flat_values), tf.uint64)
    x = _splitmix64(x)
    rows = tf.cast(ids.value_rowids(), tf.int32)
    total = tf.math.unsorted_segment_sum(x, rows, tf.cast(ids.nrows(), tf.int32))
    # Non-negative int64 (all_gather and equality need no unsigned kernels).
    return tf.bitcast(tf.bitwise.right_shift(_splitmix64(total), tf.constant(2, tf.uint64)), tf.int64)


def _splitmix64(x: tf.Tensor) -> tf.Tensor:
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(30, tf.uint64))) * tf.constant(
        0xBF58476D1CE4E5B9, tf.uint64)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(27, tf.uint64))) * tf.constant(
        0x94D049BB133111EB, tf.uint64)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(31, tf.uint64)))


def pair_keys(ids: tf.Tensor | None, bag_ids: tf.RaggedTensor, bag_counts: tf.RaggedTensor, batch: tf.Tensor, *,
               tag: int) -> tf.Tensor:
    """``[batch, 2]`` int64: (document id key, bag key); a match in either column is an accidental hit."""
    return tf.stack([candidate_keys(ids, batch, tag=tag), bag_keys(bag_ids, bag_counts)], axis=1)
