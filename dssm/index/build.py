"""Full builds of a version: from an in-memory matrix, from documents encoded in process, or streamed from
the encode job's Parquet shards; each normalises, builds ScaNN, passes the recall gate, writes BM25 state and
the manifest, and publishes."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dssm.artifacts import copy_listed, verify_manifest, write_json_atomic, write_manifest
from dssm.config import config_to_dict
from dssm.data import document_text
from dssm.errors import ConfigError, InputError
from dssm.index.ann import (
    NpyRows,
    ScannConfig,
    build_scann,
    build_scann_in_chunks,
    l2_normalize_inplace,
    npy_chunks,
    resolve_scann_params,
    share_scann_dataset,
)
from dssm.index.docstore import DocStore, DocStoreWriter
from dssm.index.files import tree_bytes
from dssm.index.layout import BATCH_ROWS, DOCS_DB, EMBEDDINGS, MODEL_DIR, SCANN_DIR
from dssm.index.memory import MemoryTrace, release_free_memory
from dssm.index.recall import PROBE_DIR, RecallProbe, tune_search
from dssm.index.versions import check_added_file_name, new_version_name, publish_version, staging

__all__ = [
    "BuildResult", "Finalize", "build_index", "build_index_from_documents", "count_shard_rows",
    "build_index_from_shards",
]


@dataclass(frozen=True)
class BuildResult:
    """What a build produced."""

    index_dir: Path
    version: str
    version_dir: Path
    documents: int
    dim: int
    scann: dict[str, Any]
    recall_at_10: float
    seconds: dict[str, float]
    peak_rss_bytes: int
    matrix_bytes: int
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary."""
        data = dataclasses.asdict(self)
        data["index_dir"] = str(self.index_dir)
        data["version_dir"] = str(self.version_dir)
        return data


def _check_finite(matrix: np.ndarray, store_path: Path, *, chunk: int = 65536) -> None:
    # Chunked: a whole-matrix isfinite() would allocate an [n, dim] bool temporary.
    bad = np.concatenate([start + np.flatnonzero(~np.isfinite(matrix[start:start + chunk]).all(axis=1))
                          for start in range(0, matrix.shape[0], chunk)] or [np.zeros(0, np.int64)])
    if bad.size:
        row = int(bad[0])
        conn = sqlite3.connect(store_path)
        found = conn.execute("SELECT id FROM docs WHERE row = ?", (row,)).fetchone()
        conn.close()
        doc_id = found[0] if found else f"row {row}"
        raise InputError(f"embedding of document {doc_id!r} (and {bad.size - 1} more) is not finite (NaN/inf)")


#: ``stage -> ({file name: JSON data}, {manifest key: value})``: see :func:`build_index_from_shards`.
Finalize = Callable[[Path], tuple[Mapping[str, Any], Mapping[str, Any]]]


def _finish_version(*, index_dir: Path, version: str, stage: Path, matrix: np.ndarray, store: DocStoreWriter,
                    model_dir: str | Path | None, config: ScannConfig, extra: dict[str, Any] | None,
                    timings: dict[str, float], trace: MemoryTrace, finalize: Finalize | None = None) -> BuildResult:
    """Normalise, save, build ScaNN, measure recall, copy the model, write the manifest, publish.

    ``matrix`` is released after the exact search (ScaNN then reads ``embeddings.npy`` in chunks; see
    :func:`build_scann_in_chunks`): callers that pass their only reference (``matrix=box.pop()``)
    get it freed before ScaNN builds.
    """
    # deferred: bm25s and PyStemmer, imported only when this runs
    from dssm.bm25 import BM25_DIR, has_bm25_state, write_bm25_state

    n, dim = matrix.shape
    matrix_bytes = int(matrix.nbytes)
    store.close()
    if n == 0:
        raise InputError("the corpus has no documents to index")
    _check_finite(matrix, store.path)
    zero_rows = l2_normalize_inplace(matrix)
    box = [matrix]  # _build_ann frees the only reference once ScaNN no longer needs it
    del matrix
    params, recall = _build_ann(stage, box, config=config, timings=timings, trace=trace)
    model_info = _copy_model(model_dir, stage)
    trace.mark("model_copy")
    added = _add_finalized_files(stage, finalize, timings) if finalize is not None else {}
    # BM25 state for Searcher mode="hybrid"/"bm25" (dssm/bm25.py owns the format); written before
    # the manifest so the manifest checksums it, unless the finalize hook wrote it with settings it
    # chose (`dssm index --hybrid-pairs`: k1 and b tuned on held-out pairs).
    if not has_bm25_state(stage):
        tick = time.perf_counter()
        write_bm25_state(stage, (doc for _, doc in DocStore(stage / DOCS_DB).iter_all()))
        timings["bm25"] = time.perf_counter() - tick
    trace.mark("bm25")
    memory = trace.report(matrix_bytes=matrix_bytes, scann_bytes=tree_bytes(stage / SCANN_DIR),
                          bm25_bytes=tree_bytes(stage / BM25_DIR))
    peak = memory["peak_rss_bytes"]
    manifest_extra = {
        "version": version,
        "counts": {"documents": n, "zero_embeddings": zero_rows},
        "dim": dim,
        "scann": params,
        "scann_config": config_to_dict(config),
        "recall@10": recall,
        "recall_sample": min(config.recall_sample, n),
        "model": model_info,
        "build": {"seconds": {k: round(v, 3) for k, v in timings.items()}, "peak_rss_bytes": peak,
                  "matrix_bytes": matrix_bytes, "memory": memory},
        **(extra or {}),
        **added,
    }
    write_manifest(stage, kind="index", extra=manifest_extra)
    final = publish_version(index_dir, stage, version)
    return BuildResult(index_dir=index_dir, version=version, version_dir=final, documents=n, dim=dim, scann=params,
                       recall_at_10=recall, seconds=timings, peak_rss_bytes=peak, matrix_bytes=matrix_bytes,
                       memory=memory)


def _build_ann(stage: Path, box: list[np.ndarray], *, config: ScannConfig, timings: dict[str, float],
               trace: MemoryTrace) -> tuple[dict[str, Any], float]:
    """Save ``embeddings.npy``, build and serialize ScaNN, pass the recall gate: ``(params, recall@10)``.

    ``box`` holds the only reference to the normalised [n, dim] matrix; it is emptied (the matrix freed)
    as soon as ScaNN no longer needs it.
    """
    matrix = box.pop()
    n = matrix.shape[0]
    tick = time.perf_counter()
    np.save(stage / EMBEDDINGS, matrix, allow_pickle=False)
    timings["save_embeddings"] = time.perf_counter() - tick
    trace.mark("normalise_save")
    # The exact side of the recall gate runs now, while the matrix is the only large array: after
    # the ScaNN build it would sit beside ScaNN's copy of the data.
    tick = time.perf_counter()
    probe = RecallProbe(matrix, k=10, sample=config.recall_sample, seed=config.seed)
    timings["exact_search"] = time.perf_counter() - tick
    params = resolve_scann_params(config, n)
    chunked = params["mode"] != "brute_force" and n > params["training_sample_size"]
    if chunked:
        sample_rows = np.sort(np.random.default_rng(config.seed).choice(n, params["training_sample_size"],
                                                                        replace=False))
        sample = matrix[sample_rows]
        del matrix  # ScaNN reads the rows back from embeddings.npy, a chunk at a time
    # The gate scores the few rows ScaNN returns, read back from the file.
    probe.matrix = rows_on_disk = NpyRows(stage / EMBEDDINGS)
    release_free_memory()
    trace.mark("exact_search")
    tick = time.perf_counter()
    if chunked:
        searcher = build_scann_in_chunks(sample, npy_chunks(stage / EMBEDDINGS), params)
        del sample
    else:
        searcher = build_scann(matrix, params)
        del matrix
    timings["scann_build"] = time.perf_counter() - tick
    release_free_memory()
    trace.mark("scann_build")
    (stage / SCANN_DIR).mkdir()
    searcher.serialize(str(stage / SCANN_DIR), relative_path=True)
    share_scann_dataset(stage)
    release_free_memory()
    trace.mark("scann_serialize")
    tick = time.perf_counter()
    recall = tune_search(searcher, probe, params, tune_leaves=config.num_leaves_to_search == 0,
                         min_recall=config.min_recall)
    timings["recall"] = time.perf_counter() - tick
    probe.save(stage / PROBE_DIR)  # the first compaction carries it (an exact search is 3.4 s at 1M)
    rows_on_disk.close()
    del searcher, probe
    release_free_memory()
    trace.mark("recall")
    if recall < config.min_recall:
        raise ConfigError(f"ScaNN recall@10 {recall:.4f} against exact search is below --min-recall "
                          f"{config.min_recall} with {params}; search more leaves or raise reorder_k")
    return params, recall


def _copy_model(model_dir: str | Path | None, stage: Path) -> dict[str, Any] | None:
    """Copy the verified model directory's own files into the version; its manifest summary (``None``: no model)."""
    if model_dir is None:
        return None
    model_dir = Path(model_dir)
    model_manifest = verify_manifest(model_dir, kind="model")
    copy_listed(model_dir, stage / MODEL_DIR, model_manifest)
    return {"source": str(model_dir.resolve()), "created": model_manifest.get("created"),
            "files": len(model_manifest.get("files", {}))}


def _add_finalized_files(stage: Path, finalize: Finalize, timings: dict[str, float]) -> dict[str, Any]:
    """Run the build's finalize hook on the staged version: write its JSON files, return its manifest keys."""
    tick = time.perf_counter()
    files, added = finalize(stage)
    for name, data in files.items():
        check_added_file_name(name)
        if (stage / name).exists():
            raise ConfigError(f"cannot add index file {name!r}: the version already has one")
        write_json_atomic(stage / name, data)
    timings["finalize"] = time.perf_counter() - tick
    return dict(added)


def build_index(
    index_dir: str | Path,
    *,
    embeddings: np.ndarray,
    ids: Sequence[str],
    texts: Sequence[str],
    titles: Sequence[str] | None = None,
    model_dir: str | Path | None = None,
    config: ScannConfig = ScannConfig(),  # noqa: B008 - frozen, immutable
    version: str | None = None,
    extra: dict[str, Any] | None = None,
    copy: bool = True,
) -> BuildResult:
    """Build and publish an index version from an in-memory embedding matrix.

    Args:
        index_dir: the index directory (created if missing).
        embeddings: [n, dim] float; copied once into float32 unless ``copy=False``.
        ids: n unique document ids.
        texts: n document texts.
        titles: n titles, or ``None`` for empty titles.
        model_dir: the model directory to copy into the version (its manifest is verified);
            ``None`` builds a vector-only index (search by vector; no text queries).
        config: ScaNN configuration.
        version: version name; default :func:`new_version_name`.
        extra: more manifest keys.
        copy: ``False`` normalises a float32 C-contiguous ``embeddings`` in place instead of copying it
            (no second [n, dim] matrix for callers that own the array).

    Returns:
        The :class:`BuildResult`.

    Raises:
        InputError: no documents, mismatched lengths, a duplicate or empty id, non-finite embeddings.
        ConfigError: recall below ``config.min_recall``, or a ScaNN mode impossible for n.
    """
    trace = MemoryTrace()  # before the copy: a copied matrix is the build's memory
    matrix = np.array(embeddings, dtype=np.float32, copy=True, order="C") if copy else \
        np.ascontiguousarray(embeddings, dtype=np.float32)
    if matrix.ndim != 2:
        raise InputError(f"embeddings must be a [n, dim] matrix, got shape {matrix.shape}")
    n = matrix.shape[0]
    titles = [""] * n if titles is None else titles
    for name, values in (("ids", ids), ("texts", texts), ("titles", titles)):
        if len(values) != n:
            raise InputError(f"{len(values)} {name} for {n} embeddings")
    index_dir = Path(index_dir)
    version = version or new_version_name()
    with staging(index_dir, version) as root:
        stage = root / "version"
        stage.mkdir()
        tick = time.perf_counter()
        store = DocStoreWriter(stage / DOCS_DB)
        for start in range(0, n, BATCH_ROWS):
            stop = start + BATCH_ROWS
            store.add(list(ids[start:stop]), list(titles[start:stop]), list(texts[start:stop]))
        timings = {"docs": time.perf_counter() - tick}
        trace.mark("docs")
        box = [matrix]  # the callee frees a copy it alone holds (copy=False: the caller's array stays)
        del matrix
        return _finish_version(index_dir=index_dir, version=version, stage=stage, matrix=box.pop(), store=store,
                               model_dir=model_dir, config=config, extra=extra, timings=timings, trace=trace)


def build_index_from_documents(
    index_dir: str | Path,
    *,
    model_dir: str | Path,
    documents: Sequence[Any],
    config: ScannConfig = ScannConfig(),  # noqa: B008 - frozen, immutable
    batch_size: int = 4096,
    version: str | None = None,
    progress: bool = True,
) -> BuildResult:
    """Encode documents in this process with the model's document tower, then :func:`build_index`.

    The in-process counterpart of the ``dssm index`` Beam job, for corpora that fit in memory.

    Args:
        index_dir: the index directory.
        model_dir: the model directory (verified, then copied into the version).
        documents: objects with ``id``, ``title``, ``text`` (e.g. :class:`dssm.data.Document`).
        config: ScaNN configuration.
        batch_size: texts per call into the document tower.
        version: version name; default :func:`new_version_name`.
        progress: show a tqdm bar.
    """
    # deferred: TensorFlow, imported only when this runs
    from dssm.export import load_encoder

    if not documents:
        raise InputError("the corpus has no documents to index")
    encoder = load_encoder(model_dir, batch_size=batch_size)
    matrix = np.empty((len(documents), encoder.dim), dtype=np.float32)
    tick = time.perf_counter()
    with tqdm(total=len(documents), desc="encoding", unit="doc", disable=not progress) as bar:
        for start in range(0, len(documents), batch_size):
            chunk = documents[start:start + batch_size]
            matrix[start:start + len(chunk)] = encoder.embed_documents([document_text(d.title, d.text) for d in chunk])
            bar.update(len(chunk))
    seconds = time.perf_counter() - tick
    return build_index(index_dir, embeddings=matrix, ids=[d.id for d in documents], texts=[d.text for d in documents],
                       titles=[d.title for d in documents], model_dir=model_dir, config=config, version=version,
                       copy=False,
                       extra={"encode": {"encoded": len(documents), "seconds": round(seconds, 3), "in_process": True,
                                         "docs_per_second": round(len(documents) / max(seconds, 1e-9), 1)}})


def count_shard_rows(shards: Iterable[str | Path]) -> tuple[int, int | None]:
    """Rows in Parquet embedding shards (from their footers) and the embedding width of the first row.

    Returns:
        (rows, dim) — dim is ``None`` if every shard is empty.
    """
    # deferred: pyarrow, imported only when this runs
    import pyarrow.parquet as pq

    total, dim = 0, None
    for path in shards:
        file = pq.ParquetFile(path)
        total += file.metadata.num_rows
        if dim is None and file.metadata.num_rows:
            first = next(file.iter_batches(batch_size=1, columns=["embedding"]))
            dim = len(first.column(0)[0])
    return total, dim


def _load_shards(shards: Sequence[Path], matrix: np.ndarray, store: DocStoreWriter, *, has_record: bool,
                 progress: bool) -> None:
    """Fill ``matrix`` [n, dim] and the doc store from Parquet shards, batch by batch, in row order.

    Raises:
        InputError: an embedding of the wrong width (naming the id) or null, more or fewer rows than
            the footers said, a duplicate id.
    """
    # deferred: pyarrow, imported only when this runs
    import pyarrow.parquet as pq

    n, dim = matrix.shape
    pos = 0
    wanted = ["id", "title", "text", "embedding"] + (["record"] if has_record else [])
    with tqdm(total=n, desc="loading shards", unit="doc", disable=not progress) as bar:
        for path in shards:
            shard_row = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=wanted):
                ids = batch.column(0).to_pylist()
                column = batch.column(3)
                lengths = np.diff(np.asarray(column.offsets))
                wrong = np.flatnonzero(lengths != dim)
                if wrong.size:
                    raise InputError(f"{path}: document {ids[int(wrong[0])]!r} has a {int(lengths[wrong[0]])}"
                                     f"-dim embedding, expected {dim}")
                if column.null_count:
                    raise InputError(f"{path}: a document has a null embedding")
                rows = len(ids)
                if pos + rows > n:
                    raise InputError(f"{path} holds more rows than its footer said ({pos + rows} > {n})")
                matrix[pos:pos + rows] = column.flatten().to_numpy(zero_copy_only=False).reshape(rows, dim)
                store.add(ids, batch.column(1).to_pylist(), batch.column(2).to_pylist(),
                          locations=(batch.column(4).to_pylist() if has_record
                                     else [f"{path.name} row {shard_row + i}" for i in range(rows)]))
                shard_row += rows
                pos += rows
                bar.update(rows)
    if pos != n:
        raise InputError(f"embedding shards held {pos} rows, their footers said {n}")


def build_index_from_shards(
    index_dir: str | Path,
    *,
    shards: Sequence[str | Path],
    model_dir: str | Path | None,
    config: ScannConfig = ScannConfig(),  # noqa: B008 - frozen, immutable
    version: str | None = None,
    extra: dict[str, Any] | None = None,
    progress: bool = True,
    finalize: Finalize | None = None,
) -> BuildResult:
    """Stream Parquet shards (``id``, ``title``, ``text``, ``embedding``) into a published index version.

    The matrix is preallocated once from the shards' row counts and filled batch by batch, so the
    only full-size array is the [n, dim] float32 matrix itself (plus ScaNN's structures).

    Args:
        index_dir: the index directory.
        shards: Parquet files written by the encode job.
        model_dir: model directory copied into the version (``None``: vector-only index).
        config: ScaNN configuration.
        version: version name; default :func:`new_version_name`.
        extra: more manifest keys (e.g. the encode job's counts).
        progress: show a tqdm bar.
        finalize: called with the staged version (embeddings, doc store, model, ScaNN) before its
            BM25 state and manifest are written; returns ``(files, manifest keys)``: small JSON files
            added to the version and checksummed with it (``dssm index`` stores the hybrid weight so).
            A hook may write the BM25 state itself (:func:`dssm.bm25.write_bm25_state`, with
            settings it chose); the build writes Lucene's otherwise.

    Raises:
        InputError: no documents, a missing column, an embedding of the wrong width (naming the id),
            a duplicate id (naming it and both rows), non-finite embeddings.
    """
    # deferred: pyarrow, imported only when this runs
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = [Path(s) for s in shards]
    has_record = True  # the encode job's source locations, for error messages
    for path in shards:
        if not path.is_file():
            raise InputError(f"embedding shard not found: {path}")
        names = pq.read_schema(path).names
        has_record = has_record and "record" in names
        missing = [c for c in ("id", "title", "text", "embedding") if c not in names]
        if missing:
            raise InputError(f"embedding shard {path} lacks column(s) {missing}; it has {names}")
    n, dim = count_shard_rows(shards)
    if n == 0 or dim is None:
        raise InputError("the corpus has no documents to index (every embedding shard is empty)")
    index_dir = Path(index_dir)
    version = version or new_version_name()
    trace = MemoryTrace()
    with staging(index_dir, version) as root:
        stage = root / "version"
        stage.mkdir()
        tick = time.perf_counter()
        matrix = np.empty((n, dim), dtype=np.float32)
        store = DocStoreWriter(stage / DOCS_DB)
        _load_shards(shards, matrix, store, has_record=has_record, progress=progress)
        pa.default_memory_pool().release_unused()  # Arrow keeps freed batches for reuse
        release_free_memory()
        timings = {"load_shards": time.perf_counter() - tick}
        trace.mark("load_shards")
        box = [matrix]  # so that _finish_version can free it once ScaNN has its copy
        del matrix
        return _finish_version(index_dir=index_dir, version=version, stage=stage, matrix=box.pop(), store=store,
                               model_dir=model_dir, config=config, extra=extra, timings=timings, trace=trace,
                               finalize=finalize)
