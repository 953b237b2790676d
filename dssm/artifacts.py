"""Artifact manifests: sha256 of every file, written after a save and verified before a load.

Every directory a user may load (a model, an index version, a pairs dataset) carries a
``manifest.json``::

    {"kind": "model", "format_version": 1, "created": "...", "files": {"rel/path": {"sha256": ..., "bytes": ...}},
     ...extra keys...}

Loading verifies each listed file, so a corrupted or truncated file is refused with its name.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np

from dssm.errors import ChecksumError, IndexNotFoundError, InputError

__all__ = ["MANIFEST", "RERANKER_KIND", "sha256_file",
           "write_manifest", "read_manifest", "read_history", "verify_manifest", "write_json_atomic", "load_npy",
           "manifest_extra", "copy_listed", "refuse_filled_output"]

MANIFEST = "manifest.json"
# The manifest kind of a re-ranker directory (dssm.rerank_export writes it; dssm.index attaches it).
RERANKER_KIND = "reranker"


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _sha256_once(path: Path, stat: os.stat_result, hashed: dict[tuple[int, int, int], str]) -> str:
    """``sha256_file(path)``, read once per inode in ``hashed`` (two hard links of one file are one read)."""
    inode = (stat.st_dev, stat.st_ino, stat.st_size)
    if inode not in hashed:
        hashed[inode] = sha256_file(path)
    return hashed[inode]


def refuse_filled_output(output: str | Path, *, overwrite: bool) -> Path:
    """``output`` as a Path, unless it is a non-empty directory and ``overwrite`` is False (a command's
    ``--output`` without ``--overwrite``).

    Raises:
        InputError: naming ``output``.
    """
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise InputError(f"output directory {output} exists and is not empty (pass --overwrite to replace it)")
    return output


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON via a temp file + fsync + rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_manifest(directory: str | Path, *, kind: str, extra: dict[str, Any] | None = None,
                   linked_from: str | Path | None = None) -> dict[str, Any]:
    """Checksum every file under ``directory`` (except the manifest) and write ``manifest.json``.

    Args:
        directory: the artifact directory.
        kind: the manifest's ``kind``.
        extra: more top-level keys.
        linked_from: an artifact directory this one hard-links files from (a derived index version's
            base). A file that is the *same inode* as the file at the same path there takes that
            manifest's sha256 instead of being read again: the same inode is the same bytes, and a
            write of an unchanged 157 MB model copy no longer hashes it (if those bytes were corrupted
            since, the copied checksum fails when the new directory is verified, as it should).

    Returns:
        The manifest as written.
    """
    directory = Path(directory)
    known = _linked_checksums(Path(linked_from)) if linked_from is not None else {}
    files: dict[str, dict[str, Any]] = {}
    hashed: dict[tuple[int, int, int], str] = {}  # two paths of one inode (hard links) are read once
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST or path.name.startswith(".") and ".tmp-" in path.name:
            continue
        stat = path.stat()
        reused = known.get(rel)
        if reused is not None and reused[0] == (stat.st_dev, stat.st_ino) and reused[1]["bytes"] == stat.st_size:
            files[rel] = dict(reused[1])
        else:
            files[rel] = {"sha256": _sha256_once(path, stat, hashed), "bytes": stat.st_size}
    manifest = {
        "kind": kind,
        "format_version": 1,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "files": files,
        **(extra or {}),
    }
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


_OWN_KEYS = ("kind", "format_version", "created", "files")


def manifest_extra(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest's keys beyond the ones :func:`write_manifest` writes itself: what a derived artifact
    (an index version written from another) carries over as its ``extra``."""
    return {k: v for k, v in manifest.items() if k not in _OWN_KEYS}


def _linked_checksums(source: Path) -> dict[str, tuple[tuple[int, int], dict[str, Any]]]:
    """``source``'s manifest entries with the (device, inode) of each file there now (missing files left out)."""
    out = {}
    for rel, meta in read_manifest(source)["files"].items():
        try:
            stat = (source / rel).stat()
        except OSError:
            continue
        out[rel] = ((stat.st_dev, stat.st_ino), meta)
    return out


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` without verifying files.

    Raises:
        IndexNotFoundError: there is no manifest (not an artifact directory, or an unfinished write).
        ChecksumError: the manifest itself is not valid JSON.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise IndexNotFoundError(f"no {MANIFEST} in {directory}: not a dssm artifact, or its write did not finish")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ChecksumError(f"{path} is not valid JSON (truncated?): {exc}") from exc


def read_history(model_dir: str | Path) -> dict[str, Any]:
    """A model directory's ``history.json`` (what trained or fitted it), ``{}`` if it has none; not verified.

    Raises:
        ChecksumError: the file is not a JSON object.
    """
    path = Path(model_dir) / "history.json"
    if not path.is_file():
        return {}
    try:
        history = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ChecksumError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(history, dict):
        raise ChecksumError(f"{path} is not a JSON object")
    return history


def verify_manifest(directory: str | Path, *, kind: str | None = None, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check every file listed in the manifest against its size and sha256.

    Args:
        directory: the artifact directory.
        kind: if given, the manifest's ``kind`` must equal it.
        skip: entries not checked: a top-level name (an index loaded without its ``reranker/``) or a
            directory path (``delta/<segment>``) skips every file under it.

    Returns:
        The manifest.

    Raises:
        ChecksumError: a file is missing, truncated, or its sha256 differs (the message names it).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if kind is not None and manifest.get("kind") != kind:
        raise ChecksumError(f"{directory} holds a {manifest.get('kind')!r} artifact, expected {kind!r}")
    hashed: dict[tuple[int, int, int], str] = {}  # two paths of one inode (hard links) are read once
    for rel, meta in manifest["files"].items():
        if any(rel == entry or rel.startswith(entry + "/") for entry in skip):
            continue
        path = directory / rel
        if not path.is_file():
            raise ChecksumError(f"{path} is listed in {MANIFEST} but missing")
        stat = path.stat()
        if stat.st_size != meta["bytes"]:
            raise ChecksumError(f"{path} has {stat.st_size} bytes, manifest says {meta['bytes']} (truncated or "
                                f"changed){_same_file_as(directory, manifest, rel)}")
        if _sha256_once(path, stat, hashed) != meta["sha256"]:
            raise ChecksumError(f"{path} does not match its sha256 in {MANIFEST} (corrupted or changed)"
                                f"{_same_file_as(directory, manifest, rel)}")
    return manifest


def _same_file_as(directory: Path, manifest: dict[str, Any], rel: str) -> str:
    """``"; it is the same file as a, b"`` for the manifest's other paths that are hard links of ``rel``."""
    path = directory / rel
    links = [other for other in manifest["files"]
             if other != rel and (directory / other).is_file() and (directory / other).samefile(path)]
    return f"; it is the same file as {', '.join(links)}" if links else ""


# numpy parses a .npy header with ast.literal_eval, and CPython 3.11's AST constructor is not
# thread-safe: two parses at once can fail with "SystemError: AST constructor recursion depth
# mismatch" (the soak test met it when a request loaded an array while the service reloaded).
_NPY_LOCK = threading.Lock()


def load_npy(path: str | Path, *, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load(path, allow_pickle=False)`` (``mmap_mode`` as numpy's), one load at a time per process."""
    with _NPY_LOCK:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)


def copy_listed(source: str | Path, destination: str | Path, manifest: dict[str, Any]) -> None:
    """Copy ``source``'s manifest and the top-level entries its ``manifest`` lists to ``destination`` (created).

    Only an artifact's own files: a trained model directory also keeps ``checkpoints/`` and ``logs/``
    (hundreds of MB, not in its manifest).
    """
    source = Path(source)
    listed = {rel.split("/", 1)[0] for rel in manifest["files"]} | {MANIFEST}
    shutil.copytree(source, destination, ignore=lambda d, names: [
        n for n in names if Path(d) == source and n not in listed])
