"""Sharding rules (``docs/scaling.md``): which shard owns a document id, and ``i/N`` specs."""

from __future__ import annotations

import hashlib
import re

from dssm.errors import ConfigError

__all__ = ["shard_of", "parse_shard_spec"]


def shard_of(doc_id: str, num_shards: int) -> int:
    """The index shard of a document: the first 8 bytes of sha1(id) modulo ``num_shards``.

    Stable across processes, machines and Python versions (unlike ``hash``), so every encode job,
    upsert and delete routes an id to the same shard.
    """

    if num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1, got {num_shards}")
    digest = hashlib.sha1(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def parse_shard_spec(spec: str) -> tuple[int, int]:
    """``"i/N"`` → ``(i, N)`` with ``0 <= i < N``.

    Raises:
        ConfigError: not of that form.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ConfigError(f"shard must be 'i/N' with 0 <= i < N, got {spec!r}")
    return int(match.group(1)), int(match.group(2))
