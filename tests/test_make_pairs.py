"""The pairs job: its DoFns under TestPipeline, and whole runs on tiny files in every input format."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from dssm.artifacts import verify_manifest
from dssm.cli import main as cli_main
from dssm.data import split_of
from dssm.errors import InputError
from dssm.features import FeatureConfig, Featurizer
from pipelines.beir import JoinBeir
from pipelines.corpus import CorpusPairs, CorpusSpec, corpus_pairs, sentence_spans, span_pairs, strip_title
from pipelines.featurize import FeaturizePairs, MakePairs
from pipelines.make_pairs import run
from pipelines.records import REJECTED, sum_counts
from pipelines.validate import PairColumns, PairLimits, SplitSpec, ValidatePairs, text_id

import tensorflow as tf  # noqa: E402  isort: skip  (after dssm: legacy Keras)

SMALL = FeatureConfig(num_buckets=5000)
SMALL_FLAGS = ["--num-buckets", "5000"]


def _raw(line: int, **fields: Any) -> dict[str, Any]:
    return {"record": f"in.tsv:{line}", "fields": fields, "reason": None, "error": None}


def test_validate_pairs_sends_every_bad_row_to_the_dead_letter_with_its_reason() -> None:
    columns = PairColumns("q", "d", "label", "qid", None)
    limits = PairLimits(max_query_chars=20, max_document_chars=30)
    raws = [
        _raw(2, q="how to cook rice", d="rice cooking guide", label="1", qid="Q7"),
        _raw(3, q="is the sky blue", d="why the sky is blue", label="0", qid=""),  # negative kept; id by hash
        _raw(4, q="   ", d="doc", label="1"),
        _raw(5, q=b"caf\xe9 au lait", d="coffee", label="1"),  # Latin-1 bytes, not UTF-8
        _raw(6, q="short", d="x" * 31, label="1"),
        _raw(7, q="q" * 21, d="doc", label="1"),
        _raw(8, q="no document here", label="1"),
        _raw(9, q="what is a label", d="a label", label="yes"),
        _raw(10, q="nan label", d="doc", label="nan"),
        _raw(11, q="graded", d="graded doc", label="3.8"),
        _raw(13, q="pandas bool", d="written to csv", label=" True"),  # how pandas writes a bool column
        _raw(14, q="pandas false", d="written to csv", label="FALSE"),
        {"record": "in.tsv:12", "fields": {"q": "a"}, "reason": "unparsable", "error": "has 1 fields, header has 3"},
    ]
    split = SplitSpec(validation_fraction=0.5, salt="s")
    expected_pairs = [
        ("in.tsv:2", "Q7", text_id("rice cooking guide"), 1.0),
        ("in.tsv:3", text_id("is the sky blue"), text_id("why the sky is blue"), 0.0),
        ("in.tsv:11", text_id("graded"), text_id("graded doc"), 3.8),
        ("in.tsv:13", text_id("pandas bool"), text_id("written to csv"), 1.0),
        ("in.tsv:14", text_id("pandas false"), text_id("written to csv"), 0.0),
    ]
    expected_rejected = [
        ("in.tsv:4", "empty_query"), ("in.tsv:5", "query_not_utf8"), ("in.tsv:6", "document_too_long"),
        ("in.tsv:7", "query_too_long"), ("in.tsv:8", "missing_column"), ("in.tsv:9", "bad_label"),
        ("in.tsv:10", "bad_label"), ("in.tsv:12", "unparsable"),
    ]
    with test_pipeline.TestPipeline() as p:
        out = (p | beam.Create(raws)
               | beam.ParDo(ValidatePairs(columns=columns, limits=limits, split=split)).with_outputs(
                   REJECTED, main="pairs"))
        assert_that(out.pairs | "P" >> beam.Map(lambda x: (x["record"], x["query_id"], x["document_id"], x["label"])),
                    equal_to(expected_pairs), label="pairs")
        assert_that(out.pairs | "S" >> beam.Map(lambda x: x["split"] == split_of(
            x["query_text"], validation_fraction=0.5, salt="s")), equal_to([True] * 5), label="splits")
        assert_that(out[REJECTED] | "R" >> beam.Map(lambda x: (x["record"], x["reason"])),
                    equal_to(expected_rejected), label="rejected")
        # The dead letter keeps the row as read, bytes and all, and says what was wrong.
        assert_that(out[REJECTED] | "D" >> beam.Filter(lambda x: x["record"] == "in.tsv:5")
                    | beam.Map(lambda x: (x["row"]["q"], "'caf\\\\xe9 au lait'" in x["detail"])),
                    equal_to([(b"caf\xe9 au lait", True)]), label="detail")


def test_featurize_pairs_gives_the_featurizer_ids() -> None:
    pairs = [{"record": f"r{i}", "query_id": f"q{i}", "document_id": f"d{i}", "query_text": q,
              "document_text": d, "label": float(i % 2), "split": "train" if i % 3 else "validation"}
             for i, (q, d) in enumerate([("How do magnets work?", "magnetism explained"), ("日本語の質問", "答え"),
                                         ("emoji 🙂 query", "a b c"), ("x", "y" * 100)])]
    featurizer = Featurizer(SMALL)
    expected = []
    for pair in pairs:
        (qi, qc), (di, dc) = featurizer.bags_numpy([pair["query_text"], pair["document_text"]])
        expected.append((pair["split"], pair["query_id"], tuple(qi), tuple(qc), tuple(di), tuple(dc), pair["label"]))

    def parse(kv: tuple[str, bytes]) -> tuple:
        f = tf.train.Example.FromString(kv[1]).features.feature
        return (kv[0], f["query_id"].bytes_list.value[0].decode(), tuple(f["query_ids"].int64_list.value),
                tuple(f["query_counts"].float_list.value), tuple(f["document_ids"].int64_list.value),
                tuple(f["document_counts"].float_list.value), f["label"].float_list.value[0])

    with test_pipeline.TestPipeline() as p:
        got = (p | beam.Create(pairs) | beam.BatchElements(min_batch_size=3, max_batch_size=3)
               | beam.ParDo(FeaturizePairs(feature_config=SMALL)) | beam.Map(parse))
        assert_that(got, equal_to(expected))


def test_join_beir_resolves_ids_and_rejects_what_does_not() -> None:
    def raw(name: str, line: int, **fields: Any) -> dict[str, Any]:
        return {"record": f"{name}:{line}", "fields": fields, "reason": None, "error": None}

    queries = [raw("queries.jsonl", 1, _id="1", text="first query"), raw("queries.jsonl", 2, _id="2", text="dup a"),
               raw("queries.jsonl", 3, _id="2", text="dup b"),
               {"record": "queries.jsonl:4", "fields": {"raw": "{oops"}, "reason": "unparsable", "error": "bad json"}]
    corpus = [raw("corpus.jsonl", 1, _id="d1", title="Title", text="body one"),
              raw("corpus.jsonl", 2, _id="d2", title="", text="body two")]
    qrels = [raw("qrels.tsv", 2, **{"query-id": "1", "corpus-id": "d1", "score": "2"}),
             raw("qrels.tsv", 3, **{"query-id": "1", "corpus-id": "d2", "score": "1"}),
             raw("qrels.tsv", 4, **{"query-id": "1", "corpus-id": "d9", "score": "1"}),
             raw("qrels.tsv", 5, **{"query-id": "7", "corpus-id": "d1", "score": "1"}),
             raw("qrels.tsv", 6, **{"query-id": "2", "corpus-id": "d1", "score": "1"}),
             raw("qrels.tsv", 7, **{"query-id": "1", "corpus-id": "d1", "score": "0"})]
    with test_pipeline.TestPipeline() as p:
        joined = {"qrels": p | "Q" >> beam.Create(qrels), "queries": p | "U" >> beam.Create(queries),
                  "corpus": p | "C" >> beam.Create(corpus)} | JoinBeir()
        assert_that(joined["pairs"] | beam.Map(lambda r: (r["record"], r["reason"], r["fields"].get("query"),
                                                          r["fields"].get("document"), r["fields"]["label"])),
                    equal_to([("qrels.tsv:2", None, "first query", "Title body one", 2.0),
                              ("qrels.tsv:3", None, "first query", "body two", 1.0),
                              ("qrels.tsv:4", "unknown_document_id", "first query", None, 1.0),
                              ("qrels.tsv:5", "unknown_query_id", None, None, 1.0),
                              ("qrels.tsv:6", "duplicate_id", None, None, 1.0),
                              ("qrels.tsv:7", "non_positive_score", None, None, "0")]), label="pairs")
        assert_that(joined[REJECTED] | "R" >> beam.Map(lambda r: (r["record"], r["reason"])),
                    equal_to([("queries.jsonl:4", "bad_query_record")]), label="rejected")


# ---- whole runs -------------------------------------------------------------------------------------------

_FEATURES = {
    "query_id": tf.io.FixedLenFeature([], tf.string), "document_id": tf.io.FixedLenFeature([], tf.string),
    "query_text": tf.io.FixedLenFeature([], tf.string), "document_text": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.float32),
    "query_ids": tf.io.VarLenFeature(tf.int64), "query_counts": tf.io.VarLenFeature(tf.float32),
    "document_ids": tf.io.VarLenFeature(tf.int64), "document_counts": tf.io.VarLenFeature(tf.float32),
}


def _shards(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Every example of every split, parsed back with tf.data; also checks no feature is extra."""
    result = {}
    for split in ("train", "validation"):
        files = sorted(str(p) for p in out.glob(f"{split}-*-of-*.tfrecord.gz"))
        assert files, f"no {split} shards in {out}"
        examples = []
        for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
            assert set(tf.train.Example.FromString(record.numpy()).features.feature) == set(_FEATURES)
            parsed = tf.io.parse_single_example(record, _FEATURES)
            row = {k: v.numpy() for k, v in parsed.items() if not isinstance(v, tf.SparseTensor)}
            row.update({k: v.values.numpy() for k, v in parsed.items() if isinstance(v, tf.SparseTensor)})
            row.update({k: row[k].decode() for k in ("query_id", "document_id", "query_text", "document_text")})
            examples.append(row)
        result[split] = examples
    return result


def _rejected(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for p in sorted(out.glob("rejected-*.jsonl")) for line in p.read_text().splitlines()]


def _check_features(examples: list[dict[str, Any]], config: FeatureConfig = SMALL) -> None:
    featurizer = Featurizer(config)
    texts = [e["query_text"] for e in examples] + [e["document_text"] for e in examples]
    bags = featurizer.bags_numpy(texts)
    for i, example in enumerate(examples):
        for side, (ids, counts) in (("query", bags[i]), ("document", bags[len(examples) + i])):
            np.testing.assert_array_equal(example[f"{side}_ids"], ids)
            np.testing.assert_array_equal(example[f"{side}_counts"], counts)


def _stats(out: Path) -> dict[str, Any]:
    return json.loads((out / "stats.json").read_text())


QUORA_TSV = (
    b"id\ttext1\ttext2\tis_duplicate\tsplit\tquora_pair_id\n"
    b"p1\tHow do I learn Python ?\tWhat is the best way to learn Python ?\t1\tdev\t11\n"
    b"p2\tIs honey good for you ?\tHow far is the moon ?\t0\tdev\t12\n"
    b"p3\tWhy is the sky blue ?\tWhat makes the sky blue ?\t1\tdev\t13\n"
    b"p4\t\tAn empty question on the left\t1\tdev\t14\n"
    b"p5\tCaf\xe9 in Latin-1 ?\tNot UTF-8\t1\tdev\t15\n"
    b"p6\tToo many fields\there\t1\tdev\t16\textra\n"
    b"p7\tWhat is a label ?\tA number\tmaybe\tdev\t17\n"
    + b"p8\t" + b"long " * 30 + b"?\tshort\t1\tdev\t18\n"
    + b"".join(b"q%d\tquestion number %d about topic %d ?\tanother phrasing of number %d ?\t%d\tdev\t%d\n"
               % (i, i, i % 7, i, i % 2, 100 + i) for i in range(40))
)


def test_quora_tsv_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_bytes(QUORA_TSV)
    out = tmp_path / "out"
    stats = run(["--input", str(path), "--output", str(out), "--max-query-chars", "100",
                 "--validation-fraction", "0.3", *SMALL_FLAGS])

    assert stats == _stats(out)
    assert (stats["read"], stats["written"], stats["rejected"]) == (48, 43, 5)
    assert stats["rejected_by_reason"] == {"bad_label": 1, "empty_query": 1, "query_not_utf8": 1,
                                           "query_too_long": 1, "unparsable": 1}
    shards = _shards(out)
    assert len(shards["train"]) == stats["train"] and len(shards["validation"]) == stats["validation"]
    assert stats["train"] > 0 and stats["validation"] > 0
    examples = shards["train"] + shards["validation"]
    _check_features(examples)
    for split, rows in shards.items():
        assert all(split_of(e["query_text"], validation_fraction=0.3) == split for e in rows)
    by_query = {e["query_text"]: e for e in examples}
    honey = by_query["Is honey good for you ?"]
    assert honey["label"] == 0.0 and honey["document_text"] == "How far is the moon ?"  # explicit negative kept
    assert honey["query_id"] == text_id("Is honey good for you ?")
    assert by_query["How do I learn Python ?"]["label"] == 1.0

    rejected = {r["record"]: r for r in _rejected(out)}
    assert {k.rsplit(":", 1)[1]: v["reason"] for k, v in rejected.items()} == {
        "5": "empty_query", "6": "query_not_utf8", "7": "unparsable", "8": "bad_label", "9": "query_too_long"}
    assert rejected[f"{path}:6"]["row"]["text1"] == "Caf\\xe9 in Latin-1 ?"
    assert rejected[f"{path}:8"]["row"]["is_duplicate"] == "maybe"
    assert json.loads((out / "features.json").read_text())["num_buckets"] == 5000
    config = json.loads((out / "pairs_config.json").read_text())
    assert (config["format"], config["query_column"], config["label_column"]) == ("quora", "text1", "is_duplicate")
    manifest = verify_manifest(out, kind="pairs")
    assert "stats.json" in manifest["files"] and not list(out.glob(".counts*"))


def test_quora_csv_as_quora_publishes_it(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text(
        'id,qid1,qid2,question1,question2,is_duplicate\n'
        '0,1,2,"What is the step by step guide to invest in share market in india?",'
        '"What is the step by step guide to invest in share market?",0\n'
        '1,3,4,"How do I read and find my YouTube comments?","How can I see all my Youtube comments?",1\n'
        '2,5,6,"A question, with a comma and ""quotes""","Multi\nline answer",1\n'
        '3,7,8,"",Empty question,0\n'
    )
    out = tmp_path / "out"
    stats = run(["--input", str(path), "--output", str(out), "--validation-fraction", "0", *SMALL_FLAGS])
    assert (stats["read"], stats["train"], stats["validation"], stats["rejected_by_reason"]) == (
        4, 3, 0, {"empty_query": 1})
    examples = {e["query_id"]: e for e in _shards(out)["train"]}
    assert set(examples) == {"1", "3", "5"}  # qid1/qid2 are Quora's question ids
    assert examples["5"]["document_id"] == "6"
    assert examples["5"]["query_text"] == 'A question, with a comma and "quotes"'
    assert examples["5"]["document_text"] == "Multi\nline answer"
    assert examples["1"]["label"] == 0.0
    _check_features(list(examples.values()))
    assert _rejected(out)[0]["record"] == f"{path}:6"  # the physical line: the row after a multi-line field


def test_jsonl_pairs_with_renamed_columns_and_ids(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    rows = [{"q": "cheap flights", "doc": "Find cheap flights to anywhere", "qid": "u1", "did": 42, "clicked": 1},
            {"q": "weather today", "doc": "Weather forecast", "qid": "u2", "did": 43, "clicked": True},
            {"q": "no doc", "qid": "u3", "clicked": 1},
            {"q": "null label", "doc": "something", "qid": "u4", "did": 44, "clicked": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    out = tmp_path / "out"
    stats = run(["--input", str(path), "--output", str(out), "--query-column", "q", "--document-column", "doc",
                 "--label-column", "clicked", "--query-id-column", "qid", "--document-id-column", "did",
                 "--validation-fraction", "0", *SMALL_FLAGS])
    assert (stats["read"], stats["written"]) == (5, 2)
    assert stats["rejected_by_reason"] == {"bad_label": 1, "missing_column": 1, "unparsable": 1}
    examples = sorted(_shards(out)["train"], key=lambda e: e["query_id"])
    assert [(e["query_id"], e["document_id"], e["label"]) for e in examples] == [("u1", "42", 1.0), ("u2", "43", 1.0)]
    _check_features(examples)
    assert {r["record"] for r in _rejected(out)} == {f"{path}:3", f"{path}:4", f"{path}:5"}


def test_parquet_pairs_without_a_label_column_are_positives(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{"query": f"query {i}", "document": f"document {i} text"} for i in range(20)]
                                        + [{"query": "null doc", "document": None}]), path)
    out = tmp_path / "out"
    stats = run(["--input", str(path), "--output", str(out), "--validation-fraction", "0.5", *SMALL_FLAGS])
    assert (stats["read"], stats["written"], stats["rejected_by_reason"]) == (21, 20, {"empty_document": 1})
    shards = _shards(out)
    examples = shards["train"] + shards["validation"]
    assert {e["label"] for e in examples} == {1.0}
    assert {e["document_id"] for e in examples} == {text_id(f"document {i} text") for i in range(20)}
    _check_features(examples)
    assert _rejected(out)[0]["record"] == f"{path}:row 21"


def test_beir_directory_end_to_end(adi_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    stats = run(["--input", str(adi_dir), "--output", str(out), "--validation-fraction", "0.3", *SMALL_FLAGS],
                test_pipeline=test_pipeline.TestPipeline())
    assert (stats["read"], stats["written"], stats["rejected"]) == (170, 170, 0)  # adi: 170 qrels, all score 1
    shards = _shards(out)
    assert len(shards["validation"]) == stats["validation"] > 0
    examples = shards["train"] + shards["validation"]
    queries = {json.loads(line)["_id"]: json.loads(line)["text"] for line in (adi_dir / "queries.jsonl").open()}
    corpus = {d["_id"]: d for d in map(json.loads, (adi_dir / "corpus.jsonl").open())}
    qrels = Counter(tuple(line.split("\t")[:2]) for line in (adi_dir / "qrels.tsv").read_text().splitlines()[1:])
    assert Counter((e["query_id"], e["document_id"]) for e in examples) == qrels
    for e in examples:
        assert e["query_text"] == queries[e["query_id"]]
        doc = corpus[e["document_id"]]
        assert e["document_text"] == (f"{doc['title']} {doc['text']}".strip() if doc["title"] else doc["text"])
    _check_features(examples)
    assert json.loads((out / "pairs_config.json").read_text())["beir_qrels"] == "qrels.tsv"


def _against_plain_beir(variant: Path, adi_dir: Path, tmp_path: Path) -> tuple[dict, Counter, Counter]:
    """The pairs job on ``variant`` (adi rewritten) and on adi itself: (variant's stats, both pairs by split)."""
    flags = ["--validation-fraction", "0.3", *SMALL_FLAGS]
    stats = run(["--input", str(variant), "--output", str(tmp_path / "variant"), *flags],
                test_pipeline=test_pipeline.TestPipeline())
    run(["--input", str(adi_dir), "--output", str(tmp_path / "plain"), *flags],
        test_pipeline=test_pipeline.TestPipeline())

    def pairs(out: Path) -> Counter:
        return Counter((split, e["query_id"], e["document_id"], e["query_text"], e["document_text"])
                       for split, rows in _shards(out).items() for e in rows)

    return stats, pairs(tmp_path / "variant"), pairs(tmp_path / "plain")


def test_beir_directory_with_trec_qrels_gives_the_same_pairs(adi_dir: Path, tmp_path: Path) -> None:
    trec = tmp_path / "adi-trec"
    trec.mkdir()
    for name in ("corpus.jsonl", "queries.jsonl"):
        (trec / name).write_bytes((adi_dir / name).read_bytes())
    rows = [line.split("\t") for line in (adi_dir / "qrels.tsv").read_text().splitlines()[1:]]
    (trec / "qrels.tsv").write_text("".join(f"{q} 0 {d} {s}\n" for q, d, s in rows) + "1 0 17\n")  # one bad line
    stats, got, expected = _against_plain_beir(trec, adi_dir, tmp_path)
    assert (stats["read"], stats["written"], stats["rejected"]) == (171, 170, 1)
    [bad] = _rejected(tmp_path / "variant")
    assert bad["record"] == f"{trec / 'qrels.tsv'}:171" and "a trec qrels line has 4" in bad["detail"]
    assert got == expected


def test_beir_directory_of_compressed_files_gives_the_same_pairs(adi_dir: Path, tmp_path: Path) -> None:
    """``corpus.jsonl.gz`` and ``queries.jsonl.gz`` (BEIR's copies on the Hugging Face hub) are read whole and
    give the plain directory's pairs; the config names the qrels as found."""
    import gzip

    packed = tmp_path / "adi-gz"
    packed.mkdir()
    for name in ("corpus.jsonl", "queries.jsonl", "qrels.tsv"):
        (packed / (name + ".gz")).write_bytes(gzip.compress((adi_dir / name).read_bytes()))
    stats, got, expected = _against_plain_beir(packed, adi_dir, tmp_path)
    assert (stats["read"], stats["written"], stats["rejected"]) == (170, 170, 0)
    assert json.loads((tmp_path / "variant" / "pairs_config.json").read_text())["beir_qrels"] == "qrels.tsv.gz"
    assert got == expected


def test_split_is_the_same_on_every_run_and_moves_with_the_salt(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_bytes(QUORA_TSV)

    def splits(name: str, *flags: str) -> dict[tuple[str, str], str]:
        run(["--input", str(path), "--output", str(tmp_path / name), "--validation-fraction", "0.5", *flags,
             *SMALL_FLAGS, "--direct_num_workers", "2", "--direct_running_mode", "multi_threading"])
        return {(e["query_text"], e["document_text"]): split
                for split, rows in _shards(tmp_path / name).items() for e in rows}

    first, second = splits("a"), splits("b")
    assert first == second and len(first) == 44  # the long query passes the default limit
    salted = splits("c", "--split-salt", "other")
    assert salted.keys() == first.keys() and salted != first


def test_input_errors_stop_the_job_before_it_starts(tmp_path: Path, adi_dir: Path) -> None:
    out = str(tmp_path / "out")
    with pytest.raises(InputError, match="input not found"):
        run(["--input", str(tmp_path / "missing.tsv"), "--output", out])
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("title,body\na,b\n")
    with pytest.raises(InputError, match=r"lacks column\(s\) \['query', 'document'\]: it has \['title', 'body'\]"):
        run(["--input", str(wrong), "--output", out])
    with pytest.raises(InputError, match=r"lacks column\(s\) \['stars'\]"):
        run(["--input", str(wrong), "--output", out, "--query-column", "title", "--document-column", "body",
             "--label-column", "stars"])
    no_label = tmp_path / "nolabel.tsv"
    no_label.write_text("question1\tquestion2\nx\ty\n")
    with pytest.raises(InputError, match=r"quora format\) lacks column\(s\) \['is_duplicate'\]"):
        run(["--input", str(no_label), "--output", out])
    with pytest.raises(InputError, match="needs a BEIR directory"):
        run(["--input", str(wrong), "--format", "beir", "--output", out])
    with pytest.raises(InputError, match="has no qrels.tsv or qrels/train.tsv"):
        run(["--input", str(tmp_path), "--output", out])
    with pytest.raises(InputError, match="needs a table file"):
        run(["--input", str(adi_dir), "--format", "pairs", "--output", out])
    assert not (tmp_path / "out").exists()


def test_all_rows_rejected_is_an_error_but_keeps_the_dead_letters(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text("query\tdocument\n\tx\n \ty\n")
    out = tmp_path / "out"
    assert cli_main(["pairs", "--input", str(path), "--output", str(out), *SMALL_FLAGS]) == 2
    assert "no pairs written" in capsys.readouterr().err
    assert _stats(out)["rejected_by_reason"] == {"empty_query": 2}
    assert len(_rejected(out)) == 2 and not (out / "manifest.json").exists()


def test_help_lists_our_flags_and_the_feature_flags(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for flag in ("--query-column", "--max-query-chars", "--split-salt", "--num-buckets", "--max-chars"):
        assert flag in shown


# ---- format corpus: self-supervised pairs -----------------------------------------------------------------

def test_strip_title_removes_a_leading_copy_of_the_title_only() -> None:
    # cranfield: the text starts with the title, lower-cased, with its " ." and a one-word typo.
    assert strip_title("Experimental investigation of a wing .",
                       "experimental investigation of a wing . an experimental study was made .") == (
        "an experimental study was made .")
    title = "steady motion of a sphere., oseen's criticism and solution ."
    text = "steady motion of a sphere., oseens's criticism and solution . the formula of stokes"
    assert strip_title(title, text) == "the formula of stokes"
    # cisi/adi: the title is not repeated; two words of five differ -> not a copy.
    assert strip_title("Use Made of Technical Libraries", "This report is a study") == "This report is a study"
    assert strip_title("a b c d e", "a b x y e and more") == "a b x y e and more"
    assert strip_title("", "body") == "body"
    assert strip_title("longer title than text", "longer title") == "longer title"


def test_sentence_spans_split_on_sentence_ends_and_blank_lines() -> None:
    text = "  First one. Second? Third!\n\nFourth without end\nstill fourth"
    assert [text[a:b] for a, b in sentence_spans(text)] == [
        "First one.", "Second?", "Third!", "Fourth without end\nstill fourth"]
    assert sentence_spans("   ") == [] and sentence_spans("no end") == [(0, 6)]


def test_corpus_pairs_title_first_then_hashed_sentences() -> None:
    text = "alpha sentence is long enough. beta sentence is long enough. gamma sentence is long enough."
    kwargs = {"min_query_chars": 20, "max_query_chars": 100}
    (only,) = corpus_pairs("d1", "The Title Of This Document", text, pairs_per_document=1, **kwargs, seed=0)
    assert only == ("title", "The Title Of This Document", text)
    three = corpus_pairs("d1", "The Title Of This Document", text, pairs_per_document=3, **kwargs, seed=0)
    assert [p[0] for p in three][0] == "title" and len(three) == 3
    for suffix, query, document in three[1:]:
        i = int(suffix[1:])
        assert query == ["alpha sentence is long enough.", "beta sentence is long enough.",
                         "gamma sentence is long enough."][i]
        assert document.startswith("The Title Of This Document ") and query not in document
        assert document.count("sentence is long enough.") == 2  # the rest: the other two sentences
    # The pick is a hash of seed and doc id: repeatable, and it moves with either.
    assert corpus_pairs("d1", "", text, pairs_per_document=1, **kwargs, seed=0) == corpus_pairs(
        "d1", "", text, pairs_per_document=1, **kwargs, seed=0)
    picks = {corpus_pairs(d, "", text, pairs_per_document=1, **kwargs, seed=s)[0][0]
             for d in ("d1", "d2", "d3") for s in range(4)}
    assert picks == {"s0", "s1", "s2"}
    # Too short: a 5-character title is no query; a one-sentence text has no "rest".
    assert corpus_pairs("d", "Short", "one sentence only, long enough.", pairs_per_document=2, **kwargs,
                        seed=0) == []
    assert corpus_pairs("d", "", "tiny. bits. here.", pairs_per_document=1, **kwargs, seed=0) == []
    # A title that is the whole text leaves no body: falls back to nothing usable.
    assert corpus_pairs("d", "the whole text .", "the whole text .", pairs_per_document=1, **kwargs, seed=0) == []


def test_span_pairs_cut_short_queries_out_of_the_body() -> None:
    body = " ".join(f"w{i}" for i in range(30))
    pairs = span_pairs("d1", "A Title", body, count=5, seed=0)
    assert pairs and len(pairs) <= 5
    words = body.split()
    for suffix, query, document in pairs:
        assert suffix.startswith("w") and 4 <= len(query.split()) <= 12
        start = words.index(query.split()[0])
        assert query == " ".join(words[start:start + len(query.split())])  # contiguous, in order
        # the document is the title and the body without the span: no query word is left in it
        assert document == "A Title " + " ".join(words[:start] + words[start + len(query.split()):])
        assert not set(query.split()) & set(document.split())
    assert len({(q, d) for _, q, d in pairs}) == len(pairs)  # a repeated span is kept once
    assert span_pairs("d1", "A Title", body, count=5, seed=0) == pairs  # repeatable
    assert span_pairs("d1", "A Title", body, count=5, seed=1) != pairs
    # at most half of a short body; none from a body under 8 words; the title is not cut from
    eight = "one two three four five six seven eight"
    assert all(len(q.split()) == 4 for _, q, _ in span_pairs("d", "", eight, count=3, seed=0))
    assert span_pairs("d", "a long title of many many words here", "too short body", count=3, seed=0) == []
    # a body that opens with its title: spans come from the text after it
    (only,) = span_pairs("d", "Title Words", "Title Words . " + eight, count=1, seed=0)
    assert "Title" not in only[1] and only[2].startswith("Title Words ")


def test_span_queries_pair_a_one_sentence_document_and_reject_a_short_one_by_name() -> None:
    spec = CorpusSpec(id_column="_id", text_column="text", title_column="title", pairs_per_document=2,
                      min_query_chars=10, seed=0, span_queries=2)
    raws = [_raw(1, _id="long", title="", text="one single sentence that runs on for ten whole words"),
            _raw(2, _id="short", title="", text="one sentence, nothing else")]
    with test_pipeline.TestPipeline() as p:
        out = (p | beam.Create(raws)
               | beam.ParDo(CorpusPairs(spec=spec, limits=PairLimits(max_query_chars=100, max_document_chars=1000),
                                        split=SplitSpec(validation_fraction=0.0, salt=""))
                            ).with_outputs(REJECTED, CorpusPairs.PAIRED, main="pairs"))
        assert_that(out.pairs | "P" >> beam.Map(lambda x: x["query_id"]), equal_to(["long#w0", "long#w1"]),
                    label="pairs")
        assert_that(out[REJECTED] | "R" >> beam.Map(lambda x: (x["record"], x["reason"], "8+ words" in x["detail"])),
                    equal_to([("in.tsv:2", "no_pair", True)]), label="rejected")


def test_corpus_pairs_dofn_emits_pairs_and_dead_letters() -> None:
    spec = CorpusSpec(id_column="_id", text_column="text", title_column="title", pairs_per_document=2,
                      min_query_chars=10, seed=0)
    raws = [
        _raw(1, _id="a", title="a title here", text="a title here . first real sentence. second real sentence."),
        _raw(2, _id="b", title="", text="only sentence one here. only sentence two here."),
        _raw(3, _id=" ", title="x", text="no id"),
        _raw(4, _id="c", title="", text=""),
        _raw(5, _id="d", title="", text=b"caf\xe9 not utf8. another sentence."),
        _raw(6, _id="e", title="", text="one sentence, nothing else"),
        _raw(7, title="no id column", text="x"),
        _raw(8, _id=9, title="numeric id ok", text="body of nine"),
        {"record": "in.tsv:9", "fields": {"raw": "{"}, "reason": "unparsable", "error": "not valid JSON"},
    ]
    split = SplitSpec(validation_fraction=0.5, salt="")
    with test_pipeline.TestPipeline() as p:
        out = (p | beam.Create(raws)
               | beam.ParDo(CorpusPairs(spec=spec, limits=PairLimits(max_query_chars=100, max_document_chars=1000),
                                        split=split)).with_outputs(REJECTED, CorpusPairs.PAIRED, main="pairs"))
        assert_that(out.pairs | "P" >> beam.Map(lambda x: (x["query_id"], x["document_id"], x["query_text"],
                                                           x["document_text"], x["label"], x["split"])),
                    equal_to([
                        ("a#title", "a", "a title here", "first real sentence. second real sentence.", 1.0,
                         split_of("a", validation_fraction=0.5)),
                        *[(f"a#s{i}", "a", q, f"a title here {rest}", 1.0, split_of("a", validation_fraction=0.5))
                          for i, q, rest in [(0, "first real sentence.", "second real sentence."),
                                             (1, "second real sentence.", "first real sentence.")]
                          if corpus_pairs("a", "a title here", "a title here . first real sentence. second real "
                                          "sentence.", pairs_per_document=2, min_query_chars=10,
                                          max_query_chars=100, seed=0)[1][0] == f"s{i}"],
                        *[(f"b#{s}", "b", q, d, 1.0, split_of("b", validation_fraction=0.5))
                          for s, q, d in corpus_pairs("b", "", "only sentence one here. only sentence two here.",
                                                      pairs_per_document=2, min_query_chars=10,
                                                      max_query_chars=100, seed=0)],
                        ("9#title", "9", "numeric id ok", "body of nine", 1.0, split_of("9", validation_fraction=0.5)),
                    ]), label="pairs")
        assert_that(out[REJECTED] | "R" >> beam.Map(lambda x: (x["record"], x["reason"])),
                    equal_to([("in.tsv:3", "empty_document_id"), ("in.tsv:4", "empty_document"),
                              ("in.tsv:5", "document_not_utf8"), ("in.tsv:6", "no_pair"),
                              ("in.tsv:7", "missing_column"), ("in.tsv:9", "unparsable")]), label="rejected")
        assert_that(out[CorpusPairs.PAIRED], equal_to(["a", "b", "9"]), label="paired")


def test_corpus_end_to_end_on_adi(adi_dir: Path, tmp_path: Path) -> None:
    corpus = {d["_id"]: d for d in map(json.loads, (adi_dir / "corpus.jsonl").open())}
    out = tmp_path / "out"
    # No --format: a table with _id and text and no query/document columns is a corpus.
    # --span-queries 0: the sentence pairs alone (span pairs are checked at the end)
    stats = run(["--input", str(adi_dir / "corpus.jsonl"), "--output", str(out), "--pairs-per-document", "3",
                 "--validation-fraction", "0.3", "--span-queries", "0", *SMALL_FLAGS],
                test_pipeline=test_pipeline.TestPipeline())
    assert stats == _stats(out)
    assert (stats["read"], stats["paired_documents"], stats["rejected"]) == (82, 82, 0)
    shards = _shards(out)
    examples = shards["train"] + shards["validation"]
    assert len(examples) == stats["written"] == stats["train"] + stats["validation"]
    # adi's titles are not repeated in the text: 74 documents give title + 2 sentences, 8 only the title.
    assert stats["written"] == 74 * 3 + 8
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for e in examples:
        by_doc.setdefault(e["document_id"], []).append(e)
        assert e["label"] == 1.0 and e["query_text"] and e["query_text"] not in e["document_text"]
    assert by_doc.keys() == corpus.keys()
    for doc_id, rows in by_doc.items():
        doc = corpus[doc_id]
        if doc_id == "17":  # "document recovery" is under --min-query-chars 20: sentence pairs only
            assert all(r["query_id"] != "17#title" for r in rows) and rows
            continue
        title = next(r for r in rows if r["query_id"] == f"{doc_id}#title")
        assert title["query_text"] == doc["title"].strip()
        if doc_id == "24":  # its text opens with the title's words: they are cut from the positive
            assert title["document_text"].startswith("is described . a technical reports program")
        elif doc_id == "33":  # "/information please/ services ." | "information please services are ..."
            assert title["document_text"].startswith("are required to provide answer")
        else:
            assert title["document_text"] == doc["text"].strip()
        for r in rows:
            assert r["query_id"].startswith(f"{doc_id}#") and len(r["query_text"]) >= 20
            if r["query_id"] != f"{doc_id}#title":
                assert r["query_text"] in doc["text"] and r["document_text"].startswith(doc["title"].strip())
    for split, rows in shards.items():  # a document's pairs share its split, drawn from the document id
        assert {split_of(e["document_id"], validation_fraction=0.3) for e in rows} == {split}
    _check_features(examples)
    config = json.loads((out / "pairs_config.json").read_text())
    assert (config["format"], config["split_key"], config["id_column"], config["pairs_per_document"]) == (
        "corpus", "document_id", "_id", 3)
    verify_manifest(out, kind="pairs")

    # Repeatable: the same seed gives the same pairs; another seed picks other sentences.
    def pairs_of(name: str, *flags: str) -> set[tuple[str, str]]:
        run(["--input", str(adi_dir), "--format", "corpus", "--output", str(tmp_path / name),
             "--pairs-per-document", "3", "--validation-fraction", "0.3", "--span-queries", "0", *flags, *SMALL_FLAGS])
        return {(e["query_id"], e["query_text"]) for rows in _shards(tmp_path / name).values() for e in rows}

    assert pairs_of("again") == {(e["query_id"], e["query_text"]) for e in examples}
    assert pairs_of("seeded", "--seed", "7") != pairs_of("again")
    # the default --span-queries 2: two more pairs per document (82 documents of 8+ words), short spans
    # (each also paired with a BM25 top document by default: tests/test_span_labels.py)
    spans = pairs_of("spans", "--span-queries", "2", "--bm25-span-pairs", "0") - pairs_of("again")
    assert len(spans) == 2 * 82 and all(q.split("#")[1] in ("w0", "w1") for q, _ in spans)
    assert all(4 <= len(text.split()) <= 12 for _, text in spans)
    with pytest.raises(InputError, match="--span-queries"):
        pairs_of("bad", "--span-queries", "-1")


def test_corpus_with_renamed_columns_title_prefix_and_dead_letters(tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    path.write_text(
        "doc_no,heading,body\n"
        "1,wing in a slipstream .,wing in a slipstream . a study of a wing in a propeller slipstream was made .\n"
        "2,,first sentence of the second doc. and its second sentence here.\n"
        "3,the whole text,the whole text\n"
        ",no id,text without id\n"
    )
    out = tmp_path / "out"
    stats = run(["--input", str(path), "--format", "corpus", "--output", str(out), "--id-column", "doc_no",
                 "--title-column", "heading", "--text-column", "body", "--pairs-per-document", "1",
                 "--span-queries", "0", "--validation-fraction", "0", *SMALL_FLAGS])
    assert (stats["read"], stats["paired_documents"], stats["written"]) == (4, 2, 2)
    assert stats["rejected_by_reason"] == {"empty_document_id": 1, "no_pair": 1}
    examples = {e["query_id"]: e for e in _shards_or_empty(out)["train"]}
    # The title is not left in its own positive: the pair would be trivial.
    assert examples["1#title"]["document_text"] == "a study of a wing in a propeller slipstream was made ."
    assert examples["1#title"]["query_text"] == "wing in a slipstream ."
    (second,) = [e for k, e in examples.items() if k.startswith("2#")]
    assert second["document_id"] == "2" and second["query_text"] in (
        "first sentence of the second doc.", "and its second sentence here.")
    with pytest.raises(InputError, match=r"lacks column\(s\) \['text'\]"):
        run(["--input", str(path), "--format", "corpus", "--output", str(tmp_path / "x"), "--id-column", "doc_no"])
    with pytest.raises(InputError, match="lacks the title column 'name'"):
        run(["--input", str(path), "--format", "corpus", "--output", str(tmp_path / "x"), "--id-column", "doc_no",
             "--text-column", "body", "--title-column", "name"])
    with pytest.raises(InputError, match="needs labelled pairs"):
        run(["--input", str(path), "--format", "corpus", "--output", str(tmp_path / "x"), "--id-column", "doc_no",
             "--text-column", "body", "--negatives-as-third-input"])


def _shards_or_empty(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Like :func:`_shards`, but a split with no examples is an empty list (its shard may be absent)."""
    result = {}
    for split in ("train", "validation"):
        files = sorted(str(p) for p in out.glob(f"{split}-*-of-*.tfrecord.gz"))
        result[split] = [
            {k: (v.decode() if isinstance(v, bytes) else v) for k, v in _parse(r).items()}
            for r in (tf.data.TFRecordDataset(files, compression_type="GZIP") if files else [])]
    return result


def _parse(record: tf.Tensor, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    parsed = tf.io.parse_single_example(record, spec or _FEATURES)
    return {k: (v.values.numpy() if isinstance(v, tf.SparseTensor) else v.numpy()) for k, v in parsed.items()}


# ---- explicit negatives as a third tower input ------------------------------------------------------------

_NEGATIVE_FEATURES = {**_FEATURES, "negative_id": tf.io.FixedLenFeature([], tf.string),
                      "negative_text": tf.io.FixedLenFeature([], tf.string),
                      "negative_ids": tf.io.VarLenFeature(tf.int64), "negative_counts": tf.io.VarLenFeature(tf.float32)}


def test_label_0_rows_become_negatives_of_the_same_querys_positives(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text(
        "text1\ttext2\tis_duplicate\n"
        "How do I learn Python ?\tWhat is the best way to learn Python ?\t1\n"
        "How do I learn Python ?\tHow can I teach myself Python ?\t1\n"
        "How do I learn Python ?\tHow do I cook rice ?\t0\n"
        "how do I  learn python ?\tWhat is a snake ?\t0\n"  # same query once normalised
        "Why is the sky blue ?\tWhat makes the sky blue ?\t1\n"
        "Is the moon made of cheese ?\tWhy is the sky blue ?\t0\n"  # negative for the other side's query
        "Is honey good for you ?\tHow far is the moon ?\t0\n"  # no positive to attach to
        "Can pigs fly ?\tDo pigs fly ?\t1\n"
        "Can pigs fly ?\tDo pigs fly ?\t0\n"  # contradicts the positive: never its negative
        "Can pigs fly ?\t\t0\n"  # rejected, as without the option
    )
    out = tmp_path / "out"
    stats = run(["--input", str(path), "--output", str(out), "--negatives-as-third-input",
                 "--validation-fraction", "0", *SMALL_FLAGS])
    assert (stats["read"], stats["written"], stats["rejected"]) == (10, 9, 1)
    assert (stats["label_0"], stats["with_negative"]) == (5, 3)
    files = sorted(str(p) for p in out.glob("train-*.tfrecord.gz"))
    rows = [_parse(r, _NEGATIVE_FEATURES) for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    assert len(rows) == 9
    text = {k: lambda r, k=k: r[k].decode() for k in ("query_text", "document_text", "negative_text", "negative_id")}
    got = {(text["query_text"](r), text["document_text"](r), r["label"]): text["negative_text"](r) for r in rows}
    python = {got[("How do I learn Python ?", d, 1.0)] for d in (
        "What is the best way to learn Python ?", "How can I teach myself Python ?")}
    assert python == {"How do I cook rice ?", "What is a snake ?"}  # round-robin: one each
    assert got[("Why is the sky blue ?", "What makes the sky blue ?", 1.0)] == "Is the moon made of cheese ?"
    assert got[("Can pigs fly ?", "Do pigs fly ?", 1.0)] == ""
    assert got[("Is honey good for you ?", "How far is the moon ?", 0.0)] == ""  # label-0 rows stay as they are
    featurizer = Featurizer(SMALL)
    for r in rows:
        negative = text["negative_text"](r)
        if negative:
            ids, counts = featurizer.bags_numpy([negative])[0]
            np.testing.assert_array_equal(r["negative_ids"], ids)
            np.testing.assert_array_equal(r["negative_counts"], counts)
            assert text["negative_id"](r) == text_id(negative)
        else:
            assert len(r["negative_ids"]) == 0 and text["negative_id"](r) == ""
    with pytest.raises(InputError, match="needs labelled pairs"):
        unlabelled = tmp_path / "unlabelled.tsv"
        unlabelled.write_text("query\tdocument\na\tb\n")
        run(["--input", str(unlabelled), "--output", str(tmp_path / "x"), "--negatives-as-third-input"])


def test_make_pairs_checks_and_featurizes_a_chunk_with_counts() -> None:
    columns = PairColumns("q", "d", "label", None, None)
    check = ValidatePairs(columns=columns, limits=PairLimits(max_query_chars=50, max_document_chars=50),
                          split=SplitSpec(validation_fraction=0.5, salt=""))
    raws = [_raw(i, q=f"question number {i}", d=f"document {i}", label=str(i % 2)) for i in range(2, 12)]
    raws += [_raw(12, q="", d="x", label="1"), _raw(13, q="q", d="d", label="?")]
    featurizer = Featurizer(SMALL)
    expected = {"train": [], "validation": []}
    for r in raws[:10]:
        query, document = r["fields"]["q"], r["fields"]["d"]
        split = split_of(query, validation_fraction=0.5)
        expected[split].append((query, tuple(featurizer.bags_numpy([document])[0][0])))
    assert expected["train"] and expected["validation"]

    def parse(serialized: bytes) -> tuple[str, tuple[int, ...]]:
        f = tf.train.Example.FromString(serialized).features.feature
        return f["query_text"].bytes_list.value[0].decode(), tuple(f["document_ids"].int64_list.value)

    with test_pipeline.TestPipeline() as p:
        # Two chunks; batch_size 3 makes each chunk featurize in several calls.
        made = (p | beam.Create([raws[:7], raws[7:]])
                | beam.ParDo(MakePairs(check=check, feature_config=SMALL, batch_size=3)).with_outputs(
                    REJECTED, MakePairs.VALIDATION, MakePairs.COUNTS, main="train"))
        # One list of examples per chunk and split.
        assert_that(made.train | "T" >> beam.FlatMap(lambda batch: map(parse, batch)), equal_to(expected["train"]),
                    label="train")
        assert_that(made[MakePairs.VALIDATION] | "V" >> beam.FlatMap(lambda batch: map(parse, batch)),
                    equal_to(expected["validation"]),
                    label="validation")
        assert_that(made[REJECTED] | "R" >> beam.Map(lambda r: r["reason"]), equal_to(["empty_query", "bad_label"]),
                    label="rejected")
        assert_that(made[MakePairs.COUNTS] | beam.CombineGlobally(sum_counts), equal_to([{
            "read": 12, "train": len(expected["train"]), "validation": len(expected["validation"]), "label_0": 5,
            "rejected:empty_query": 1, "rejected:bad_label": 1}]), label="counts")


# ---- format neighbours: each document → its BM25 nearest other documents -----------------------------------

# Hand-checked BM25 neighbours (stop words and stemming as dssm.bm25 does them):
# a and b are the same text, so neither is the other's neighbour; both share "apple pie" with c.
# c shares "apple pie" with a and b (two terms) and "cinnamon" with d (one, rarer): a and b score the
# same for c, so the row order (ids sorted) puts a first. d shares only "cinnamon", with c.
# e and f share "quantum physics". g shares no term with anyone: no neighbour.
HAND_CORPUS = {
    "a": "red apple pie recipe",
    "b": "red apple pie recipe",
    "c": "apple pie with cinnamon",
    "d": "cinnamon rolls baking",
    "e": "quantum physics lecture",
    "f": "quantum physics homework help",
    "g": "zebra",
}
HAND_TOP1 = {"a": "c", "b": "c", "c": "a", "d": "c", "e": "f", "f": "e"}


def test_neighbour_pairs_by_hand_without_self_or_identical_text() -> None:
    from dssm.bm25 import neighbour_pairs
    from dssm.errors import ConfigError

    ids, texts = list(HAND_CORPUS), list(HAND_CORPUS.values())
    top1 = neighbour_pairs(ids, texts, top=1, progress=False)
    assert [(q, d) for q, _, d, _ in top1] == list(HAND_TOP1.items())
    assert all(qt == HAND_CORPUS[q] and dt == HAND_CORPUS[d] for q, qt, d, dt in top1)
    top2 = neighbour_pairs(ids, texts, top=2, progress=False)
    assert [(q, d) for q, _, d, _ in top2 if q == "c"] == [("c", "a"), ("c", "b")]
    assert [(q, d) for q, _, d, _ in top2 if q == "d"] == [("d", "c")]  # only one shares a term
    # skip 1: c's best (a) is passed over; a has a single neighbour, so nothing is left for it.
    skipped = dict((q, d) for q, _, d, _ in neighbour_pairs(ids, texts, top=1, skip=1, progress=False))
    assert skipped.get("c") == "b" and "a" not in skipped and "e" not in skipped
    with pytest.raises(ConfigError, match="top=0"):
        neighbour_pairs(ids, texts, top=0)
    with pytest.raises(InputError, match="'a' occurs more than once"):
        neighbour_pairs(["a", "a"], ["x y", "x z"])


def test_neighbour_pairs_searches_deeper_past_many_copies() -> None:
    from dssm.bm25 import neighbour_pairs

    # Five copies outscore the one real neighbour; the first search (k = 3) sees only copies.
    ids = [f"x{i}" for i in range(5)] + ["y", "z"]
    texts = ["solar panel installation cost"] * 5 + ["solar panel cleaning", "kitchen tiles"]
    pairs = neighbour_pairs(ids, texts, top=1, progress=False)
    assert [(q, d) for q, _, d, _ in pairs[:5]] == [(f"x{i}", "y") for i in range(5)]
    assert len(pairs) == 6 and pairs[5][0] == "y" and pairs[5][2] in ids[:5]  # the copies tie for y


def test_neighbour_transforms_pair_documents_and_dead_letter_the_rest() -> None:
    from pipelines.corpus import CheckDocuments, NeighbourSpec, neighbour_outputs

    spec = CorpusSpec(id_column="_id", text_column="text", title_column="title", pairs_per_document=1,
                      min_query_chars=1, seed=0)
    raws = [_raw(i, _id=doc_id, title="", text=text) for i, (doc_id, text) in enumerate(HAND_CORPUS.items(), 1)]
    raws[2] = _raw(3, _id="c", title="apple pie", text="with cinnamon")  # title + text = c's text above
    raws += [
        _raw(8, _id="a", title="", text="quantum physics"),  # a's id again: dead letter, a keeps line 1
        _raw(9, _id=" ", title="", text="no id"),
        _raw(10, _id="h", title="", text=b"caf\xe9 physics"),
        {"record": "in.tsv:11", "fields": {"raw": "{"}, "reason": "unparsable", "error": "not valid JSON"},
    ]
    split = SplitSpec(validation_fraction=0.5, salt="")
    limits = PairLimits(max_query_chars=100, max_document_chars=100)
    with test_pipeline.TestPipeline() as p:
        checked = (p | beam.Create([raws[:6], raws[6:]])  # two chunks
                   | beam.ParDo(CheckDocuments(spec=spec, limits=limits)).with_outputs(
                       REJECTED, CheckDocuments.COUNTS, main="documents"))
        paired = (checked.documents | beam.combiners.ToList()
                  | beam.FlatMap(neighbour_outputs, spec=NeighbourSpec(top=1, skip=0, chunk=4), split=split)
                  .with_outputs(REJECTED, CheckDocuments.COUNTS, main="chunks"))
        assert_that(paired.chunks | beam.Map(len), equal_to([4, 2]), label="chunk sizes")
        assert_that(paired.chunks | beam.FlatMap(lambda c: c) | beam.Map(
            lambda x: (x["record"], x["query_id"], x["document_id"], x["query_text"], x["document_text"],
                       x["label"], x["split"])),
            equal_to([(f"in.tsv:{'abcdef'.index(q) + 1}", q, d, HAND_CORPUS[q], HAND_CORPUS[d], 1.0,
                       split_of(HAND_CORPUS[q], validation_fraction=0.5)) for q, d in HAND_TOP1.items()]),
            label="pairs")
        rejected = (checked[REJECTED], paired[REJECTED]) | "AllRejected" >> beam.Flatten()
        assert_that(rejected | "R" >> beam.Map(lambda x: (x["record"], x["reason"])),
                    equal_to([("in.tsv:7", "no_neighbour"), ("in.tsv:8", "duplicate_id"),
                              ("in.tsv:9", "empty_document_id"), ("in.tsv:10", "document_not_utf8"),
                              ("in.tsv:11", "unparsable")]), label="rejected")
        counts = ((checked[CheckDocuments.COUNTS], paired[CheckDocuments.COUNTS]) | "AllCounts" >> beam.Flatten()
                  | beam.CombineGlobally(sum_counts))
        assert_that(counts, equal_to([{"read": 11, "paired_documents": 6, "rejected:no_neighbour": 1,
                                       "rejected:duplicate_id": 1, "rejected:empty_document_id": 1,
                                       "rejected:document_not_utf8": 1, "rejected:unparsable": 1}]),
                    label="counts")


def test_neighbours_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"_id": doc_id, "title": "", "text": text}) for doc_id, text in HAND_CORPUS.items()]
    lines.append('{"_id": "broken", "text": ')  # a bad record
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    stats = run(["--input", str(tmp_path), "--format", "neighbours", "--output", str(out), "--batch-size", "2",
                 "--validation-fraction", "0.4", *SMALL_FLAGS], test_pipeline=test_pipeline.TestPipeline())
    assert stats == _stats(out)
    assert (stats["read"], stats["paired_documents"], stats["written"], stats["rejected"]) == (8, 6, 6, 2)
    assert stats["rejected_by_reason"] == {"no_neighbour": 1, "unparsable": 1}
    assert sorted((r["record"].rsplit(":", 1)[1], r["reason"]) for r in _rejected(out)) == [
        ("7", "no_neighbour"), ("8", "unparsable")]
    shards = _shards_or_empty(out)
    examples = shards["train"] + shards["validation"]
    assert {(e["query_id"], e["document_id"]) for e in examples} == set(HAND_TOP1.items())
    for split, rows in shards.items():  # the split hashes the query text, as format pairs does
        assert {split_of(e["query_text"], validation_fraction=0.4) for e in rows} <= {split}
    assert stats["train"] == len(shards["train"]) and stats["validation"] == len(shards["validation"])
    _check_features(examples)
    config = json.loads((out / "pairs_config.json").read_text())
    assert (config["format"], config["split_key"], config["neighbours"], config["skip_neighbours"]) == (
        "neighbours", "query_text", 1, 0)
    verify_manifest(out, kind="pairs")
    two = run(["--input", str(path), "--format", "neighbours", "--output", str(tmp_path / "two"),
               "--neighbours", "2", *SMALL_FLAGS])
    # a, b, d, e, f have one neighbour each (a and b are the same text), c two.
    assert two["written"] == sum(len(rows) for rows in _shards_or_empty(tmp_path / "two").values()) == 7
    with pytest.raises(InputError, match="--neighbours must be >= 1"):
        run(["--input", str(path), "--format", "neighbours", "--output", str(tmp_path / "x"), "--neighbours", "0"])
    with pytest.raises(InputError, match=r"neighbours format\) lacks column\(s\) \['body'\]"):
        run(["--input", str(path), "--format", "neighbours", "--output", str(tmp_path / "x"), "--text-column",
             "body"])


# ---- format tags (issue 16): labelled texts → (text, label description) pairs ---------------------------


def test_tag_pairs_dofn_pairs_each_label_and_dead_letters_the_rest() -> None:
    from pipelines.tags import TagPairs, TagSpec

    spec = TagSpec(text_column="text", labels_column="labels", id_column="_id", separator=",",
                   descriptions=(("game::board", "game: board"), ("ui::gtk", "user interface: gtk")))
    raws = [
        _raw(1, _id="p1", text="a chess game", labels=["game::board", "ui::gtk", "game::board"]),
        _raw(2, _id="", text="an editor", labels="ui::gtk"),  # no id: the text's hash
        _raw(3, _id="p3", text="x", labels=["nope"]),
        _raw(4, _id="p4", text="y", labels=[]),
        _raw(5, _id="p5", text="  ", labels=["ui::gtk"]),
        _raw(6, _id="p6", text="z", labels=7),
        _raw(7, _id="p7", text="w"),
    ]
    split = SplitSpec(validation_fraction=0.5)
    limits = PairLimits(max_query_chars=100, max_document_chars=100)
    with test_pipeline.TestPipeline() as p:
        out = (p | beam.Create(raws)
               | beam.ParDo(TagPairs(spec=spec, limits=limits, split=split)).with_outputs(
                   REJECTED, TagPairs.PAIRED, main="pairs"))
        assert_that(out.pairs | "P" >> beam.Map(lambda x: (x["record"], x["query_id"], x["document_id"],
                                                           x["document_text"], x["split"])),
                    equal_to([("in.tsv:1", "p1", "game::board", "game: board", split_of("p1", validation_fraction=0.5)),
                              ("in.tsv:1", "p1", "ui::gtk", "user interface: gtk",
                               split_of("p1", validation_fraction=0.5)),
                              ("in.tsv:2", text_id("an editor"), "ui::gtk", "user interface: gtk",
                               split_of(text_id("an editor"), validation_fraction=0.5))]), label="pairs")
        assert_that(out[REJECTED] | "R" >> beam.Map(lambda x: (x["record"], x["reason"])),
                    equal_to([("in.tsv:3", "unknown_label"), ("in.tsv:4", "no_label"), ("in.tsv:5", "empty_query"),
                              ("in.tsv:6", "bad_labels"), ("in.tsv:7", "missing_column")]), label="rejected")
        assert_that(out[TagPairs.PAIRED], equal_to(["p1", text_id("an editor")]), label="paired")


def test_pairs_job_format_tags_writes_shards_dead_letters_and_counts(tmp_path) -> None:
    labels = tmp_path / "labels.tsv"
    labels.write_text("label\tdescription\ngame::board\tgame: board\nui::gtk\tuser interface: gtk\n")
    rows = [{"_id": "p1", "text": "a chess game", "labels": ["game::board", "ui::gtk"]},
            {"_id": "p2", "text": "a text editor", "labels": ["ui::gtk"]},
            {"_id": "p3", "text": "unknown tag here", "labels": ["nope"]},
            {"_id": "p4", "text": "no tags at all", "labels": []}]
    data = tmp_path / "tagged.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "pairs"
    stats = run(["--input", str(data), "--format", "tags", "--label-file", str(labels), "--output", str(out),
                 "--validation-fraction", "0", *SMALL_FLAGS])
    assert (stats["read"], stats["paired_documents"], stats["written"], stats["rejected"]) == (4, 2, 3, 2)
    assert stats["rejected_by_reason"] == {"no_label": 1, "unknown_label": 1}
    verify_manifest(out, kind="pairs")
    train = _shards_train_only(out)
    assert sorted((e["query_id"], e["document_id"], e["document_text"]) for e in train) == [
        ("p1", "game::board", "game: board"), ("p1", "ui::gtk", "user interface: gtk"),
        ("p2", "ui::gtk", "user interface: gtk")]
    assert sorted(r["reason"] for r in _rejected(out)) == ["no_label", "unknown_label"]
    assert json.loads((out / "pairs_config.json").read_text())["split_key"] == "query_id"
    with pytest.raises(InputError, match="needs --label-file"):
        run(["--input", str(data), "--format", "tags", "--output", str(tmp_path / "x")])
    with pytest.raises(InputError, match=r"lacks column\(s\) \['tags'\]"):
        run(["--input", str(data), "--format", "tags", "--label-file", str(labels), "--labels-column", "tags",
             "--output", str(tmp_path / "y")])


def _shards_train_only(out: Path) -> list[dict[str, str]]:
    files = sorted(str(p) for p in out.glob("train-*-of-*.tfrecord.gz"))
    rows = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        f = tf.train.Example.FromString(record.numpy()).features.feature
        rows.append({k: f[k].bytes_list.value[0].decode() for k in ("query_id", "document_id", "document_text")})
    return rows


def test_a_pyserini_corpus_is_guessed_as_format_corpus(tmp_path: Path) -> None:
    """``dssm pairs --input docs.jsonl`` on Pyserini's JsonCollection (``id``, ``contents``): format corpus,
    its text column ``contents`` (written in the pairs config); a named column still wins."""
    from pipelines.make_pairs import PairsConfig, resolve_input

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "contents": f"a document {i}. about things {i}."}) + "\n"
                            for i in range(3)))
    source, resolved = resolve_input(path, format=None, config=PairsConfig())
    assert source.format == "corpus" and (resolved.id_column, resolved.text_column) == ("id", "contents")
    assert source.corpus.text_column == "contents"
    with pytest.raises(InputError, match=r"lacks column\(s\) \['body'\]"):
        resolve_input(path, format="corpus", config=PairsConfig(text_column="body"),
                      explicit=frozenset({"text_column"}))
