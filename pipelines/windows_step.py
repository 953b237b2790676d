"""``dssm index --windows``: the build step that stores the documents' window vectors (:mod:`dssm.windows`).

Run by the encode job's finalize hook (:func:`pipelines.encode_corpus.label_free_finalize`) on the
staged version, after the hybrid weight: ``auto`` keeps windows only where the held-out labelled
pairs (``--hybrid-pairs``) show a significant gain (:func:`dssm.windows.choose_windows`), ``on``
stores them without asking, ``off`` never. Nothing is chosen on evaluated queries.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dssm import index as index_lib
from dssm.data import document_text
from dssm.windows import WindowConfig, WindowRows, choose_windows

__all__ = ["WINDOW_MODES", "windows_step", "windows_only_finalize"]

WINDOW_MODES = ("auto", "on", "off")


def windows_step(stage: Path, *, mode: str, encoder: Any, texts: Sequence[str], embeddings: np.ndarray,
                 pairs: Sequence[tuple[str, str]] | None, bm25_config: Any, weight: float, normalization: str,
                 seed: int) -> dict[str, Any]:
    """Decide (``mode``), and when kept write ``stage/windows/`` over every document of the staged doc store.

    Args:
        stage: the staged version (doc store and model copy written).
        encoder: the version's towers (``embed_queries``, ``embed_documents``); ``None`` for a fitted
            model (``dssm lsa``), which is refitted per tuning corpus: ``auto`` cannot decide for it, and
            ``on`` embeds the windows with the fit's own towers (loaded here).
        texts: the tuning corpus's full texts; ``embeddings`` their [n, dim] stored rows.
        pairs: held-out labelled ``(query, document text)`` pairs, or ``None``.
        bm25_config: the version's BM25 settings; ``weight``/``normalization`` its stored hybrid.

    Returns:
        The manifest's ``windows`` report (``stored``: whether ``windows/`` was written).
    """
    if mode == "off":
        return {"stored": False, "reason": "--windows off"}
    if encoder is None and mode == "auto":
        return {"stored": False, "reason": "a fitted model (dssm lsa) is refitted per corpus: `auto` stores no "
                                           "windows for it (`on` does)"}
    if encoder is None:
        from dssm.export import load_encoder  # deferred: TensorFlow, imported only when this runs

        encoder = load_encoder(stage / index_lib.MODEL_DIR)
    config, report = WindowConfig(), {}
    if mode == "auto":
        if not pairs:
            return {"stored": False, "reason": "no held-out labelled pairs (--hybrid-pairs) to decide on"}
        # deferred: bm25s and PyStemmer, imported only when this runs
        from dssm.bm25 import BM25Config, BM25Index

        tick = time.perf_counter()
        bm25 = BM25Index.build([str(i) for i in range(len(texts))], list(texts), config=bm25_config or BM25Config())
        keep, report = choose_windows(texts=texts, embeddings=embeddings, pairs=pairs,
                                      embed_queries=encoder.embed_queries, embed_documents=encoder.embed_documents,
                                      bm25=bm25, weight=weight, normalization=normalization, config=config, seed=seed)
        report["seconds"] = round(time.perf_counter() - tick, 2)
        means = report.get("means", {})
        print(f"windows {'kept' if keep else 'not kept'} ({report['pairs']} held-out labelled pairs; DSSM MRR@10 "
              f"{means.get('dssm', 0):.4f} -> {means.get('dssm+windows', 0):.4f}, p {report.get('p', 1.0):.3g}; "
              f"hybrid {means.get('hybrid', 0):.4f} -> {means.get('hybrid+windows', 0):.4f})",
              file=sys.stderr, flush=True)
        if not keep:
            return report | {"stored": False}
    tick = time.perf_counter()
    store = index_lib.DocStore(stage / index_lib.DOCS_DB)
    with tqdm(total=len(store), desc="window vectors", unit="doc") as bar:
        rows = WindowRows.write(stage / index_lib.WINDOWS_DIR,
                                lambda: (document_text(d.title, d.text) for _, d in store.iter_all()),
                                encoder.embed_documents, config, owner=WindowRows.owner(stage / index_lib.MODEL_DIR),
                                progress=bar.update)
    return report | {"stored": True, "documents": len(rows), "windows": len(rows.rows),
                     "store_seconds": round(time.perf_counter() - tick, 2)}


def windows_only_finalize(*, seed: int = 0) -> Any:
    """The build's finalize hook for ``--windows on`` where the tuning step does not run (``--shard``,
    ``--hybrid-weight none``): every document's windows stored, nothing decided.

    Every shard of a sharded index must be built alike: a searcher merges the shards' dense hits by
    score, and a windowed score (cosine + best window's, in [-2, 2]) is not comparable with a bare
    cosine (:class:`serving.searcher.ShardedSearcher` refuses shards that disagree).
    """

    def finalize(stage: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        report = windows_step(stage, mode="on", encoder=None, texts=[],
                              embeddings=np.zeros((0, 0), np.float32), pairs=None, bm25_config=None, weight=0.0,
                              normalization="minmax", seed=seed)
        return {}, {"windows": report}

    return finalize

