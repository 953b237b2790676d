"""Re-ranker directory: export a trained :class:`~dssm.rerank.Reranker` as a SavedModel, load it, fuse its scores.

Layout::

    RERANKER_DIR/saved_model/   signature score: queries [None] tf.string, documents [None] tf.string
                                -> {"score": [None] float32} (pair i is (queries[i], documents[i]))
    RERANKER_DIR/config.json    {"features": FeatureConfig, "rerank": RerankConfig, "embedding_dim": int,
                                 "fusion": {mode: weight}, "first_stage_weight": λ, "train": {...}}
    RERANKER_DIR/history.json   per-epoch loss, the fusion curves, wall time
    RERANKER_DIR/manifest.json  kind "reranker", sha256 of every file

A re-ranked list is ordered by ``w · minmax(first-stage score) + (1 - w) · minmax(re-ranker score)``
over the candidates (:func:`fuse_reranked`), ``w`` per first-stage mode from ``fusion`` (chosen by
``dssm train-reranker`` on held-out training queries, never on evaluated queries). A weight of 1 keeps
the first stage's order: a re-ranker that does not help on held-out training queries changes nothing.
A re-ranker trained with the first stage's score as an input (``dssm train-reranker
--first-stage-term``; ``first_stage_weight`` λ in ``config.json``) contributes ``score + λ ·
minmax(first-stage score)``, the sum it was trained on, in place of its score.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.artifacts import RERANKER_KIND, read_manifest, verify_manifest, write_json_atomic, write_manifest
from dssm.config import config_from_dict, config_to_dict
from dssm.errors import ChecksumError, ConfigError, InputError
from dssm.features import FeatureConfig
from dssm.hybrid import fuse_scores, normalize_scores
from dssm.rerank import RerankConfig, Reranker
from dssm.rerank_docs import DOCUMENTS_DIR, DocumentRows
from dssm.rerank_fast import NumpyReranker

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["RERANKER_KIND", "export_reranker", "load_reranker", "LoadedReranker", "fuse_reranked",
           "read_reranker_config"]

_SAVED_MODEL = "saved_model"
_PAIRS = (tf.TensorSpec([None], tf.string, name="queries"), tf.TensorSpec([None], tf.string, name="documents"))


class _Serving(tf.Module):
    """What the SavedModel holds: the re-ranker's variables and its ``score`` function."""

    def __init__(self, model: Reranker) -> None:
        super().__init__(name="reranker")
        self.reranker = model

    @tf.function(input_signature=list(_PAIRS))
    def score(self, queries: tf.Tensor, documents: tf.Tensor) -> dict[str, tf.Tensor]:
        """``[n]`` queries, ``[n]`` documents → ``{"score": [n] float32}``."""
        return {"score": self.reranker((queries, documents), training=False)}


def export_reranker(model: Reranker, output: str | Path, *, fusion: Mapping[str, float], train: Mapping[str, Any],
                    history: Mapping[str, Any], first_stage_weight: float = 0.0, overwrite: bool = False) -> Path:
    """Write ``output`` (SavedModel, configs, history, manifest), assembled beside it and renamed into place.

    Args:
        model: a trained (built) re-ranker.
        output: destination directory.
        fusion: first-stage mode → weight of the first stage's score in the fused order, each in [0, 1].
        train: the training settings (saved in ``config.json``).
        history: per-epoch figures and the fusion curves.
        first_stage_weight: λ, the weight of the first stage's min-max score the model was trained beside
            (0: trained alone).
        overwrite: replace an existing ``output``.

    Raises:
        InputError: ``output`` exists and ``overwrite`` is False.
        ConfigError: a fusion weight outside [0, 1], or a λ that is not finite.
    """
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise InputError(f"re-ranker directory {output} exists and is not empty (--overwrite replaces it)")
    bad = {mode: w for mode, w in fusion.items() if not 0.0 <= float(w) <= 1.0}
    if bad:
        raise ConfigError(f"fusion weights must be in [0, 1], got {bad}")
    if not np.isfinite(first_stage_weight):
        raise ConfigError(f"first_stage_weight must be finite, got {first_stage_weight}")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.tmp-export")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    serving = _Serving(model)
    tf.saved_model.save(serving, str(staging / _SAVED_MODEL), signatures={"score": serving.score})
    write_json_atomic(staging / "config.json", {
        "features": config_to_dict(model.feature_config), "rerank": config_to_dict(model.config),
        "embedding_dim": int(model.table.shape[1]), "fusion": {m: float(w) for m, w in fusion.items()},
        "first_stage_weight": float(first_stage_weight), "train": dict(train),
    })
    write_json_atomic(staging / "history.json", dict(history))
    write_manifest(staging, kind=RERANKER_KIND)
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    return output


def read_reranker_config(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of a re-ranker directory with ``features`` and ``rerank`` as config objects (not verified)."""
    import json  # noqa: PLC0415  (tiny; kept local to the one reader)

    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text())
        return {**raw, "features": config_from_dict(FeatureConfig, raw["features"]),
                "rerank": config_from_dict(RerankConfig, raw["rerank"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ChecksumError(f"{path} is not a re-ranker config: {exc}") from exc


def fuse_reranked(first: np.ndarray, reranked: np.ndarray, *, weight: float,
                  first_stage_weight: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Order candidates by ``weight · minmax(first) + (1 - weight) · minmax(reranked + λ · minmax(first))``.

    Args:
        first: ``[n]`` first-stage scores of the candidates.
        reranked: ``[n]`` re-ranker scores of the same candidates.
        weight: the first stage's share, in [0, 1].
        first_stage_weight: λ, for a re-ranker trained with the first stage's min-max score added to its
            own (``LoadedReranker.first_stage_weight``); 0 for one trained alone.

    Returns:
        ``(order [n] int64, fused [n] float32)``: candidate positions best first (ties keep the
        first stage's order) and their fused scores in that order.
    """
    first = np.asarray(first, np.float32)
    reranked = np.asarray(reranked, np.float32)
    if first.shape != reranked.shape or first.ndim != 1:
        raise InputError(f"first-stage scores {first.shape} and re-ranker scores {reranked.shape} must be "
                         "equal 1-d shapes")
    if first.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if first_stage_weight:
        reranked = reranked + np.float32(first_stage_weight) * normalize_scores(first).astype(np.float32)
    fused = fuse_scores(first, reranked, weight=weight)
    order = np.argsort(-fused, kind="stable")
    return order, fused[order]


class LoadedReranker:
    """A loaded re-ranker: ``score(query, documents)`` and the fusion weight per first-stage mode.

    Args:
        loaded: the SavedModel (``tf.saved_model.load``).
        config: :func:`read_reranker_config`'s dict.
        directory: where it was loaded from (named in errors).
    """

    def __init__(self, loaded: Any, *, config: Mapping[str, Any], directory: Path, batch_size: int = 512,
                 fast: bool = True) -> None:
        self._loaded = loaded
        self._score = loaded.signatures["score"]
        self.config: RerankConfig = config["rerank"]
        self.features: FeatureConfig = config["features"]
        self.fusion: dict[str, float] = {m: float(w) for m, w in config.get("fusion", {}).items()}
        # λ of a re-ranker trained beside the first stage's score (0 for one trained alone, and for old ones)
        self.first_stage_weight = float(config.get("first_stage_weight", 0.0))
        self.directory = directory
        self.batch_size = batch_size
        # The numpy forward pass (dssm.rerank_fast); None: every pair goes through the SavedModel.
        self.fast = NumpyReranker.from_loaded(loaded, config=self.config, features=self.features) if fast else None
        # directory/documents/ when it has one (an index version's re-ranker): its documents' word ids
        self.documents: DocumentRows | None = None

    def weight(self, mode: str) -> float:
        """The first stage's share in the fused order for ``mode`` (1.0 = first-stage order, for a mode never tuned)."""
        return self.fusion.get(mode, 1.0)

    def fuse(self, first: np.ndarray, scores: np.ndarray, *, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """:func:`fuse_reranked` with this re-ranker's share for ``mode`` and its λ: ``(order [n], fused [n])``."""
        return fuse_reranked(first, scores, weight=self.weight(mode), first_stage_weight=self.first_stage_weight)

    def score_pairs(self, queries: Sequence[str], documents: Sequence[str]) -> np.ndarray:
        """``n`` (query, document) pairs → ``[n]`` float32 scores, in batches of ``batch_size``."""
        if len(queries) != len(documents):
            raise InputError(f"{len(queries)} queries but {len(documents)} documents: pairs need one of each")
        out = []
        for start in range(0, len(queries), self.batch_size):
            q, d = queries[start:start + self.batch_size], documents[start:start + self.batch_size]
            if self.fast is not None:
                out.append(self.fast.score_pairs(q, d))
            else:
                out.append(self._score(queries=tf.constant(_utf8(q), tf.string),
                                       documents=tf.constant(_utf8(d), tf.string))["score"].numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def score(self, query: str, documents: Sequence[str]) -> np.ndarray:
        """One query against its candidates → ``[len(documents)]`` float32."""
        return self.score_pairs([query] * len(documents), list(documents))


def _utf8(texts: Sequence[str | bytes]) -> list[bytes]:
    return [t.encode("utf-8", "surrogatepass") if isinstance(t, str) else bytes(t) for t in texts]


def load_reranker(directory: str | Path, *, batch_size: int = 512, fast: bool = True) -> LoadedReranker:
    """Verify ``directory``'s manifest (kind ``reranker``), then load its SavedModel.

    Args:
        directory: a directory written by :func:`export_reranker`.
        batch_size: pairs per scoring call.
        fast: score pairs with :class:`dssm.rerank_fast.NumpyReranker` (the same scores to float32
            rounding, at a fraction of the graph's cost); ``False`` sends every pair through the SavedModel.
            A SavedModel whose object graph lacks the re-ranker's weights is served by the signature.

    Raises:
        IndexNotFoundError: no ``manifest.json`` there.
        ChecksumError: a file is missing, truncated or changed (named), or it is not a re-ranker; or
            (with ``fast``) its ``documents/`` word ids are, or belong to another re-ranker.
    """
    directory = Path(directory)
    read_manifest(directory)
    verify_manifest(directory, kind=RERANKER_KIND)
    config = read_reranker_config(directory)
    loaded = tf.saved_model.load(str(directory / _SAVED_MODEL))
    out = LoadedReranker(loaded, config=config, directory=directory, batch_size=batch_size, fast=fast)
    documents = directory / DOCUMENTS_DIR
    if out.fast is not None and documents.is_dir():  # an index version's: its documents' word ids
        out.documents = DocumentRows.load(documents, owner=DocumentRows.owner(directory))
        out.fast.use_documents(out.documents)
    return out
