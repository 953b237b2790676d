"""Names of an index directory's parts (``docs/design.md`` has the layout); no logic."""

from __future__ import annotations

import re

__all__ = ["CURRENT", "VERSIONS", "STAGING", "DOCS_DB", "EMBEDDINGS", "SCANN_DIR", "MODEL_DIR", "RERANKER_DIR",
           "WINDOWS_DIR", "WINDOWS_WRITTEN_DIR", "BATCH_ROWS"]


CURRENT = "CURRENT"


VERSIONS = "versions"


STAGING = ".staging"


DOCS_DB = "docs.sqlite"


EMBEDDINGS = "embeddings.npy"


SCANN_DIR = "scann"


MODEL_DIR = "model"


# A version's re-ranker (dssm attach-reranker / dssm index --reranker); updates hard-link it forward.
RERANKER_DIR = "reranker"


# A version's window vectors (dssm.windows; dssm index --windows); keyed by text, so updates hard-link
# it forward unchanged.
WINDOWS_DIR = "windows"


# Window vectors of documents written since (dssm.index.written_windows): stores keyed by text, merged
# by size tier as writes add them and into one at a compaction.
WINDOWS_WRITTEN_DIR = "windows_written"


VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Rows per SQLite transaction / Arrow batch while streaming shards: bounded memory whatever n is.
BATCH_ROWS = 8192
