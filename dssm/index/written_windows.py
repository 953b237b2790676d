"""Window vectors of documents written after the build (issue 11's windows with issue 14's writes).

A version's ``windows/`` (:mod:`dssm.windows`) holds the windows of the documents ``dssm index``
embedded. A write through :func:`dssm.index.writes.upsert_documents` embeds its documents' windows
with the same document tower and stores them beside, as ``windows_written/<store>/`` (each a
:class:`dssm.windows.WindowRows` keyed by text, like ``windows/``), so search finds a written
document's windows instead of embedding them (before, they were embedded at search time, per process,
and only the last :data:`dssm.windows.COMPUTED_TEXTS` texts were kept).

Stores follow the delta segments' size-tiered policy (:func:`dssm.index.segments.merge_start`): a
write links the earlier stores forward and adds one; when the newest stores fill a tier they become
one, so a version holds a handful whatever the number of writes. A compaction folds them all into
one. Texts of documents deleted or replaced since stay until the next full build (``dssm index``
starts without them); they cost bytes, never a wrong score, since a store is looked up by text.
A write given raw vectors (:func:`dssm.index.update_index`) has no tower and stores none: its
documents' windows are embedded at search time, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dssm.artifacts import read_manifest
from dssm.config import config_from_dict
from dssm.index.files import link_tree
from dssm.index.layout import MODEL_DIR, WINDOWS_DIR, WINDOWS_WRITTEN_DIR
from dssm.index.segments import merge_start
from dssm.windows import WindowConfig, WindowRows

__all__ = ["written_window_dirs", "embed_written_windows", "stage_written_windows", "carry_written_windows"]


def written_window_dirs(version_dir: Path) -> list[Path]:
    """The version's stores of written documents' windows, oldest first (their names sort by version)."""
    root = version_dir / WINDOWS_WRITTEN_DIR
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def embed_written_windows(version_dir: Path, texts: Sequence[str],
                          embed_documents: Callable[[list[str]], np.ndarray]) -> WindowRows | None:
    """``texts``' windows, cut as the version's ``windows/`` was, or ``None`` when the version stores no
    windows (or no text is longer than one window)."""
    if not (version_dir / WINDOWS_DIR).is_dir():
        return None
    config = config_from_dict(WindowConfig, read_manifest(version_dir / WINDOWS_DIR).get("config", {}))
    store = WindowRows.embed(texts, embed_documents, config)
    return store if len(store) else None


def stage_written_windows(base: Path, stage: Path, added: WindowRows | None, *, version: str, fold: bool) -> None:
    """Stage ``stage/windows_written``: ``base``'s stores linked forward, with ``added`` as a new store.

    Args:
        base: the version the write reads.
        stage: the new version's staging directory (its manifest not yet written).
        added: the write's documents' windows (:func:`embed_written_windows`), or ``None``.
        version: the new version's name (a new store is named ``w-<version>``).
        fold: merge every store and ``added`` into one (a compaction); otherwise the newest ones merge
            when they fill a size tier.

    Raises:
        ChecksumError: a store to merge is corrupt or was made for another model (named).
    """
    dirs = written_window_dirs(base)
    if not (base / WINDOWS_DIR).is_dir():  # a version without windows/ scores no windows
        added = None
    if not dirs and added is None:
        return
    if fold:  # one store alone is linked, not rewritten
        first = len(dirs) if added is None and len(dirs) == 1 else 0
    elif added is not None:
        first = merge_start([int(read_manifest(d)["documents"]) for d in dirs] + [len(added)])
    else:
        first = len(dirs)
    root = stage / WINDOWS_WRITTEN_DIR
    root.mkdir()
    for directory in dirs[:first]:
        link_tree(directory, root / directory.name)
    if first == len(dirs) and added is None:
        return
    owner = WindowRows.owner(base / MODEL_DIR)
    merged = WindowRows.merge([WindowRows.load(d, owner=owner) for d in dirs[first:]] + ([added] if added else []))
    config = config_from_dict(WindowConfig, read_manifest(base / WINDOWS_DIR).get("config", {}))
    merged.save(root / f"w-{version}", owner=owner, extra=WindowRows.manifest_extra(config))


def carry_written_windows(out: Path, *, read: Path, live: Path) -> None:
    """Link into ``out``'s ``windows_written/`` the stores that writes published on ``live`` after
    ``read`` (the version a background compaction read; its stores are folded into ``out``'s already).

    A store that a write made by merging some of ``read``'s stores with its own is carried whole: a
    text found twice has the same windows in both, and the first store found gives them.
    """
    known = {d.name for d in written_window_dirs(read)} | {d.name for d in written_window_dirs(out)}
    for directory in written_window_dirs(live):
        if directory.name not in known:
            (out / WINDOWS_WRITTEN_DIR).mkdir(exist_ok=True)
            link_tree(directory, out / WINDOWS_WRITTEN_DIR / directory.name)
