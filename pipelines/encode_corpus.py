"""``dssm index``: encode a corpus with the document tower (Beam RunInference), then build the ScaNN index.

Pipeline (one chain, so it runs the same on the DirectRunner, Dask and portable runners)::

    read plan (ReadRange per ~batch-size lines of a JSONL file; per CSV/TSV/Parquet file)
        ─ ReadBatches: read the range, validate_document, emit one keyed example per batch
        ─ RunInference (KeyedModelHandler over the SavedModel's embed_document; one example = one batch)
        ─ write_batch: embeddings-BBBBB-of-NNNNN.parquet + rejected-BBBBB-of-NNNNN.jsonl (dead letters)

Batches are formed where the records are read, so no document crosses a shuffle: on Beam's
DirectRunner the GroupByKey of every document (and the per-document steps around it) cost about
12 µs of CPU per document, a fifth of the job (1M quora texts, 2 workers: 64.5 → 52.8 µs/doc beyond
the fixed start-up; the tower itself takes about 40). A JSONL corpus is cut into
byte ranges at line boundaries (one range = one batch), so one big file is still spread over the
workers; a CSV/TSV/Parquet file is read by one worker in ``--batch-size`` chunks.

then :func:`dssm.index.build_index_from_shards` streams the Parquet shards (``id``, ``title``,
``text``, ``record``, ``embedding`` float32 list) into one preallocated matrix and the SQLite doc
store, builds ScaNN, checks recall, and publishes ``INDEX_DIR/versions/<version>/`` by flipping
``CURRENT``.

Documents that cannot be indexed (unparsable, no id, empty, not UTF-8) go to
``INDEX_DIR/rejected/<version>/rejected-*.jsonl`` with a reason; their counts are in the manifest.
A missing file, a missing id/text column, an empty corpus or a duplicate id stops the build with
an :class:`~dssm.errors.InputError` naming the record.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm import index as index_lib
from dssm.artifacts import verify_manifest
from dssm.config import add_config_arguments, config_from_args, config_to_dict
from dssm.data import document_text, read_columns, table_format
from dssm.errors import ConfigError, InputError
from dssm.hybrid import HYBRID_FILE, label_free_weight
from pipelines.transforms import REJECTED, json_safe, read_jsonl_range, read_table, rejected_json

__all__ = [
    "REASONS",
    "SHARD_SCHEMA",
    "CorpusColumns",
    "DocumentTowerHandler",
    "KeyedTowerHandler",
    "validate_document",
    "ValidateDocuments",
    "ReadRange",
    "ReadBatches",
    "plan_reads",
    "EncodeBatches",
    "shard_table",
    "write_batch",
    "count_records",
    "resolve_corpus",
    "encode_pipeline",
    "run",
    "main",
]

REASONS = {
    "unparsable": "the record could not be parsed (wrong field count, invalid JSON)",
    "empty_id": "the id is missing, empty or only whitespace",
    "not_utf8": "the id, title or text is not valid UTF-8",
    "empty_document": "title and text are both empty or only whitespace",
}


def _shard_schema() -> Any:
    # deferred: pyarrow, imported only when this runs
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("record", pa.string()),
        ("embedding", pa.list_(pa.float32())),
    ])


SHARD_SCHEMA = _shard_schema()


@dataclass(frozen=True)
class CorpusColumns:
    """Which columns hold the id, title and text (``title=None``: no titles)."""

    id: str
    text: str = "text"
    title: str | None = "title"


def _as_str(value: Any) -> str | bytes | None:
    if value is None or isinstance(value, str | bytes):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    return json.dumps(json_safe(value), ensure_ascii=False)


DOCUMENT = "document"


def validate_document(raw: dict[str, Any], columns: CorpusColumns) -> tuple[str, dict[str, Any]]:
    """Raw record (``pipelines.transforms.read_table``) → ``("document", doc)`` or ``("rejected", dead letter)``.

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
    doc_id = _as_str(fields.get(columns.id))
    title = _as_str(fields.get(columns.title)) if columns.title else ""
    text = _as_str(fields.get(columns.text))
    not_utf8 = [name for name, value in (("id", doc_id), ("title", title), ("text", text)) if isinstance(value, bytes)]
    if not_utf8:
        return reject("not_utf8", f"{', '.join(not_utf8)} not valid UTF-8")
    if doc_id is None or not doc_id.strip():
        return reject("empty_id", f"no usable {columns.id!r}: {json_safe(doc_id)!r}")
    title, text = title or "", text or ""
    if not (title.strip() or text.strip()):
        return reject("empty_document", f"document {doc_id.strip()!r} has no title or text")
    return DOCUMENT, {"record": record, "id": doc_id.strip(), "title": title, "text": text}


def _select(item: tuple[str, dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [item[1]] if item[0] == kind else []


class ValidateDocuments(beam.PTransform):
    """Raw records → ``(documents, rejected)`` PCollections (see :func:`validate_document`)."""

    def __init__(self, columns: CorpusColumns):
        super().__init__()
        self.columns = columns

    def expand(self, raw: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        checked = raw | "Check" >> beam.Map(validate_document, self.columns)
        return (checked | "Documents" >> beam.FlatMap(_select, DOCUMENT),
                checked | "Rejected" >> beam.FlatMap(_select, REJECTED))


class DocumentTowerHandler(ModelHandler[Sequence[str], PredictionResult, Any]):
    """RunInference handler for the exported document tower: one batch of texts → [n, dim] float32.

    An *example* is a whole batch of texts (the job forms batches where it reads them, see
    :class:`ReadBatches`), so RunInference's own ``BatchElements`` is skipped (it would only regroup
    the batches, and it emits its last group from ``finish_bundle``, which Beam's Dask runner drops):
    each element reaching RunInference is then a ready "batch" of one keyed example,
    ``[(key, texts)]``. The model is the SavedModel under
    ``MODEL_DIR/saved_model`` loaded with :func:`dssm.export.load_encoder` (which verifies the
    model's manifest), so Beam, the searcher and the tests all run the same ``embed_document``.

    Args:
        model_dir: the model directory.
        call_size: texts per SavedModel call (a batch is cut into calls of this size). 4096 took about
            9% less CPU per document than the encoder's default 1024 on quora-length texts (in-process
            A/B on 100k texts, 3 alternating runs each: 37.4 vs 41.3 µs/doc).
    """

    def __init__(self, model_dir: str, *, call_size: int = 4096):
        super().__init__()
        self.model_dir = str(model_dir)
        self.call_size = call_size

    def load_model(self) -> Any:
        # deferred: TensorFlow, imported only when this runs
        from dssm.export import load_encoder

        return load_encoder(self.model_dir, batch_size=self.call_size)

    def run_inference(self, batch: Sequence[Sequence[str]], model: Any,
                      inference_args: dict[str, Any] | None = None) -> list[PredictionResult]:
        return [PredictionResult(texts, np.asarray(model.embed_documents(list(texts)), dtype=np.float32))
                for texts in batch]

    def get_num_bytes(self, batch: Sequence[Sequence[str]]) -> int:
        return sum(len(text.encode("utf-8")) for texts in batch for text in texts)

    def get_metrics_namespace(self) -> str:
        return "dssm_document_tower"

    def should_skip_batching(self) -> bool:
        return True


class KeyedTowerHandler(KeyedModelHandler):
    """``KeyedModelHandler(DocumentTowerHandler(model_dir))`` that also passes on ``should_skip_batching``.

    Beam 2.77's ``KeyedModelHandler`` forwards ``batch_elements_kwargs`` but not
    ``should_skip_batching``, so RunInference put a ``BatchElements`` before the model anyway: it held
    up to 8 of our batches (tens of thousands of documents) per bundle, and on the Dask runner lost the
    ones it emits from ``finish_bundle``.
    """

    def __init__(self, model_dir: str):
        self.tower = DocumentTowerHandler(model_dir)
        super().__init__(self.tower)

    def should_skip_batching(self) -> bool:
        return self.tower.should_skip_batching()


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


# Bytes per read while planning JSONL ranges (numpy finds the newlines of each block).
_PLAN_BLOCK = 1 << 24


def _jsonl_cuts(path: str, lines_per_range: int) -> tuple[list[tuple[int, int, int]], int]:
    """``([(start, end, first_line)], lines)``: byte ranges of ``lines_per_range`` lines (the last may be short)."""
    starts, first_lines = [0], [1]
    lines = offset = 0
    with open(path, "rb") as handle:
        while block := handle.read(_PLAN_BLOCK):
            newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n"))
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
    return [(starts[i], starts[i + 1], first_lines[i]) for i in range(len(starts) - 1)], lines


def _ends_without_newline(path: str, size: int) -> bool:
    """Whether the file's last byte is not a newline (its last line then has no ``\\n``)."""
    with open(path, "rb") as handle:
        handle.seek(size - 1)
        return handle.read(1) != b"\n"


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
        if kind == "jsonl":
            cuts, lines = _jsonl_cuts(path, per_batch)
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


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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
            raws = _chunks(read_table(task.path, task.table), self.batch_size)
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


def _from_prediction(keyed: tuple[Any, PredictionResult]) -> tuple[int, list[dict], list[dict], np.ndarray]:
    (batch_id, docs, rejected), result = keyed
    return batch_id, docs, rejected, result.inference


class EncodeBatches(beam.PTransform):
    """``[((batch_id, docs, rejected), texts)]`` → ``(batch_id, docs, rejected, embeddings)``.

    Each example is one RunInference call over a :class:`KeyedTowerHandler` (a
    :class:`~apache_beam.ml.inference.base.KeyedModelHandler` of :class:`DocumentTowerHandler`);
    ``embeddings`` is ``[len(docs), dim]`` float32, row i for ``texts[i]``. Dead letters ride along in
    their batch so the job stays one chain (the Dask runner computes only the last transform's graph).
    """

    def __init__(self, model_dir: str, *, use_run_inference: bool = True):
        super().__init__()
        self.handler = KeyedTowerHandler(model_dir)
        self.use_run_inference = use_run_inference

    def expand(self, examples: beam.PCollection) -> beam.PCollection:
        return (
            examples
            | ("RunInference" >> RunInference(self.handler) if self.use_run_inference
               else "Inference" >> beam.ParDo(_PlainInference(self.handler)))
            | "FromPrediction" >> beam.Map(_from_prediction)
        )


class _PlainInference(beam.DoFn):
    """The same keyed model handler called from a plain DoFn (model loaded in ``setup``).

    ``--inference pardo``: a fallback for runners where RunInference misbehaves (on Beam 2.77's Dask runner
    it lost batches while its ``BatchElements`` was not skipped; see docs/scaling.md).
    """

    def __init__(self, handler: KeyedModelHandler):
        super().__init__()
        self.handler = handler
        self.model: Any = None

    def setup(self) -> None:
        self.model = self.handler.load_model()

    def process(self, batch: list[tuple[Any, list[str]]]) -> Iterable[tuple[Any, PredictionResult]]:
        yield from self.handler.run_inference(batch, self.model)


def shard_table(docs: Sequence[dict[str, Any]], embeddings: np.ndarray) -> Any:
    """Documents and their [n, dim] embeddings → one ``pyarrow.Table`` in :data:`SHARD_SCHEMA`."""
    # deferred: pyarrow, imported only when this runs
    import pyarrow as pa

    matrix = np.ascontiguousarray(embeddings, dtype=np.float32)
    if matrix.shape[0] != len(docs):
        raise ConfigError(f"{len(docs)} documents but {matrix.shape[0]} embeddings")
    dim = matrix.shape[1] if matrix.ndim == 2 else 0
    offsets = pa.array(np.arange(0, (len(docs) + 1) * dim, dim, dtype=np.int32) if dim else
                       np.zeros(len(docs) + 1, np.int32), pa.int32())
    embedding = pa.ListArray.from_arrays(offsets, pa.array(matrix.ravel(), pa.float32()))
    columns = [pa.array([d[name] for d in docs], pa.string()) for name in ("id", "title", "text", "record")]
    return pa.Table.from_arrays([*columns, embedding], schema=SHARD_SCHEMA)


def _replace_atomically(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_batch(batch: tuple[int, list[dict], list[dict], np.ndarray], *, shards_dir: str, rejected_dir: str,
                num_batches: int) -> tuple[int, int]:
    """Write one batch's shard (``embeddings-BBBBB-of-NNNNN.parquet``) and dead letters; returns the counts.

    Files are named by batch id and replaced atomically, so a retried batch overwrites its own
    output and a killed worker never leaves half a file under the final name. Batch ids follow the
    corpus order, so the shards' name order is the corpus order (ids are zero-padded to the width of
    ``num_batches``, at least 5 digits). Records the wall-clock millisecond each batch was written in
    the ``dssm_encode`` distribution ``batch_written_ms``.
    """
    # deferred: pyarrow, imported only when this runs
    import pyarrow.parquet as pq

    batch_id, docs, rejected, embeddings = batch
    width = max(5, len(str(num_batches)))
    name = f"{batch_id:0{width}d}-of-{num_batches:0{width}d}"
    if docs:
        table = shard_table(docs, embeddings)
        # Dictionary encoding of unique ids/texts was 3/4 of the write time; float vectors do not compress.
        compression = {"id": "snappy", "title": "snappy", "text": "snappy", "record": "snappy", "embedding": "none"}
        _replace_atomically(Path(shards_dir) / f"embeddings-{name}.parquet",
                            lambda p: pq.write_table(table, p, compression=compression, use_dictionary=False))
    if rejected:
        text = "".join(rejected_json(r) + "\n" for r in rejected)
        _replace_atomically(Path(rejected_dir) / f"rejected-{name}.jsonl",
                            lambda p: p.write_text(text, encoding="utf-8"))
    Metrics.distribution("dssm_encode", "batch_written_ms").update(int(time.time() * 1000))
    Metrics.counter("dssm_encode", "encoded").inc(len(docs))
    return len(docs), len(rejected)


def resolve_corpus(corpus: str) -> list[str]:
    """The corpus file(s): a file, a glob, or a BEIR directory (its ``corpus.jsonl``).

    Raises:
        InputError: nothing matches.
    """
    path = Path(corpus)
    if path.is_dir():
        beir = path / "corpus.jsonl"
        if not beir.is_file():
            raise InputError(f"--corpus {corpus} is a directory without corpus.jsonl")
        return [str(beir)]
    if path.is_file():
        return [str(path)]
    matches = sorted(p for p in glob.glob(corpus) if Path(p).is_file())
    if not matches:
        raise InputError(f"corpus not found: {corpus}")
    return matches


def _check_columns(paths: Sequence[str], columns: CorpusColumns, table: str | None) -> None:
    for path in paths:
        have = read_columns(path, table)
        missing = [c for c in (columns.id, columns.text) if c not in have]
        if missing:
            raise InputError(f"corpus {path} lacks column(s) {missing}; it has {have} "
                             "(rename with --id-column / --text-column)")


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
        with open(path, "rb") as handle:
            lines = sum(1 for line in handle if line.strip())
        total += max(0, lines - (kind in ("csv", "tsv")))
    return total


def encode_pipeline(p: beam.Pipeline, *, ranges: Sequence[ReadRange], columns: CorpusColumns, model_dir: str,
                    shards_dir: str, rejected_dir: str, batch_size: int, shard: tuple[int, int] | None = None,
                    use_run_inference: bool = True) -> beam.PCollection:
    """Add the encode job to pipeline ``p``: read + validate + batch → RunInference → Parquet + dead letters.

    Args:
        p: the pipeline.
        ranges: the read tasks (:func:`plan_reads`); their batch ids name the output files.
        columns: the corpus columns.
        model_dir: the model directory (``saved_model`` inside).
        shards_dir: where the ``embeddings-*.parquet`` shards go.
        rejected_dir: where the ``rejected-*.jsonl`` dead letters go.
        batch_size: records per batch of a whole-file range, as planned.
        shard: ``(i, N)``: keep only the documents of index shard i of N.
        use_run_inference: RunInference (else the same handler in a plain DoFn, for Dask).

    One chain with no multi-output steps, no shuffle of documents and no ``finish_bundle`` outputs, so it
    runs the same on the DirectRunner, the Dask runner and the portable runners. ``beam.Create``
    redistributes the read tasks (a reshuffle of a few small elements), so workers share them.

    Returns:
        ``(documents, rejected)`` counts per batch.
    """
    num_batches = ranges[-1].first_batch + ranges[-1].batches if ranges else 0
    stride = shard[1] if shard else 1
    return (
        p
        | "ReadTasks" >> beam.Create(list(ranges))
        | "ReadBatches" >> beam.ParDo(ReadBatches(columns=columns, batch_size=batch_size * stride, shard=shard))
        | "Encode" >> EncodeBatches(model_dir, use_run_inference=use_run_inference)
        | "Write" >> beam.Map(write_batch, shards_dir=shards_dir, rejected_dir=rejected_dir,
                              num_batches=num_batches)
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dssm index", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other flags go to Beam (e.g. --runner, --direct_num_workers, --direct_running_mode).")
    parser.add_argument("--model", required=True, help="model directory written by `dssm train`")
    parser.add_argument("--corpus", required=True,
                        help="corpus: BEIR directory or corpus.jsonl, or JSONL/CSV/TSV/Parquet file(s) (glob ok)")
    parser.add_argument("--output", required=True, help="index directory (a new version is added)")
    parser.add_argument("--format", default=None, choices=["csv", "tsv", "jsonl", "parquet"],
                        help="corpus table format (default: from the suffix)")
    parser.add_argument("--id-column", default=None, help="id column (default: _id if present, else id)")
    parser.add_argument("--text-column", default="text", help="text column (default: text)")
    parser.add_argument("--title-column", default="title",
                        help="title column, joined before the text; '' for none (default: title; "
                             "a corpus without it gets empty titles)")
    parser.add_argument("--batch-size", type=int, default=4096,
                        help="documents per RunInference batch and per Parquet shard (lines of a JSONL file, "
                             "records of a CSV/TSV/Parquet file; with --shard i/N, about that many of every "
                             "N times as many)")
    parser.add_argument("--shards", default=None,
                        help="keep the embedding shards in this directory (default: a staging "
                             "directory removed after the build)")
    parser.add_argument("--keep-versions", type=int, default=0,
                        help="after publishing, delete all but the newest N versions (0: keep all)")
    parser.add_argument("--min-recall", dest="scann_min_recall", type=float, default=None,
                        help="same as --scann-min-recall")
    parser.add_argument("--shard", default=None, metavar="i/N",
                        help="index only the documents whose id hashes to shard i of N (sha1 of the id; "
                             "run N jobs into N index directories and search them with ShardedSearcher; "
                             "see docs/scaling.md)")
    parser.add_argument("--inference", choices=("auto", "runinference", "pardo"), default="auto",
                        help="runinference: Beam RunInference over the keyed model handler; pardo: the same "
                             "handler in a plain DoFn (a fallback for runners where RunInference misbehaves); "
                             "auto: runinference (default: auto)")
    parser.add_argument("--hybrid-weight", choices=("label-free", "none"), default="label-free",
                        help="label-free: choose the weight of DSSM in hybrid search (the default search mode) on "
                             "pseudo-queries cut from the corpus and store it in the version; it stays 0 (BM25's "
                             "ranking) unless the tower beats BM25 alone significantly on them (dssm.hybrid."
                             "label_free_weight). none: store nothing (hybrid then uses weight 0.5). Skipped with "
                             "--shard (default: label-free)")
    parser.add_argument("--hybrid-pairs", default=None, metavar="PAIRS_DIR",
                        help="choose the hybrid weight on the validation split of this `dssm pairs` output "
                             "(labelled query -> document pairs the model was not trained on) instead of "
                             "pseudo-queries cut from the corpus; the same significance rule keeps it or 0")
    parser.add_argument("--json", action="store_true", help="print the build summary as JSON")
    add_config_arguments(parser, index_lib.ScannConfig, prefix="scann-")
    return parser


def label_free_finalize(*, seed: int = 0, queries: int = 500, max_docs: int = 50_000,
                        pairs: list[tuple[str, str]] | None = None) -> index_lib.Finalize:
    """The build step that stores the hybrid weight (``hybrid.json``) in the staged version.

    Reads the staged doc store, embeddings and model copy (a random ``max_docs`` of the documents on a
    larger corpus: the tuning corpus, so memory stays bounded at any size) and runs
    :func:`dssm.hybrid.label_free_weight` on pseudo-queries, or on ``pairs`` (labelled pairs held out
    from training) when given; its report goes to the manifest as ``hybrid_tuning``.
    """
    def finalize(stage: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        # deferred: TensorFlow, imported only when this runs
        from dssm.export import load_encoder

        store = index_lib.DocStore(stage / index_lib.DOCS_DB)
        embeddings = np.load(stage / index_lib.EMBEDDINGS, mmap_mode="r")
        rows = np.arange(len(store))
        if rows.size > max_docs:
            rows = np.sort(np.random.default_rng(seed).choice(rows.size, max_docs, replace=False))
        texts = [document_text(d.title, d.text) for d in store.get(rows.tolist())]
        encoder = load_encoder(stage / index_lib.MODEL_DIR)
        tick = time.perf_counter()
        hybrid, report = label_free_weight(texts=texts, embeddings=np.asarray(embeddings[rows]),
                                           embed_queries=encoder.embed_queries,
                                           embed_documents=encoder.embed_documents, queries=queries, seed=seed,
                                           pairs=pairs)
        report.update(corpus_documents=len(store), seconds=round(time.perf_counter() - tick, 2))
        tuned_on = f"{report['pairs']} held-out labelled pairs" if pairs is not None else \
            f"label-free, {report['pseudo_queries']} pseudo-queries"
        print(f"hybrid weight {hybrid.weight:.2f} on DSSM ({tuned_on}; "
              f"best {report.get('best', 0.0):.2f}, gain {report.get('gain', 0.0):+.4f} MRR@10, "
              f"p {report.get('p', 1.0):.3g})",
              file=sys.stderr, flush=True)
        settings = config_to_dict(hybrid)
        return {HYBRID_FILE: settings}, {"hybrid": settings, "hybrid_tuning": report}

    return finalize


def _steady_rate(job: Any) -> dict[str, Any]:
    """Documents/s from the first batch read to the last shard written (Beam metrics), or ``{}`` if unknown.

    Leaves out what comes before the first batch: worker start-up, imports and model loading, a fixed
    cost of seconds that dominates a short job's whole-job rate.
    """

    try:
        metrics = job.metrics().query(MetricsFilter().with_namespace("dssm_encode"))
    except (NotImplementedError, AttributeError, KeyError):  # a runner without metrics
        return {}
    found = {m.key.metric.name: m.committed for kind in ("counters", "distributions") for m in metrics.get(kind, [])}
    start, end, encoded = found.get("batch_start_ms"), found.get("batch_written_ms"), found.get("encoded")
    if not (start and end and encoded and start.count and end.count and end.max > start.min):
        return {}
    seconds = (end.max - start.min) / 1000
    return {"steady_seconds": round(seconds, 3), "steady_docs_per_second": round(encoded / seconds, 1)}


def _count_rejected(prefix: str) -> tuple[int, dict[str, int], str | None]:
    reasons: Counter[str] = Counter()
    example = None
    for path in sorted(glob.glob(prefix + "*")):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    item = json.loads(line)
                    reasons[item["reason"]] += 1
                    if example is None:
                        example = f"{item['record']}: {item['detail']}"
    return sum(reasons.values()), dict(sorted(reasons.items())), example


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Run the encode job and build + publish a new index version.

    Args:
        argv: ``dssm index`` flags; unknown ones go to Beam's ``PipelineOptions``.
        test_pipeline: a ``TestPipeline`` to build the job on instead of a new pipeline.

    Returns:
        The build summary (also stored in the version's manifest).

    Raises:
        InputError: missing corpus/model, missing columns, empty corpus, duplicate ids.
        ConfigError: bad flags, or the built index's recall is below ``--min-recall``.
    """

    args, beam_args = _parser().parse_known_args(argv)
    config = config_from_args(index_lib.ScannConfig, args, prefix="scann-")
    if args.keep_versions < 0:
        raise ConfigError(f"--keep-versions must be >= 0, got {args.keep_versions}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    shard = index_lib.parse_shard_spec(args.shard) if args.shard else None
    paths = resolve_corpus(args.corpus)
    table = args.format  # None: each file's suffix decides
    for path in paths:
        table_format(path, table)  # an unknown suffix fails here, not inside the pipeline
    first_columns = read_columns(paths[0], table)
    id_column = args.id_column or ("_id" if "_id" in first_columns else "id")
    columns = CorpusColumns(id=id_column, text=args.text_column, title=args.title_column or None)
    _check_columns(paths, columns, table)
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise InputError(f"--model {model_dir}: no such directory (train one with `dssm train`)")
    verify_manifest(model_dir, kind="model")

    tuning_pairs = None
    if args.hybrid_pairs:
        # deferred: TensorFlow, imported only when this runs
        from dssm.train import pair_files, read_text_pairs

        tuning_pairs = read_text_pairs(pair_files(args.hybrid_pairs, "validation"))
        if not tuning_pairs:
            raise InputError(f"--hybrid-pairs {args.hybrid_pairs}: its validation split holds no positive pair "
                             "(make it with `dssm pairs --validation-fraction F`)")
    output = Path(args.output)
    version = index_lib.new_version_name()
    stage = index_lib.staging_dir(output, version)
    shards_dir = Path(args.shards) if args.shards else stage / "shards"
    if args.shards and any(shards_dir.glob("embeddings-*.parquet")):
        raise InputError(f"--shards {shards_dir} already holds embedding shards; give an empty directory")
    shards_dir.mkdir(parents=True, exist_ok=True)
    rejected_dir = output / "rejected" / version
    rejected_dir.mkdir(parents=True, exist_ok=True)
    # auto was pardo on Dask while RunInference's BatchElements (not skipped through Beam 2.77's
    # KeyedModelHandler) lost the batches it emits from finish_bundle there; KeyedTowerHandler skips it.
    use_run_inference = args.inference in ("auto", "runinference")
    ranges, records = plan_reads(paths, table, batch_size=args.batch_size, stride=shard[1] if shard else 1)
    num_batches = ranges[-1].first_batch + ranges[-1].batches if ranges else 0

    try:
        started = time.perf_counter()
        pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(beam_args))
        encode_pipeline(pipeline, ranges=ranges, columns=columns, model_dir=str(model_dir),
                        shards_dir=str(shards_dir.resolve()), rejected_dir=str(rejected_dir.resolve()),
                        batch_size=args.batch_size, shard=shard, use_run_inference=use_run_inference)
        print(f"encoding {records:,} records of {', '.join(paths)} in {num_batches} batches with {model_dir} ...",
              file=sys.stderr, flush=True)
        job = pipeline.run()
        job.wait_until_finish()
        encode_seconds = time.perf_counter() - started
        steady = _steady_rate(job)

        shards = sorted(shards_dir.glob("embeddings-*.parquet"))
        encoded, _ = index_lib.count_shard_rows(shards)
        rejected, by_reason, example = _count_rejected(str(rejected_dir / "rejected-"))
        if encoded == 0:
            detail = f"; {rejected} record(s) rejected, e.g. {example} (see {rejected_dir})" if rejected else ""
            raise InputError(f"corpus {args.corpus} has no documents to index{detail}")
        encode = {
            "corpus": [str(Path(p).resolve()) for p in paths],
            "columns": {"id": columns.id, "title": columns.title, "text": columns.text},
            "read": encoded + rejected,
            "encoded": encoded,
            "rejected": rejected,
            "rejected_by_reason": by_reason,
            "rejected_dir": str(rejected_dir),
            "seconds": round(encode_seconds, 3),
            "docs_per_second": round(encoded / encode_seconds, 1),
            **steady,
            "batches": num_batches,
            "beam_args": beam_args,
            "shard": None if shard is None else {"index": shard[0], "count": shard[1]},
            "inference": "runinference" if use_run_inference else "pardo",
        }
        extra: dict[str, Any] = {"encode": encode}
        if shard is not None:
            extra["shard"] = {"index": shard[0], "count": shard[1], "hash": "sha1(id)[:8] mod count"}
        finalize = label_free_finalize(seed=config.seed, pairs=tuning_pairs) \
            if args.hybrid_weight == "label-free" and shard is None else None
        result = index_lib.build_index_from_shards(output, shards=shards, model_dir=model_dir, config=config,
                                                   version=version, extra=extra, finalize=finalize)
    finally:
        # The shards are scratch unless --shards asked to keep them; a failed job leaves no staging.
        shutil.rmtree(stage, ignore_errors=True)
        if not any(rejected_dir.glob("rejected-*.jsonl")):
            shutil.rmtree(rejected_dir, ignore_errors=True)
        for empty in (stage.parent, rejected_dir.parent):
            with contextlib.suppress(OSError):  # only if empty: other builds may be using it
                empty.rmdir()
    if not rejected:
        encode["rejected_dir"] = None
    pruned = index_lib.prune_versions(output, keep=args.keep_versions) if args.keep_versions else []
    summary = result.summary()
    summary.update(encode=encode, pruned_versions=pruned, scann_config=config_to_dict(config),
                   shards=str(shards_dir) if args.shards else None)
    return summary


def _table(summary: dict[str, Any]) -> str:
    enc = summary["encode"]
    rows = [
        ("version", summary["version"]),
        ("index", summary["version_dir"]),
        ("documents", f"{summary['documents']:,} (dim {summary['dim']})"),
        ("rejected", f"{enc['rejected']:,}" + (f" {enc['rejected_by_reason']} → {enc['rejected_dir']}"
                                               if enc["rejected"] else "")),
        ("encode", f"{enc['seconds']:.1f} s, {enc['docs_per_second']:,.0f} docs/s"
                   + (f" (steady {enc['steady_docs_per_second']:,.0f} docs/s after start-up)"
                      if enc.get("steady_docs_per_second") else "")),
        ("scann", ", ".join(f"{k}={v}" for k, v in summary["scann"].items())),
        ("recall@10", f"{summary['recall_at_10']:.4f} vs exact"),
        ("build", ", ".join(f"{k} {v:.2f}s" for k, v in summary["seconds"].items())),
        ("peak RSS", f"{summary['peak_rss_bytes'] / 2**20:,.0f} MiB "
                     f"(matrix {summary['matrix_bytes'] / 2**20:,.1f} MiB)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    """``dssm index --model MODEL_DIR --corpus PATH --output INDEX_DIR [beam flags]``."""
    as_json = _parser().parse_known_args(argv)[0].json
    summary = run(argv)
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        print(_table(summary))
    return 0
