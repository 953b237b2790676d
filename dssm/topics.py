"""Topic-aware batches: each training batch drawn from pairs that are lexically close (``--topic-batches``).

With in-batch negatives, a batch of random pairs asks the towers to tell a query's document from 255
documents on other subjects, which a bag of trigrams already does; BM25's near misses (documents on
the query's subject that are not its answer) are what the towers lose to BM25 on. TAS-Balanced
(Hofstätter et al., SIGIR 2021, "Efficiently Teaching an Effective Dense Retriever with Balanced
Topic Aware Sampling") clusters the training queries once and fills each batch from one cluster, so
the in-batch negatives are on the query's topic. Here the clusters are made from the pairs' own
hashed bags, label-free and model-free, inside the input pipeline:

1. each pair's query bag and document bag, counts weighted by the bucket's idf over the pairs'
   documents, are projected on ``dim`` seeded Gaussian directions (one per distinct bucket; a
   Johnson-Lindenstrauss sketch, so the cosine of two projections approximates the cosine of the
   weighted bags), L2-normalised, summed and normalised again;
2. spherical k-means (``iterations`` Lloyd steps from a seeded k-means++ start) groups them into ``n / batch_size``
   clusters;
3. every epoch shuffles the pairs, then stably sorts them by a shuffled order of the clusters, so
   consecutive batches hold one cluster (or the ends of two) and the epoch's order still depends
   only on ``(seed, epoch)``.
"""

from __future__ import annotations

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["topic_clusters", "topic_order"]

DIM = 256  # a sketch this wide separates topics of real questions better than 64 (tests/test_topics.py)
_CHUNK = 8192  # rows scored against every centroid at once (8,192 x 1,000 clusters: 33 MB)


def _sketch(ids: tf.RaggedTensor, counts: tf.RaggedTensor, idx: tf.Tensor, idf: tf.Tensor,
            directions: tf.Tensor) -> tf.Tensor:
    """``[rows, dim]`` L2-normalised projections of idf-weighted bags (``idx``: each flat id's distinct index).

    A sparse ``[rows, distinct]`` by dense ``[distinct, dim]`` product: memory in tokens, not tokens x dim.
    """
    weights = counts.flat_values * tf.gather(idf, idx)  # [tokens]
    bags = tf.sparse.SparseTensor(tf.stack([tf.cast(ids.value_rowids(), tf.int64), idx], axis=1), weights,
                                  tf.stack([tf.cast(ids.nrows(), tf.int64), tf.shape(idf, out_type=tf.int64)[0]]))
    return tf.math.l2_normalize(tf.sparse.sparse_dense_matmul(bags, directions), axis=1)


def _assign(sketch: tf.Tensor, centroids: tf.Tensor) -> tf.Tensor:
    """``[n]`` int64 nearest centroid (largest cosine) of each row, in chunks of rows: ``[chunk, k]`` at a time."""
    n = tf.shape(sketch)[0]
    padded = tf.pad(sketch, [[0, -n % _CHUNK], [0, 0]])
    chunks = tf.reshape(padded, [-1, _CHUNK, tf.shape(sketch)[1]])
    nearest = tf.map_fn(lambda rows: tf.argmax(tf.matmul(rows, centroids, transpose_b=True), axis=1), chunks,
                        fn_output_signature=tf.int64)
    return tf.reshape(nearest, [-1])[:n]


def _spread_start(sketch: tf.Tensor, k: tf.Tensor, *, seed: int) -> tf.Tensor:
    """``[k, dim]`` greedy k-means++ start (Arthur & Vassilvitskii 2007; the greedy form scikit-learn uses).

    Each next centroid: ``2 + ln k`` rows drawn with probability proportional to their distance ``1 - cos``
    (half the squared distance of unit vectors) from the nearest centroid so far, and the one that leaves the
    smallest total distance kept. A uniform start (and plain k-means++ on the tests' four topics, one seed
    in three) leaves a topic without a centroid and splits another in two.
    """
    n = tf.shape(sketch, out_type=tf.int64)[0]
    trials = tf.cast(2.0 + tf.math.log(tf.cast(k, tf.float32)), tf.int32)
    first = tf.random.stateless_uniform([], seed=[seed, 2], maxval=n, dtype=tf.int64)
    chosen = tf.TensorArray(tf.int64, size=tf.cast(k, tf.int32)).write(0, first)
    nearest = tf.matmul(sketch, sketch[first][:, None])[:, 0]  # [n] cosine to the nearest chosen centroid

    def step(i: tf.Tensor, chosen: tf.TensorArray, nearest: tf.Tensor) -> tuple[tf.Tensor, tf.TensorArray, tf.Tensor]:
        distance = tf.maximum(1.0 - nearest, 0.0) + 1e-12
        rows = tf.random.stateless_categorical(tf.math.log(distance)[None, :], trials,
                                               seed=[seed, 10 + tf.cast(i, tf.int64)], dtype=tf.int64)[0]
        after = tf.maximum(nearest[:, None], tf.matmul(sketch, tf.gather(sketch, rows), transpose_b=True))
        best = tf.argmin(tf.reduce_sum(1.0 - after, axis=0))
        return i + 1, chosen.write(i, rows[best]), after[:, best]

    _, chosen, _ = tf.while_loop(lambda i, *_: i < tf.cast(k, tf.int32), step, (tf.constant(1), chosen, nearest))
    return tf.gather(sketch, chosen.stack())


def topic_clusters(pairs: dict[str, tf.Tensor], *, batch_size: int, seed: int, dim: int = DIM,
                   iterations: int = 10) -> tf.Tensor:
    """The cluster of every pair: ``[n]`` int64 in ``[0, max(1, round(n / batch_size)))``.

    Args:
        pairs: the in-memory table of :func:`dssm.inputs.make_dataset`: ``query_ids``/``query_counts`` and
            ``document_ids``/``document_counts`` ``[n, None]`` ragged.
        batch_size: pairs per batch; there are about as many clusters as batches.
        seed: seeds the directions and the k-means start.
        dim: width of the sketch the clusters are made in.
        iterations: Lloyd steps.
    """
    query_ids, document_ids = pairs["query_ids"], pairs["document_ids"]
    n = tf.cast(query_ids.nrows(), tf.int64)
    flat = tf.concat([query_ids.flat_values, document_ids.flat_values], axis=0)
    distinct, idx = tf.unique(flat, out_idx=tf.int64)
    # idf over the documents: a bucket on every document page says nothing about the topic.
    doc_idx = idx[tf.size(query_ids.flat_values, out_type=tf.int64):]
    df = tf.math.unsorted_segment_sum(tf.ones_like(doc_idx, tf.float32), doc_idx, tf.size(distinct))
    idf = tf.math.log((tf.cast(n, tf.float32) + 1.0) / (df + 1.0)) + 1.0
    directions = tf.random.stateless_normal([tf.size(distinct), dim], seed=[seed, 1])
    query_idx = idx[:tf.size(query_ids.flat_values, out_type=tf.int64)]
    sketch = tf.math.l2_normalize(
        _sketch(query_ids, pairs["query_counts"], query_idx, idf, directions)
        + _sketch(document_ids, pairs["document_counts"], doc_idx, idf, directions), axis=1)  # [n, dim]
    k = tf.maximum(tf.cast(tf.round(tf.cast(n, tf.float64) / batch_size), tf.int64), 1)
    centroids = _spread_start(sketch, k, seed=seed)  # [k, dim]
    for _ in range(iterations):  # a fixed, small count: unrolled in the graph
        assign = _assign(sketch, centroids)
        sums = tf.math.unsorted_segment_sum(sketch, assign, k)
        # A cluster left empty keeps its centroid (a zero sum would normalise to zero and never win again).
        empty = tf.reduce_all(tf.equal(sums, 0.0), axis=1, keepdims=True)
        centroids = tf.where(empty, centroids, tf.math.l2_normalize(sums, axis=1))
    return _assign(sketch, centroids)


def topic_order(clusters: tf.Tensor, *, seed: int) -> tf.Tensor:
    """One epoch's order of the pairs: ``[n]`` int64, clusters contiguous, in a shuffled order.

    Args:
        clusters: ``[n]`` int64 cluster of each pair (:func:`topic_clusters`).
        seed: the epoch's seed; the same seed gives the same order.
    """
    n = tf.shape(clusters, out_type=tf.int64)[0]
    shuffled = tf.random.experimental.stateless_shuffle(tf.range(n), seed=[seed, 0])
    k = tf.reduce_max(clusters) + 1
    rank = tf.random.experimental.stateless_shuffle(tf.range(k), seed=[seed, 3])  # cluster -> its place
    return tf.gather(shuffled, tf.argsort(tf.gather(rank, tf.gather(clusters, shuffled)), stable=True))
