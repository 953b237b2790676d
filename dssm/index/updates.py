"""Incremental updates: upserts and deletes into a new version without re-encoding the rest.

Rebalancing (rebuilding the ScaNN partitions, codebooks and leaves tuning from the updated matrix,
no re-encoding) happens when ``rebalance`` is ``True``; or, when it is ``None``, if the rows changed
since the last full build exceed ``rebalance_fraction`` of the documents that build held (the
k-means tree and AH codebooks were trained on the old distribution, and appended points sit in
partitions whose centres no longer describe them), if the ``auto`` ScaNN mode would now pick
another structure for the new size, or if recall@10 of the updated searcher falls below
``min_recall``. ``rebalance=False`` never rebalances (the recall gate then fails the update). The
default threshold is :data:`DEFAULT_REBALANCE_FRACTION` (20% until 2026-12-06; docs/scaling.md says why).
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dssm.artifacts import load_npy, manifest_extra, read_manifest, verify_manifest, write_manifest
from dssm.errors import ConfigError, InputError
from dssm.index.ann import (
    ScannConfig,
    build_scann,
    resolve_scann_params,
    scann_pybind,
    share_scann_dataset,
)
from dssm.index.delta import LiveView, compaction_ops, default_max_delta, rebase_writes, write_delta
from dssm.index.docstore import Doc, DocStore
from dssm.index.files import fsync_file, fsync_tree, link_tree
from dssm.index.layout import DOCS_DB, EMBEDDINGS, MODEL_DIR, RERANKER_DIR, SCANN_DIR, WINDOWS_DIR, WINDOWS_WRITTEN_DIR
from dssm.index.recall import MUTATED_FIRST_GROWTH, PROBE_DIR, RecallProbe, carried_probe, tune_search
from dssm.index.segments import DELTA_DIR, SEGMENTS_KEY, TOMBSTONES, SegmentLayout, pending_rows
from dssm.index.update_input import checked_update_settings, checked_vectors
from dssm.index.versions import (
    DEFAULT_KEEP_VERSIONS,
    CompactionSlot,
    IndexWriteLock,
    VersionLease,
    current_version_dir,
    new_version_name,
    publish_version,
    retain_versions,
    staging,
)
from dssm.index.written_windows import stage_written_windows
from dssm.windows import WindowRows

__all__ = ["DEFAULT_REBALANCE_FRACTION", "UpdateResult", "update_index", "compact_index"]

#: Rows changed since the last full build, per document it held, past which ScaNN is rebuilt.
DEFAULT_REBALANCE_FRACTION = 0.5


@dataclass(frozen=True)
class UpdateResult:
    """What an incremental update produced."""

    index_dir: Path
    base_version: str
    version: str
    version_dir: Path
    documents: int
    deleted: int
    inserted: int
    replaced: int
    rebalanced: bool
    rebalance_reason: str | None
    recall_at_10: float
    rows_changed_since_build: int
    seconds: dict[str, float]
    compacted: bool = True  # False: written as a delta segment (the base untouched)
    delta_documents: int = 0  # live documents in delta segments after the write
    tombstones: int = 0

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary."""
        data = dataclasses.asdict(self)
        data["index_dir"] = str(self.index_dir)
        data["version_dir"] = str(self.version_dir)
        return data

# Files of a version an update regenerates; everything else (model/, thresholds.json, hybrid.json, ...)
# is hard-linked from the base version, which is never modified in place.
_REGENERATED = {SCANN_DIR, DOCS_DB, EMBEDDINGS, "bm25", "manifest.json", DELTA_DIR, TOMBSTONES, PROBE_DIR,
                WINDOWS_WRITTEN_DIR}
# What an update never reads, only links forward (their checksums carried over by inode): verified by
# whoever loads them, not hashed by every write.
_LINKED_ONLY = (MODEL_DIR, RERANKER_DIR, WINDOWS_DIR, WINDOWS_WRITTEN_DIR)


def update_index(
    index_dir: str | Path,
    *,
    upsert_ids: Sequence[str] = (),
    upsert_titles: Sequence[str] = (),
    upsert_texts: Sequence[str] = (),
    upsert_vectors: np.ndarray | None = None,
    upsert_windows: WindowRows | None = None,
    delete_ids: Sequence[str] = (),
    rebalance: bool | None = None,
    rebalance_fraction: float = DEFAULT_REBALANCE_FRACTION,
    min_recall: float | None = None,
    version: str | None = None,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    max_delta: int | None = None,
) -> UpdateResult:
    """Delete and upsert documents into a new version of the live index, without re-encoding the rest.

    The base version is never modified. A write that keeps the delta within ``max_delta`` rows is
    staged as a delta segment plus tombstones (:mod:`dssm.index.delta`; O(changed documents)). A
    write past it, or with ``rebalance=True``, **compacts**: base + delta + the write are applied to
    the base segment. There row bookkeeping follows ScaNN's own mutation semantics so that
    ``embeddings.npy`` row ``i``, ScaNN datapoint ``i`` and ``docs.sqlite`` row ``i`` stay one
    document: a delete moves the last row into the hole (in the order given), an upsert of a known id
    overwrites its row in place, a new id is appended. ScaNN is mutated through its pybind searcher
    with our row numbers (never ``docids``, which it would pickle), and the rows it reports are
    checked against ours.

    Rebalancing (see the module docstring) follows ``rebalance`` and ``rebalance_fraction``.

    Args:
        index_dir: the index directory (its ``CURRENT`` version is the base).
        upsert_ids: ids to add or replace.
        upsert_titles: their titles.
        upsert_texts: their texts.
        upsert_vectors: [len(upsert_ids), dim] float embeddings (L2-normalised here).
        upsert_windows: the upserts' window vectors, stored with the write
            (:mod:`dssm.index.written_windows`; ignored by a version without ``windows/``).
        delete_ids: ids to delete; each must be in the base version.
        rebalance: force (``True``) or forbid (``False``) a rebalance; ``None`` decides as above.
        rebalance_fraction: drift threshold for the automatic rebalance, in (0, 1].
        min_recall: recall@10 gate; default the base build's ``min_recall``.
        version: new version name; default :func:`new_version_name`.
        keep_versions: after publishing, keep this many newest versions and any a reader holds
            (:func:`dssm.index.versions.retain_versions`; 0 keeps every version).
        max_delta: live delta documents + tombstoned base rows a version may hold before a write
            compacts; default :func:`dssm.index.delta.default_max_delta` of the base's size; 0 compacts
            every write.

    Returns:
        The :class:`UpdateResult`.

    Raises:
        InputError: an id to delete is not in the index, duplicate ids, wrong shapes, non-finite vectors,
            or the update would leave no documents.
        ConfigError: recall below ``min_recall``, or ScaNN's row bookkeeping disagrees with ours.
    """
    index_dir = checked_update_settings(index_dir, rebalance_fraction=rebalance_fraction, keep_versions=keep_versions)
    ids, deletes = list(upsert_ids), list(delete_ids)
    with IndexWriteLock(index_dir):
        tick = time.perf_counter()
        base = current_version_dir(index_dir)
        manifest = read_manifest(base)
        vectors = checked_vectors(ids, upsert_titles, upsert_texts, upsert_vectors, deletes, int(manifest["dim"]))
        docs = [Doc(i, t or "", x or "") for i, t, x in zip(ids, upsert_titles, upsert_texts, strict=True)]
        version = version or new_version_name()
        view, replaced = _killed(base, manifest, ids=ids, deletes=deletes)
        timings = {"load": time.perf_counter() - tick}
        limit = default_max_delta(view.layout.base_documents) if max_delta is None else max_delta
        pending = pending_rows(view.dead, view.layout.base_documents) + len(docs)
        counts = {"deleted": len(deletes), "inserted": len(ids) - replaced, "replaced": replaced}
        if rebalance is not True and pending <= limit:
            result = _delta_update(index_dir, base, manifest, view, docs=docs, vectors=vectors, version=version,
                                   counts=counts, timings=timings, windows=upsert_windows)
        else:
            result = _compact(index_dir, base, view, docs=docs, vectors=vectors, version=version, counts=counts,
                              rebalance=rebalance, rebalance_fraction=rebalance_fraction, min_recall=min_recall,
                              timings=timings, windows=upsert_windows)
    retain_versions(index_dir, keep_versions)  # past the lock: its deletes need it only to rename
    return result


def compact_index(index_dir: str | Path, *, rebalance: bool | None = None,
                  rebalance_fraction: float = DEFAULT_REBALANCE_FRACTION, min_recall: float | None = None,
                  keep_versions: int = DEFAULT_KEEP_VERSIONS,
                  staged: Callable[[Path], Any] | None = None) -> UpdateResult | None:
    """Fold the live version's delta segments and tombstones into a new base (a new version).

    What a write past ``max_delta`` does on its own (:func:`update_index`); the HTTP service runs it
    in the background once the delta passes half of that. Unlike that write, it holds the writers'
    lock only to read the live version and to publish: writes made while it builds the new base are
    carried onto it (:func:`dssm.index.delta.rebase_writes`) as a delta of their own.

    ``staged`` is called with the new base's complete, durable version directory before the lock is
    taken (the service loads its base then: the published version links the same files, so a reader
    that has loaded them swaps it in without the seconds of ScaNN load and hashing a 1M base costs).

    Returns:
        The :class:`UpdateResult`, or ``None`` if the live version has no delta and no tombstones, if
        another process is compacting this index, or if a full build or another compaction replaced
        its base meanwhile (this one is then moot).
    """
    index_dir = checked_update_settings(index_dir, rebalance_fraction=rebalance_fraction, keep_versions=keep_versions)
    with CompactionSlot(index_dir) as slot:
        if not slot.acquired:
            return None
        return _compact_now(index_dir, rebalance=rebalance, rebalance_fraction=rebalance_fraction,
                            min_recall=min_recall, keep_versions=keep_versions, staged=staged)


def _compact_now(index_dir: Path, *, rebalance: bool | None, rebalance_fraction: float, min_recall: float | None,
                 keep_versions: int, staged: Callable[[Path], Any] | None) -> UpdateResult | None:
    """:func:`compact_index`'s work, in the compaction slot."""
    tick = time.perf_counter()
    with IndexWriteLock(index_dir):
        base = current_version_dir(index_dir)
        # Writes go on meanwhile and each prunes old versions: the lease keeps this one's files
        # until the compaction has read them (at 8 writes/s it outlives retention by about a second).
        lease = VersionLease(base)
    try:  # a published version never changes: read it past the lock (0.25 s at 1M that writes waited)
        view = LiveView.open(base, read_manifest(base))
        return _compact_from(index_dir, base, view, rebalance=rebalance, rebalance_fraction=rebalance_fraction,
                             min_recall=min_recall, keep_versions=keep_versions, tick=tick, staged=staged)
    finally:
        lease.release()


def _compact_from(index_dir: Path, base: Path, view: LiveView, *, rebalance: bool | None, rebalance_fraction: float,
                  min_recall: float | None, keep_versions: int, tick: float,
                  staged: Callable[[Path], Any] | None) -> UpdateResult | None:
    """Fold ``base``'s delta into a new base and publish it (rebased over writes published meanwhile)."""
    if view.layout.plain:
        return None
    version, timings = new_version_name(), {"load": time.perf_counter() - tick}
    manifest = verify_manifest(base, kind="index", skip=_LINKED_ONLY)
    dim = int(manifest["dim"])
    with staging(index_dir, version) as root:
        (stage := root / "version").mkdir()
        changes, state = _fold(base, stage, manifest, view, docs=[], vectors=np.zeros((0, dim), np.float32),
                               version=version, rebalance=rebalance, rebalance_fraction=rebalance_fraction,
                               min_recall=min_recall, timings=timings, windows=None)
        layout: SegmentLayout | None = SegmentLayout(base_version=version, base_documents=changes.final)
        # Durable before the writers' lock: synced under it, the new base (~1.2 GB at 1M) stalled writes 4-5 s.
        tick = time.perf_counter()
        fsync_tree(stage)
        timings["sync"], tick = time.perf_counter() - tick, time.perf_counter()
        if staged is not None:
            staged(stage)
            timings["staged"], tick = time.perf_counter() - tick, time.perf_counter()
        with IndexWriteLock(index_dir):
            live = current_version_dir(index_dir)
            if live.name != base.name:
                (rebased := root / "rebased").mkdir()
                layout = rebase_writes(stage, rebased, view, live, version=version, read=base)
                if layout is None:
                    return None
                stage = rebased
            published = publish_version(index_dir, stage, version)
        timings["locked"] = time.perf_counter() - tick
        retain_versions(index_dir, keep_versions)
    return UpdateResult(index_dir=index_dir, base_version=base.name, version=version, version_dir=published,
                        documents=layout.live, deleted=0, inserted=0, replaced=0, rebalanced=state.reason is not None,
                        rebalance_reason=state.reason, recall_at_10=state.recall,
                        rows_changed_since_build=state.history["rows_changed_since_build"], seconds=timings,
                        delta_documents=layout.delta_rows, tombstones=layout.tombstones)


def _killed(base: Path, manifest: dict[str, Any], *, ids: list[str], deletes: list[str]) -> tuple[LiveView, int]:
    """The live view of ``base`` with the deleted and the upserted ids' rows tombstoned, and how many
    upserts replace a live document."""
    view = LiveView.open(base, manifest)
    for doc_id in deletes:
        if not view.kill(doc_id):
            raise InputError(f"document id {doc_id!r} is not in index version {base.name}; nothing was deleted")
    return view, sum(view.kill(doc_id) for doc_id in ids)


def _delta_update(index_dir: Path, base: Path, manifest: dict[str, Any], view: LiveView, *, docs: list[Doc],
                  vectors: np.ndarray, version: str, counts: dict[str, int], timings: dict[str, float],
                  windows: WindowRows | None) -> UpdateResult:
    """Publish the write as a delta segment + tombstones over ``base`` (the caller holds the lock)."""
    with staging(index_dir, version) as root:
        (stage := root / "version").mkdir()
        stage_written_windows(base, stage, windows, version=version, fold=False)
        written = write_delta(base, stage, manifest, view, docs=docs, vectors=vectors, version=version,
                              updates=counts, timings=timings)
        published = publish_version(index_dir, stage, version)
    history = manifest.get("updates") or {}
    base_live = written.layout.base_documents - int(view.dead[:written.layout.base_documents].sum())
    return UpdateResult(
        index_dir=index_dir, base_version=base.name, version=version, version_dir=published,
        documents=written.layout.live, **counts, rebalanced=False, rebalance_reason=None,
        recall_at_10=float(manifest["recall@10"]),
        rows_changed_since_build=int(history.get("rows_changed_since_build", 0)), seconds=timings,
        compacted=False, delta_documents=written.layout.live - base_live, tombstones=written.layout.tombstones)


def _compact(index_dir: Path, base: Path, view: LiveView, *, docs: list[Doc], vectors: np.ndarray, version: str,
             counts: dict[str, int], rebalance: bool | None, rebalance_fraction: float, min_recall: float | None,
             timings: dict[str, float], windows: WindowRows | None) -> UpdateResult:
    """Fold base + delta + the write into a new base segment and publish it (the caller holds the lock)."""
    manifest = verify_manifest(base, kind="index", skip=_LINKED_ONLY)  # a compaction reads all of the base
    with staging(index_dir, version) as root:
        (stage := root / "version").mkdir()
        changes, state = _fold(base, stage, manifest, view, docs=docs, vectors=vectors, version=version,
                               rebalance=rebalance, rebalance_fraction=rebalance_fraction, min_recall=min_recall,
                               timings=timings, windows=windows)
        published = publish_version(index_dir, stage, version)
    return UpdateResult(index_dir=index_dir, base_version=base.name, version=version, version_dir=published,
                        documents=changes.final, **counts, rebalanced=state.reason is not None,
                        rebalance_reason=state.reason, recall_at_10=state.recall,
                        rows_changed_since_build=state.history["rows_changed_since_build"], seconds=timings)


def _fold(base: Path, stage: Path, manifest: dict[str, Any], view: LiveView, *, docs: list[Doc], vectors: np.ndarray,
          version: str, rebalance: bool | None, rebalance_fraction: float, min_recall: float | None,
          timings: dict[str, float], windows: WindowRows | None) -> tuple[_RowChanges, _ScannState]:
    """Stage base + delta + a write as a new base segment in ``stage`` (with its manifest; not published)."""
    folded, vectors, base_deletes = compaction_ops(view, docs, vectors)
    for child in base.iterdir():
        if child.name not in _REGENERATED:
            link_tree(child, stage / child.name)
    changes = _apply_rows(base, stage, manifest, ids=[d.id for d in folded], titles=[d.title for d in folded],
                          texts=[d.text for d in folded], vectors=vectors, deletes=base_deletes, timings=timings)
    state = _update_scann(base, manifest, changes, vectors, rebalance=rebalance, rebalance_fraction=rebalance_fraction,
                          min_recall=min_recall, version=version, timings=timings)
    _write_scann_and_bm25(stage, state, base=base, changes=changes, docs=folded, timings=timings)
    stage_written_windows(base, stage, windows, version=version, fold=True)
    write_manifest(stage, kind="index", linked_from=base, extra=_updated_manifest(
        manifest, base=base, version=version, changes=changes, state=state, deletes=len(base_deletes),
        rebalance_fraction=rebalance_fraction, timings=timings))
    return changes, state


def _write_scann_and_bm25(stage: Path, state: _ScannState, *, base: Path, changes: _RowChanges,
                          docs: list[Doc], timings: dict[str, float]) -> None:
    """ScaNN's files and the BM25 state into ``stage``: the base's state carried over with only
    ``docs`` (the folded upserts) tokenised, or rebuilt from the updated store for an older base."""
    # deferred: bm25s and PyStemmer, imported only when this runs
    from dssm.bm25 import update_bm25_state, write_bm25_state

    (stage / SCANN_DIR).mkdir()
    state.searcher.serialize(str(stage / SCANN_DIR), relative_path=True)
    state.probe.save(stage / PROBE_DIR)
    share_scann_dataset(stage, atol=1e-6)
    tick = time.perf_counter()
    source, new_rows = changes.sources
    if not update_bm25_state(base, stage, source=source, new_docs={row: docs[j] for row, j in new_rows.items()}):
        write_bm25_state(stage, (doc for _, doc in DocStore(stage / DOCS_DB).iter_all()))
    timings["bm25"] = time.perf_counter() - tick


@dataclass
class _RowChanges:
    """What an update did to the rows (ScaNN must do the same): see :func:`_apply_rows`."""

    matrix: np.ndarray  # [final, dim] float32, the new embeddings.npy
    size: int  # rows left after the deletes
    final: int  # rows after the appends
    delete_rows: list[int]
    moved_from: list[int]
    upsert_rows: list[int | None]  # per upsert: its existing row, or None for an append
    new_rows: list[int]  # indices (into the upserts) of the appended documents
    replaced: int

    @functools.cached_property  # the probe and the BM25 state both need it
    def sources(self) -> tuple[np.ndarray, dict[int, int]]:
        """Per new row, the base row whose document it still holds (or -1), and ``{new row: upsert index}``."""
        source = np.arange(self.size + len(self.delete_rows), dtype=np.int64)
        for row, last in zip(self.delete_rows, self.moved_from, strict=True):
            source[row] = source[last]
        upserted, appended = {}, self.size
        for j, row in enumerate(self.upsert_rows):
            upserted[appended if row is None else row] = j
            appended += row is None
        source = np.concatenate([source[:self.size], np.full(self.final - self.size, -1, np.int64)])
        source[list(upserted)] = -1
        return source, upserted


def _apply_rows(base: Path, stage: Path, manifest: dict[str, Any], *, ids: list[str], titles: list[str],
                texts: list[str], vectors: np.ndarray, deletes: list[str], timings: dict[str, float]) -> _RowChanges:
    """Apply deletes, then upserts, to a copy of the doc store and the matrix with ScaNN's row rules.

    A delete moves the last row into the hole, an upsert of a known id overwrites its row, a new id is
    appended; writes ``docs.sqlite`` and ``embeddings.npy`` into ``stage``.
    """
    tick = time.perf_counter()
    shutil.copyfile(base / DOCS_DB, stage / DOCS_DB)
    matrix = load_npy(base / EMBEDDINGS)  # a private, writable copy
    timings["load"] += time.perf_counter() - tick
    tick = time.perf_counter()
    conn = sqlite3.connect(stage / DOCS_DB)
    conn.execute("PRAGMA journal_mode = OFF")
    size = SegmentLayout.of(manifest, base.name).base_documents
    delete_rows: list[int] = []
    moved_from: list[int] = []
    for doc_id in deletes:
        found = conn.execute("SELECT row FROM docs WHERE id = ?", (doc_id,)).fetchone()
        if found is None:
            raise InputError(f"document id {doc_id!r} is not in index version {base.name}; nothing was deleted")
        row, last = int(found[0]), size - 1
        conn.execute("DELETE FROM docs WHERE row = ?", (row,))
        if row != last:
            conn.execute("UPDATE docs SET row = ? WHERE row = ?", (row, last))
            matrix[row] = matrix[last]
        delete_rows.append(row)
        moved_from.append(last)
        size -= 1
    upsert_rows: list[int | None] = []
    new_rows: list[int] = []
    for j, doc_id in enumerate(ids):
        found = conn.execute("SELECT row FROM docs WHERE id = ?", (doc_id,)).fetchone()
        if found is None:
            conn.execute("INSERT INTO docs (row, id, title, text) VALUES (?, ?, ?, ?)",
                         (size + len(new_rows), doc_id, titles[j] or "", texts[j] or ""))
            upsert_rows.append(None)
            new_rows.append(j)
        else:
            row = int(found[0])
            conn.execute("UPDATE docs SET title = ?, text = ? WHERE row = ?", (titles[j] or "", texts[j] or "", row))
            matrix[row] = vectors[j]
            upsert_rows.append(row)
    final = size + len(new_rows)
    if final == 0:
        raise InputError(f"the update would delete every document of index version {base.name}")
    conn.commit()
    conn.close()
    fsync_file(stage / DOCS_DB)
    matrix = np.concatenate([matrix[:size], vectors[new_rows]]) if new_rows else matrix[:size]
    np.save(stage / EMBEDDINGS, matrix, allow_pickle=False)
    timings["store"] = time.perf_counter() - tick
    return _RowChanges(matrix=matrix, size=size, final=final, delete_rows=delete_rows, moved_from=moved_from,
                       upsert_rows=upsert_rows, new_rows=new_rows, replaced=len(ids) - len(new_rows))


@dataclass
class _ScannState:
    """The updated (or rebuilt) ScaNN searcher, its parameters, recall and the update history."""

    searcher: Any
    params: dict[str, Any]
    recall: float
    reason: str | None  # why it was rebalanced, or None
    history: dict[str, Any]
    config: ScannConfig  # the base build's, read from its manifest
    probe: RecallProbe  # saved beside the new base, for the next compaction to carry


def _update_scann(base: Path, manifest: dict[str, Any], changes: _RowChanges, vectors: np.ndarray, *,
                  rebalance: bool | None, rebalance_fraction: float, min_recall: float | None, version: str,
                  timings: dict[str, float]) -> _ScannState:
    """Mutate the base's ScaNN searcher like the rows, or rebalance (rebuild it), and pass the recall gate."""
    config_dict = dict(manifest.get("scann_config") or {})
    config = ScannConfig(**{k: v for k, v in config_dict.items()
                            if k in {f.name for f in dataclasses.fields(ScannConfig)}})
    if min_recall is None:
        min_recall = config.min_recall
    history = dict(manifest.get("updates") or {})
    at_build = int(history.get("documents_at_build", SegmentLayout.of(manifest, base.name).base_documents))
    changed = int(history.get("rows_changed_since_build", 0)) + len(changes.delete_rows) + len(changes.upsert_rows)
    params = dict(manifest["scann"])
    reason: str | None = None
    if rebalance:
        reason = "requested"
    elif rebalance is None:
        if changed > rebalance_fraction * at_build:
            reason = f"{changed} rows changed since the last full build of {at_build} (> {rebalance_fraction:.0%})"
        elif config.mode == "auto" and resolve_scann_params(config, changes.final)["mode"] != params["mode"]:
            reason = f"auto mode picks {resolve_scann_params(config, changes.final)['mode']} for {changes.final} " \
                     "documents"
    tick = time.perf_counter()
    probe = carried_probe(base, changes.matrix, changes.sources[0], sample=config.recall_sample, seed=config.seed)
    timings["exact"] = time.perf_counter() - tick
    searcher, recall = None, 0.0
    if reason is None:
        searcher, recall = _mutate_scann(base, changes, vectors, probe, params, config, history=history,
                                         manifest=manifest, min_recall=min_recall, timings=timings)
        if recall < min_recall and rebalance is None:
            reason = f"recall@10 {recall:.4f} below {min_recall} after the in-place update"
    if reason is not None:
        tick = time.perf_counter()
        params = resolve_scann_params(config, changes.final)
        searcher = build_scann(changes.matrix, params)
        timings["scann_rebuild"] = time.perf_counter() - tick
        recall = _gate(searcher, probe, params, config, min_recall)
        history = {"documents_at_build": changes.final, "rows_changed_since_build": 0, "last_build": version,
                   "recall_at_build": recall}
    else:
        history = {"documents_at_build": at_build, "rows_changed_since_build": changed,
                   "last_build": history.get("last_build", base.name),
                   "recall_at_build": history.get("recall_at_build", manifest["recall@10"])}
    if recall < min_recall:
        raise ConfigError(f"ScaNN recall@10 {recall:.4f} after the update is below {min_recall} with {params}"
                          + ("" if rebalance is not False else "; rebalancing was forbidden"))
    return _ScannState(searcher=searcher, params=params, recall=recall, reason=reason, history=history,
                       config=config, probe=probe)


def _gate(searcher: Any, probe: RecallProbe, params: dict[str, Any], config: ScannConfig, min_recall: float,
          measured: float | None = None, first_growth: float = 1.25) -> float:
    """Recall of the searcher tuned up to ``min_recall`` (``params`` updated; :func:`tune_search`)."""
    return tune_search(searcher, probe, params, tune_leaves=config.num_leaves_to_search == 0, min_recall=min_recall,
                       measured=measured, first_growth=first_growth)


def _mutate_scann(base: Path, changes: _RowChanges, vectors: np.ndarray, probe: RecallProbe, params: dict[str, Any],
                  config: ScannConfig, *, history: dict[str, Any], manifest: dict[str, Any], min_recall: float,
                  timings: dict[str, float]) -> tuple[Any, float]:
    """The base searcher with the same deletes and upserts as the rows (checked row for row), and its recall."""
    scann_ops_pybind = scann_pybind()  # deferred: ScaNN, imported on first use (without TensorFlow)

    tick = time.perf_counter()
    searcher = scann_ops_pybind.load_searcher(str(base / SCANN_DIR), assets_backcompat_shim=False)
    if changes.delete_rows:
        got = [int(r) for r in searcher.searcher.delete(changes.delete_rows)]
        if got != changes.moved_from:
            raise ConfigError(f"ScaNN moved rows {got[:5]}... on delete, we expected {changes.moved_from[:5]}...")
    if changes.upsert_rows:
        got = [int(r) for r in searcher.searcher.upsert(changes.upsert_rows, vectors, 1)]
        expected, appended = [], changes.size
        for row in changes.upsert_rows:
            expected.append(appended if row is None else row)
            appended += row is None
        if got != expected:
            raise ConfigError(f"ScaNN placed upserts at rows {got[:5]}..., we expected {expected[:5]}...")
    if int(searcher.size()) != changes.final:
        raise ConfigError(f"ScaNN holds {searcher.size()} points after the update, the store {changes.final}")
    timings["scann_update"] = time.perf_counter() - tick
    recall = probe.recall(searcher, leaves_to_search=params.get("num_leaves_to_search"))
    # Keep the recall the last full build reached (within 0.01), not just the gate: points added to
    # stale partitions cost recall first, and searching more partitions is a query-time setting,
    # cheaper than re-partitioning.
    target = max(min_recall, min(1.0, float(history.get("recall_at_build", manifest["recall@10"]))) - 0.01)
    if recall < target and params["mode"] == "tree_ah" and config.num_leaves_to_search == 0:
        recall = _gate(searcher, probe, params, config, target, measured=recall, first_growth=MUTATED_FIRST_GROWTH)
    return searcher, recall


def _updated_manifest(manifest: dict[str, Any], *, base: Path, version: str, changes: _RowChanges,
                      state: _ScannState, deletes: int, rebalance_fraction: float,
                      timings: dict[str, float]) -> dict[str, Any]:
    """The new version's manifest keys: the base's, with counts, ScaNN, recall and the update history."""
    new_manifest = {k: v for k, v in manifest_extra(manifest).items() if k != SEGMENTS_KEY}
    new_manifest.update(
        version=version,
        counts={"documents": changes.final, "zero_embeddings": int((~changes.matrix.any(axis=1)).sum())},
        scann=state.params,
        **{"recall@10": state.recall, "recall_sample": min(state.config.recall_sample, changes.final)},
        updates={**state.history, "base_version": base.name, "deleted": deletes,
                 "inserted": len(changes.new_rows), "replaced": changes.replaced,
                 "rebalanced": state.reason is not None,
                 "rebalance_reason": state.reason, "rebalance_fraction": rebalance_fraction,
                 "seconds": {k: round(v, 3) for k, v in timings.items()}},
    )
    return new_manifest
