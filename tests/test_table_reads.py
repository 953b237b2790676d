"""Line-range reads: every task read on its own gives read_table's records; the pairs job's output does not change."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import pipelines.make_pairs as make_pairs
from pipelines.records import read_table
from pipelines.table_reads import line_cuts, plan_table_reads, read_task_chunks

TSV = (
    b"id\ttext1\ttext2\tis_duplicate\n"
    b"p1\tHow do I learn Python ?\tWhat is the best way to learn Python ?\t1\n"
    b"\n"
    b"p2\tToo many fields\there\t1\textra\n"
    b"p3\tCaf\xe9 in Latin-1 ?\tNot UTF-8\t1\n"
    b"p4\t\"quoted\" text stays\tas \"it\" is\t0\n"
    + b"".join(b"q%d\tquestion number %d ?\tanother phrasing %d ?\t%d\n" % (i, i, i, i % 2) for i in range(23))
    + b"last\tno newline at the end\tof the file\t1"
)
JSONL = (
    b'{"q": "first", "d": "doc one", "label": 1}\n'
    b"\n"
    b"not json\n"
    b'["a list"]\n'
    + b"".join(b'{"q": "query %d", "d": "document %d", "label": %d}\n' % (i, i, i % 2) for i in range(17))
    + b'{"q": "caf\xc3\xa9", "d": "last line", "label": 0}'
)


def _records_by_tasks(path: Path, table: str | None, lines_per_task: int, chunk_rows: int = 3) -> list[dict]:
    tasks = plan_table_reads(str(path), table, lines_per_task=lines_per_task)
    return [record for task in tasks for chunk in read_task_chunks(task, chunk_rows) for record in chunk]


@pytest.mark.parametrize(("name", "data"), [("pairs.tsv", TSV), ("pairs.jsonl", JSONL)])
@pytest.mark.parametrize("lines_per_task", [1, 2, 3, 7, 1000])
def test_every_split_reads_the_records_read_table_reads(tmp_path: Path, name: str, data: bytes,
                                                        lines_per_task: int) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    tasks = plan_table_reads(str(path), None, lines_per_task=lines_per_task)
    assert (len(tasks) > 1) == (lines_per_task < data.count(b"\n"))
    assert _records_by_tasks(path, None, lines_per_task) == list(read_table(str(path)))


@pytest.mark.parametrize(("name", "data"), [("pairs.tsv", TSV), ("pairs.jsonl", JSONL)])
def test_a_byte_order_mark_is_read_past_in_every_split(tmp_path: Path, name: str, data: bytes) -> None:
    plain, marked = tmp_path / name, tmp_path / f"bom-{name}"
    plain.write_bytes(data)
    marked.write_bytes(b"\xef\xbb\xbf" + data)  # what Windows tools put before UTF-8 text
    expected = [{**r, "record": r["record"].replace(str(plain), str(marked))} for r in read_table(str(plain))]
    assert list(read_table(str(marked))) == expected
    for lines_per_task in (1, 3, 1000):
        assert _records_by_tasks(marked, None, lines_per_task) == expected


def test_line_cuts_cover_the_file_at_line_starts(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"a\nbb\n\nccc\nd")
    cuts, lines, has_cr = line_cuts(str(path), 2)
    assert cuts == [(0, 5, 1), (5, 10, 3), (10, 11, 5)]
    assert (lines, has_cr) == (5, False)


def test_files_that_cannot_be_cut_are_one_task(tmp_path: Path) -> None:
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(TSV.replace(b"\n", b"\r\n"))  # csv ends lines at a lone \r too: not cut
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_bytes(b'id,text\n1,"a field\nover two lines"\n' * 20)  # quoted newlines
    for path in (crlf, csv_file):
        [task] = plan_table_reads(str(path), None, lines_per_task=2)
        assert task.end is None
        assert _records_by_tasks(path, None, 2) == list(read_table(str(path)))


def _outputs(out: Path) -> tuple[dict, list[bytes], list[str]]:
    stats = json.loads((out / "stats.json").read_text())
    records = sorted(gzip.decompress(p.read_bytes()) for p in out.glob("*.tfrecord.gz"))
    rejected = sorted(line for p in out.glob("rejected-*.jsonl") for line in p.read_text().splitlines())
    return {k: v for k, v in stats.items() if k not in ("seconds", "rows_per_second")}, records, rejected


def test_the_pairs_job_writes_the_same_records_from_line_ranges(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_bytes(TSV)
    argv = ["--input", str(path), "--num-buckets", "5000", "--num-shards", "1"]
    make_pairs.run([*argv, "--output", str(tmp_path / "whole")])
    monkeypatch.setattr(make_pairs, "_LINES_PER_TASK", 4)
    make_pairs.run([*argv, "--output", str(tmp_path / "ranges")])
    whole, ranges = _outputs(tmp_path / "whole"), _outputs(tmp_path / "ranges")
    assert whole[0]["read"] == 28 and whole[0]["rejected"] == 2
    # One shard per split either way; the records (not their order) and dead letters are the same.
    assert whole[0] == ranges[0] and whole[2] == ranges[2]
    assert sorted(_frames(whole[1])) == sorted(_frames(ranges[1]))


def _frames(blobs: list[bytes]) -> list[bytes]:
    out = []
    for blob in blobs:
        at = 0
        while at < len(blob):
            length = int.from_bytes(blob[at:at + 8], "little")
            out.append(blob[at + 12:at + 12 + length])
            at += 16 + length
    return out


@pytest.mark.parametrize(("name", "data"), [("pairs.tsv", TSV), ("pairs.jsonl", JSONL)])
def test_a_gzip_compressed_table_is_one_task_with_the_plain_records(tmp_path: Path, name: str, data: bytes) -> None:
    """A gzip stream has no byte offsets to cut at: one whole-file task, whose records are the plain file's
    (located in the compressed file)."""
    plain, packed = tmp_path / name, tmp_path / (name + ".gz")
    plain.write_bytes(data)
    packed.write_bytes(gzip.compress(data))
    [task] = plan_table_reads(str(packed), None, lines_per_task=2)
    assert task.end is None and task.kind == name.split(".")[1]
    got = _records_by_tasks(packed, None, 2)
    assert [{**r, "record": r["record"].replace(".gz:", ":")} for r in got] == list(read_table(str(plain)))
