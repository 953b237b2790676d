"""Retrieval validation: the validation split as a search task, scored after every epoch.

This module owns the exact-search validation that picks the best epoch: :func:`read_validation_set`
turns the ``validation-*`` shards into queries and their relevant documents (up to
``validation_queries`` queries against every document of the split, de-duplicated by
``document_id``, plus any :func:`corpus_distractors`), :func:`evaluate_retrieval` scores them with
the current towers as Recall@10 and MRR@10, and :class:`RetrievalValidation` logs those as
``val_recall_at_10`` / ``val_mrr_at_10`` at the end of each epoch. :data:`MONITOR` is the metric
early stopping and keep-best follow.

**Distractors.** The split's own documents are a small, easy haystack: on debian-dev's labelled
validation split (1,368 queries) BM25 finds the paired description with MRR@10 0.84 among the
split's 1,368 documents but 0.65 among the corpus's 34,090, and a trained tower 0.80 and 0.51. So the
split says little about the search a user runs, and ranks levers differently (docs/quality.md). The
documents of the corpus the model will index (``dssm train --validation-corpus``, ``dssm select
--corpus``) can join the haystack: each is unlabelled, so it only ever counts against a query
(an unlabelled copy of a relevant document is left out by id and by text).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.data import document_text, iter_corpus
from dssm.errors import InputError
from dssm.hashing import FeatureConfig, TokenBagger
from dssm.inputs import VALIDATION_SPEC
from dssm.metrics import mrr_at_k, recall_at_k
from dssm.model import DSSMModel

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["MONITOR", "Distractor", "ValidationSet", "corpus_distractors", "read_validation_set",
           "evaluate_retrieval", "monitored_value", "RetrievalValidation", "hint", "EASY_HAYSTACK"]

# The metric early stopping and the best checkpoint follow (higher is better).
MONITOR = "val_recall_at_10"
_K = 10

#: A validation distractor: ``(document id, text, (ids, counts) bag)``.
Distractor = tuple[str, str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class ValidationSet:
    """Validation queries and documents for exact-search Recall@k / MRR@k.

    Attributes:
        query_keys: ``query_id`` (else the query text) of each query, in row order.
        document_keys: ``document_id`` (else the text) of each document, in row order.
        queries: the query bags in batches, each ``(ids, counts)`` ``[batch, None]`` int64/float32 ragged.
        documents: the document bags in batches, likewise.
        relevant: per query, the sorted rows of its relevant documents (``label > min_label``).
        excluded: ``[m, 2]`` int64 ``(query row, document row)`` pairs left out of the ranking: a
            document whose text is the query's own (a question asked again is not a result).
    """

    query_keys: list[str]
    document_keys: list[str]
    queries: list[tuple[tf.RaggedTensor, tf.RaggedTensor]]
    documents: list[tuple[tf.RaggedTensor, tf.RaggedTensor]]
    relevant: list[np.ndarray]
    excluded: np.ndarray

    @property
    def num_queries(self) -> int:
        return len(self.query_keys)

    @property
    def num_documents(self) -> int:
        return len(self.document_keys)


def _ragged_batches(bags: list[tuple[np.ndarray, np.ndarray]], batch_size: int
                    ) -> list[tuple[tf.RaggedTensor, tf.RaggedTensor]]:
    out = []
    for start in range(0, len(bags), batch_size):
        chunk = bags[start:start + batch_size]
        lengths = np.array([len(ids) for ids, _ in chunk], np.int64)
        ids = np.concatenate([ids for ids, _ in chunk]).astype(np.int64)
        counts = np.concatenate([counts for _, counts in chunk]).astype(np.float32)
        out.append((tf.RaggedTensor.from_row_lengths(ids, lengths), tf.RaggedTensor.from_row_lengths(counts, lengths)))
    return out



class _Rows:
    """Distinct keys (query or document ids) in first-seen order, each with its bag and decoded key."""

    def __init__(self) -> None:
        self.row: dict[bytes, int] = {}
        self.bags: list[tuple[np.ndarray, np.ndarray]] = []
        self.keys: list[str] = []

    def add(self, key: bytes, make_bag: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[int, bool]:
        """``(row of key, whether it is new)``; a new key's bag is made and stored."""
        row = self.row.get(key)
        if row is not None:
            return row, False
        row = self.row[key] = len(self.bags)
        self.bags.append(make_bag())
        self.keys.append(key.decode("utf-8", "replace"))
        return row, True


def corpus_distractors(path: str | Path, *, features: FeatureConfig, limit: int, seed: int,
                       columns: str = "") -> list[Distractor]:
    """The documents of a corpus file (BEIR ``corpus.jsonl`` or any table :func:`dssm.data.iter_corpus`
    reads) as validation distractors, hashed by ``features``; a seeded sample of ``limit`` if larger;
    none, and nothing read, for ``path`` ``""`` or ``limit`` 0 (the trainer passes 0 when it has no
    validation split to search). ``columns`` (``"ID,TEXT"`` or ``"ID,TEXT,TITLE"``) names a table's
    columns when they are not the defaults :func:`dssm.data.iter_corpus` looks for.

    Raises:
        InputError: the corpus is missing or a record is bad (named by :func:`dssm.data.iter_corpus`).
    """
    if not path or limit <= 0:
        return []
    names = [c.strip() for c in columns.split(",")] if columns else []
    if names and not (2 <= len(names) <= 3 and all(names)):
        raise InputError(f"corpus columns must be ID,TEXT or ID,TEXT,TITLE, got {columns!r}")
    id_column, text_column, title_column = (names + ["title"])[:3] if names else (None, None, "title")
    documents = [(doc.id, document_text(doc.title, doc.text))
                 for doc in iter_corpus(path, id_column=id_column, text_column=text_column, title_column=title_column)]
    if len(documents) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(documents), size=limit, replace=False))
        documents = [documents[i] for i in keep.tolist()]
    bags = TokenBagger(features).bags_numpy([text for _, text in documents])
    return [(doc_id, text, bag) for (doc_id, text), bag in zip(documents, bags, strict=True)]


def read_validation_set(files: Sequence[str], *, min_label: float, max_queries: int, seed: int,
                        batch_size: int = 1024, distractors: Sequence[Distractor] = ()) -> ValidationSet | None:
    """The validation split as a retrieval task: its queries against all its documents (and distractors).

    Documents are every ``document_*`` of the shards (relevant or not), de-duplicated by
    ``document_id``; a query's relevant documents are those it is paired with at ``label >
    min_label``. Queries without one are dropped; above ``max_queries``, a sample seeded by ``seed``
    is kept (the same queries every epoch and every run). Then each distractor whose id is not a
    document id of the split and whose text is not a document text of it becomes one more document,
    relevant to none (a distractor whose text is a query's own is left out of that query's ranking,
    as a split document would be).

    Args:
        files: ``validation-*`` shards.
        min_label: pairs at or below it are not relevant (the trainer's positive threshold).
        max_queries: at most this many queries (0 = none).
        seed: the sampling seed.
        batch_size: bags per embedding batch.
        distractors: more documents (:func:`corpus_distractors`), hashed like the shards.

    Returns:
        The set, or None when there are no files, no queries with a relevant document or ``max_queries`` is 0.
    """
    if not files or max_queries <= 0:
        return None
    ds = tf.data.TFRecordDataset(list(files), compression_type="GZIP").batch(1024)
    ds = ds.map(lambda records: tf.io.parse_example(records, VALIDATION_SPEC))
    docs, queries = _Rows(), _Rows()
    doc_text_rows: dict[bytes, list[int]] = {}
    query_texts: list[bytes] = []
    relevant: list[set[int]] = []
    for batch in ds:
        columns = {key: batch[key].numpy() for key in ("query_id", "query_text", "document_id", "document_text",
                                                        "label")}
        bags = {key: (batch[key].values.numpy(), batch[key].row_splits.numpy())
                for key in ("query_ids", "query_counts", "document_ids", "document_counts")}

        def bag(prefix: str, i: int, bags: dict[str, tuple[np.ndarray, np.ndarray]] = bags
                ) -> tuple[np.ndarray, np.ndarray]:
            ids, splits = bags[f"{prefix}_ids"]
            counts, _ = bags[f"{prefix}_counts"]
            return ids[splits[i]:splits[i + 1]], counts[splits[i]:splits[i + 1]]

        for i in range(len(columns["label"])):
            row, new = docs.add(columns["document_id"][i] or columns["document_text"][i], partial(bag, "document", i))
            if new:
                doc_text_rows.setdefault(columns["document_text"][i], []).append(row)
            q, new = queries.add(columns["query_id"][i] or columns["query_text"][i], partial(bag, "query", i))
            if new:
                query_texts.append(columns["query_text"][i])
                relevant.append(set())
            if columns["label"][i] > min_label:
                relevant[q].add(row)
    chosen = [q for q in range(len(queries.bags)) if relevant[q]]
    if not chosen:
        return None
    if len(chosen) > max_queries:
        chosen = sorted(np.random.default_rng(seed).choice(chosen, size=max_queries, replace=False).tolist())
    for doc_id, text, bag in distractors:
        key, raw = doc_id.encode("utf-8"), text.encode("utf-8")
        if raw not in doc_text_rows:
            row, new = docs.add(key, lambda bag=bag: bag)  # an id already taken adds nothing
            if new:
                doc_text_rows[raw] = [row]
    excluded = [(new, row) for new, q in enumerate(chosen) for row in doc_text_rows.get(query_texts[q], [])
                if row not in relevant[q]]
    return ValidationSet(
        query_keys=[queries.keys[q] for q in chosen], document_keys=docs.keys,
        queries=_ragged_batches([queries.bags[q] for q in chosen], batch_size),
        documents=_ragged_batches(docs.bags, batch_size),
        relevant=[np.array(sorted(relevant[q]), np.int64) for q in chosen],
        excluded=np.array(excluded, np.int64).reshape(-1, 2))


def _embed_batches(tower: tf.keras.Model, batches: list[tuple[tf.RaggedTensor, tf.RaggedTensor]]) -> tf.Tensor:
    """``[n, dim]`` float32 embeddings of the bags, with dropout off.

    Eager on purpose: a few dozen batches per epoch cost less than tracing a tf.function each time.
    """
    return tf.concat([tower((ids, counts), training=False) for ids, counts in batches], axis=0)


def evaluate_retrieval(model: DSSMModel, validation: ValidationSet, *, k: int = _K,
                       batch_size: int = 1024) -> dict[str, float]:
    """Exact search of every validation query among all validation documents, with the current towers.

    Args:
        model: queries go through ``model.query_tower``, documents through ``model.document_tower``
            (``training=False``).
        validation: from :func:`read_validation_set`.
        k: the cut-off.
        batch_size: queries scored per matrix product (``[batch, num_documents]`` scores).

    Returns:
        ``{"recall_at_{k}": mean Recall@k, "mrr_at_{k}": mean MRR@k}`` over the queries, with the
        definitions of :func:`dssm.metrics.recall_at_k` / :func:`dssm.metrics.mrr_at_k`.
    """
    documents = _embed_batches(model.document_tower, validation.documents)
    queries = _embed_batches(model.query_tower, validation.queries)
    k = min(k, validation.num_documents)
    top = np.empty((validation.num_queries, k), np.int64)
    excluded = validation.excluded
    for start in range(0, validation.num_queries, batch_size):
        block = queries[start:start + batch_size]
        scores = tf.matmul(block, documents, transpose_b=True)
        mine = excluded[(excluded[:, 0] >= start) & (excluded[:, 0] < start + batch_size)]
        if len(mine):
            rows = tf.constant(mine - np.array([start, 0]), tf.int64)
            scores = tf.tensor_scatter_nd_update(scores, rows, tf.fill([len(mine)], -np.inf))
        top[start:start + len(block)] = tf.math.top_k(scores, k=k).indices.numpy()
    recall = mrr = 0.0
    for ranked, relevant in zip(top, validation.relevant, strict=True):
        grades = dict.fromkeys(relevant.tolist(), 1.0)
        recall += recall_at_k(ranked.tolist(), grades, k)
        mrr += mrr_at_k(ranked.tolist(), grades, k)
    n = validation.num_queries
    return {f"recall_at_{_K}": recall / n, f"mrr_at_{_K}": mrr / n}


def monitored_value(model: DSSMModel, validation: ValidationSet) -> float:
    """The :data:`MONITOR` figure of ``model``'s current towers (:func:`evaluate_retrieval`'s Recall@10)."""
    return evaluate_retrieval(model, validation)[MONITOR.removeprefix("val_")]


class RetrievalValidation(tf.keras.callbacks.Callback):
    """Adds ``val_recall_at_10``, ``val_mrr_at_10`` and ``val_retrieval_seconds`` to each epoch's logs."""

    def __init__(self, validation: ValidationSet) -> None:
        super().__init__()
        self.validation = validation

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        start = time.perf_counter()
        metrics = evaluate_retrieval(self.model, self.validation)
        if logs is not None:
            logs.update({f"val_{name}": value for name, value in metrics.items()})
            logs["val_retrieval_seconds"] = time.perf_counter() - start


#: A best validation recall@10 at or above this, searched among the split's own documents only, leaves
#: early stopping and the best-epoch pick little to tell epochs apart by (:func:`hint`).
EASY_HAYSTACK = 0.9


def hint(history: dict[str, Any], train_config: Any) -> str:
    """A note for ``dssm train``'s summary line when the epoch it kept was judged on an easy haystack.

    Without ``--validation-corpus`` the split's queries search only the split's documents, where a
    fine-tuned tower finds nearly all of them: on SciFact's pairs the best epoch scored val R@10 0.971
    there, early stopping kept epoch 5 of 8, and among the corpus's 5,183 abstracts that model scored
    0.672 against 0.766 for 10 epochs (docs/quality.md). Empty when nothing was chosen by the split
    (no early stop, the last epoch kept), when a corpus judged it, or when the split was hard enough.
    """
    recalls = history.get(MONITOR) or []
    epochs = history.get("epoch") or []
    chose = bool(history.get("stopped_early")) or (bool(epochs) and history.get("weights_epoch") != epochs[-1])
    if train_config.validation_corpus or not chose or not recalls or max(recalls) < EASY_HAYSTACK:
        return ""
    return (f"\nnote: the epoch kept was judged among the validation split's own documents, where {MONITOR} "
            f"reached {max(recalls):.3f}; pass --validation-corpus CORPUS (the corpus you will index) to judge it "
            "among that corpus's documents, or --early-stopping-patience 0 --no-keep-best for fixed epochs")
