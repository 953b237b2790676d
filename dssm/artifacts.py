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
from pathlib import Path
from typing import Any

from dssm.errors import ChecksumError, IndexNotFoundError

__all__ = ["MANIFEST", "RERANKER_KIND", "sha256_file",
           "write_manifest", "read_manifest", "verify_manifest", "write_json_atomic"]

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


def write_manifest(directory: str | Path, *, kind: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checksum every file under ``directory`` (except the manifest) and write ``manifest.json``.

    Returns:
        The manifest as written.
    """
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST or path.name.startswith(".") and ".tmp-" in path.name:
            continue
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {
        "kind": kind,
        "format_version": 1,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "files": files,
        **(extra or {}),
    }
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


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


def verify_manifest(directory: str | Path, *, kind: str | None = None, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check every file listed in the manifest against its size and sha256.

    Args:
        directory: the artifact directory.
        kind: if given, the manifest's ``kind`` must equal it.
        skip: top-level entries not checked (an index loaded without its ``reranker/``).

    Returns:
        The manifest.

    Raises:
        ChecksumError: a file is missing, truncated, or its sha256 differs (the message names it).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if kind is not None and manifest.get("kind") != kind:
        raise ChecksumError(f"{directory} holds a {manifest.get('kind')!r} artifact, expected {kind!r}")
    for rel, meta in manifest["files"].items():
        if rel.split("/", 1)[0] in skip:
            continue
        path = directory / rel
        if not path.is_file():
            raise ChecksumError(f"{path} is listed in {MANIFEST} but missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise ChecksumError(f"{path} has {size} bytes, manifest says {meta['bytes']} (truncated or changed)")
        if sha256_file(path) != meta["sha256"]:
            raise ChecksumError(f"{path} does not match its sha256 in {MANIFEST} (corrupted or changed)")
    return manifest
