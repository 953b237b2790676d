"""Readers for user tables, corpora and BEIR directories; the deterministic split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dssm.data import (
    is_valid_utf8,
    iter_corpus,
    iter_qrels,
    iter_rows,
    qrels_layout,
    read_beir,
    read_columns,
    read_qrels,
    split_of,
)
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


def test_qrels_in_beir_trec_and_plain_layouts_read_the_same(tmp_path: Path) -> None:
    expected = {"1": {"17": 1, "46": 2}, "q 2": {"d9": 0}}
    layouts = {
        "beir": "query-id\tcorpus-id\tscore\n1\t17\t1\n1\t46\t2\n\nq 2\td9\t0\n",
        "trec": "1 0 17 1\n1 0 46 2\n",  # TREC: query, iteration, document, grade
        "plain": "1\t17\t1\r\n1 46 2\r\n",
    }
    for layout, text in layouts.items():
        path = tmp_path / f"{layout}.tsv"
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # a byte-order mark is read past
        assert qrels_layout(path) == layout
        got = read_qrels(path)
        want = expected if layout == "beir" else {"1": expected["1"]}
        assert got == want, layout


def test_bad_qrels_are_refused_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "qrels.txt"
    path.write_text("1 0 17 1\n1 0 46\n")
    rows = list(iter_qrels(path))
    assert rows[0].error is None and rows[1].error == "has 3 fields, a trec qrels line has 4"
    with pytest.raises(InputError, match=f"{path}:2: has 3 fields"):
        read_qrels(path)
    path.write_text("query corpus relevance\n1 17 1\n")
    with pytest.raises(InputError, match="first line 'query corpus relevance' is neither BEIR's header"):
        qrels_layout(path)
    path.write_text("query-id\tcorpus-id\tscore\n1\t17\tyes\n")
    with pytest.raises(InputError, match=r":2: score 'yes' is not a number"):
        read_qrels(path)
    path.write_text("\n")
    with pytest.raises(InputError, match="qrels file is empty"):
        read_qrels(path)


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_bytes(b'\xef\xbb\xbf{"_id": 1, "text": "first"}\r\n{"_id": 2, "text": "second"}\r\n')
    (tmp_path / "c.csv").write_bytes(b"\xef\xbb\xbfid,text\r\n1,first\r\n2,second\r\n")
    for name in ("c.jsonl", "c.csv"):
        assert [(d.id, d.text) for d in iter_corpus(tmp_path / name)] == [("1", "first"), ("2", "second")], name
    assert read_columns(tmp_path / "c.csv") == ["id", "text"]


def test_jsonl_columns_are_the_keys_of_its_first_records(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"_id": "1", "title": "a title only"}\nnot json\n{"_id": "2", "text": "body", "title": "t"}\n')
    assert read_columns(path) == ["_id", "title", "text"]  # the first record lacks text; later ones have it
    path.write_text('{"_id": "1", "title": "a title only"}\n{"_id": "2", "text": "body", "title": "t"}\n')
    assert [(d.id, d.title, d.text) for d in iter_corpus(path)] == [("1", "a title only", ""), ("2", "t", "body")]


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


def _gzip_copy(source: Path, target: Path) -> Path:
    import gzip

    target.write_bytes(gzip.compress(source.read_bytes()))
    return target


def test_gzip_compressed_tables_read_as_the_plain_ones(tmp_path: Path, adi_dir: Path) -> None:
    """``corpus.jsonl.gz``, ``.tsv.gz``, ``.csv.gz``: the same columns and rows, located ``path:line`` in the
    compressed file; a byte-order mark inside is read past, as in a plain file."""
    (tmp_path / "t.csv").write_bytes(b"\xef\xbb\xbfid,text\r\n1,\"first, quoted\"\r\n2,second\r\n3\r\n")
    (tmp_path / "t.tsv").write_text("id\ttext\n1\tfirst\n\n2\tsecond\textra\n")
    (tmp_path / "t.jsonl").write_bytes((adi_dir / "corpus.jsonl").read_bytes() + b"{broken\n")
    for name in ("t.csv", "t.tsv", "t.jsonl"):
        plain, packed = tmp_path / name, _gzip_copy(tmp_path / name, tmp_path / (name + ".gz"))
        assert read_columns(packed) == read_columns(plain), name
        rows = [(r.location, r.fields, r.error) for r in iter_rows(plain)]
        assert [(r.location.replace(".gz:", ":"), r.fields, r.error) for r in iter_rows(packed)] == rows, name
        assert any(error for _, _, error in rows), name  # the bad record comes back with its reason, not raised
    assert [d.id for d in iter_corpus(_gzip_copy(adi_dir / "corpus.jsonl", tmp_path / "c.jsonl.gz"))] == [
        d.id for d in iter_corpus(adi_dir / "corpus.jsonl")]


def test_gzip_suffixes_and_damaged_files_are_named(tmp_path: Path) -> None:
    from dssm.data import table_format

    assert [table_format(name) for name in ("a.jsonl.gz", "b.TSV.GZ", "c.csv.gz", "d.txt.gz")] == [
        "jsonl", "tsv", "csv", "tsv"]
    assert table_format("e.gz", "jsonl") == "jsonl"
    with pytest.raises(InputError, match="Parquet compresses itself"):
        table_format("f.parquet.gz")
    with pytest.raises(InputError, match="cannot tell the format of g.gz"):
        table_format("g.gz")
    (tmp_path / "not.jsonl.gz").write_text('{"_id": "1", "text": "plain text behind a .gz name"}\n')
    with pytest.raises(InputError, match="not.jsonl.gz: not a readable gzip file"):
        list(iter_rows(tmp_path / "not.jsonl.gz"))
    import gzip

    whole = gzip.compress(b"".join(b'{"_id": "%d", "text": "document %d"}\n' % (i, i) for i in range(2000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # a download cut short
    with pytest.raises(InputError, match="cut.jsonl.gz: not a readable gzip file"):
        list(iter_corpus(tmp_path / "cut.jsonl.gz"))


def test_a_beir_directory_of_compressed_files_reads_as_the_plain_one(tmp_path: Path, adi_dir: Path) -> None:
    """As BEIR's copies on the Hugging Face hub ship it: ``corpus.jsonl.gz``, ``queries.jsonl.gz``, and the
    qrels plain or compressed; a plain file wins where both are there."""
    from dssm.data import beir_file

    packed = tmp_path / "adi"
    (packed / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        _gzip_copy(adi_dir / name, packed / (name + ".gz"))
    _gzip_copy(adi_dir / "qrels.tsv", packed / "qrels" / "test.tsv.gz")
    plain, got = read_beir(adi_dir), read_beir(packed)
    assert (got.corpus, got.queries, got.qrels) == (plain.corpus, plain.queries, plain.qrels)
    assert beir_file(packed, "corpus.jsonl") == packed / "corpus.jsonl.gz"
    (packed / "corpus.jsonl").write_bytes((adi_dir / "corpus.jsonl").read_bytes())
    assert beir_file(packed, "corpus.jsonl") == packed / "corpus.jsonl"
    assert beir_file(packed, "missing.jsonl") == packed / "missing.jsonl"


def test_corpus_columns_default_to_beir_then_pyserini_names(tmp_path: Path) -> None:
    """Without column names a corpus's ids and texts are BEIR's ``_id``/``text``, else ``id``/``docid`` and
    Pyserini's ``contents``; a named column always wins."""
    from dssm.data import corpus_columns

    (tmp_path / "p.jsonl").write_text('{"id": "d1", "contents": "pyserini text"}\n')
    (tmp_path / "q.jsonl").write_text('{"docid": "d2", "contents": "other", "text": "beir text"}\n')
    assert [(d.id, d.text) for d in iter_corpus(tmp_path / "p.jsonl")] == [("d1", "pyserini text")]
    assert [(d.id, d.text) for d in iter_corpus(tmp_path / "q.jsonl")] == [("d2", "beir text")]
    assert [d.text for d in iter_corpus(tmp_path / "q.jsonl", text_column="contents")] == ["other"]
    assert corpus_columns(["_id", "id", "text"]) == ("_id", "text")
    assert corpus_columns(["body"]) == ("id", "text")  # neither: the names the error then says are missing
    with pytest.raises(InputError, match=r"lacks column\(s\) \['id', 'text'\]"):
        (tmp_path / "r.jsonl").write_text('{"key": "d3", "body": "x"}\n')
        list(iter_corpus(tmp_path / "r.jsonl"))
