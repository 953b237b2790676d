"""The optimizers: sparse updates of the embedding tables, and the ``--optimizer`` choice.

This module owns :data:`OPTIMIZERS` and :func:`make_optimizer`, and the optimizers that update only
the table rows a batch touches. The table is ``[num_buckets, embedding_dim]`` (2^18 × 300 floats,
315 MB, by default) and each batch touches a few tens of thousands of its rows. Keras' Adam applies
its moment decay to the *whole* table every step even for sparse gradients, which dominates the
step; ``adagrad`` (:class:`SparseAdagrad`), ``rowwise_adagrad`` (:class:`RowwiseAdagrad`) and
``lazy_adam`` (:class:`LazyAdam`, Adam restricted to the rows in the batch) update only the rows a
batch touches.
"""

from __future__ import annotations

from typing import Any, Protocol

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.bags import gathered_rows

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["OPTIMIZERS", "OptimizerConfig", "SparseAdagrad", "RowwiseAdagrad", "LazyAdam", "make_optimizer"]

OPTIMIZERS = ("adagrad", "rowwise_adagrad", "lazy_adam", "adam", "sgd")


class OptimizerConfig(Protocol):
    """What :func:`make_optimizer` reads of a :class:`dssm.train.TrainConfig`."""

    @property
    def optimizer(self) -> str: ...

    @property
    def learning_rate(self) -> float: ...


class _UniqueRows:
    """Skips Keras' sparse-gradient de-duplication when the rows are already unique (a cheap check).

    Keras runs ``unique`` + ``unsorted_segment_sum`` over every sparse gradient before applying it.
    :class:`~dssm.model.DSSMModel` gathers each table once per step, so its gradients have unique
    rows and the segment sum would copy ``[rows, dim]`` for nothing; it still runs if they are not.
    """

    def _deduplicate_sparse_grad(self, grads: list[Any]) -> list[Any]:
        return [_unique_rows(grad) if isinstance(grad, tf.IndexedSlices) else grad for grad in grads]


def _unique_rows(grad: tf.IndexedSlices) -> tf.IndexedSlices:
    """``grad`` with each row once (duplicates summed), copying nothing when the rows are already distinct.

    An :class:`~dssm.bags.EmbeddingBag`'s own gradient (marked, see :func:`dssm.bags.gathered_rows`)
    has distinct rows by construction and passes as is; strictly ascending indices are confirmed by
    one comparison of neighbours; anything else (e.g. gradients concatenated across replicas) goes
    through ``unique``, and the segment sum runs only if something repeats.
    """
    indices = grad.indices
    if gathered_rows(indices) is not None:
        return grad

    def merged() -> tuple[tf.Tensor, tf.Tensor]:
        # unique keeps first-appearance order, so when nothing repeats `rows` equals the indices.
        rows, position = tf.unique(indices)
        values = tf.cond(tf.size(rows) == tf.size(indices), lambda: grad.values,
                         lambda: tf.math.unsorted_segment_sum(grad.values, position, tf.size(rows)))
        return values, rows

    ascending = tf.reduce_all(indices[1:] > indices[:-1])
    values, rows = tf.cond(ascending, lambda: (grad.values, indices), merged)
    return tf.IndexedSlices(values, rows, grad.dense_shape)


class SparseAdagrad(_UniqueRows, tf.keras.optimizers.Adagrad):
    """Adagrad whose sparse update is TF's fused ``ResourceSparseApplyAdagradV2`` kernel.

    One pass over the touched rows instead of Keras' five (square, scatter-add, gather, divide,
    scatter-add). The update is ``var -= lr * g / (sqrt(accum) + epsilon)`` (Keras puts epsilon
    inside the square root; with epsilon = 1e-7 the difference is below float32 resolution).
    """

    def update_step(self, gradient: Any, variable: tf.Variable) -> None:
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        accumulator = self._accumulators[self._index_dict[self._var_key(variable)]]
        tf.raw_ops.ResourceSparseApplyAdagradV2(
            var=variable.handle, accum=accumulator.handle, lr=tf.cast(self.learning_rate, variable.dtype),
            epsilon=tf.cast(self.epsilon, variable.dtype), grad=gradient.values, indices=gradient.indices,
            use_locking=False)
        return None


def _is_embedding_table(variable: tf.Variable) -> bool:
    return variable.shape.rank == 2 and "embedding_bag/table" in variable.name


class RowwiseAdagrad(_UniqueRows, tf.keras.optimizers.Adagrad):
    """Adagrad with one accumulator per embedding-table *row* (dense layers keep Keras' Adagrad).

    For the tables (:class:`~dssm.bags.EmbeddingBag`), ``acc[row] += mean(g[row]^2)`` and
    ``table[row] -= lr * g[row] / sqrt(acc[row] + epsilon)``: the update writes only the touched
    table rows and reads a ``[num_buckets]`` accumulator, instead of reading and writing a second
    ``[num_buckets, dim]`` accumulator at random rows, which roughly halves the optimizer's share of
    the step. This is the row-wise Adagrad that large recommender embedding tables use (e.g. DLRM).
    """

    def build(self, var_list: list[tf.Variable]) -> None:
        tf.keras.optimizers.Optimizer.build(self, var_list)
        if getattr(self, "_built", False):
            return
        self._built = True
        self._accumulators = []
        for var in var_list:
            shape = [var.shape[0]] if _is_embedding_table(var) else var.shape
            self._accumulators.append(self.add_variable_from_reference(
                var, "accumulator", initial_value=tf.fill(shape, tf.cast(self.initial_accumulator_value, var.dtype))))

    def update_step(self, gradient: Any, variable: tf.Variable) -> None:
        if not _is_embedding_table(variable):
            return super().update_step(gradient, variable)
        accumulator = self._accumulators[self._index_dict[self._var_key(variable)]]
        lr = tf.cast(self.learning_rate, variable.dtype)
        if isinstance(gradient, tf.IndexedSlices):
            rows, values = gradient.indices, gradient.values
            acc = tf.gather(accumulator, rows) + _row_mean_square(values)
            accumulator.scatter_update(tf.IndexedSlices(acc, rows))
            # Gather, update, scatter_update: TF's scatter_sub kernel costs about three times a
            # gather plus a (memcpy) scatter_update of the same rows. Rows are unique here.
            old = gathered_rows(rows)
            if old is None or old.dtype != variable.dtype:
                old = tf.gather(variable, rows)
            new = old - values * (lr * tf.math.rsqrt(acc + self.epsilon))[:, None]
            variable.scatter_update(tf.IndexedSlices(new, rows))
        else:
            accumulator.assign_add(_row_mean_square(gradient))
            variable.assign_sub(gradient * (lr * tf.math.rsqrt(accumulator + self.epsilon))[:, None])
        return None


def _row_mean_square(values: tf.Tensor) -> tf.Tensor:
    """``[rows, dim]`` → ``[rows]`` mean of the squares of each row.

    As the squared Euclidean norm: one fused pass (``reduce_mean(square(x))`` writes and rereads a
    ``[rows, dim]`` temporary, ~3x the CPU time for a batch's ~18k table rows); the sqrt and square
    round it by about an ulp.
    """
    return tf.square(tf.math.reduce_euclidean_norm(values, axis=1)) / tf.cast(tf.shape(values)[1], values.dtype)


class LazyAdam(_UniqueRows, tf.keras.optimizers.Adam):
    """Adam whose sparse update reads and writes only the rows in the gradient.

    For ``tf.IndexedSlices`` gradients the moments of the touched rows are decayed and updated and
    only those rows of the variable move; untouched rows keep stale moments (as in TF-Addons'
    LazyAdam). Dense gradients take Keras' Adam path unchanged.
    """

    def update_step(self, gradient: Any, variable: tf.Variable) -> None:
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        lr = tf.cast(self.learning_rate, variable.dtype)
        step = tf.cast(self.iterations + 1, variable.dtype)
        beta_1 = tf.cast(self.beta_1, variable.dtype)
        beta_2 = tf.cast(self.beta_2, variable.dtype)
        alpha = lr * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
        key = self._var_key(variable)
        m = self._momentums[self._index_dict[key]]
        v = self._velocities[self._index_dict[key]]
        rows = gradient.indices  # unique: de-duplicated before update_step
        m_rows = beta_1 * tf.gather(m, rows) + (1 - beta_1) * gradient.values
        v_rows = beta_2 * tf.gather(v, rows) + (1 - beta_2) * tf.square(gradient.values)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        variable.scatter_sub(tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon), rows))
        return None



def make_optimizer(config: OptimizerConfig) -> tf.keras.optimizers.Optimizer:
    """The optimizer ``config.optimizer`` names, at ``config.learning_rate``."""
    if config.optimizer == "adagrad":
        return SparseAdagrad(config.learning_rate)
    if config.optimizer == "rowwise_adagrad":
        return RowwiseAdagrad(config.learning_rate)
    if config.optimizer == "lazy_adam":
        return LazyAdam(config.learning_rate)
    if config.optimizer == "adam":
        return tf.keras.optimizers.Adam(config.learning_rate)
    return tf.keras.optimizers.SGD(config.learning_rate)
