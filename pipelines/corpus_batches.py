"""The encode job's read stage: corpus files → read tasks → validated, keyed batches for RunInference.

This module owns how ``dssm index`` reads a corpus: :func:`plan_reads` cuts the files into
:class:`ReadRange` tasks (byte ranges of a JSONL file at line boundaries, one batch each; a whole
CSV/TSV/Parquet file otherwise), :class:`ReadBatches` reads a task, checks every record with
:func:`validate_document` (reason codes in :data:`REASONS`) against the :class:`CorpusColumns`, keeps
one index shard's documents when asked, and emits one keyed example per batch. Batches are formed
where the records are read, so no document crosses a shuffle.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from dssm import index as index_lib
from dssm.data import document_text, is_gzip, open_text, table_format
from dssm.errors import InputError
from pipelines.records import REJECTED, as_text, json_safe, read_jsonl_range, read_table_chunks
from pipelines.table_reads import line_cuts

__all__ = [
    "REASONS",
    "DOCUMENT",
    "CorpusColumns",
    "validate_document",
    "ReadRange",
    "plan_reads",
    "count_records",
    "ReadBatches",
]

REASONS = {
    "unparsable": "the record could not be parsed (wrong field count, invalid JSON)",
    "empty_id": "the id is missing, empty or only whitespace",
    "not_utf8": "the id, title or text is not valid UTF-8",
    "empty_document": "title and text are both empty or only whitespace",
}


@dataclass(frozen=True)
class CorpusColumns:
    """Which columns hold the id, title and text (``title=None``: no titles)."""

    id: str
    text: str = "text"
    title: str | None = "title"


DOCUMENT = "document"


def validate_document(raw: dict[str, Any], columns: CorpusColumns) -> tuple[str, dict[str, Any]]:
    """Raw record (``pipelines.records.read_table``) → ``("document", doc)`` or ``("rejected", dead letter)``.

    A document is ``{"record", "id", "title", "text"}``; a dead letter ``{"record", "reason", "detail",
    "row"}`` with a reason from :data:`REASONS`. One output marked by kind rather than a multi-output
    ParDo, because Beam's Dask runner hands every output of a ParDo to every consumer.
    """
    fields = raw["fields"]
    record = raw["record"]

    def reject(reason: str, detail: str) -> tuple[str, dict[str, Any]]:
        return REJECTED, {"record": record, "reason": reason, "detail": detail, "row": fields}

    if raw.get("reason"):
        return reject("unparsable", raw.get("error") or raw["reason"])
    doc_id = as_text(fields.get(columns.id))
    title = as_text(fields.get(columns.title)) if columns.title else ""
    text = as_text(fields.get(columns.text))
    not_utf8 = [name for name, value in (("id", doc_id), ("title", title), ("text", text)) if isinstance(value, bytes)]
    if not_utf8:
        return reject("not_utf8", f"{', '.join(not_utf8)} not valid UTF-8")
    if doc_id is None or not doc_id.strip():
        return reject("empty_id", f"no usable {columns.id!r}: {json_safe(doc_id)!r}")
    title, text = title or "", text or ""
    if not (title.strip() or text.strip()):
        return reject("empty_document", f"document {doc_id.strip()!r} has no title or text")
    return DOCUMENT, {"record": record, "id": doc_id.strip(), "title": title, "text": text}


@dataclass(frozen=True)
class ReadRange:
    """One read task of the encode job: a byte range of a JSONL file, or a whole CSV/TSV/Parquet file.

    Attributes:
        path: the corpus file.
        table: its format (``None``: from the suffix).
        start: first byte (JSONL; 0 for a whole file).
        end: byte just past the last line (JSONL), or ``None`` for the whole file.
        first_line: line number at ``start`` (JSONL).
        first_batch: id of the first batch this range emits.
        batches: how many batch ids, from ``first_batch``, the range may use (1 for a JSONL range).
    """

    path: str
    table: str | None
    start: int
    end: int | None
    first_line: int
    first_batch: int
    batches: int


def plan_reads(paths: Sequence[str], table: str | None, *, batch_size: int,
               stride: int = 1) -> tuple[list[ReadRange], int]:
    """Cut the corpus into read tasks and number their batches.

    A JSONL file becomes byte ranges of ``batch_size * stride`` lines (one batch each); a CSV, TSV or
    Parquet file is one task whose batches are ``batch_size * stride`` records (a CSV field may span
    lines, so such files are not cut). ``stride`` is the shard count of a ``--shard i/N`` job, whose
    batches keep about ``batch_size`` of every ``batch_size * N`` records.

    Returns:
        ``(ranges, records)``; the ranges' batch ids run from 0 to ``ranges[-1].first_batch +
        ranges[-1].batches - 1`` without gaps (CSV may leave some of its ids unused).
    """
    ranges: list[ReadRange] = []
    per_batch = batch_size * stride
    next_batch = records = 0
    for path in paths:
        kind = table_format(path, table)
        if kind == "jsonl" and not is_gzip(path):  # a gzip stream has no byte offsets to cut at
            cuts, lines, _ = line_cuts(path, per_batch)
            records += lines
            for start, end, first_line in cuts:
                ranges.append(ReadRange(path, table, start, end, first_line, next_batch, 1))
                next_batch += 1
            continue
        count = count_records([path], table)
        records += count
        batches = max(1, math.ceil(count / per_batch))
        ranges.append(ReadRange(path, table, 0, None, 1, next_batch, batches))
        next_batch += batches
    return ranges, records


def count_records(paths: Sequence[str], table: str | None) -> int:
    """Records in the corpus files (Parquet footers; non-empty lines of text files, less CSV/TSV headers).

    Only sizes the batches: a quoted CSV field spanning lines makes it an overestimate, which just
    makes the batches smaller.
    """
    total = 0
    for path in paths:
        kind = table_format(path, table)
        if kind == "parquet":
            # deferred: pyarrow, imported only when this runs
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
            continue
        # open_text decompresses a .gz and refuses a damaged one by name, as the reads will
        with open_text(path) if is_gzip(path) else open(path, "rb") as handle:
            lines = sum(1 for line in handle if line.strip())
        total += max(0, lines - (kind in ("csv", "tsv")))
    return total


class ReadBatches(beam.DoFn):
    """A :class:`ReadRange` → ``[((batch_id, docs, rejected), texts)]``: one keyed example per batch.

    Reads the records, validates them (:func:`validate_document`), keeps one index shard's documents
    when ``shard`` is set (dead letters go to shard 0 only, so N shard jobs report each once), and
    hands each batch to RunInference as one keyed example in a list of one (the "batch" RunInference
    passes to the model handler as is, batching skipped): ``texts`` are the documents' ``title + " " +
    text`` (:func:`dssm.bm25.document_text`). A batch whose records were all rejected still goes on
    (with no texts), so its dead letters are written. Counts ``read`` and ``rejected`` in the
    ``dssm_encode`` metrics, and the wall-clock millisecond a batch's reading started
    (``batch_start_ms``), from which the job's steady rate is measured.

    Args:
        columns: the corpus columns.
        batch_size: records per batch of a whole-file range (times the shard count).
        shard: ``(i, N)`` to keep index shard i of N only, or ``None``.
    """

    def __init__(self, *, columns: CorpusColumns, batch_size: int, shard: tuple[int, int] | None = None):
        super().__init__()
        self.columns = columns
        self.batch_size = batch_size
        self.shard = shard
        self._read = Metrics.counter("dssm_encode", "read")
        self._rejected = Metrics.counter("dssm_encode", "rejected")
        self._started = Metrics.distribution("dssm_encode", "batch_start_ms")

    def process(self, task: ReadRange) -> Iterator[list[tuple[tuple[int, list[dict], list[dict]], list[str]]]]:
        self._started.update(int(time.time() * 1000))
        if task.end is not None:
            raws: Iterable[list[dict[str, Any]]] = [list(read_jsonl_range(task.path, task.start, task.end,
                                                                         task.first_line))]
        else:
            raws = read_table_chunks(task.path, task.table, self.batch_size)
        for offset, chunk in enumerate(raws):
            if offset >= task.batches:
                raise InputError(f"corpus {task.path} has more records than the {task.batches * self.batch_size} "
                                 "planned for it (it changed while the job ran?)")
            if offset:
                self._started.update(int(time.time() * 1000))
            yield [self._example(task.first_batch + offset, chunk)]

    def _example(self, batch_id: int, raws: list[dict[str, Any]]) -> tuple[tuple[int, list[dict], list[dict]],
                                                                            list[str]]:
        docs, rejected = [], []
        columns, shard = self.columns, self.shard
        for raw in raws:
            kind, value = validate_document(raw, columns)
            if kind == DOCUMENT:
                if shard is None or index_lib.shard_of(value["id"], shard[1]) == shard[0]:
                    docs.append(value)
            elif shard is None or shard[0] == 0:
                rejected.append(value)
        self._read.inc(len(raws))
        self._rejected.inc(len(rejected))
        return (batch_id, docs, rejected), [document_text(d["title"], d["text"]) for d in docs]
