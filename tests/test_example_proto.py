"""The TensorFlow-free Example and TFRecord writers give TensorFlow's bytes; the pairs job's records are the graph's."""

from __future__ import annotations

import csv
import gzip
import random
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import numpy as np
from apache_beam.testing import test_pipeline

from dssm.features import FeatureConfig, Featurizer
from pipelines.example_proto import Example
from pipelines.featurize import featurize_pairs
from pipelines.make_pairs import run
from pipelines.tfrecords import WriteTFRecords, frame_record

import tensorflow as tf  # noqa: E402  isort: skip  (after dssm: legacy Keras)

ROOT = Path(__file__).resolve().parents[1]
QUORA = ROOT.parent / "shared" / "datasets" / "quora-dev" / "pairs.tsv"
KEYS = ["query_id", "document_id", "query_text", "label", "query_ids", "query_counts", "negative_ids", "zz", "a"]


def _fill(message: object, seed: int) -> None:
    rng = random.Random(seed)
    feature = message.features.feature  # type: ignore[attr-defined]
    for key in rng.sample(KEYS, k=rng.randint(0, len(KEYS))):
        kind = rng.choice("bfi")
        if kind == "b":
            feature[key].bytes_list.value.extend([rng.choice(["", "x", "héllo wörld"]).encode() * rng.randint(0, 3)
                                                  for _ in range(rng.randint(0, 3))])
        elif kind == "f":
            feature[key].float_list.value.extend([rng.uniform(-1e6, 1e6) for _ in range(rng.randint(0, 6))])
        else:
            feature[key].int64_list.value.extend([rng.randint(-2**63, 2**63 - 1) for _ in range(rng.randint(0, 6))])


def test_examples_serialize_to_tensorflows_bytes_and_parse_back() -> None:
    for seed in range(300):
        ours, theirs = Example(), tf.train.Example()
        _fill(ours, seed)
        _fill(theirs, seed)
        data = ours.SerializeToString()
        assert data == theirs.SerializeToString(), seed
        assert tf.train.Example.FromString(data) == theirs
        assert Example.FromString(theirs.SerializeToString()) == ours


def test_pair_examples_equal_the_ones_built_with_tensorflow() -> None:
    rows = list(csv.DictReader(open(QUORA, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = [r for r in rows if not (r["text1"].isascii() and r["text2"].isascii())][:20] + rows[:100]
    pairs = [{"query_id": f"q{i}", "document_id": f"d{i}", "query_text": r["text1"], "document_text": r["text2"],
              "label": float(r["is_duplicate"]), "split": "train"} for i, r in enumerate(rows)]
    config = FeatureConfig(num_buckets=5000)
    from dssm.hashing import TokenBagger

    ours = featurize_pairs(TokenBagger(config), pairs, negatives=True)
    bags = Featurizer(config).bags_numpy([p["query_text"] for p in pairs] + [p["document_text"] for p in pairs])
    for i, pair in enumerate(pairs):
        reference = tf.train.Example()
        feature = reference.features.feature
        for key in ("query_id", "document_id", "query_text", "document_text"):
            feature[key].bytes_list.value.append(pair[key].encode())
        feature["label"].float_list.value.append(pair["label"])
        for side, (ids, counts) in (("query", bags[i]), ("document", bags[len(pairs) + i])):
            feature[f"{side}_ids"].int64_list.value.extend(ids.tolist())
            feature[f"{side}_counts"].float_list.value.extend(counts.tolist())
        for key in ("negative_id", "negative_text"):
            feature[key].bytes_list.value.append(b"")
        feature["negative_ids"].int64_list.value[:] = []
        feature["negative_counts"].float_list.value[:] = []
        assert ours[i] == ("train", reference.SerializeToString()), pair["query_text"]


def test_tfrecord_lists_are_written_as_tensorflow_writes_them(tmp_path: Path) -> None:
    records = [b"", b"x", bytes(range(256)) * 9, "ünïcode".encode()]
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as writer:
        for record in records:
            writer.write(record)
    assert b"".join(map(frame_record, records)) == (tmp_path / "tf.tfrecord").read_bytes()

    with test_pipeline.TestPipeline() as p:
        (p | beam.Create([records[:2], records[2], records[3:]])  # lists and a bare record
         | WriteTFRecords(str(tmp_path / "out"), file_name_suffix=".tfrecord.gz", num_shards=1,
                          shard_name_template="-SSSSS-of-NNNNN"))
    [shard] = tmp_path.glob("out-*.tfrecord.gz")
    read = [r.numpy() for r in tf.data.TFRecordDataset(str(shard), compression_type="GZIP")]
    assert sorted(read) == sorted(records)
    assert len(gzip.decompress(shard.read_bytes())) == sum(len(r) + 16 for r in records)


def test_the_pairs_jobs_records_are_the_graph_featurizers_with_tensorflows_bytes(tmp_path: Path) -> None:
    """Whole job, non-ASCII rows included: every record re-made with the TF featurizer and tf.train.Example."""
    rows = list(csv.DictReader(open(QUORA, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = [r for r in rows if not (r["text1"].isascii() and r["text2"].isascii())] + rows[:150]
    path = tmp_path / "pairs.tsv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerow(["id", "text1", "text2", "is_duplicate"])
        writer.writerows([i, r["text1"], r["text2"], r["is_duplicate"]] for i, r in enumerate(rows))
    run(["--input", str(path), "--output", str(tmp_path / "out"), "--num-buckets", "5000"])
    featurizer = Featurizer(FeatureConfig(num_buckets=5000))
    records = [r.numpy() for r in tf.data.TFRecordDataset(sorted(map(str, (tmp_path / "out").glob("*.tfrecord.gz"))),
                                                          compression_type="GZIP")]
    assert len(records) == len(rows)
    for data in records:
        # Re-made from scratch in pair_example's key order (a parsed message serializes its map in
        # another order: the bytes of an Example depend on the order its features were set).
        parsed = tf.train.Example.FromString(data).features.feature
        reference = tf.train.Example()
        feature = reference.features.feature
        for key in ("query_id", "document_id", "query_text", "document_text"):
            feature[key].bytes_list.value.extend(parsed[key].bytes_list.value)
        feature["label"].float_list.value.extend(parsed["label"].float_list.value)
        texts = [parsed[f"{side}_text"].bytes_list.value[0].decode() for side in ("query", "document")]
        for side, (ids, counts) in zip(("query", "document"), featurizer.bags_numpy(texts), strict=True):
            feature[f"{side}_ids"].int64_list.value.extend(ids.tolist())
            feature[f"{side}_counts"].float_list.value.extend(counts.tolist())
        assert reference.SerializeToString() == data, texts


def test_the_pairs_modules_import_no_tensorflow() -> None:
    code = ("import sys, pipelines.make_pairs, pipelines.featurize, pipelines.tfrecords, pipelines.table_reads; "
            "sys.exit(3 if 'tensorflow' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert np.dtype(np.float32)  # numpy, not TensorFlow, carries the bags
