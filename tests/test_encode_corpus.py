"""pipelines/encode_corpus.py: the Beam encode job, its dead letters, and ``dssm index`` input errors."""

from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from dssm.errors import InputError
from pipelines import encode_corpus as ec
from pipelines.transforms import REJECTED, read_table


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
    with test_pipeline.TestPipeline() as p:
        checked = (p | beam.Create([str(corpus)]) | beam.FlatMap(read_table, None)
                   | beam.ParDo(ec.ValidateDocuments(ec.CorpusColumns(id="_id"))).with_outputs(REJECTED,
                                                                                              main="docs"))
        assert_that(checked.docs | "ids" >> beam.Map(lambda d: (d["id"], d["title"], d["text"])),
                    equal_to([("a", "T", "alpha"), ("b", "", "beta"), ("7", "", "numeric id")]), label="docs")
        assert_that(checked[REJECTED] | "reasons" >> beam.Map(lambda r: (r["record"].rsplit(":", 1)[1], r["reason"])),
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
