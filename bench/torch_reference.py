"""A plain PyTorch DSSM of the same shape as :class:`dssm.model.DSSMModel`: the ``train`` part's peer.

What a PyTorch user would write for the model ``dssm train`` trains by default, with nothing tuned:

* one shared (Siamese) tower: ``nn.EmbeddingBag(num_buckets, embedding_dim, mode="sum", sparse=True)``
  over the hashed ids with ``per_sample_weights`` = the counts (the DSSM layer on raw counts), plus a
  bias and tanh, then ``nn.Linear`` + tanh for each of ``hidden_dims``, then L2 normalisation;
* the in-batch softmax: scores ``q @ d.T / temperature``, the diagonal as labels, accidental hits
  (another row with the same document id) masked, mean cross-entropy over the batch;
* ``torch.optim.Adagrad`` (lr, initial accumulator 0.1 and epsilon 1e-7 as Keras' Adagrad) on all
  parameters; the table's gradient is sparse, so Adagrad updates only the rows a batch touched.

Queries and documents of a batch go through the tower in one ``EmbeddingBag`` call (``2 × batch``
bags), as the TF model does, so each step gathers the table once. Initialisation follows Keras
(truncated normal table, Glorot-uniform dense kernels, zero biases). The bags come from
:class:`dssm.features.Featurizer`, so both frameworks train on the same ids and counts.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# Adagrad's sparse update builds a sparse tensor per step; torch asks whether to validate it. The
# default (no check) is what a user gets, so the benchmark keeps it and only drops the notice.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

__all__ = ["TorchBatch", "TorchDSSM", "make_batches", "from_ragged", "make_optimizer", "loss_fn", "train_step",
           "set_threads"]


@dataclass(frozen=True)
class TorchBatch:
    """One batch of ``n`` pairs as ``EmbeddingBag`` input: ``2n`` bags, the ``n`` queries first.

    Attributes:
        ids: ``[entries]`` int64 bucket ids of all bags, concatenated.
        offsets: ``[2n]`` int64 start of each bag in ``ids``.
        weights: ``[entries]`` float32 counts (``per_sample_weights``).
        keys: ``[n]`` int64 document keys (equal keys = the same document: accidental hits).
    """

    ids: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor
    keys: torch.Tensor

    @property
    def pairs(self) -> int:
        return int(self.keys.shape[0])


class TorchDSSM(nn.Module):
    """The shared tower: ``[bags]`` → ``[bags, hidden_dims[-1]]`` unit vectors.

    Args:
        num_buckets: rows of the embedding table.
        embedding_dim: width of the embedding bag.
        hidden_dims: dense layers after the bag (tanh after each).
        init_stddev: stddev of the table's truncated-normal init.
    """

    def __init__(self, *, num_buckets: int, embedding_dim: int, hidden_dims: Sequence[int],
                 init_stddev: float) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(num_buckets, embedding_dim, mode="sum", sparse=True)
        nn.init.trunc_normal_(self.bag.weight, std=init_stddev, a=-2 * init_stddev, b=2 * init_stddev)
        self.bias = nn.Parameter(torch.zeros(embedding_dim))
        widths = [embedding_dim, *hidden_dims]
        self.dense = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        for layer in self.dense:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Args: ids/weights ``[entries]``, offsets ``[bags]``. Returns ``[bags, dim]`` float32, unit rows."""
        x = torch.tanh(self.bag(ids, offsets, per_sample_weights=weights) + self.bias)
        for layer in self.dense:
            x = torch.tanh(layer(x))
        return nn.functional.normalize(x, dim=-1)


def loss_fn(model: TorchDSSM, batch: TorchBatch, *, temperature: float) -> torch.Tensor:
    """Mean in-batch softmax cross-entropy of ``batch`` (a scalar)."""
    out = model(batch.ids, batch.offsets, batch.weights)
    n = batch.pairs
    query, document = out[:n], out[n:]
    logits = query @ document.T / temperature
    eye = torch.eye(n, dtype=torch.bool)
    hits = (batch.keys[:, None] == batch.keys[None, :]) & ~eye
    logits = logits.masked_fill(hits, torch.finfo(logits.dtype).min)
    return nn.functional.cross_entropy(logits, torch.arange(n))


def make_optimizer(model: TorchDSSM, *, learning_rate: float) -> torch.optim.Optimizer:
    """Adagrad over every parameter (the table's gradient is sparse), with Keras' Adagrad constants."""
    return torch.optim.Adagrad(model.parameters(), lr=learning_rate, initial_accumulator_value=0.1, eps=1e-7)


def train_step(model: TorchDSSM, optimizer: torch.optim.Optimizer, batch: TorchBatch, *,
               temperature: float) -> torch.Tensor:
    """One optimizer step on ``batch``; returns the loss (detached)."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch, temperature=temperature)
    loss.backward()
    optimizer.step()
    return loss.detach()


def from_ragged(query_ids: Any, query_counts: Any, document_ids: Any, document_counts: Any,
                keys: np.ndarray, *, combiner: str = "sum") -> TorchBatch:
    """A :class:`TorchBatch` from the featurizer's ragged ``[n, None]`` bags (TF ragged tensors) and ``[n]`` keys.

    ``combiner`` as :class:`dssm.model.ModelConfig`'s ``bag_combiner``: ``sqrtn``/``mean`` divide each
    bag's counts by the square root of / the bag's total count (at least 1), which the sum-mode
    ``EmbeddingBag`` then pools exactly as the TF bag does.
    """
    ids = np.concatenate([query_ids.flat_values.numpy(), document_ids.flat_values.numpy()])
    weights = np.concatenate([query_counts.flat_values.numpy(), document_counts.flat_values.numpy()])
    q_splits = query_ids.row_splits.numpy()
    d_splits = document_ids.row_splits.numpy()
    offsets = np.concatenate([q_splits[:-1], d_splits[:-1] + q_splits[-1]])
    if combiner != "sum":
        lengths = np.diff(np.append(offsets, ids.size))
        totals = np.add.reduceat(np.round(weights), offsets) if ids.size else np.zeros(0)
        scale = np.maximum(np.sqrt(totals) if combiner == "sqrtn" else totals, 1.0)
        weights = weights / np.repeat(scale, lengths)
    return TorchBatch(ids=torch.from_numpy(ids.astype(np.int64)), offsets=torch.from_numpy(offsets.astype(np.int64)),
                      weights=torch.from_numpy(weights.astype(np.float32)),
                      keys=torch.from_numpy(np.asarray(keys, dtype=np.int64)))


def make_batches(pairs: Sequence[tuple[str, str, str]], *, featurizer: Any, batch_size: int,
                 combiner: str = "sum") -> list[TorchBatch]:
    """Featurize ``(query, document, document_id)`` pairs into full batches of ``batch_size`` (the rest dropped).

    The document keys are FarmHash64 of the id, as :class:`dssm.model.DSSMModel` hashes ``document_id``.
    """
    import tensorflow as tf

    batches = []
    for start in range(0, len(pairs) - batch_size + 1, batch_size):
        chunk = pairs[start:start + batch_size]
        q_ids, q_counts = featurizer.bags(tf.constant([p[0] for p in chunk]))
        d_ids, d_counts = featurizer.bags(tf.constant([p[1] for p in chunk]))
        keys = tf.strings.to_hash_bucket_fast(tf.constant([p[2] for p in chunk]), 2**62).numpy()
        batches.append(from_ragged(q_ids, q_counts, d_ids, d_counts, keys, combiner=combiner))
    return batches


def set_threads() -> int:
    """Use every core for intra-op work (as TF does by default); returns the thread count."""
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads
