"""Featurizing pairs into ``tf.train.Example`` records, and explicit negatives as a third tower input.

This module owns the TFRecord features of docs/design.md ("Pair shards"): :func:`pair_example` writes
one Example, :func:`featurize_pairs` a batch of them from one featurizer call, and the DoFns around
it: :class:`MakePairs` (check + featurize a chunk of raw records, the pairs job's main step),
:class:`FeaturizePairs` (batches of pairs) and :class:`FeaturizeChunks` (chunks of pairs made
elsewhere). It also owns the explicit negatives: grouping pairs by normalised query text
(:func:`negative_entries`, :func:`attach_negatives`) and setting the ``negative_*`` features
(:func:`set_negative`, also used by ``dssm mine``), and the teacher's vectors of ``dssm pairs
--teacher`` (:func:`attach_teacher`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from tqdm import tqdm

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.hashing import FeatureConfig, TokenBagger
from dssm.teacher import teacher_encoder
from pipelines.example_proto import Example
from pipelines.records import REJECTED

__all__ = [
    "pair_example",
    "featurize_pairs",
    "attach_teacher",
    "FeaturizePairs",
    "FeaturizeChunks",
    "MakePairs",
    "example_lists",
    "normalise_text",
    "negative_entries",
    "attach_negatives",
    "set_negative",
]


def _as_list(values: Any) -> list[Any]:
    # Python lists as they are; numpy arrays (from the graph) through tolist(): protobuf converts
    # Python ints/floats three times faster than numpy scalars.
    return values.tolist() if isinstance(values, np.ndarray) else values


def pair_example(pair: dict[str, Any], query_bag: tuple[Any, Any], document_bag: tuple[Any, Any], *,
                 negative_bag: tuple[Any, Any] | None = None, with_negative: bool = False) -> bytes:
    """A serialized ``tf.train.Example`` with exactly the features of docs/design.md.

    Args:
        pair: a validated pair (with ``negative_id``/``negative_text`` when it carries a negative).
        query_bag: ``(ids int64 [m], counts float32 [m])`` of the query: numpy arrays or Python lists.
        document_bag: the same for the document.
        negative_bag: the same for the pair's negative, or ``None``.
        with_negative: also write the ``negative_*`` features (empty when the pair has no negative),
            so every example of a run has the same features.
    """
    example = Example()
    feature = example.features.feature
    for key in ("query_id", "document_id", "query_text", "document_text"):
        feature[key].bytes_list.value.append(pair[key].encode("utf-8"))
    feature["label"].float_list.value.append(pair["label"])
    feature["query_ids"].int64_list.value.extend(_as_list(query_bag[0]))
    feature["query_counts"].float_list.value.extend(_as_list(query_bag[1]))
    feature["document_ids"].int64_list.value.extend(_as_list(document_bag[0]))
    feature["document_counts"].float_list.value.extend(_as_list(document_bag[1]))
    if "query_teacher" in pair:  # dssm pairs --teacher: the teacher's vectors of both texts
        feature["query_teacher"].float_list.value.extend(_as_list(pair["query_teacher"]))
        feature["document_teacher"].float_list.value.extend(_as_list(pair["document_teacher"]))
    if with_negative:
        set_negative(example, pair.get("negative_id", ""), pair.get("negative_text", ""), negative_bag)
    return example.SerializeToString()


def attach_teacher(encode: Callable[[Sequence[str]], np.ndarray], pairs: list[dict[str, Any]]) -> None:
    """Set ``query_teacher``/``document_teacher`` (lists of floats) on every pair, each distinct text encoded once.

    Args:
        encode: a teacher (:func:`dssm.teacher.teacher_encoder`): ``texts -> [n, dim]`` float32.
        pairs: validated pairs, changed in place.
    """
    texts = list(dict.fromkeys(t for p in pairs for t in (p["query_text"], p["document_text"])))
    if not texts:
        return
    rows = dict(zip(texts, np.asarray(encode(texts), dtype=np.float32).tolist(), strict=True))
    for pair in pairs:
        pair["query_teacher"] = rows[pair["query_text"]]
        pair["document_teacher"] = rows[pair["document_text"]]


def featurize_pairs(featurizer: Any, batch: list[dict[str, Any]], *, negatives: bool) -> list[tuple[str, bytes]]:
    """``(split, serialized Example)`` for each pair of ``batch``, from one featurizer call.

    Args:
        featurizer: a :class:`~dssm.hashing.TokenBagger`.
        batch: validated pairs.
        negatives: write the ``negative_*`` features (see :func:`pair_example`).
    """
    n = len(batch)
    with_negative = [i for i, p in enumerate(batch) if negatives and p.get("negative_text")]
    texts = ([p["query_text"] for p in batch] + [p["document_text"] for p in batch]
             + [batch[i]["negative_text"] for i in with_negative])
    bags = featurizer.bags(texts)
    negative_bags = dict(zip(with_negative, bags[2 * n:], strict=True))
    return [(pair["split"], pair_example(pair, bags[i], bags[n + i], negative_bag=negative_bags.get(i),
                                         with_negative=negatives))
            for i, pair in enumerate(batch)]


def example_lists(featurizer: Any, pairs: list[dict[str, Any]], *, batch_size: int,
                  counts: dict[str, int]) -> Iterator[Any]:
    """A chunk's serialized Examples as one list per split: main output ``train``, tagged ``validation``.

    One output element per chunk and split, not per example, so Beam's per-element cost (receivers,
    windowing, the sink's call) is paid per chunk: 200k Quora pairs went from 15.5 s to 14.2 s. The
    writers (:class:`~pipelines.tfrecords.WriteTFRecords`) take lists. ``counts`` gets each split's count.
    """
    by_split: dict[str, list[bytes]] = {"train": [], "validation": []}
    for start in range(0, len(pairs), batch_size):
        for split, example in featurize_pairs(featurizer, pairs[start:start + batch_size], negatives=False):
            by_split[split].append(example)
    for split, examples in by_split.items():
        if examples:
            counts[split] = counts.get(split, 0) + len(examples)
            yield examples if split == "train" else beam.pvalue.TaggedOutput(split, examples)


class FeaturizePairs(beam.DoFn):
    """Batch of pairs → ``(split, serialized tf.train.Example)`` per pair.

    Feed it lists of pairs (``beam.BatchElements``). The texts are hashed by a
    :class:`~dssm.hashing.TokenBagger`, built once per worker in :meth:`setup`, not pickled: plain
    Python, with TensorFlow imported only if some text needs the graph.

    Args:
        feature_config: the featurizer's settings.
        negatives: write the ``negative_*`` features on every example (pairs that carry a
            ``negative_text`` get its bag; the others an empty one).
    """

    def __init__(self, *, feature_config: FeatureConfig, negatives: bool = False) -> None:
        self._config = feature_config
        self._negatives = negatives
        self._featurizer: Any = None

    def setup(self) -> None:
        self._featurizer = TokenBagger(self._config)

    def process(self, batch: Iterable[dict[str, Any]]) -> Iterator[tuple[str, bytes]]:
        yield from featurize_pairs(self._featurizer, list(batch), negatives=self._negatives)


class FeaturizeChunks(beam.DoFn):
    """A chunk of validated pairs → lists of serialized Examples: ``train`` (main), ``validation``, and a counts dict.

    :class:`MakePairs` without the checking step, for pairs made elsewhere (format neighbours).
    """

    VALIDATION = "validation"
    COUNTS = "counts"

    def __init__(self, *, feature_config: FeatureConfig, batch_size: int) -> None:
        self._config = feature_config
        self._batch_size = batch_size
        self._featurizer: Any = None

    def setup(self) -> None:
        self._featurizer = TokenBagger(self._config)

    def process(self, chunk: Iterable[dict[str, Any]]) -> Iterator[Any]:
        counts: dict[str, int] = {}
        yield from example_lists(self._featurizer, list(chunk), batch_size=self._batch_size, counts=counts)
        yield beam.pvalue.TaggedOutput(self.COUNTS, counts)


class MakePairs(beam.DoFn):
    """A chunk of raw records → checked, featurized examples, in one step per chunk.

    Every record goes through ``check`` (a :class:`~pipelines.validate.ValidatePairs` or
    :class:`~pipelines.corpus.CorpusPairs`, whose ``process`` is called directly), and the chunk's pairs
    are featurized ``batch_size`` at a time.
    Working on chunks instead of single records is what makes the job fast on Beam's DirectRunner:
    a per-element step costs several microseconds of runner bookkeeping (coders, bundle plumbing), more
    than hashing a pair, so one step per chunk replaces the validate → batch → featurize →
    partition → count chain of per-element steps.

    Outputs: main ``train`` (lists of serialized Examples, one per chunk), ``validation`` (the same), ``rejected``
    (dead letters), ``counts`` (one dict per chunk: ``read``, ``rejected:<reason>``, the splits,
    ``label_0``, ``paired_documents``). With ``featurize=False`` the main output carries the validated
    pair dicts instead and no examples are made (for jobs that regroup pairs before featurizing).
    """

    VALIDATION = "validation"
    COUNTS = "counts"

    def __init__(self, *, check: beam.DoFn, feature_config: FeatureConfig, batch_size: int,
                 featurize: bool = True, teacher: str = "") -> None:
        self._check = check
        self._config = feature_config
        self._batch_size = batch_size
        self._featurize = featurize
        self._teacher_name = teacher
        self._featurizer: Any = None
        self._teacher: Any = None
        self._bar: Any = None

    def setup(self) -> None:
        self._check.setup()
        if self._featurize:
            self._featurizer = TokenBagger(self._config)
        if self._teacher_name:  # loaded once per worker, never pickled
            self._teacher = teacher_encoder(self._teacher_name)
            # The teacher is the slow step (~120-340 texts/s a core): show this worker's count.
            self._bar = tqdm(desc=f"teacher {self._teacher_name}", unit=" pairs", mininterval=2.0)

    def teardown(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def process(self, chunk: Iterable[dict[str, Any]]) -> Iterator[Any]:
        counts: dict[str, int] = {}
        pairs = []
        for raw in chunk:
            counts["read"] = counts.get("read", 0) + 1
            for out in self._check.process(raw):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    key = f"{REJECTED}:{out.value['reason']}" if out.tag == REJECTED else "paired_documents"
                    counts[key] = counts.get(key, 0) + 1
                    if out.tag == REJECTED:
                        yield out
                else:
                    pairs.append(out)
        if self._teacher is not None:
            attach_teacher(self._teacher, pairs)
            self._bar.update(len(pairs))
        if not self._featurize:
            yield from pairs
            yield beam.pvalue.TaggedOutput(self.COUNTS, counts)
            return
        yield from example_lists(self._featurizer, pairs, batch_size=self._batch_size, counts=counts)
        label_0 = sum(1 for p in pairs if p["label"] <= 0)
        if label_0:
            counts["label_0"] = label_0
        yield beam.pvalue.TaggedOutput(self.COUNTS, counts)


# ---- explicit negatives as a third tower input ---------------------------------------------------------


def normalise_text(text: str) -> str:
    """NFKC, case-folded, white space collapsed: the key under which two texts count as the same."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def negative_entries(pair: dict[str, Any]) -> Iterator[tuple[str, tuple[str, Any]]]:
    """A validated pair → entries keyed by normalised query text for :func:`attach_negatives`.

    Every pair goes to its query's group as a ``row``. A pair with label <= 0 also offers each side
    as a negative of the other: "B is not a duplicate of A" makes B a negative for A's positives and
    A one for B's (duplicate questions are a symmetric relation).
    """
    yield normalise_text(pair["query_text"]), ("row", pair)
    if pair["label"] <= 0:
        yield normalise_text(pair["query_text"]), ("negative", (pair["document_id"], pair["document_text"]))
        yield normalise_text(pair["document_text"]), ("negative", (pair["query_id"], pair["query_text"]))


def attach_negatives(group: tuple[str, Iterable[tuple[str, Any]]]) -> Iterator[dict[str, Any]]:
    """One query's group → its pairs, each positive carrying one explicit negative when the query has any.

    Negatives are handed out round-robin (positives ordered by source record, negatives by id and
    text) so each positive gets one and as many distinct negatives as possible get used; a negative
    with the positive's document id or text, or the query's own text, is skipped for that positive
    (contradictory labels).
    Every row comes out exactly once; rows with label <= 0 come out unchanged (still label-0 pairs).
    The carried negative is ``pair["negative_id"]``/``pair["negative_text"]``.
    """
    key, entries = group
    rows, negatives = [], set()
    for kind, value in entries:
        if kind == "row":
            rows.append(value)
        else:
            negatives.add(value)
    ordered = sorted(negatives)
    positives = sorted((r for r in rows if r["label"] > 0), key=lambda r: r["record"])
    for i, pair in enumerate(positives):
        own = normalise_text(pair["document_text"])
        usable = [n for n in ordered
                  if n[0] != pair["document_id"] and normalise_text(n[1]) not in (own, key)]
        if usable:
            negative_id, negative_text = usable[i % len(usable)]
            pair = {**pair, "negative_id": negative_id, "negative_text": negative_text}
        yield pair
    yield from (r for r in rows if r["label"] <= 0)


def set_negative(example: Any, negative_id: str, negative_text: str,
                 bag: tuple[Any, Any] | None) -> None:
    """Set the ``negative_*`` features of ``example`` (empty id/text/bag = "no negative", as model.py reads it).

    ``example``: a ``tf.train.Example`` or an :class:`~pipelines.example_proto.Example` (same fields).
    """
    feature = example.features.feature
    feature["negative_id"].bytes_list.value[:] = [negative_id.encode("utf-8")]
    feature["negative_text"].bytes_list.value[:] = [negative_text.encode("utf-8")]
    feature["negative_ids"].int64_list.value[:] = _as_list(bag[0]) if bag is not None else []
    feature["negative_counts"].float_list.value[:] = _as_list(bag[1]) if bag is not None else []
