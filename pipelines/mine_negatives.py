"""``dssm mine``: hard negatives for a second training round, retrieved from an index (Beam job).

Usage::

    dssm mine --index INDEX_DIR --pairs PAIRS_DIR --output DIR [--negatives-per-query 1] [--skip-top 0]
              [beam flags]

For each training query the job asks the index (the model of a first round, through
:class:`serving.searcher.Searcher`) for its best documents, drops the query's positives and writes the
best of the rest as negatives. The output is a pairs directory in the format of docs/design.md
("Pair shards") that ``dssm train`` reads like any other, with four more features on every example:

| key | type | meaning |
|---|---|---|
| ``negative_id`` | bytes | the negative's document id (``""``: no negative) |
| ``negative_text`` | bytes | its text as the index's document tower saw it (``title + " " + text``) |
| ``negative_ids``, ``negative_counts`` | int64 / float list | its bag (``features.json`` of the pairs) |

What is mined, and how:

* The training split's positive pairs (label > 0) are grouped by query (NFKC-casefolded,
  space-normalised text), so each distinct query is searched once and *all* its positives are known.
  A retrieved document is dropped when its id is one of those positives' ``document_id``, or its text
  (``title + " " + text``, or ``text`` alone) normalises to one of their ``document_text`` or to the
  query itself (Quora's corpus holds every question, the query included).
* ``--skip-top S`` then skips the S best remaining documents (unlabelled positives sit there), and
  the next ``--negatives-per-query N`` are the negatives. The model reads one negative per example
  (``dssm/model.py``), so a pair with N negatives is written N times, once with each; a pair for which
  the index has nothing left is written once with an empty negative (counted as ``without_negative``).
* An input example that already carries a negative (``dssm pairs --negatives-as-third-input``) is also
  written unchanged (``kept_negative``).
* Validation examples and label <= 0 examples are copied with empty ``negative_*`` features
  (``passed_through``), so every example of the output has the same features.

The index is searched in batches of ``--batch-size`` queries, one query-tower call and one ScaNN call
per batch, by a DoFn that loads the searcher once per worker in ``setup()``. The index version is
pinned when the job starts: a worker that finds another version behind ``CURRENT`` fails the job
rather than mix two models' negatives.

Output: ``train-*``/``validation-*`` shards, ``rejected-*.jsonl`` (examples that lack a feature the
job needs), ``features.json`` (copied), ``pairs_config.json`` (the input's, plus ``"mining"``: the
settings, the index version and the source directory), ``stats.json`` and ``manifest.json`` (kind
``pairs``), written last.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.options.pipeline_options import PipelineOptions

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.artifacts import MANIFEST, verify_manifest, write_json_atomic, write_manifest
from dssm.config import add_config_arguments, config_from_args, config_to_dict, field, load_config
from dssm.data import document_text
from dssm.errors import ConfigError, DSSMError, IndexNotFoundError, InputError
from dssm.export import load_encoder
from dssm.features import FeatureConfig, Featurizer
from dssm.index import MODEL_DIR, current_version_dir, load_index
from pipelines.featurize import normalise_text, set_negative
from pipelines.records import REJECTED, rejected_json

import tensorflow as tf  # noqa: E402  isort: skip  (after dssm: legacy Keras)

__all__ = ["MineConfig", "MiningSpec", "ParseExamples", "MineNegatives", "pass_through", "build_pipeline",
           "run", "main"]

SPLITS = ("train", "validation")
SHARD_TEMPLATE = "-SSSSS-of-NNNNN"
_COUNTS = ".counts.json"
# Documents fetched beyond skip_top + negatives + the query's positives: room for copies of a
# positive under another id (found by text) and for the query's own text in the corpus.
_SEARCH_MARGIN = 8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MineConfig:
    """How ``dssm mine`` picks negatives. Saved under ``"mining"`` in the output's ``pairs_config.json``."""

    negatives_per_query: int = field(1, "mined negatives per training pair (the pair is written once per negative)")
    skip_top: int = field(0, "skip this many best-ranked non-positive documents (often unlabelled positives)")
    batch_size: int = field(256, "queries per query-tower call and ScaNN search")
    num_shards: int = field(0, "shards per output (train, validation, rejected); 0 lets the runner choose")


@dataclass(frozen=True)
class MiningSpec:
    """What the mining DoFn needs, all plain values so it pickles to any worker."""

    index_dir: str
    index_version: str
    features: FeatureConfig
    negatives_per_query: int
    skip_top: int


def _text(feature: Any) -> str | None:
    values = feature.bytes_list.value
    return values[0].decode("utf-8") if len(values) == 1 else None


class ParseExamples(beam.DoFn):
    """``(file, serialized Example)`` → ``(split, parsed pair)`` or a dead letter (``rejected``).

    A parsed pair is ``{"example": bytes, "split", "query_text", "query_id", "document_id",
    "document_text", "label", "has_negative"}``; an example without one of the text/id features or the
    label is rejected (reason ``missing_feature``), one that is not a ``tf.train.Example`` with
    ``unparsable``.
    """

    def __init__(self, split: str) -> None:
        self._split = split

    def process(self, element: tuple[str, bytes]) -> Iterator[Any]:
        filename, serialized = element
        try:
            feature = tf.train.Example.FromString(serialized).features.feature
        except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError type
            yield beam.pvalue.TaggedOutput(REJECTED, {"record": filename, "reason": "unparsable",
                                                     "detail": f"not a tf.train.Example: {exc}", "row": {}})
            return
        pair: dict[str, Any] = {"example": serialized, "split": self._split}
        missing = []
        for key in ("query_id", "query_text", "document_id", "document_text"):
            pair[key] = _text(feature[key]) if key in feature else None
            if pair[key] is None:
                missing.append(key)
        labels = feature["label"].float_list.value if "label" in feature else []
        if len(labels) != 1:
            missing.append("label")
        if missing:
            row = {k: pair[k] for k in ("query_id", "query_text", "document_id") if pair.get(k) is not None}
            yield beam.pvalue.TaggedOutput(REJECTED, {
                "record": f"{filename} query_id={pair.get('query_id')!r}", "reason": "missing_feature",
                "detail": f"the example lacks (or has several of) {missing}", "row": row})
            return
        pair["label"] = float(labels[0])
        pair["has_negative"] = "negative_text" in feature and bool(_text(feature["negative_text"]))
        yield pair


def pass_through(pair: dict[str, Any]) -> tuple[str, bytes, str]:
    """A pair that is not mined → ``(split, bytes, "passed_through")`` with empty ``negative_*`` features."""
    example = tf.train.Example.FromString(pair["example"])
    if not pair["has_negative"]:
        set_negative(example, "", "", None)
    return pair["split"], example.SerializeToString(), "passed_through"


class MineNegatives(beam.DoFn):
    """Batches of one-query groups → ``(split, serialized Example, tag)`` for every pair of the groups.

    Input elements are lists of ``(normalised query, [parsed pairs of that query])`` (``GroupByKey``
    then ``BatchElements``). One query-tower call and one ScaNN search serve the whole batch; the
    negatives' bags come from one featurizer call. ``tag`` is ``with_negative``, ``without_negative``
    or ``kept_negative`` (an input negative written unchanged), for the job's counts.
    """

    def __init__(self, spec: MiningSpec) -> None:
        self._spec = spec
        self._index: Any = None
        self._encoder: Any = None
        self._featurizer: Any = None

    def setup(self) -> None:
        self._index = load_index(self._spec.index_dir)
        if self._index.version != self._spec.index_version:
            raise ConfigError(f"index {self._spec.index_dir} moved from version {self._spec.index_version} to "
                              f"{self._index.version} while the job ran; run it again")
        if self._index.model_dir is None:
            raise IndexNotFoundError(f"index {self._spec.index_dir} has no model/ to embed queries")
        self._encoder = load_encoder(self._index.model_dir)
        self._featurizer = Featurizer(self._spec.features)

    def _candidates(self, key: str, pairs: list[dict[str, Any]], docs: Iterable[Any]) -> list[tuple[str, str]]:
        positive_ids = {p["document_id"] for p in pairs}
        positive_texts = {normalise_text(p["document_text"]) for p in pairs} | {key}
        found = []
        for doc in docs:
            text = document_text(doc.title, doc.text)
            if doc.id in positive_ids or normalise_text(text) in positive_texts or \
                    normalise_text(doc.text) in positive_texts:
                continue
            found.append((doc.id, text))
        spec = self._spec
        return found[spec.skip_top:spec.skip_top + spec.negatives_per_query]

    def process(self, batch: Iterable[tuple[str, Iterable[dict[str, Any]]]]) -> Iterator[tuple[str, bytes, str]]:
        groups = [(key, list(pairs)) for key, pairs in batch]
        if not groups:
            return
        index = self._index
        vectors = np.asarray(self._encoder.embed_queries([pairs[0]["query_text"] for _, pairs in groups]),
                             dtype=np.float32)
        k = self._spec.skip_top + self._spec.negatives_per_query + _SEARCH_MARGIN + max(
            len({p["document_id"] for p in pairs}) for _, pairs in groups)
        rows, _ = index.search_vectors(vectors, k)
        docs = index.docs.get(rows.ravel().tolist())
        width = rows.shape[1]
        chosen = [self._candidates(key, pairs, docs[g * width:(g + 1) * width])
                  for g, (key, pairs) in enumerate(groups)]
        texts = sorted({text for negatives in chosen for _, text in negatives})
        bags = dict(zip(texts, self._featurizer.bags_numpy(texts), strict=True))
        for (_, pairs), negatives in zip(groups, chosen, strict=True):
            for pair in pairs:
                if pair["has_negative"]:
                    yield pair["split"], pair["example"], "kept_negative"
                if not negatives:
                    example = tf.train.Example.FromString(pair["example"])
                    set_negative(example, "", "", None)
                    yield pair["split"], example.SerializeToString(), "without_negative"
                for negative_id, text in negatives:
                    example = tf.train.Example.FromString(pair["example"])
                    set_negative(example, negative_id, text, bags[text])
                    yield pair["split"], example.SerializeToString(), "with_negative"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dssm mine",
        description="Mine hard negatives for training pairs from an index (Beam job). "
                    "Unknown flags go to Beam (--runner, --direct_num_workers, --direct_running_mode, ...).")
    parser.add_argument("--index", required=True, help="index directory written by `dssm index` (follows CURRENT)")
    parser.add_argument("--pairs", required=True, help="pairs directory written by `dssm pairs`")
    parser.add_argument("--output", required=True, help="output pairs directory (local; not --pairs)")
    add_config_arguments(parser, MineConfig)
    return parser


def build_pipeline(pipeline: beam.Pipeline, *, pairs_dir: Path, output: Path, spec: MiningSpec,
                   config: MineConfig) -> None:
    """Add the job's transforms to ``pipeline``: read → parse → group by query → mine → write, plus counts."""
    parsed, rejected = [], []
    for split in SPLITS:
        pattern = str(pairs_dir / f"{split}-*-of-*.tfrecord.gz")
        result = (pipeline
                  | f"Pattern{split.title()}" >> beam.Create([pattern])
                  | f"Read{split.title()}" >> beam.io.ReadAllFromTFRecord(
                      compression_type=CompressionTypes.GZIP, with_filename=True)
                  | f"Parse{split.title()}" >> beam.ParDo(ParseExamples(split)).with_outputs(REJECTED, main="pairs"))
        parsed.append(result.pairs)
        rejected.append(result[REJECTED])
    pairs = tuple(parsed) | "AllPairs" >> beam.Flatten()
    to_mine, others = pairs | "ToMine" >> beam.Partition(
        lambda p, n: 0 if p["split"] == "train" and p["label"] > 0 else 1, 2)
    mined = (to_mine
             | "KeyByQuery" >> beam.Map(lambda p: (normalise_text(p["query_text"]), p))
             | "GroupByQuery" >> beam.GroupByKey()
             | "BatchQueries" >> beam.BatchElements(min_batch_size=min(16, config.batch_size),
                                                    max_batch_size=config.batch_size)
             | "Mine" >> beam.ParDo(MineNegatives(spec)))
    passed = others | "PassThrough" >> beam.Map(pass_through)
    examples = (mined, passed) | "AllExamples" >> beam.Flatten()
    by_split = examples | "BySplit" >> beam.Partition(lambda t, n: SPLITS.index(t[0]), len(SPLITS))
    for split, part in zip(SPLITS, by_split, strict=True):
        (part
         | f"Bytes{split.title()}" >> beam.Map(lambda t: t[1])
         | f"Write{split.title()}" >> beam.io.WriteToTFRecord(
             str(output / split), file_name_suffix=".tfrecord.gz", num_shards=config.num_shards,
             shard_name_template=SHARD_TEMPLATE, compression_type=CompressionTypes.GZIP))
    all_rejected = tuple(rejected) | "AllRejected" >> beam.Flatten()
    (all_rejected
     | "RejectedJson" >> beam.Map(rejected_json)
     | "WriteRejected" >> beam.io.WriteToText(str(output / REJECTED), file_name_suffix=".jsonl",
                                               num_shards=config.num_shards, shard_name_template=SHARD_TEMPLATE))

    keys = [
        pairs | "ReadKey" >> beam.Map(lambda _: "read"),
        to_mine | "QueryPairKey" >> beam.Map(lambda _: "mined_pairs"),
        to_mine | "QueryKey" >> beam.Map(lambda p: normalise_text(p["query_text"])) | "Queries" >> beam.Distinct()
        | "QueriesKey" >> beam.Map(lambda _: "queries"),
        examples | "SplitKey" >> beam.Map(lambda t: t[0]),
        examples | "TagKey" >> beam.Map(lambda t: t[2]),
        all_rejected | "RejectedKey" >> beam.Map(lambda r: f"{REJECTED}:{r['reason']}"),
    ]
    (tuple(keys)
     | "AllKeys" >> beam.Flatten()
     | "Count" >> beam.combiners.Count.PerElement()
     | "ToDict" >> beam.combiners.ToDict()
     | "CountsJson" >> beam.Map(lambda counts: json.dumps(counts, sort_keys=True))
     | "WriteCounts" >> beam.io.WriteToText(str(output / _COUNTS), num_shards=1, shard_name_template=""))


def _stats(counts: dict[str, int]) -> dict[str, Any]:
    by_reason = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith(f"{REJECTED}:")}
    stats = {key: counts.get(key, 0) for key in ("read", "train", "validation", "queries", "mined_pairs",
                                                  "with_negative", "without_negative", "kept_negative",
                                                  "passed_through")}
    stats.update(written=stats["train"] + stats["validation"], rejected=sum(by_reason.values()),
                 rejected_by_reason=by_reason)
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    """A readable table of ``stats.json``."""
    keys = ("read", "queries", "mined_pairs", "written", "train", "validation", "with_negative", "without_negative",
            "kept_negative", "passed_through", "rejected")
    rows = [(key, stats[key]) for key in keys]
    rows += [(f"  {reason}", n) for reason, n in stats["rejected_by_reason"].items()]
    rows += [(key, stats[key]) for key in ("seconds", "pairs_per_second") if key in stats]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>10}" for k, v in rows)


def _clear_outputs(output: Path) -> None:
    (output / MANIFEST).unlink(missing_ok=True)
    patterns = [f"{s}-*-of-*.tfrecord.gz" for s in SPLITS] + [f"{REJECTED}-*-of-*.jsonl", _COUNTS,
                                                               "stats.json", "features.json", "pairs_config.json"]
    for pattern in patterns:
        for stale in output.glob(pattern):
            stale.unlink()


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Run the job.

    Args:
        argv: command-line flags (ours and Beam's).
        test_pipeline: a pipeline to build into (tests pass ``TestPipeline()``); Beam flags in
            ``argv`` are then ignored.

    Returns:
        The statistics written to ``stats.json``.

    Raises:
        InputError: bad settings, ``--output`` is ``--pairs``, or the pairs have no training shards.
        IndexNotFoundError: no index, or an index without a model (it cannot embed query texts).
        ChecksumError: the pairs directory does not match its manifest.
    """
    args, beam_args = _parser().parse_known_args(argv)
    config = config_from_args(MineConfig, args)
    if config.negatives_per_query < 1 or config.skip_top < 0 or config.batch_size < 1 or config.num_shards < 0:
        raise InputError(f"--negatives-per-query and --batch-size must be >= 1, --skip-top and --num-shards >= 0; "
                         f"got {config}")
    pairs_dir, output = Path(args.pairs), Path(args.output)
    if not pairs_dir.is_dir():
        raise InputError(f"--pairs {pairs_dir} is not a directory")
    verify_manifest(pairs_dir, kind="pairs")
    if not list(pairs_dir.glob("train-*-of-*.tfrecord.gz")):
        raise InputError(f"--pairs {pairs_dir} has no train-*.tfrecord.gz shards to mine for")
    features = load_config(FeatureConfig, pairs_dir / "features.json")
    version_dir = current_version_dir(args.index)
    if not (version_dir / MODEL_DIR).is_dir():
        raise IndexNotFoundError(f"index {args.index} (version {version_dir.name}) has no model/: it cannot embed "
                                 "query texts; build it with `dssm index --model ...`")
    if output.exists() and (not output.is_dir() or output.resolve() == pairs_dir.resolve()):
        raise InputError(f"--output {output} is a file or the --pairs directory; name a new directory")
    output.mkdir(parents=True, exist_ok=True)
    _clear_outputs(output)

    spec = MiningSpec(index_dir=str(Path(args.index).resolve()), index_version=version_dir.name, features=features,
                      negatives_per_query=config.negatives_per_query, skip_top=config.skip_top)
    started = time.perf_counter()
    pipeline = test_pipeline if test_pipeline is not None else beam.Pipeline(options=PipelineOptions(beam_args))
    build_pipeline(pipeline, pairs_dir=pairs_dir, output=output, spec=spec, config=config)
    log.info("dssm mine: %s with index %s (%s) -> %s", pairs_dir, args.index, version_dir.name, output)
    pipeline.run().wait_until_finish()
    seconds = time.perf_counter() - started

    counts_path = output / _COUNTS
    counts = json.loads(counts_path.read_text())
    counts_path.unlink()
    stats = _stats(counts)
    accounted = stats["mined_pairs"] + stats["passed_through"] + stats["rejected"]
    if stats["read"] != accounted:
        raise DSSMError(f"mine job lost records: read {stats['read']} != mined {stats['mined_pairs']} + passed "
                        f"through {stats['passed_through']} + rejected {stats['rejected']} (a bug; please report it)")
    stats["seconds"] = round(seconds, 3)
    stats["pairs_per_second"] = round(stats["read"] / seconds, 1) if seconds > 0 else 0.0
    write_json_atomic(output / "stats.json", stats)
    shutil.copyfile(pairs_dir / "features.json", output / "features.json")
    source_config = json.loads((pairs_dir / "pairs_config.json").read_text())
    source_config["mining"] = {**config_to_dict(config), "index": spec.index_dir, "index_version": spec.index_version,
                               "pairs": str(pairs_dir.resolve())}
    write_json_atomic(output / "pairs_config.json", source_config)
    if stats["written"] == 0:
        raise InputError(f"no pairs written from {pairs_dir}: {stats['read']} read, all rejected "
                         f"({stats['rejected_by_reason']}); see {output}/{REJECTED}-*.jsonl")
    write_manifest(output, kind="pairs", extra={"stats": stats, "format": source_config.get("format"),
                                                "mined": True})
    return stats


def main(argv: list[str] | None = None) -> int:
    """``dssm mine``: run the job and print its statistics as a table."""
    stats = run(argv)
    print(format_stats(stats))
    return 0
