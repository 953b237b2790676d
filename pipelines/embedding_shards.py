"""The encode job's output: one Parquet shard of embeddings and one dead-letter file per batch.

This module owns the embedding shard format that :func:`dssm.index.build_index_from_shards` reads
(:data:`SHARD_SCHEMA`: ``id``, ``title``, ``text``, ``record``, ``embedding`` float32 list), the
conversion of a batch to it (:func:`shard_table`) and :func:`write_batch`, which writes
``embeddings-BBBBB-of-NNNNN.parquet`` and ``rejected-BBBBB-of-NNNNN.jsonl`` atomically.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics

from dssm.errors import ConfigError
from pipelines.records import rejected_json

__all__ = ["SHARD_SCHEMA", "shard_table", "write_batch"]

SHARD_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("title", pa.string()),
    ("text", pa.string()),
    ("record", pa.string()),
    ("embedding", pa.list_(pa.float32())),
])


def shard_table(docs: Sequence[dict[str, Any]], embeddings: np.ndarray) -> Any:
    """Documents and their [n, dim] embeddings → one ``pyarrow.Table`` in :data:`SHARD_SCHEMA`."""
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
    # deferred: pyarrow.parquet, loaded only when a shard is written
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
