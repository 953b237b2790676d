"""Readers for user tables, corpora and BEIR directories; the deterministic split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dssm.data import is_valid_utf8, iter_corpus, iter_rows, read_beir, read_columns, split_of
from dssm.errors import InputError


def test_read_beir_on_adi(adi_dir: Path) -> None:
    data = read_beir(adi_dir)
    assert len(data.corpus) == 82 and len(data.queries) == 35
    assert all(qid in data.queries for qid in data.qrels)
    assert all(grade > 0 for rels in data.qrels.values() for grade in rels.values())


def test_tables_in_every_format_give_the_same_rows(tmp_path: Path) -> None:
    rows = [{"id": "a", "text": 'He said "hi", then left'}, {"id": "b", "text": "tab\there? no: comma, yes"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    (tmp_path / "c.csv").write_text('id,text\na,"He said ""hi"", then left"\nb,"tab\there? no: comma, yes"\n')
    for name in ("c.jsonl", "c.parquet", "c.csv"):
        docs = list(iter_corpus(tmp_path / name))
        assert [(d.id, d.text) for d in docs] == [(r["id"], r["text"]) for r in rows], name


def test_bad_rows_are_reported_with_their_location(tmp_path: Path) -> None:
    path = tmp_path / "p.tsv"
    path.write_bytes(b"query\tdocument\nok\tfine\nonly one field\nbad \xff utf8\tdoc\n")
    got = list(iter_rows(path))
    assert got[0].error is None and got[0].fields == {"query": "ok", "document": "fine"}
    assert got[1].error == "has 1 fields, header has 2" and got[1].location == f"{path}:3"
    assert got[2].error is None and not is_valid_utf8(got[2].fields["query"])


def test_missing_files_and_columns_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        list(iter_rows(tmp_path / "nope.csv"))
    (tmp_path / "c.csv").write_text("name,body\nx,y\n")
    with pytest.raises(InputError, match=r"lacks column\(s\) \['id', 'text'\]"):
        list(iter_corpus(tmp_path / "c.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match="empty"):
        read_columns(tmp_path / "empty.csv")
    with pytest.raises(InputError, match="BEIR directory not found"):
        read_beir(tmp_path / "missing")


def test_split_is_deterministic_and_near_its_fraction() -> None:
    texts = [f"question number {i} ?" for i in range(4000)]
    splits = [split_of(t, validation_fraction=0.2) for t in texts]
    assert splits == [split_of(t, validation_fraction=0.2) for t in texts]
    share = Counter(splits)["validation"] / len(texts)
    assert 0.17 < share < 0.23
    # Case and spacing do not move a query to the other split; the salt does move some.
    assert split_of("How  do I ?", validation_fraction=0.5) == split_of("how do i ?", validation_fraction=0.5)
    assert splits != [split_of(t, validation_fraction=0.2, salt="other") for t in texts]


def test_rows_outside_a_holdout_are_copied_line_for_line(tmp_path: Path) -> None:
    from dssm.data import write_rows_outside_holdout

    held = tmp_path / "pairs"
    held.mkdir()
    (held / "pairs_config.json").write_text(json.dumps({"validation_fraction": 0.5, "split_salt": "s"}))
    questions = [f"question number {i} ?" for i in range(40)]
    lines = [f"p{i}\t{q}\tanswer {i}\t{i % 2}\n" for i, q in enumerate(questions)]
    source = tmp_path / "pairs.tsv"
    source.write_text("id\ttext1\ttext2\tis_duplicate\n" + "".join(lines))
    out = tmp_path / "user.tsv"
    kept, read = write_rows_outside_holdout(source, held, out)
    train = [line for q, line in zip(questions, lines, strict=True)
             if split_of(q, validation_fraction=0.5, salt="s") == "train"]
    assert (kept, read) == (len(train), 40) and 0 < kept < 40
    assert out.read_text() == "id\ttext1\ttext2\tis_duplicate\n" + "".join(train)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"query": q, "document": "d"}) + "\n" for q in questions))
    assert write_rows_outside_holdout(jsonl, held, tmp_path / "user.jsonl") == (len(train), 40)
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('text1,text2,is_duplicate\n"a question\nover two lines",b,1\n')
    with pytest.raises(InputError, match="1 records on 2 lines"):
        write_rows_outside_holdout(quoted, held, tmp_path / "q.csv")
    with pytest.raises(InputError, match="no query column"):
        write_rows_outside_holdout(source, held, out, query_column="missing")
