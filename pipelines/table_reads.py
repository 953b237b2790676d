"""Reading one input table on several workers: byte ranges at line boundaries, read where they land.

A JSONL file, or a TSV file (no quoting: one record per line), is cut into ranges of whole lines
before the job starts (:func:`plan_table_reads`, one fast scan for newlines); the ranges are spread
over the workers and each reads its own records, as :func:`pipelines.records.read_table` would
(same raw records, same ``path:line`` locations, same errors). Before, one worker read the whole
file and every raw record went through a shuffle to reach the others: a serial read plus the cost
of encoding every record twice. CSV (a quoted field may span lines), Parquet, gzip-compressed files,
small files and TSV files with carriage returns (``csv`` ends a line at a lone ``\\r`` too) are read whole, then their
records are shuffled as before (:class:`ReadTableChunks`).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np

from dssm.data import BOM, csv_reader, csv_rows, is_gzip, is_valid_utf8, open_text, table_format
from pipelines.records import chunked, raw_record, read_jsonl_range, read_table_chunks

__all__ = ["ReadTask", "line_cuts", "plan_table_reads", "read_task_chunks", "ReadTableChunks"]

# Bytes per read while planning ranges (numpy finds the newlines of each block).
_PLAN_BLOCK = 1 << 24


@dataclass(frozen=True)
class ReadTask:
    """A byte range ``[start, end)`` of whole lines of ``path``, or the whole file (``end`` is ``None``).

    Attributes:
        path: the file.
        table: its format as given (``None``: from the suffix).
        kind: the resolved format (``jsonl``, ``tsv``, ...).
        start: first byte.
        end: byte just past the range's last line, or ``None`` for the whole file.
        first_line: the 1-based number of the line at ``start``.
        header: a TSV file's column names (its first line; the range at byte 0 skips it).
    """

    path: str
    table: str | None
    kind: str
    start: int = 0
    end: int | None = None
    first_line: int = 1
    header: tuple[str, ...] | None = None


def line_cuts(path: str, lines_per_range: int) -> tuple[list[tuple[int, int, int]], int, bool]:
    """``([(start, end, first_line)], lines, has_cr)``: ranges of ``lines_per_range`` lines (the last may be short).

    ``has_cr``: the file holds a carriage return (where ``csv`` may end a line that this count does not).
    """
    starts, first_lines = [0], [1]
    lines = offset = 0
    has_cr = False
    with open(path, "rb") as handle:
        while block := handle.read(_PLAN_BLOCK):
            data = np.frombuffer(block, np.uint8)
            has_cr = has_cr or bool((data == ord("\r")).any())
            newlines = np.flatnonzero(data == ord("\n"))
            # The newline ending line number (lines + k + 1) closes a range when that number is a multiple.
            first = (-lines - 1) % lines_per_range
            for k in range(first, len(newlines), lines_per_range):
                starts.append(offset + int(newlines[k]) + 1)
                first_lines.append(lines + k + 2)
            lines += len(newlines)
            offset += len(block)
    if offset and _ends_without_newline(path, offset):
        lines += 1
    if starts[-1] < offset:
        starts.append(offset)
        first_lines.append(0)
    return [(starts[i], starts[i + 1], first_lines[i]) for i in range(len(starts) - 1)], lines, has_cr


def _ends_without_newline(path: str, size: int) -> bool:
    """Whether the file's last byte is not a newline (its last line then has no ``\\n``)."""
    with open(path, "rb") as handle:
        handle.seek(size - 1)
        return handle.read(1) != b"\n"


def plan_table_reads(path: str, table: str | None, *, lines_per_task: int) -> list[ReadTask]:
    """Cut ``path`` into read tasks of about ``lines_per_task`` lines (one whole-file task where it cannot be cut).

    Raises:
        InputError: the file is missing or its format unknown.
    """
    kind = table_format(path, table)
    whole = [ReadTask(path, table, kind)]
    if kind not in ("jsonl", "tsv") or is_gzip(path):  # a gzip stream has no byte offsets to cut at
        return whole
    cuts, _, has_cr = line_cuts(path, lines_per_task)
    if len(cuts) < 2 or (kind == "tsv" and has_cr):
        return whole
    header = None
    if kind == "tsv":
        with open_text(path) as handle:
            header = tuple(next(csv_reader(handle, kind), None) or ())
    return [ReadTask(path, table, kind, start, end, first_line, header) for start, end, first_line in cuts]


def _read_tsv_range(task: ReadTask) -> Iterator[dict[str, Any]]:
    assert task.end is not None and task.header is not None
    with open(task.path, "rb") as handle:
        handle.seek(task.start)
        data = handle.read(task.end - task.start)
    text = data.removeprefix(BOM if task.start == 0 else b"").decode("utf-8", "surrogateescape")
    reader = csv_reader(io.StringIO(text, newline=""), "tsv")
    if task.start == 0:
        next(reader, None)  # the header
    location_ok = is_valid_utf8(task.path)
    for row in csv_rows(reader, list(task.header), where=task.path, first_line=task.first_line):
        yield raw_record(row, location_ok=location_ok)


def read_task_chunks(task: ReadTask, chunk_rows: int) -> Iterator[list[dict[str, Any]]]:
    """The raw records of one :class:`ReadTask` in lists of ``chunk_rows`` (the body of a ``FlatMap``)."""
    if task.end is None:
        yield from read_table_chunks(task.path, task.table, chunk_rows)
        return
    yield from chunked(read_jsonl_range(task.path, task.start, task.end, task.first_line) if task.kind == "jsonl"
                       else _read_tsv_range(task), chunk_rows)


class ReadTableChunks(beam.PTransform):
    """One table → its raw records in lists of ``chunk_rows``, read (and spread) over the workers.

    Args:
        path: the file.
        table: its format (``None``: from the suffix).
        chunk_rows: records per output list.
        lines_per_task: lines per byte range (each range is one read task).
    """

    def __init__(self, path: str, table: str | None, *, chunk_rows: int, lines_per_task: int) -> None:
        super().__init__()
        self._path, self._table = path, table
        self._chunk_rows, self._lines_per_task = chunk_rows, lines_per_task

    def expand(self, pipeline: Any) -> Any:
        # Planned when the pipeline is built (the scan reads the file), not when the transform is made.
        plan = plan_table_reads(self._path, self._table, lines_per_task=self._lines_per_task)
        tasks = pipeline | "Tasks" >> beam.Create(plan)
        if len(plan) > 1:
            # Spread the (small) tasks, not the records: each worker reads what it featurizes.
            return (tasks | "SpreadTasks" >> beam.Reshuffle()
                    | "Read" >> beam.FlatMap(read_task_chunks, self._chunk_rows))
        # Reading is one element's work; shuffling the chunks lets checking and hashing spread out.
        return (tasks | "Read" >> beam.FlatMap(read_task_chunks, self._chunk_rows)
                | "Spread" >> beam.Reshuffle())
