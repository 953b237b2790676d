"""Readers for the user's files: tables (CSV/TSV/JSONL/Parquet), corpora, BEIR directories; the split.

Every reader takes the path it reads from its caller (no hidden I/O) and streams, so corpora larger
than memory can be read row by row. Bad rows are not dropped silently: :func:`iter_rows` yields them
with a reason, and the caller decides (the pipelines send them to a dead-letter output).

Invalid UTF-8 is carried as lone surrogates (``errors="surrogateescape"``) so a row can be reported
with its location instead of aborting the whole file; :func:`is_valid_utf8` tells such values apart.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import sys
import unicodedata
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from dssm.errors import InputError

__all__ = [
    "TABLE_FORMATS",
    "write_rows_outside_holdout",
    "Row",
    "Document",
    "BeirDataset",
    "table_format",
    "read_columns",
    "iter_rows",
    "csv_reader",
    "csv_rows",
    "iter_corpus",
    "read_queries",
    "read_qrels",
    "iter_qrels",
    "qrels_layout",
    "QRELS_LAYOUTS",
    "TEXT_ENCODING",
    "BOM",
    "read_beir",
    "beir_file",
    "is_gzip",
    "open_text",
    "is_valid_utf8",
    "ID_COLUMNS",
    "TEXT_COLUMNS",
    "corpus_columns",
    "split_of",
    "holdout_filter",
    "document_text",
]

TABLE_FORMATS = ("csv", "tsv", "jsonl", "parquet")
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
             ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}

#: The columns a corpus's ids and texts go by when the user names none, in order: BEIR's (``_id``,
#: ``text``), plain ones, and Pyserini's JsonCollection (``id``, ``contents``), what users of BM25
#: engines have their corpora in.
ID_COLUMNS = ("_id", "id", "docid")
TEXT_COLUMNS = ("text", "contents")

# "utf-8-sig" reads UTF-8 and drops a byte-order mark at the start of the file (Windows tools write one);
# without it the mark would be part of the first JSON line or of the first column's name.
TEXT_ENCODING = "utf-8-sig"
BOM = b"\xef\xbb\xbf"
QRELS_LAYOUTS = ("beir", "trec", "plain")
JSONL_SAMPLE = 100  # records whose keys make a JSONL file's columns

# Quora and other sources have questions longer than csv's 128 KiB default field limit.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class Row(NamedTuple):
    """One input record.

    Attributes:
        location: ``path:line`` (or ``path:row`` for Parquet) for error messages and dead letters.
        fields: column → value (``None`` where the record has no such column).
        error: why the record could not be parsed at all, or ``None``.
    """

    location: str
    fields: dict[str, Any]
    error: str | None = None


class Document(NamedTuple):
    """A corpus document."""

    id: str
    title: str
    text: str


@dataclass(frozen=True)
class BeirDataset:
    """A BEIR directory in memory: ``corpus`` id → Document, ``queries`` id → text, ``qrels`` qid → {docid: grade}."""

    corpus: dict[str, Document]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} is not a file: {path}")


def is_gzip(path: str | Path) -> bool:
    """Whether ``path`` names a gzip-compressed text file (``corpus.jsonl.gz``: its name ends in ``.gz``)."""
    return str(path).lower().endswith(".gz")


@contextmanager
def open_text(path: str | Path, *, newline: str | None = "") -> Iterator[Any]:
    """A text handle on ``path`` as every reader here opens it: UTF-8 (a byte-order mark dropped), invalid
    bytes carried as lone surrogates, and a ``.gz`` file decompressed as it is read.

    Compressed files are common where users get their data (BEIR's copies on the Hugging Face hub ship
    ``corpus.jsonl.gz``; ir_datasets and MS MARCO ``.tsv.gz``). A gzip stream cannot be cut into byte
    ranges, so the jobs read such a file whole, on one worker.

    Raises:
        InputError: a ``.gz`` file that is not gzip or is cut short, naming it (raised where the
            reading stops, so records before the damage have been read).
    """
    if not is_gzip(path):
        with open(path, encoding=TEXT_ENCODING, errors="surrogateescape", newline=newline) as handle:
            yield handle
        return
    try:
        with gzip.open(path, "rt", encoding=TEXT_ENCODING, errors="surrogateescape", newline=newline) as handle:
            yield handle
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: not a readable gzip file: {exc}") from exc


def beir_file(directory: str | Path, name: str) -> Path:
    """``directory/name``, or ``directory/name.gz`` when only the compressed copy is there."""
    plain = Path(directory) / name
    packed = plain.with_name(plain.name + ".gz")
    return packed if not plain.exists() and packed.exists() else plain


def table_format(path: str | Path, format: str | None = None) -> str:  # noqa: A002
    """The table format of ``path``: ``format`` if given, else from its suffix (a ``.gz`` one's inner suffix).

    Raises:
        InputError: an unknown format or suffix, or a gzip-compressed Parquet file (Parquet compresses
            its own pages; pyarrow reads only the plain file).
    """
    name = Path(path).name.lower()
    if format is not None:
        if format not in TABLE_FORMATS:
            raise InputError(f"unknown table format {format!r}; use one of {TABLE_FORMATS}")
        kind = format
    else:
        suffix = Path(name.removesuffix(".gz")).suffix
        if suffix not in _SUFFIXES:
            raise InputError(f"cannot tell the format of {path} from its suffix {suffix!r}; "
                             f"use one of {sorted(_SUFFIXES)} (each also gzip-compressed, + .gz) or name the format")
        kind = _SUFFIXES[suffix]
    if kind == "parquet" and is_gzip(name):
        raise InputError(f"{path}: a gzip-compressed Parquet file; Parquet compresses itself: gunzip it first")
    return kind


def read_columns(path: str | Path, format: str | None = None) -> list[str]:  # noqa: A002
    """Column names of a table: its header (CSV/TSV), schema (Parquet) or records' keys (JSONL).

    A JSONL file has no header, and a record may leave out a key others have (a title-only document
    without ``text``), so its columns are the keys of its first :data:`JSONL_SAMPLE` records, in
    the order they first appear.

    Raises:
        InputError: the file is missing, empty, or its first record is not a JSON object.
    """
    path = Path(path)
    _require_file(path, "input file")
    kind = table_format(path, format)
    if kind == "parquet":
        # deferred: pyarrow, imported only when this runs
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with open_text(path) as handle:
        if kind == "jsonl":
            return _jsonl_columns(path, handle)
        header = next(csv_reader(handle, kind), None)
        if not header:
            raise InputError(f"input file is empty: {path}")
        return header


def _jsonl_columns(path: Path, handle: Any) -> list[str]:
    columns: dict[str, None] = {}
    records = 0
    for line_no, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if not records:
                raise InputError(f"{path}:{line_no}: not valid JSON: {exc}") from exc
            continue  # a later bad line is the reader's to reject, with its location
        if not isinstance(record, dict):
            if not records:
                raise InputError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            continue
        columns.update(dict.fromkeys(record))
        records += 1
        if records >= JSONL_SAMPLE:
            break
    if not records:
        raise InputError(f"input file is empty: {path}")
    return list(columns)


def csv_reader(handle: Any, kind: str) -> Any:
    """A ``csv.reader`` over ``handle`` for ``kind`` (``csv`` or ``tsv``)."""
    if kind == "tsv":
        # TSV as Quora and BEIR write it: no quoting, quotes are ordinary characters.
        return csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
    return csv.reader(handle)


def iter_rows(path: str | Path, format: str | None = None) -> Iterator[Row]:  # noqa: A002
    """Stream the records of a CSV/TSV/JSONL/Parquet table.

    CSV/TSV need a header row. Records with the wrong number of fields or invalid JSON come back with
    ``error`` set, not raised, so the caller can reject them and go on.

    Raises:
        InputError: the file is missing or its format unknown.
    """
    path = Path(path)
    _require_file(path, "input file")
    kind = table_format(path, format)
    if kind == "parquet":
        yield from _iter_parquet(path)
        return
    with open_text(path) as handle:
        if kind == "jsonl":
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                location = f"{path}:{line_no}"
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeEncodeError) as exc:
                    yield Row(location, {"raw": line.rstrip("\n")}, f"not valid JSON: {exc}")
                    continue
                if not isinstance(record, dict):
                    yield Row(location, {"raw": line.rstrip("\n")}, "not a JSON object")
                    continue
                yield Row(location, record)
            return
        reader = csv_reader(handle, kind)
        header = next(reader, None)
        if header is None:
            return
        yield from csv_rows(reader, header, where=str(path))


def csv_rows(reader: Any, header: list[str], *, where: str, first_line: int = 1) -> Iterator[Row]:
    """The rows of a ``csv.reader`` positioned after the header, as :func:`iter_rows` gives them.

    Args:
        reader: the reader (its ``line_num`` counts lines from ``first_line``).
        header: the column names.
        where: the file's name in locations (``where:line``).
        first_line: the number of the reader's first line in the file (a byte range's readers start
            mid-file).
    """
    offset = first_line - 1
    for values in reader:
        location = f"{where}:{reader.line_num + offset}"
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            yield Row(location, dict(zip(header, values, strict=False)),
                      f"has {len(values)} fields, header has {len(header)}")
            continue
        yield Row(location, dict(zip(header, values, strict=True)))


def _iter_parquet(path: Path) -> Iterator[Row]:
    # deferred: pyarrow, imported only when this runs
    import pyarrow.parquet as pq

    row_no = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=8192):
        for record in batch.to_pylist():
            row_no += 1
            yield Row(f"{path}:row {row_no}", record)


def is_valid_utf8(value: str) -> bool:
    """False if ``value`` carries bytes that were not UTF-8 (read with ``surrogateescape``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def corpus_columns(found: list[str], *, id_column: str | None = None,
                   text_column: str | None = None) -> tuple[str, str]:
    """The id and text columns of a corpus whose columns are ``found``: the ones named, else the first of
    :data:`ID_COLUMNS` and :data:`TEXT_COLUMNS` it has (``id`` and ``text`` when it has none, for the
    caller's message naming what is missing)."""
    return (id_column or next((c for c in ID_COLUMNS if c in found), "id"),
            text_column or next((c for c in TEXT_COLUMNS if c in found), "text"))


def iter_corpus(
    path: str | Path,
    *,
    id_column: str | None = None,
    text_column: str | None = None,
    title_column: str | None = "title",
    format: str | None = None,  # noqa: A002
) -> Iterator[Document]:
    """Stream documents from a corpus table (BEIR ``corpus.jsonl`` or any CSV/TSV/JSONL/Parquet).

    Args:
        path: the corpus file.
        id_column: id column; default the first of :data:`ID_COLUMNS` present.
        text_column: text column; default the first of :data:`TEXT_COLUMNS` present.
        title_column: optional title column (missing → empty titles).
        format: table format; default from the suffix.

    Raises:
        InputError: missing file, missing id/text column, an unparsable record, an empty id,
            invalid UTF-8 (each names the record).
    """
    columns = read_columns(path, format)
    id_column, text_column = corpus_columns(columns, id_column=id_column, text_column=text_column)
    missing = [c for c in (id_column, text_column) if c not in columns]
    if missing:
        raise InputError(f"corpus {path} lacks column(s) {missing}; it has {columns}")
    for row in iter_rows(path, format):
        if row.error:
            raise InputError(f"{row.location}: {row.error}")
        doc_id = _text(row.fields.get(id_column)).strip()
        if not doc_id:
            raise InputError(f"{row.location}: empty document id")
        title = _text(row.fields.get(title_column)) if title_column else ""
        text = _text(row.fields.get(text_column))
        if not (is_valid_utf8(doc_id) and is_valid_utf8(title) and is_valid_utf8(text)):
            raise InputError(f"{row.location}: document {doc_id!r} is not valid UTF-8")
        yield Document(doc_id, title, text)


def read_queries(path: str | Path) -> dict[str, str]:
    """BEIR ``queries.jsonl`` (``_id``, ``text``) → {id: text}."""
    queries = {}
    for doc in iter_corpus(path, text_column="text", title_column=None):
        queries[doc.id] = doc.text
    return queries


def qrels_layout(path: str | Path) -> str:
    """Which qrels layout ``path`` holds, from its first non-blank line.

    * ``beir``: tab-separated with the header ``query-id corpus-id score`` (BEIR's ``qrels/*.tsv``);
    * ``trec``: ``query-id iteration corpus-id score`` separated by spaces or tabs, no header (TREC's
      qrels, written by trec_eval, pyserini and ir_datasets);
    * ``plain``: ``query-id corpus-id score`` separated by spaces or tabs, no header.

    Raises:
        InputError: the file is missing or empty, or its first line is none of these (naming the line).
    """
    path = Path(path)
    _require_file(path, "qrels file")
    with open_text(path) as handle:
        first = next((line for line in handle if line.strip()), None)
    if first is None:
        raise InputError(f"qrels file is empty: {path}")
    tabbed = first.rstrip("\r\n").split("\t")
    if [c.strip() for c in tabbed[:2]] == ["query-id", "corpus-id"] and len(tabbed) >= 3:
        return "beir"
    fields = first.split()
    if len(fields) in (3, 4) and _is_number(fields[-1]):
        return "trec" if len(fields) == 4 else "plain"
    raise InputError(f"qrels {path}: first line {first.strip()!r} is neither BEIR's header 'query-id corpus-id "
                     "score' nor a headerless 'query-id [iteration] corpus-id score' line (TREC qrels)")


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def iter_qrels(path: str | Path) -> Iterator[Row]:
    """The judgements of a qrels file in any of :func:`qrels_layout`'s layouts, as rows of one shape.

    Every row's fields are ``{"query-id", "corpus-id", "score"}`` (strings, as read); a line with the
    wrong number of fields comes back with ``error`` set, as :func:`iter_rows` does.

    Raises:
        InputError: see :func:`qrels_layout`.
    """
    path = Path(path)
    layout = qrels_layout(path)
    if layout == "beir":
        qid, did, score = read_columns(path, "tsv")[:3]
        for row in iter_rows(path, "tsv"):
            fields = {"query-id": row.fields.get(qid), "corpus-id": row.fields.get(did), "score": row.fields.get(score)}
            yield Row(row.location, fields, row.error)
        return
    width = 4 if layout == "trec" else 3
    with open_text(path) as handle:
        for line_no, line in enumerate(handle, 1):
            fields = line.split()
            if not fields:
                continue
            location = f"{path}:{line_no}"
            if len(fields) != width:
                yield Row(location, {"raw": line.rstrip("\r\n")},
                          f"has {len(fields)} fields, a {layout} qrels line has {width}")
                continue
            yield Row(location, {"query-id": fields[0], "corpus-id": fields[-2], "score": fields[-1]})


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """A qrels file (BEIR's ``qrels.tsv`` with its header, or TREC's headerless lines) → {qid: {docid: grade}}.

    Raises:
        InputError: missing file, a layout :func:`qrels_layout` does not know, a malformed line or a
            non-integer score (naming the line).
    """
    qrels: dict[str, dict[str, int]] = {}
    for row in iter_qrels(path):
        if row.error:
            raise InputError(f"{row.location}: {row.error}")
        qid, did, score = (_text(row.fields.get(c)) for c in ("query-id", "corpus-id", "score"))
        try:
            grade = int(float(score))
        except ValueError as exc:
            raise InputError(f"{row.location}: score {score!r} is not a number") from exc
        qrels.setdefault(qid, {})[did] = grade
    return qrels


def read_beir(directory: str | Path) -> BeirDataset:
    """Read a BEIR directory (``corpus.jsonl``, ``queries.jsonl``, ``qrels.tsv`` or ``qrels/test.tsv``; each
    may be gzip-compressed, ``corpus.jsonl.gz``).

    Raises:
        InputError: the directory or one of its files is missing, or the corpus is empty.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"BEIR directory not found: {directory}")
    qrels_path, test_qrels = beir_file(directory, "qrels.tsv"), beir_file(directory / "qrels", "test.tsv")
    if not qrels_path.exists() and test_qrels.exists():
        qrels_path = test_qrels
    corpus_path, queries_path = beir_file(directory, "corpus.jsonl"), beir_file(directory, "queries.jsonl")
    for needed in (corpus_path, queries_path, qrels_path):
        if not needed.exists():
            raise InputError(f"BEIR directory {directory} lacks {needed.name}")
    corpus = {doc.id: doc for doc in iter_corpus(corpus_path)}
    if not corpus:
        raise InputError(f"corpus {corpus_path} is empty")
    return BeirDataset(corpus=corpus, queries=read_queries(queries_path), qrels=read_qrels(qrels_path))


def split_of(text: str, *, validation_fraction: float, salt: str = "") -> str:
    """``"validation"`` or ``"train"``, from a hash of the NFKC-casefolded, space-normalised text.

    Deterministic across runs, machines and Beam runners (sha256, not Python's salted ``hash``), so
    a query and all its pairs land in the same split every time.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise InputError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    key = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8", "surrogatepass")).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    return "validation" if point < validation_fraction else "train"


def write_rows_outside_holdout(source: str | Path, pairs_dir: str | Path, out: str | Path, *,
                               query_column: str | None = None) -> tuple[int, int]:
    """Copy, line for line, the rows of a pairs table whose query is outside ``pairs_dir``'s validation split.

    What a recipe that is evaluated with ``dssm eval --holdout PAIRS_DIR`` may still train and tune on:
    ``dssm pairs`` on the copy, with another ``--split-salt``, splits off its own validation share (for
    ``dssm index --hybrid-pairs``) from rows that never reach the evaluated queries.

    Args:
        source: a CSV/TSV/JSONL table, one record per line after the header.
        pairs_dir: the ``dssm pairs`` output whose validation split is held out.
        out: the copy (header kept).
        query_column: the query's column; default the first of ``question1``, ``text1``, ``query``.

    Returns:
        ``(rows kept, rows read)``.

    Raises:
        InputError: a Parquet table, no query column, an unparsable or multi-line record (named).
    """
    source, fmt = Path(source), table_format(source)
    if fmt == "parquet":
        raise InputError(f"{source}: copying rows line for line needs a CSV/TSV/JSONL table, not Parquet")
    columns = read_columns(source)
    column = query_column or next((c for c in ("question1", "text1", "query") if c in columns), None)
    if column not in columns:
        raise InputError(f"{source}: no query column {query_column or 'question1/text1/query'} in {columns}")
    held_out = holdout_filter(pairs_dir)
    with open_text(source, newline=None) as handle:
        lines = handle.read().splitlines(keepends=True)
    header, body = (lines[:1], lines[1:]) if fmt in ("csv", "tsv") else ([], lines)
    body = [line for line in body if line.strip()]
    keep = []
    for row in iter_rows(source):
        if row.error:
            raise InputError(f"{row.location}: {row.error}")
        keep.append(not held_out(str(row.fields.get(column) or "")))
    if len(keep) != len(body):
        raise InputError(f"{source}: {len(keep)} records on {len(body)} lines; a quoted field spans lines")
    kept = [line for line, wanted in zip(body, keep, strict=True) if wanted]
    Path(out).write_text("".join(header + kept), encoding="utf-8")
    return len(kept), len(keep)


def document_text(title: str, text: str) -> str:
    """What a document is to the towers and to BM25: title and body joined by a space (either may be empty)."""
    return f"{title} {text}".strip() if title else text


def holdout_filter(pairs_dir: str | Path) -> Callable[[str], bool]:
    """``text -> in validation split``, the split ``dssm pairs`` made (``PAIRS_DIR/pairs_config.json``:
    ``validation_fraction`` and ``split_salt``, hashed by :func:`dssm.data.split_of` on the query text)."""
    path = Path(pairs_dir) / "pairs_config.json"
    if not path.is_file():
        raise InputError(f"--holdout {pairs_dir}: no pairs_config.json there (not a `dssm pairs` output?)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    missing = [key for key in ("validation_fraction", "split_salt") if key not in config]
    if missing:
        raise InputError(f"{path} lacks {missing}; cannot reproduce its train/validation split")
    fraction, salt = float(config["validation_fraction"]), str(config["split_salt"])
    if fraction <= 0:
        raise InputError(f"{path}: validation_fraction is {fraction}, so there are no held-out queries")
    return lambda text: split_of(text, validation_fraction=fraction, salt=salt) == "validation"
