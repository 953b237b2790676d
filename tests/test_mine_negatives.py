"""``dssm mine``: hard negatives from a real tiny index (adi, the tiny trained model of conftest)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from dssm import index as ix
from dssm.artifacts import verify_manifest
from dssm.cli import main as cli_main
from dssm.config import load_config
from dssm.data import Document, document_text, iter_corpus
from dssm.errors import IndexNotFoundError, InputError
from dssm.features import FeatureConfig, Featurizer
from pipelines import make_pairs
from pipelines.featurize import normalise_text
from pipelines.mine_negatives import MineNegatives, MiningSpec, run
from serving.searcher import Searcher

import tensorflow as tf  # noqa: E402  isort: skip  (after dssm: legacy Keras)

SPEC = {
    "query_id": tf.io.FixedLenFeature([], tf.string), "document_id": tf.io.FixedLenFeature([], tf.string),
    "query_text": tf.io.FixedLenFeature([], tf.string), "document_text": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.float32),
    "query_ids": tf.io.VarLenFeature(tf.int64), "query_counts": tf.io.VarLenFeature(tf.float32),
    "document_ids": tf.io.VarLenFeature(tf.int64), "document_counts": tf.io.VarLenFeature(tf.float32),
    "negative_id": tf.io.FixedLenFeature([], tf.string), "negative_text": tf.io.FixedLenFeature([], tf.string),
    "negative_ids": tf.io.VarLenFeature(tf.int64), "negative_counts": tf.io.VarLenFeature(tf.float32),
}
TEXTS = ("query_id", "document_id", "query_text", "document_text", "negative_id", "negative_text")


def read_split(out: Path, split: str) -> list[dict[str, Any]]:
    files = sorted(str(p) for p in out.glob(f"{split}-*-of-*.tfrecord.gz"))
    rows = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        parsed = tf.io.parse_single_example(record, SPEC)
        row = {k: (v.values.numpy() if isinstance(v, tf.SparseTensor) else v.numpy()) for k, v in parsed.items()}
        rows.append({k: (row[k].decode() if k in TEXTS else row[k]) for k in row})
    return rows


@pytest.fixture(scope="module")
def mining_setup(tiny_model_dir: Path, adi_dir: Path, tmp_path_factory: Any) -> dict[str, Any]:
    """adi pairs (BEIR qrels) and an adi index with one extra document: a copy of a positive under another id."""
    work = tmp_path_factory.mktemp("mine")
    pairs = work / "pairs"
    make_pairs.run(["--input", str(adi_dir), "--format", "beir", "--output", str(pairs), "--num-buckets", "4096",
                    "--validation-fraction", "0.2"])
    first = next(iter(tf.data.TFRecordDataset(sorted(str(p) for p in pairs.glob("train-*")), compression_type="GZIP")))
    copied = tf.train.Example.FromString(first.numpy()).features.feature["document_id"].bytes_list.value[0].decode()
    docs = list(iter_corpus(adi_dir / "corpus.jsonl"))
    original = next(d for d in docs if d.id == copied)
    docs.append(Document(f"copy-of-{copied}", original.title, original.text))
    index = work / "index"
    ix.build_index_from_documents(index, model_dir=tiny_model_dir, documents=docs, progress=False)
    return {"pairs": pairs, "index": index, "copied": copied, "docs": {d.id: d for d in docs}, "work": work}


def test_mined_negatives_are_never_positives_and_follow_the_ranking(mining_setup: dict[str, Any]) -> None:
    pairs, index, work = mining_setup["pairs"], mining_setup["index"], mining_setup["work"]
    out = work / "mined"
    stats = run(["--index", str(index), "--pairs", str(pairs), "--output", str(out), "--negatives-per-query", "2",
                 "--skip-top", "1", "--batch-size", "8"], test_pipeline=test_pipeline.TestPipeline())
    source = {split: read_split_plain(pairs, split) for split in ("train", "validation")}
    assert stats["read"] == len(source["train"]) + len(source["validation"]) == 170
    positives: dict[str, set[str]] = defaultdict(set)
    for row in source["train"]:
        positives[row["query_text"]].add(row["document_id"])
    assert (stats["mined_pairs"], stats["queries"]) == (len(source["train"]), len(positives))
    # adi has 83 documents and queries have at most a handful of positives: two negatives each, always.
    assert (stats["with_negative"], stats["without_negative"]) == (2 * len(source["train"]), 0)
    assert stats["passed_through"] == stats["validation"] == len(source["validation"])
    assert stats["written"] == stats["train"] + stats["validation"] and stats["rejected"] == 0
    assert stats == json.loads((out / "stats.json").read_text())

    train = read_split(out, "train")
    featurizer = Featurizer(load_config(FeatureConfig, out / "features.json"))
    copied = mining_setup["copied"]
    searcher = Searcher.load(index)
    by_query: dict[str, set[str]] = defaultdict(set)
    for row in train:
        query = row["query_text"]
        by_query[query].add(row["negative_id"])
        assert row["negative_id"] not in positives[query]
        if copied in positives[query]:
            assert row["negative_id"] != f"copy-of-{copied}"  # same text as a positive, other id
        doc = mining_setup["docs"][row["negative_id"]]
        assert row["negative_text"] == document_text(doc.title, doc.text)
        ids, counts = featurizer.bags_numpy([row["negative_text"]])[0]
        np.testing.assert_array_equal(row["negative_ids"], ids)
        np.testing.assert_array_equal(row["negative_counts"], counts)
    # The negatives are ranks 2 and 3 among the non-positives of the index's own ranking (--skip-top 1).
    for query, negatives in by_query.items():
        own = {normalise_text(document_text(mining_setup["docs"][d].title, mining_setup["docs"][d].text))
               for d in positives[query]}
        ranked = [h.id for h in searcher.search(query, k=40) if h.id not in positives[query]
                  and normalise_text(document_text(mining_setup["docs"][h.id].title, h.text)) not in own]
        assert negatives == set(ranked[1:3]), query
    # Validation keeps its pairs with an empty negative; every example has the four features.
    validation = read_split(out, "validation")
    assert len(validation) == len(source["validation"])
    assert all(r["negative_id"] == "" and len(r["negative_ids"]) == 0 for r in validation)

    config = json.loads((out / "pairs_config.json").read_text())
    assert config["format"] == "beir" and config["mining"]["negatives_per_query"] == 2
    assert config["mining"]["skip_top"] == 1 and config["mining"]["index_version"] == searcher.version
    assert (out / "features.json").read_text() == (pairs / "features.json").read_text()
    verify_manifest(out, kind="pairs")


def read_split_plain(out: Path, split: str) -> list[dict[str, Any]]:
    spec = {k: v for k, v in SPEC.items() if not k.startswith("negative")}
    files = sorted(str(p) for p in out.glob(f"{split}-*-of-*.tfrecord.gz"))
    rows = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        parsed = tf.io.parse_single_example(record, spec)
        rows.append({k: parsed[k].numpy().decode() for k in ("query_id", "document_id", "query_text")})
    return rows


def test_mine_dofn_drops_the_positive_and_its_copy(mining_setup: dict[str, Any]) -> None:
    """A query equal to a document's own text finds it first; neither it nor its copy may be a negative."""
    copied, docs, index = mining_setup["copied"], mining_setup["docs"], mining_setup["index"]
    target = docs[copied]
    query = document_text(target.title, target.text)
    example = tf.train.Example()
    for key, value in (("query_id", "q"), ("query_text", query), ("document_id", copied),
                       ("document_text", query)):
        example.features.feature[key].bytes_list.value.append(value.encode())
    example.features.feature["label"].float_list.value.append(1.0)
    pair = {"example": example.SerializeToString(), "split": "train", "query_id": "q", "query_text": query,
            "document_id": copied, "document_text": query, "label": 1.0, "has_negative": False}
    searcher = Searcher.load(index)
    hits = [h.id for h in searcher.search(query, k=5)]
    assert set(hits[:2]) == {copied, f"copy-of-{copied}"}  # both score 1.0: the test is not vacuous
    spec = MiningSpec(index_dir=str(index), index_version=searcher.version,
                      features=load_config(FeatureConfig, mining_setup["pairs"] / "features.json"),
                      negatives_per_query=1, skip_top=0)
    with test_pipeline.TestPipeline() as p:
        got = (p | beam.Create([[(normalise_text(query), [pair])]]) | beam.ParDo(MineNegatives(spec))
               | beam.Map(lambda t: (t[0], t[2], tf.train.Example.FromString(t[1]).features.feature["negative_id"]
                                     .bytes_list.value[0].decode())))
        assert_that(got, equal_to([("train", "with_negative", hits[2])]))


def test_input_errors(mining_setup: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    pairs, index = str(mining_setup["pairs"]), str(mining_setup["index"])
    with pytest.raises(IndexNotFoundError, match="no index at"):
        run(["--index", str(tmp_path / "none"), "--pairs", pairs, "--output", str(tmp_path / "o")])
    with pytest.raises(InputError, match="is a file or the --pairs directory"):
        run(["--index", index, "--pairs", pairs, "--output", pairs])
    with pytest.raises(InputError, match="negatives-per-query"):
        run(["--index", index, "--pairs", pairs, "--output", str(tmp_path / "o"), "--negatives-per-query", "0"])
    assert cli_main(["mine", "--index", index, "--pairs", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    vector_only = tmp_path / "vectors"
    ix.build_index(vector_only, embeddings=np.eye(4, dtype=np.float32), ids=list("abcd"), texts=list("abcd"))
    with pytest.raises(IndexNotFoundError, match="has no model"):
        run(["--index", str(vector_only), "--pairs", pairs, "--output", str(tmp_path / "o")])
