"""Writes as delta segments: a write costs what it changes (issue 14).

A write (upserts and deletes, already checked by :func:`dssm.index.update_index`) resolves each id
against the live version (newest delta segment first, then the base, tombstones skipped), tombstones
the rows it deletes or replaces, and adds its upserts as one new delta segment. The new version
hard-links the base and the earlier segments, and writes only the new segment, ``tombstones.npy``
and its manifest (whose checksums of linked files are carried over by inode).

**Merge policy** (size-tiered, as Lucene's and LSM trees'; :func:`dssm.index.segments.merge_start`):
when the newest delta segments hold :data:`~dssm.index.segments.MERGE_FACTOR` of one size tier, their
live rows and the write's upserts become one segment of the next tier. Segments stay few (a handful
per tier) and a document is rewritten a few times over its life, not with the whole delta every few
writes.

**Compaction**: when the delta would pass ``max_delta`` rows (live delta documents plus tombstoned
base rows; default :func:`default_max_delta`), the write is folded into the base instead:
:func:`compaction_ops` turns base + delta + the write into upserts and deletes of the base, which the
full update path applies to ScaNN (mutated, or rebuilt by the rebalance rules) and the BM25 state.

What a delta write verifies: the files it reads to build the next version (the delta segments and
``tombstones.npy``, small); the base's files are only looked up (ids in ``docs.sqlite``) and linked
forward with their checksums, and are verified by whoever loads them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dssm.artifacts import manifest_extra, read_manifest, verify_manifest, write_manifest
from dssm.errors import InputError
from dssm.index.docstore import Doc, DocStore
from dssm.index.files import link_tree
from dssm.index.layout import DOCS_DB, WINDOWS_WRITTEN_DIR
from dssm.index.load import delta_segments, loaded_delta_segments, remember_delta_segment
from dssm.index.segments import (
    DELTA_DIR,
    MAX_SEGMENTS,
    SEGMENTS_KEY,
    TOMBSTONES,
    DeltaSegment,
    SegmentedDocs,
    SegmentLayout,
    merge_start,
    read_tombstones,
)
from dssm.index.written_windows import carry_written_windows

__all__ = ["DeltaWrite", "LiveView", "default_max_delta", "compaction_ops", "write_delta",
           "rebase_writes"]


def default_max_delta(base_documents: int) -> int:
    """Delta rows (live delta documents + tombstoned base rows) a version may hold before compaction.

    1% of the base, at least 20,000: exact search over 20k rows of 128 floats adds ~0.4 ms to a query
    (2 ms to a batch of 8, one thread), and a base that lost 1% of its rows to tombstones asks ScaNN
    for a few more neighbours. The floor sets how often a small index compacts, and gives the
    background compaction (started at half of it) room for the writes that arrive while it runs: a
    100k compaction is ~3.5 s of CPU and 4-6 s of wall time beside 8 searching clients on 2 cores, so
    with a 10,000 floor, at 1,000 documents/s, the write that reached the limit sometimes came first
    and compacted inline, and compactions took a third of the machine (``bench/write_http.py``).
    """
    return max(20_000, base_documents // 100)


@dataclass
class LiveView:
    """The live version as a write sees it: its layout, delta segments, tombstones and id lookup."""

    layout: SegmentLayout
    deltas: list[DeltaSegment]
    dead: np.ndarray  # [rows] bool, updated by the write
    docs: SegmentedDocs

    @classmethod
    def open(cls, version_dir: Path, manifest: dict[str, Any]) -> LiveView:
        """Read a version's delta segments and tombstones (checked against its manifest)."""
        layout = SegmentLayout.of(manifest, version_dir.name)
        known = loaded_delta_segments(version_dir, layout)  # by this process's reader or last write
        small = {DELTA_DIR, TOMBSTONES}
        verify_manifest(version_dir, kind="index",
                        skip=tuple({rel.split("/", 1)[0] for rel in manifest["files"]} - small) + tuple(known))
        deltas = list(delta_segments(version_dir, layout, known))
        dead = read_tombstones(version_dir, layout)
        docs = SegmentedDocs(DocStore(version_dir / DOCS_DB, size=layout.base_documents), deltas, dead)
        return cls(layout=layout, deltas=deltas, dead=dead, docs=docs)

    def kill(self, doc_id: str) -> bool:
        """Tombstone the live row of ``doc_id``; whether it had one."""
        row = self.docs.row_of(doc_id)
        if row is None:
            return False
        self.dead[row] = True
        return True

    def live_delta(self, first: int = 0) -> tuple[list[Doc], np.ndarray]:
        """The live documents of the delta segments from ``first`` on and their [n, dim] embeddings, oldest first."""
        docs, parts = [], []
        offset = self.layout.base_documents + sum(len(segment) for segment in self.deltas[:first])
        for segment in self.deltas[first:]:
            keep = np.flatnonzero(~self.dead[offset:offset + len(segment)])
            docs.extend(segment.docs[i] for i in keep)
            parts.append(segment.matrix[keep])
            offset += len(segment)
        dim = self.deltas[0].matrix.shape[1] if self.deltas else 0
        return docs, np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


@dataclass(frozen=True)
class DeltaWrite:
    """What a delta write staged: the new version's layout, and whether it merged the delta segments."""

    layout: SegmentLayout
    merged: bool


def compaction_ops(view: LiveView, docs: list[Doc], vectors: np.ndarray) -> tuple[list[Doc], np.ndarray, list[str]]:
    """Base + delta + a write (its kills already applied to ``view``) as upserts and deletes of the base.

    Returns:
        (upserts, their [n, dim] vectors, ids to delete from the base): every live delta document and
        the write's upserts (a base id among them is replaced in place), and the ids of tombstoned base
        rows that no upsert brings back.
    """
    delta_docs, delta_vectors = view.live_delta()
    upserts = delta_docs + docs
    matrix = np.concatenate([delta_vectors.reshape(-1, vectors.shape[1]), vectors])
    upserted = {d.id for d in upserts}
    dead_base = np.flatnonzero(view.dead[:view.layout.base_documents]).tolist()
    deletes = [d.id for d in view.docs.base.get(dead_base) if d.id not in upserted]
    return upserts, matrix, deletes


def _first_merged(view: LiveView, new_rows: int) -> int:
    """The first delta segment a write of ``new_rows`` upserts merges (``len(segments)``: none)."""
    count = len(view.layout.delta)
    if not new_rows:
        return count  # a delete adds no segment, so it merges none
    offset, live = view.layout.base_documents, []
    for _, rows in view.layout.delta:
        live.append(int((~view.dead[offset:offset + rows]).sum()))
        offset += rows
    first = merge_start(live + [new_rows])
    # The tiers bound the count for any sane mix of write sizes; past the cap, merge them all.
    return 0 if first + 1 > MAX_SEGMENTS else first


def write_delta(base: Path, stage: Path, manifest: dict[str, Any], view: LiveView, *, docs: list[Doc],
                vectors: np.ndarray, version: str, updates: dict[str, Any], timings: dict[str, float]) -> DeltaWrite:
    """Stage the next version of ``base``: its segments linked, ``docs`` as a new segment, the tombstones.

    ``view`` has the write's kills applied. Writes the version into ``stage`` (an empty directory)
    with its manifest (``updates``: what the write did, for the manifest's ``updates`` record); the
    caller publishes it.

    Raises:
        InputError: the write would leave no live document.
    """
    tick = time.perf_counter()
    layout = view.layout
    first = _first_merged(view, len(docs))
    merged = first < len(layout.delta)
    offset = layout.base_documents + sum(rows for _, rows in layout.delta[:first])
    if merged:
        old_docs, old_vectors = view.live_delta(first)
        docs, vectors = old_docs + docs, np.concatenate([old_vectors, vectors])
    segments, dead = list(layout.delta[:first]), view.dead[:offset]
    kept = {name for name, _ in segments}
    for child in base.iterdir():
        if child.name == DELTA_DIR:
            for name in kept:
                link_tree(child / name, stage / DELTA_DIR / name)
        elif child.name not in ("manifest.json", TOMBSTONES, WINDOWS_WRITTEN_DIR):  # the caller stages those
            link_tree(child, stage / child.name)
    if docs:
        name = f"d-{version}"
        segment = DeltaSegment(name, docs, np.ascontiguousarray(vectors, dtype=np.float32))
        segment.write(stage / DELTA_DIR / name)
        remember_delta_segment(stage, segment)
        segments.append((name, len(docs)))
        dead = np.concatenate([dead, np.zeros(len(docs), bool)])
    tombstones = np.flatnonzero(dead).astype(np.int64)
    if tombstones.size:
        np.save(stage / TOMBSTONES, tombstones, allow_pickle=False)
    new_layout = SegmentLayout(base_version=layout.base_version, base_documents=layout.base_documents,
                               delta=tuple(segments), tombstones=int(tombstones.size))
    if new_layout.live == 0:
        raise InputError(f"the update would delete every document of index version {base.name}")
    timings["delta"] = time.perf_counter() - tick
    extra = manifest_extra(manifest)
    extra.update(version=version, counts={**manifest["counts"], "documents": new_layout.live},
                 **{SEGMENTS_KEY: new_layout.to_dict()})
    extra["updates"] = {**(manifest.get("updates") or {}), **updates, "base_version": base.name, "delta_write": True,
                        "merged_segments": merged, "seconds": {k: round(v, 4) for k, v in timings.items()}}
    write_manifest(stage, kind="index", linked_from=base, extra=extra)
    return DeltaWrite(layout=new_layout, merged=merged)


def rebase_writes(compacted: Path, out: Path, view: LiveView, live: Path, *, version: str,
                  read: Path) -> SegmentLayout | None:
    """Stage in ``out`` the compacted base (staged in ``compacted`` from ``view``) plus the writes that
    were published since ``view``'s version (the live version is now ``live``).

    A compaction builds its base from the version it read, without the writers' lock; writes that
    came meanwhile added delta segments and tombstones over the *old* base. Each id they touched
    (a base or delta row tombstoned since, or a live delta document that ``view`` did not hold in the
    same form) gets its row in the compacted base tombstoned and, if it is live, its document in one
    new delta segment. The caller has made ``compacted`` durable (before taking the lock: its files get
    a second link here, and publishing skips linked files as already durable), holds the writers' lock
    and publishes ``out``. ``read`` is ``view``'s version: the stores of written windows that writes
    added after it are carried too (:func:`dssm.index.written_windows.carry_written_windows`).

    Returns:
        The staged version's layout, or ``None`` if ``live`` no longer shares ``view``'s base (a full
        build or another compaction replaced it: the compaction is moot).
    """
    now = LiveView.open(live, read_manifest(live))
    if (now.layout.base_version, now.layout.base_documents) != (view.layout.base_version, view.layout.base_documents):
        return None
    rows = view.layout.base_documents
    touched = {d.id for d in view.docs.base.get(np.flatnonzero(now.dead[:rows] & ~view.dead[:rows]).tolist())}
    old_docs, old_vectors = view.live_delta()
    before = {d.id: (d, old_vectors[i]) for i, d in enumerate(old_docs)}
    touched.update(doc_id for doc_id in before if now.docs.row_of(doc_id) is None)
    new_docs, new_vectors = now.live_delta()
    carried = [i for i, d in enumerate(new_docs)
               if d.id not in before or before[d.id][0] != d or not np.array_equal(before[d.id][1], new_vectors[i])]
    touched.update(new_docs[i].id for i in carried)
    store = DocStore(compacted / DOCS_DB)
    tombstones = np.asarray(sorted(r for r in map(store.row_of, touched) if r is not None), dtype=np.int64)
    for child in compacted.iterdir():
        if child.name != "manifest.json":
            link_tree(child, out / child.name)
    carry_written_windows(out, read=read, live=live)
    segments = []
    if carried:
        name = f"d-{version}"
        DeltaSegment(name, [new_docs[i] for i in carried], new_vectors[carried]).write(out / DELTA_DIR / name)
        segments.append((name, len(carried)))
    if tombstones.size:
        np.save(out / TOMBSTONES, tombstones, allow_pickle=False)
    layout = SegmentLayout(base_version=version, base_documents=len(store), delta=tuple(segments),
                           tombstones=int(tombstones.size))
    manifest = read_manifest(compacted)
    extra = manifest_extra(manifest)
    extra.update(counts={**manifest["counts"], "documents": layout.live}, **{SEGMENTS_KEY: layout.to_dict()})
    extra["updates"] = {**manifest["updates"], "rebased_onto": live.name, "writes_carried": len(touched)}
    write_manifest(out, kind="index", linked_from=compacted, extra=extra)
    return layout
