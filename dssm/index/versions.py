"""Versions of an index directory: names, staging, the writers' lock, atomic publication of ``CURRENT``, pruning.

Every writer of ``CURRENT`` (full builds, updates, derived versions, pruning) publishes through
:func:`publish_version` under :class:`IndexWriteLock`; :func:`publish_index_files` derives a version
from the live one (reading ``CURRENT`` under the lock).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
import shutil
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dssm.artifacts import MANIFEST, read_manifest, sha256_file, verify_manifest, write_json_atomic
from dssm.errors import ConfigError, IndexNotFoundError
from dssm.index.files import fsync_dir, fsync_tree
from dssm.index.layout import CURRENT, STAGING, VERSION_RE, VERSIONS

__all__ = [
    "new_version_name", "staging_dir", "staging", "clean_stale_staging", "IndexWriteLock", "CompactionSlot",
    "publish_version",
    "current_version_dir", "list_versions", "prune_versions", "check_added_file_name", "publish_index_files",
    "VersionLease", "version_in_use", "retain_versions", "DEFAULT_KEEP_VERSIONS",
]

# Writes (upserts, deletes, derived versions, full builds) keep this many newest versions, plus the live
# one and any a reader still holds (issue 14: 400 small writes used to fill 10 GB).
DEFAULT_KEEP_VERSIONS = 10


def new_version_name() -> str:
    """A sortable, unique version name: UTC time to the microsecond plus a random suffix.

    Example: ``20250101T120000.123456Z-1a2b3c``; names sort in build order.
    """
    now = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9))
    return f"{stamp}.{now // 1000 % 10**6:06d}Z-{secrets.token_hex(3)}"


def staging_dir(index_dir: str | Path, version: str) -> Path:
    """Where a build of ``version`` writes before publication (same filesystem, so rename is atomic)."""
    return Path(index_dir) / STAGING / version


#: In every staging directory: the file its writer holds an exclusive ``flock`` on while it writes.
_OWNER = ".owner"
#: A staging directory without an owner file may be one a writer is creating right now.
_OWNERLESS_GRACE_SECONDS = 60.0
# staging root (resolved) -> [owner fd, depth]: one owner lock per process and version, re-entrant.
_owned: dict[str, list[int]] = {}
_owned_guard = threading.Lock()


@contextlib.contextmanager
def staging(index_dir: str | Path, version: str) -> Iterator[Path]:
    """``INDEX_DIR/.staging/<version>``, owned while the block runs and removed after it.

    The writer holds an exclusive ``flock`` on the directory's ``.owner`` file, and the kernel drops
    it when the process dies, however it dies. The outermost entry first removes the staging
    directories that no live writer owns (:func:`clean_stale_staging`): what a killed build left.
    Re-entrant within a process: the encode job stages its shards and then calls the shards build
    with the same version.
    """
    index_dir = Path(index_dir)
    root = staging_dir(index_dir, version)
    key = str(root.resolve())
    with _owned_guard:
        entry = _owned.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is None:
        clean_stale_staging(index_dir)
        fd = _create_owned(root)
        with _owned_guard:
            entry = _owned[key] = [fd, 1]
    try:
        yield root
    finally:
        with _owned_guard:
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _owned[key]
        if last:
            shutil.rmtree(root, ignore_errors=True)  # still owned: no cleaner removes it under us
            os.close(entry[0])
            with contextlib.suppress(OSError):  # only if empty: other writers may be staging beside us
                (index_dir / STAGING).rmdir()


def _create_owned(root: Path) -> int:
    """Create the staging directory ``root`` and own it: the descriptor holding its owner lock.

    Another writer's :func:`clean_stale_staging` may find our ``.owner`` between its creation and our
    ``flock`` and delete the directory (CI saw a compaction lose its staging so); a writer that just
    finished may remove an empty ``.staging`` between our two ``mkdir`` calls. Either way we retry on a
    fresh directory, and the lock only counts once the ``.owner`` it holds is still the one in ``root``.
    The cleaner deletes while holding the lock, so it cannot delete after we checked.
    """
    for _ in range(100):
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = _own(root)  # only a cleaner deleting it can hold it, and briefly
        except FileNotFoundError:
            continue
        try:
            if os.stat(root / _OWNER).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise ConfigError(f"could not create staging directory {root}: it kept being removed under us")


def _own(directory: Path) -> int:
    """An exclusive ``flock`` on ``directory/.owner`` (created), waited for: the open descriptor, which holds
    it until closed (or the process dies). :func:`clean_stale_staging` skips an owned directory.
    """
    fd = os.open(directory / _OWNER, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def clean_stale_staging(index_dir: str | Path) -> list[str]:
    """Remove the staging directories no live writer owns (a build or update killed mid-write).

    Returns:
        The names of the removed directories.
    """
    root = Path(index_dir) / STAGING
    if not root.is_dir():
        return []
    removed = []
    with contextlib.suppress(FileNotFoundError):  # a finishing writer removed an empty .staging
        children = sorted(root.iterdir())
        for child in children:
            if child.is_dir() and _remove_if_stale(child):
                removed.append(child.name)
    return removed


def _remove_if_stale(directory: Path) -> bool:
    """Delete ``directory`` unless a live writer owns it (or may be creating it): whether it was deleted."""
    try:
        fd = os.open(directory / _OWNER, os.O_RDWR)
    except FileNotFoundError:
        # No owner file: left by a writer from before owner files, or one that is creating it now.
        try:
            if time.time() - directory.stat().st_mtime <= _OWNERLESS_GRACE_SECONDS:
                return False
        except FileNotFoundError:
            return False
        shutil.rmtree(directory, ignore_errors=True)
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live writer holds it
        # Deleted while we hold the lock: a writer that opened this .owner just now waits for it,
        # then sees its .owner gone and starts over (_create_owned).
        shutil.rmtree(directory, ignore_errors=True)
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here


_UPDATE_LOCK = ".update.lock"


class CompactionSlot:
    """A non-blocking ``flock`` on ``INDEX_DIR/.compact.lock``: one compaction per index at a time.

    With ``dssm serve --workers N`` every worker may find the delta due; the others skip (the one
    that runs would make theirs moot anyway) instead of spending the CPU.
    """

    def __init__(self, index_dir: Path) -> None:
        self.path = index_dir / ".compact.lock"
        self.acquired = False

    def __enter__(self) -> CompactionSlot:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.acquired = True
        except BlockingIOError:
            self.acquired = False
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # releases the lock


class IndexWriteLock:
    """The one lock every writer of ``INDEX_DIR/CURRENT`` holds: an exclusive ``flock`` on ``.update.lock``.

    Full builds (around the publish), updates, derived versions (thresholds, hybrid weight) and
    pruning all take it, and a writer that derives a version from the live one reads ``CURRENT``
    *under* it, so no publish is built on a base another writer has since replaced (issue 12).
    Re-entrant within a thread (``update_index`` holds it and calls :func:`publish_version`, which
    takes it too); other threads and processes wait.
    """

    _held = threading.local()

    def __init__(self, index_dir: str | Path):
        self.path = Path(index_dir) / _UPDATE_LOCK
        self._key = str(Path(index_dir).resolve())

    def __enter__(self) -> IndexWriteLock:
        held = self._held.__dict__.setdefault("locks", {})
        if self._key in held:
            held[self._key][1] += 1
            return self
        if not self.path.parent.is_dir():
            raise IndexNotFoundError(f"no index at {self.path.parent} (build one with `dssm index`)")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        held[self._key] = [fd, 1]
        return self

    def __exit__(self, *exc: object) -> None:
        held = self._held.__dict__["locks"]
        entry = held[self._key]
        entry[1] -= 1
        if entry[1] == 0:
            del held[self._key]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])


def publish_version(index_dir: str | Path, staged: str | Path, version: str) -> Path:
    """Move a complete staged version into ``versions/`` and point ``CURRENT`` at it, atomically.

    Args:
        index_dir: the index directory.
        staged: a complete version directory (with its manifest) on the same filesystem.
        version: its name.

    Returns:
        The published version directory.
    """
    index_dir = Path(index_dir)
    if not VERSION_RE.match(version):
        raise ConfigError(f"invalid index version name {version!r}")
    read_manifest(staged)  # refuse to publish a version whose manifest was never written
    versions = index_dir / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    final = versions / version
    fsync_tree(Path(staged), skip_linked=True)
    with IndexWriteLock(index_dir):
        os.rename(staged, final)
        fsync_dir(versions)
        tmp = index_dir / f"{CURRENT}.tmp-{version}"
        with open(tmp, "w") as handle:
            handle.write(version + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, index_dir / CURRENT)
        fsync_dir(index_dir)
    return final


def current_version_dir(index_dir: str | Path) -> Path:
    """The directory ``CURRENT`` points to.

    Raises:
        IndexNotFoundError: no index at ``index_dir``, or ``CURRENT`` names a missing version.
    """
    index_dir = Path(index_dir)
    pointer = index_dir / CURRENT
    if not pointer.is_file():
        raise IndexNotFoundError(f"no index at {index_dir}: {pointer} not found (build one with `dssm index`)")
    version = pointer.read_text().strip()
    if not VERSION_RE.match(version):
        raise IndexNotFoundError(f"{pointer} holds {version!r}, which is not a version name")
    directory = index_dir / VERSIONS / version
    if not directory.is_dir():
        raise IndexNotFoundError(f"{pointer} names version {version!r} but {directory} does not exist")
    return directory


def list_versions(index_dir: str | Path) -> list[str]:
    """Published version names, oldest first."""
    versions = Path(index_dir) / VERSIONS
    if not versions.is_dir():
        return []
    return sorted(p.name for p in versions.iterdir() if p.is_dir() and VERSION_RE.match(p.name))


class VersionLease:
    """A reader's hold on a version directory: a shared ``flock`` on it while the reader lives.

    :func:`load_index` takes one for the version it loads, so pruning never deletes a version a
    Searcher (or an in-flight request on an old snapshot) still reads. Released by :meth:`release`
    or when the lease is garbage collected.
    """

    def __init__(self, version_dir: str | Path) -> None:
        fd = os.open(version_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        self._release = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        """Give the version up (idempotent)."""
        self._release()


def version_in_use(version_dir: str | Path) -> bool:
    """True while some process holds a :class:`VersionLease` on ``version_dir``."""
    try:
        fd = os.open(version_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock too
    return False


def prune_versions(index_dir: str | Path, *, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions, never the one ``CURRENT`` names nor one a reader holds.

    Returns:
        Names of deleted versions.
    """
    if keep < 1:
        raise ConfigError(f"keep must be >= 1, got {keep}")
    index_dir = Path(index_dir)
    moved = []
    with IndexWriteLock(index_dir):  # CURRENT cannot move to a version we are about to delete
        current = current_version_dir(index_dir).name
        names = list_versions(index_dir)
        doomed = [v for v in names[:-keep] if v != current and not version_in_use(index_dir / VERSIONS / v)]
        for name in doomed:
            # Out of versions/ under the lock, deleted after it: unlinking the last links to a 1M
            # base (~1.5 GB) took 0.2-0.3 s, and every writer waited for it. Owned like a staging
            # directory while we delete it (another writer's clean_stale_staging leaves it alone); a
            # crash in between leaves an ownerless one, which clean_stale_staging removes.
            source = index_dir / VERSIONS / name
            fd = _own(source)
            trash = index_dir / STAGING / f"{name}.pruned-{os.getpid()}"
            try:
                trash.parent.mkdir(exist_ok=True)
                os.rename(source, trash)
                moved.append((trash, fd))
            except OSError:  # .staging removed meanwhile by a writer that finished: delete in place
                shutil.rmtree(source)
                os.close(fd)
    for trash, fd in moved:
        shutil.rmtree(trash, ignore_errors=True)
        os.close(fd)
    return doomed


def retain_versions(index_dir: str | Path, keep: int) -> list[str]:
    """A writer's automatic retention after it published: :func:`prune_versions` unless ``keep`` is 0.

    At least 2 are kept whatever ``keep`` says, so the version that was live a moment ago survives a
    reader that read ``CURRENT`` just before the switch.

    Raises:
        ConfigError: ``keep`` is negative.
    """
    if keep < 0:
        raise ConfigError(f"keep_versions must be >= 0 (0 keeps every version), got {keep}")
    return prune_versions(index_dir, keep=max(keep, 2)) if keep else []


def check_added_file_name(name: str) -> None:
    """Refuse a name for a JSON file added to a version (a finalize hook's, ``publish_index_files``'):
    a plain top-level name, not the manifest, not hidden.

    Raises:
        ConfigError: naming it.
    """
    if "/" in name or name in ("", MANIFEST) or name.startswith("."):
        raise ConfigError(f"cannot add index file {name!r}")


def publish_index_files(index_dir: str | Path, *, files: Mapping[str, Any],
                        manifest_updates: Mapping[str, Any], directories: Mapping[str, Path] | None = None,
                        keep_versions: int = DEFAULT_KEEP_VERSIONS) -> str:
    """Publish a new index version = the live one + small JSON files + manifest keys.

    The live version is verified, copied with hard links (published versions are never modified in
    place, so sharing inodes is safe; the manifest is written fresh, not linked), the JSON files are
    written, their sha256s added to the copied manifest together with ``manifest_updates``, and the
    result published with :func:`publish_version` (atomic ``CURRENT`` switch).

    Args:
        index_dir: the index directory.
        files: ``{file name: JSON-serialisable data}``, plain names at the version's top level.
        manifest_updates: keys set in the new manifest (e.g. ``{"duplicate_threshold": 0.8}``).
        directories: ``{directory name: source directory}`` copied in (replacing one of that name), every
            file checksummed into the manifest (``dssm attach-reranker``'s ``reranker/``).
        keep_versions: then keep this many newest versions (:func:`retain_versions`; 0 keeps all).

    Returns:
        The new version's name.
    """
    directories = dict(directories or {})
    for name in [*files, *directories]:
        check_added_file_name(name)
    # The live version is read under the writers' lock and the new one published before it is
    # released: a base read outside it could be replaced by an upsert meanwhile, and one of the two
    # writes would be lost (issue 12).
    with IndexWriteLock(index_dir):
        version = _publish_derived(index_dir, files=files, manifest_updates=manifest_updates,
                                   directories=directories)
        retain_versions(index_dir, keep_versions)
        return version


def _publish_derived(index_dir: str | Path, *, files: Mapping[str, Any], manifest_updates: Mapping[str, Any],
                     directories: Mapping[str, Path]) -> str:
    source = current_version_dir(index_dir)
    manifest = verify_manifest(source, kind="index")
    version = new_version_name()
    with staging(index_dir, version) as stage_root:
        stage = stage_root / "version"
        shutil.copytree(source, stage, copy_function=os.link, ignore=lambda d, names: [
            n for n in names if Path(d) == source and (n == MANIFEST or n in files or n in directories)])
        new = dict(manifest)
        new["files"] = {rel: meta for rel, meta in manifest["files"].items()
                        if rel not in files and rel.split("/", 1)[0] not in directories}
        for name, directory in directories.items():
            shutil.copytree(directory, stage / name)
            for path in sorted(p for p in (stage / name).rglob("*") if p.is_file()):
                new["files"][path.relative_to(stage).as_posix()] = {"sha256": sha256_file(path),
                                                                      "bytes": path.stat().st_size}
        for name, data in files.items():
            path = stage / name
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            new["files"][name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        new.update(manifest_updates)
        new.update(version=version, derived_from=source.name,
                   created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        write_json_atomic(stage / MANIFEST, new)
        publish_version(index_dir, stage, version)
    return version
