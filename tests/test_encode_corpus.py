"""pipelines/encode_corpus.py: the Beam encode job, its dead letters, and ``dssm index`` input errors."""

from __future__ import annotations

import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from dssm.errors import InputError
from pipelines import encode_corpus as ec
from pipelines.corpus_batches import CorpusColumns, ReadBatches, plan_reads
from pipelines.inference import EncodeBatches, KeyedTowerHandler
from pipelines.records import read_table


def write_jsonl(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_validate_documents_splits_good_and_rejected(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [
        {"_id": "a", "title": "T", "text": "alpha"},
        {"_id": " b ", "text": "beta"},                   # no title column → empty title; id stripped
        {"_id": "", "title": "x", "text": "no id"},
        {"_id": "c", "title": " ", "text": "  "},
        "{not json",
        {"_id": 7, "title": None, "text": "numeric id"},
    ])
    corpus.write_bytes(corpus.read_bytes() + b'{"_id": "d", "text": "bad \xff byte"}\n')
    ranges, _ = plan_reads([str(corpus)], None, batch_size=100)
    with test_pipeline.TestPipeline() as p:
        batches = (p | beam.Create(ranges) | beam.ParDo(ReadBatches(columns=CorpusColumns(id="_id"), batch_size=100))
                   | beam.FlatMap(lambda example: [key for key, _texts in example]))
        docs = batches | "docs" >> beam.FlatMap(lambda batch: batch[1])
        rejected = batches | "rejected" >> beam.FlatMap(lambda batch: batch[2])
        assert_that(docs | "ids" >> beam.Map(lambda d: (d["id"], d["title"], d["text"])),
                    equal_to([("a", "T", "alpha"), ("b", "", "beta"), ("7", "", "numeric id")]), label="docs")
        assert_that(rejected | "reasons" >> beam.Map(lambda r: (r["record"].rsplit(":", 1)[1], r["reason"])),
                    equal_to([("3", "empty_id"), ("4", "empty_document"), ("5", "unparsable"), ("7", "not_utf8")]),
                    label="rejected")


def test_input_errors_before_the_pipeline(tmp_path):
    out = str(tmp_path / "idx")
    with pytest.raises(InputError, match="corpus not found"):
        ec.run(["--model", str(tmp_path), "--corpus", str(tmp_path / "missing.jsonl"), "--output", out])
    write_jsonl(tmp_path / "c.jsonl", [{"doc": "a", "body": "x"}])
    with pytest.raises(InputError, match=r"lacks column\(s\) \['id', 'text'\]"):
        ec.run(["--model", str(tmp_path), "--corpus", str(tmp_path / "c.jsonl"), "--output", out])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="empty"):
        ec.run(["--model", str(tmp_path), "--corpus", str(tmp_path / "empty.jsonl"), "--output", out])
    (tmp_path / "c.xml").write_text("<a/>")
    with pytest.raises(InputError, match="cannot tell the format"):
        ec.run(["--model", str(tmp_path), "--corpus", str(tmp_path / "c.xml"), "--output", out])
    with pytest.raises(InputError, match="no such directory"):
        ec.run(["--model", str(tmp_path / "nomodel"), "--corpus", str(tmp_path / "c.jsonl"), "--output", out,
                "--id-column", "doc", "--text-column", "body"])
    assert not (tmp_path / "idx").exists()


def _adi_documents(adi_dir):
    from dssm.data import iter_corpus

    return list(iter_corpus(adi_dir / "corpus.jsonl"))


def test_plan_reads_cuts_jsonl_at_lines_and_reads_what_read_table_reads(tmp_path):
    """Byte ranges of N lines each, read back, give read_table's records (locations included), in order."""
    from pipelines.records import read_jsonl_range

    lines = [json.dumps({"_id": f"d{i}", "text": f"text {i} \u00e9"}) for i in range(10)]
    lines[3] = ""                   # blank: skipped, but counted in the line numbers
    lines[6] = "{broken"            # unparsable: a raw record with reason set
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(("\n".join(lines)).encode("utf-8") + b'\n{"_id": "x", "text": "bad \xff"}')  # no final \n
    ranges, records = plan_reads([str(corpus)], None, batch_size=4)
    assert records == 11
    assert [(r.first_line, r.first_batch, r.batches) for r in ranges] == [(1, 0, 1), (5, 1, 1), (9, 2, 1)]
    assert ranges[0].start == 0 and ranges[-1].end == corpus.stat().st_size
    assert all(a.end == b.start for a, b in zip(ranges, ranges[1:], strict=False))
    got = [raw for r in ranges for raw in read_jsonl_range(r.path, r.start, r.end, r.first_line)]
    assert got == list(read_table(str(corpus)))
    assert got[-1]["fields"]["text"] == b"bad \xff" and got[5]["reason"] == "unparsable"

    # A CSV file is one read task with enough batch ids for its records; with --shard i/3 a batch
    # holds three times as many records, so a third of them on average stay.
    csv = tmp_path / "c.csv"
    csv.write_text("id,text\n" + "".join(f"{i},t{i}\n" for i in range(9)), encoding="utf-8")
    ranges, records = plan_reads([str(corpus), str(csv)], None, batch_size=2, stride=3)
    assert records == 20 and [(r.end is None, r.first_batch, r.batches) for r in ranges] == [
        (False, 0, 1), (False, 1, 1), (True, 2, 2)]


def test_read_and_encode_batches_match_the_encoder(tiny_model_dir, adi_dir, tmp_path):
    """Read tasks → batches → RunInference over the SavedModel give what the encoder gives directly."""
    from dssm.data import document_text
    from dssm.export import load_encoder

    docs = _adi_documents(adi_dir)
    expected = load_encoder(tiny_model_dir).embed_documents([document_text(d.title, d.text) for d in docs])
    expected_by_id = {d.id: expected[i] for i, d in enumerate(docs)}
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": d.id, "title": d.title, "text": d.text} for d in docs]
                         + [{"_id": "", "text": "no id"}])
    ranges, _ = plan_reads([str(corpus)], None, batch_size=30)
    assert len(ranges) == 3
    # RunInference gets each batch as it is: no BatchElements regrouping them (Beam's KeyedModelHandler
    # does not pass should_skip_batching on).
    assert KeyedTowerHandler(str(tiny_model_dir)).should_skip_batching()

    def check(batches):
        assert sorted(b[0] for b in batches) == [0, 1, 2]  # one batch per range, in corpus order
        got, order = {}, []
        for batch_id, batch_docs, rejected, embeddings in sorted(batches, key=lambda b: b[0]):
            assert embeddings.dtype == np.float32 and embeddings.shape == (len(batch_docs), 16)
            got.update({d["id"]: embeddings[i] for i, d in enumerate(batch_docs)})
            order += [d["id"] for d in batch_docs]
            assert [r["reason"] for r in rejected] == (["empty_id"] if batch_id == 2 else [])
        assert order == [d.id for d in docs]
        for doc_id, vector in got.items():
            np.testing.assert_allclose(vector, expected_by_id[doc_id], atol=1e-6, err_msg=doc_id)

    with test_pipeline.TestPipeline() as p:
        batches = (p | beam.Create(ranges)
                   | beam.ParDo(ReadBatches(columns=CorpusColumns(id="_id"), batch_size=30))
                   | EncodeBatches(str(tiny_model_dir)))
        assert_that(batches, check)


def test_index_job_on_adi_builds_a_searchable_version(tiny_model_dir, adi_dir, tmp_path, capsys):
    from dssm import index as ix
    from dssm.data import document_text
    from dssm.export import load_encoder

    out = tmp_path / "idx"
    summary = ec.run(["--model", str(tiny_model_dir), "--corpus", str(adi_dir), "--output", str(out)],
                     test_pipeline=test_pipeline.TestPipeline())
    docs = _adi_documents(adi_dir)
    assert summary["documents"] == len(docs) == 82
    assert summary["encode"]["rejected"] == 0 and summary["encode"]["read"] == 82
    assert summary["scann"]["mode"] == "brute_force" and summary["recall_at_10"] == 1.0
    index = ix.load_index(out)
    assert index.version == summary["version"] and (index.version_dir / "model" / "saved_model").is_dir()
    assert index.manifest["encode"]["encoded"] == 82
    # Rows of embeddings.npy are the encoder's document embeddings of the doc store's rows.
    stored = dict(index.docs.iter_all())
    by_id = {d.id: d for d in docs}
    texts = [document_text(by_id[stored[r].id].title, by_id[stored[r].id].text) for r in range(82)]
    np.testing.assert_allclose(index.embeddings(), load_encoder(tiny_model_dir).embed_documents(texts), atol=1e-6)
    assert stored[0].title == by_id[stored[0].id].title and stored[5].text == by_id[stored[5].id].text
    # The staging area (shards) is gone; nothing but the published version is left.
    assert not (out / ".staging").exists() and not (out / "rejected").exists()

    # `dssm index` again through main(): ScaNN flags override the size rule, --keep-versions prunes
    # (once this test's own reader lets the first version go: a held version is never pruned).
    index.lease.release()
    # (Re-ranking all 82 documents exactly makes AH exact here; the 2-epoch model's embeddings are too
    # alike for AH codes alone to rank them.)
    assert ec.main(["--model", str(tiny_model_dir), "--corpus", str(adi_dir / "corpus.jsonl"), "--output", str(out),
                    "--scann-mode", "ah", "--scann-reorder-k", "82", "--min-recall", "0.99", "--keep-versions", "1",
                    "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["scann"]["mode"] == "ah" and printed["scann"]["reorder_k"] == 82
    assert printed["recall_at_10"] >= 0.99 and printed["pruned_versions"] == [summary["version"]]
    assert ix.list_versions(out) == [printed["version"]] == [ix.load_index(out).version]


def test_index_job_dead_letters_and_custom_columns(tiny_model_dir, tmp_path):
    from dssm import index as ix

    corpus = tmp_path / "docs.csv"
    corpus.write_text("doc_id,body,heading\n"
                      "a1,first document about indexing,Head A\n"
                      "a2,,\n"                      # empty → dead letter
                      "a3,third document about retrieval,\n"
                      "a4,only,two,many\n"          # wrong field count → dead letter
                      ",no id here,x\n", encoding="utf-8")
    out = tmp_path / "idx"
    summary = ec.run(["--model", str(tiny_model_dir), "--corpus", str(corpus), "--output", str(out),
                      "--id-column", "doc_id", "--text-column", "body", "--title-column", "heading",
                      "--batch-size", "2"], test_pipeline=test_pipeline.TestPipeline())
    assert summary["documents"] == 2
    assert summary["encode"]["rejected_by_reason"] == {"empty_document": 1, "empty_id": 1, "unparsable": 1}
    rejected = [json.loads(line) for f in sorted((out / "rejected" / summary["version"]).glob("*.jsonl"))
                for line in f.read_text().splitlines()]
    assert sorted(r["record"].rsplit(":", 1)[1] for r in rejected) == ["3", "5", "6"]
    index = ix.load_index(out)
    assert sorted(d.id for _, d in index.docs.iter_all()) == ["a1", "a3"]
    assert index.docs.get([index.docs.row_of("a1")])[0].title == "Head A"


def test_duplicate_ids_and_all_rejected_corpus_stop_the_build(tiny_model_dir, tmp_path):
    from dssm import index as ix

    out = tmp_path / "idx"
    first = ix.build_index(out, embeddings=np.eye(2, 16, dtype=np.float32), ids=["x", "y"], texts=["one", "two"])
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "x", "text": "one"}, {"id": "y", "text": "two"},
                                               {"id": "x", "text": "again"}])
    with pytest.raises(InputError, match=r"duplicate document id 'x'.*dup.jsonl:[13]"):
        ec.run(["--model", str(tiny_model_dir), "--corpus", str(dup), "--output", str(out)],
               test_pipeline=test_pipeline.TestPipeline())
    empty = write_jsonl(tmp_path / "blank.jsonl", [{"id": "x", "text": " "}])
    with pytest.raises(InputError, match=r"no documents to index; 1 record\(s\) rejected, e.g. .*blank.jsonl:1"):
        ec.run(["--model", str(tiny_model_dir), "--corpus", str(empty), "--output", str(out)],
               test_pipeline=test_pipeline.TestPipeline())
    assert ix.current_version_dir(out) == first.version_dir
    assert ix.list_versions(out) == [first.version]
    assert not (out / ".staging").exists()
    # Only the all-rejected run's dead letters are kept (the duplicate run had none).
    assert len(list((out / "rejected").iterdir())) == 1


def test_index_job_reads_parquet_corpus(tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dssm import index as ix

    pq.write_table(pa.table({"id": ["p1", "p2", "p3"], "text": ["alpha beta", "gamma", "delta epsilon"],
                             "extra": [1, 2, 3]}), tmp_path / "corpus.parquet")
    out = tmp_path / "idx"
    summary = ec.run(["--model", str(tiny_model_dir), "--corpus", str(tmp_path / "corpus.parquet"),
                      "--output", str(out)], test_pipeline=test_pipeline.TestPipeline())
    assert summary["documents"] == 3 and summary["encode"]["columns"] == {"id": "id", "title": "title",
                                                                          "text": "text"}
    index = ix.load_index(out)
    assert {d.id: (d.title, d.text) for _, d in index.docs.iter_all()} == {
        "p1": ("", "alpha beta"), "p2": ("", "gamma"), "p3": ("", "delta epsilon")}


def test_index_job_reads_a_pyserini_corpus_without_column_flags(tiny_model_dir, tmp_path):
    """Pyserini's JsonCollection (``id``, ``contents``), what users of BM25 engines have: indexed as it is."""
    from dssm import index as ix

    corpus = write_jsonl(tmp_path / "docs.jsonl", [{"id": "d1", "contents": "first document about indexing"},
                                                   {"id": "d2", "contents": "second document about retrieval"}])
    out = tmp_path / "idx"
    summary = ec.run(["--model", str(tiny_model_dir), "--corpus", str(corpus), "--output", str(out)],
                     test_pipeline=test_pipeline.TestPipeline())
    assert summary["documents"] == 2 and summary["encode"]["columns"] == {"id": "id", "title": "title",
                                                                          "text": "contents"}
    assert {d.id: d.text for _, d in ix.load_index(out).docs.iter_all()} == {
        "d1": "first document about indexing", "d2": "second document about retrieval"}


def test_same_job_on_direct_and_dask_gives_the_same_embeddings(tiny_model_dir, adi_dir, tmp_path):
    """The encode job on the DirectRunner (multi-process) and on Dask against a LocalCluster started here.

    Both use RunInference (``--inference auto``): on Dask it lost the batches its ``BatchElements`` emitted
    from ``finish_bundle`` until :class:`KeyedTowerHandler` skipped that step (docs/scaling.md). Small
    batches so there are several.
    """
    distributed = pytest.importorskip("distributed")
    from dssm import index as ix

    common = ["--model", str(tiny_model_dir), "--corpus", str(adi_dir), "--batch-size", "20", "--json"]
    direct = ec.run([*common, "--output", str(tmp_path / "direct"), "--direct_running_mode=multi_processing",
                     "--direct_num_workers=2"])
    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        dask = ec.run([*common, "--output", str(tmp_path / "dask"),
                       "--runner=apache_beam.runners.dask.dask_runner.DaskRunner",
                       f"--dask_client_address={cluster.scheduler_address}"])
    assert direct["encode"]["inference"] == dask["encode"]["inference"] == "runinference"
    assert direct["encode"]["batches"] == dask["encode"]["batches"] == 5
    assert direct["documents"] == dask["documents"] == 82

    def by_id(path):
        index = ix.load_index(path)
        matrix = index.embeddings()
        return {doc.id: matrix[row] for row, doc in index.docs.iter_all()}

    a, b = by_id(tmp_path / "direct"), by_id(tmp_path / "dask")
    assert set(a) == set(b)
    np.testing.assert_allclose(np.stack([a[i] for i in sorted(a)]), np.stack([b[i] for i in sorted(a)]), atol=1e-6)


def test_a_compressed_corpus_is_one_read_task_with_the_plain_records(tmp_path, adi_dir):
    """``corpus.jsonl.gz`` (a BEIR directory's, or given by name): one whole-file task, batches by its record
    count, the plain file's records."""
    import gzip

    from pipelines.encode_corpus import resolve_corpus

    directory = tmp_path / "adi"
    directory.mkdir()
    packed = directory / "corpus.jsonl.gz"
    packed.write_bytes(gzip.compress((adi_dir / "corpus.jsonl").read_bytes()))
    assert resolve_corpus(str(directory)) == [str(packed)]
    ranges, records = plan_reads([str(packed)], None, batch_size=20)
    assert records == 82 and [(r.end, r.first_batch, r.batches) for r in ranges] == [(None, 0, 5)]
    got = list(read_table(str(packed)))
    assert got[0]["record"] == f"{packed}:1"
    assert [{**r, "record": r["record"].rsplit(":", 1)[1]} for r in got] == [
        {**r, "record": r["record"].rsplit(":", 1)[1]} for r in read_table(str(adi_dir / "corpus.jsonl"))]
    (directory / "corpus.jsonl.gz").unlink()
    with pytest.raises(InputError, match="without corpus.jsonl"):
        resolve_corpus(str(directory))


def test_a_damaged_compressed_corpus_is_refused_by_name_when_its_reads_are_planned(tmp_path, adi_dir):
    """Sizing the batches of a ``.gz`` corpus reads it through; a file cut short fails there with the
    readers' error naming it, not with gzip's own."""
    import gzip

    packed = tmp_path / "corpus.jsonl.gz"
    packed.write_bytes(gzip.compress((adi_dir / "corpus.jsonl").read_bytes())[:-40])
    with pytest.raises(InputError, match=f"{packed}: not a readable gzip file"):
        plan_reads([str(packed)], None, batch_size=20)
