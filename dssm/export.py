"""Model directory: export a trained model as a SavedModel that embeds raw strings, and load it back.

Layout (docs/design.md)::

    MODEL_DIR/saved_model/   signatures embed_query, embed_document: texts [None] tf.string
                             -> {"embedding": [None, dim] float32}, L2-normalised;
                             featurize: texts [None] tf.string -> {"ids": [None, None] int64 (padded
                             with -1), "counts": [None, None] float32 (padded with 0), "lengths": [None] int64}
    MODEL_DIR/config.json    {"features": FeatureConfig, "model": ModelConfig, "train": TrainConfig,
                              "loss": LossConfig}
    MODEL_DIR/history.json   per-epoch training metrics, best_epoch, pairs/s, wall time (dssm.train)
    MODEL_DIR/query_tower/   the query tower's weights as .npy files (dssm.query_numpy): queries without
                             TensorFlow; not written for a mixed-precision model
    MODEL_DIR/manifest.json  kind "model", sha256 of every file

Featurization runs inside the SavedModel (the same :class:`~dssm.features.Featurizer` graph the
shards were made with), so callers pass raw text; the ``featurize`` signature exposes that graph's
bags, so the ids a model computes can be checked against the ids in the shards it was trained on
(``Encoder.featurize``). The signatures hold only the towers' variables, not optimizer slots.
:func:`load_encoder` verifies every checksum before TensorFlow reads a byte.

A few queries at a time (the search hot path: one query) skip the graph:
:meth:`dssm.hashing.TokenBagger.bag_ids` hashes the text in Python (each word once, from a bounded cache)
and :class:`QueryTower` runs the query tower's forward pass in numpy on the loaded variables: 0.21
ms per 8-40-word query instead of the signature's 0.63 ms, mostly TensorFlow's per-call and per-op
overhead (quiet machine; 0.05 ms hashing, ~0.1 ms the one eager gather of table rows, which avoids a
second copy of the table). The result equals the signature's to float32 rounding; anything else (a
text the Python hasher declines, batches, a mixed-precision model) uses the signature.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.artifacts import MANIFEST, verify_manifest, write_json_atomic, write_manifest
from dssm.config import config_from_dict, config_to_dict
from dssm.errors import ConfigError, InputError
from dssm.features import FeatureConfig
from dssm.model import DSSMModel, ModelConfig
from dssm.query_numpy import (
    FAST_QUERY_MAX_TEXTS,
    QUERY_TOWER_DIR,
    l2_normalize_rows,
    numpy_activation,
    write_query_tower,
)
from dssm.query_numpy import QueryTower as _NumpyQueryTower

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["SAVED_MODEL", "FAST_QUERY_MAX_TEXTS", "export_model", "load_encoder", "Encoder", "QueryTower",
           "read_model_configs", "row_reader", "l2_normalize_rows", "numpy_activation"]

SAVED_MODEL = "saved_model"
_TEXTS = tf.TensorSpec([None], tf.string, name="texts")


class _Serving(tf.Module):
    """What the SavedModel holds: the two towers and one tf.function per signature."""

    def __init__(self, model: DSSMModel) -> None:
        super().__init__(name="dssm")
        self.query_tower = model.query_tower
        self.document_tower = model.document_tower
        self.output_dim = tf.constant(model.config.output_dim, tf.int32)
        # Both towers hash with this one object (DSSMModel shares it), so `featurize` shows exactly
        # the bags the embed signatures feed their towers.
        self._featurizer = model.query_tower.featurizer

    @tf.function(input_signature=[_TEXTS])
    def embed_query(self, texts: tf.Tensor) -> dict[str, tf.Tensor]:
        """``[batch]`` tf.string → ``{"embedding": [batch, dim] float32}`` with the query tower."""
        return {"embedding": self.query_tower.embed_texts(texts)}

    @tf.function(input_signature=[_TEXTS])
    def embed_document(self, texts: tf.Tensor) -> dict[str, tf.Tensor]:
        """``[batch]`` tf.string → ``{"embedding": [batch, dim] float32}`` with the document tower."""
        return {"embedding": self.document_tower.embed_texts(texts)}

    @tf.function(input_signature=[_TEXTS])
    def featurize(self, texts: tf.Tensor) -> dict[str, tf.Tensor]:
        """``[batch]`` tf.string → the towers' input bags, padded (signatures cannot return ragged tensors).

        Returns:
            ``{"ids": [batch, width] int64, "counts": [batch, width] float32, "lengths": [batch] int64}``;
            row ``i`` holds ``lengths[i]`` entries, the rest is padding (id -1, count 0).
        """
        ids, counts = self._featurizer.bags(texts)
        return {"ids": ids.to_tensor(default_value=-1), "counts": counts.to_tensor(default_value=0.0),
                "lengths": ids.row_lengths()}


def export_model(model: DSSMModel, model_dir: str | Path, *, train_config: Any,
                 history: dict[str, Any] | None = None, overwrite: bool = False, keep: Sequence[str] = ()) -> Path:
    """Write ``model_dir`` (SavedModel, configs, history, manifest).

    The directory is assembled under a temporary sibling and renamed into place, so a crash never
    leaves a half-written model that looks complete. Entries of an existing ``model_dir`` named in
    ``keep`` (the trainer's ``checkpoints/`` and ``logs/``) stay where they are and are not listed
    in the manifest: the old model's files are removed (manifest first) and the new ones moved in
    (manifest last).

    Args:
        model: a trained (built) model.
        model_dir: destination directory.
        train_config: the ``TrainConfig`` used (a dataclass; saved in ``config.json``).
        history: the trainer's history (per-epoch lists, ``best_epoch``, wall time...) to save as ``history.json``.
        overwrite: replace an existing ``model_dir``.
        keep: names of entries in ``model_dir`` to leave in place (they do not count as "not empty").

    Returns:
        ``model_dir`` as a Path.

    Raises:
        InputError: ``model_dir`` exists and holds more than ``keep`` and ``overwrite`` is False.
        ConfigError: ``keep`` names a file the export writes.
    """
    model_dir = Path(model_dir)
    keep = frozenset(keep)
    if keep & {SAVED_MODEL, "config.json", "history.json", MANIFEST}:
        raise ConfigError(f"keep={sorted(keep)} names a file the export writes")
    if model_dir.exists() and any(p.name not in keep for p in model_dir.iterdir()) and not overwrite:
        raise InputError(f"model directory {model_dir} exists and is not empty (overwrite=True replaces it)")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = model_dir.with_name(f".{model_dir.name}.tmp-export")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    serving = _Serving(model)
    towers = {model.query_tower, model.document_tower}
    jit = {tower: tower.jit_dense for tower in towers}
    try:
        # The serving graph runs without XLA: no compile at load time, and CPU serving gains nothing.
        for tower in towers:
            tower.jit_dense = False
        tf.saved_model.save(serving, str(staging / SAVED_MODEL),
                            signatures={"embed_query": serving.embed_query, "embed_document": serving.embed_document,
                                        "featurize": serving.featurize})
    finally:
        for tower, value in jit.items():
            tower.jit_dense = value
    if not getattr(train_config, "mixed_precision", False):  # numpy in float32 cannot match a bfloat16 graph
        _write_numpy_tower(staging / QUERY_TOWER_DIR, model.query_tower)
    write_json_atomic(staging / "config.json", {
        "features": config_to_dict(model.feature_config),
        "model": config_to_dict(model.config),
        "train": config_to_dict(train_config),
        "loss": config_to_dict(model.loss_config),
    })
    write_json_atomic(staging / "history.json", history or {})
    write_manifest(staging, kind="model", extra={"dim": model.config.output_dim})
    if model_dir.exists() and any(p.name in keep for p in model_dir.iterdir()):
        (model_dir / MANIFEST).unlink(missing_ok=True)  # from here until the new manifest: not a loadable model
        for entry in model_dir.iterdir():
            if entry.name in keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        for entry in staging.iterdir():
            if entry.name != MANIFEST:
                entry.rename(model_dir / entry.name)
        (staging / MANIFEST).rename(model_dir / MANIFEST)
        staging.rmdir()
        return model_dir
    if model_dir.exists():
        shutil.rmtree(model_dir)
    staging.rename(model_dir)
    return model_dir


def _write_numpy_tower(directory: Path, tower: Any) -> None:
    """The query tower's weights as ``.npy`` files (:func:`dssm.query_numpy.write_query_tower`)."""
    write_query_tower(directory, table=tower.bag.table.numpy(), bias=tower.bag_bias.numpy(),
                      layers=[(dense.kernel.numpy(), dense.bias.numpy()) for dense in tower.hidden],
                      side=tower.side.table.numpy() if tower.side is not None else None)


def read_model_configs(model_dir: str | Path) -> tuple[FeatureConfig, ModelConfig, dict[str, Any]]:
    """``(FeatureConfig, ModelConfig, train config dict)`` from ``model_dir/config.json`` (not verified)."""
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
        return (config_from_dict(FeatureConfig, data["features"]), config_from_dict(ModelConfig, data["model"]),
                dict(data.get("train", {})))
    except FileNotFoundError as exc:
        raise InputError(f"{path} not found: not a dssm model directory") from exc
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a valid model config: {exc!r}") from exc


class Encoder:
    """Embeds texts with a loaded model directory's towers.

    Attributes:
        dim: embedding width.
        features, model: the configs the model was trained with.
    """

    def __init__(self, loaded: Any, *, features: FeatureConfig, model: ModelConfig, batch_size: int = 1024,
                 fast_queries: bool = True, mixed_precision: bool = False) -> None:
        self._loaded = loaded
        # The signatures' concrete functions: calling them skips the restored tf.function's argument
        # matching, ~0.1 ms of a ~0.5 ms single-query call; _flat_call goes one layer further down.
        self._embed_query = _flat_call(loaded.signatures["embed_query"])
        self._embed_document = _flat_call(loaded.signatures["embed_document"])
        # Models exported before the signature existed lack it; only featurize() needs it.
        self._featurize = loaded.signatures.get("featurize")
        self.features = features
        self.model = model
        self.dim = model.output_dim
        self.batch_size = batch_size
        # A mixed-precision model's graph computes in bfloat16; numpy in float32 would not match it.
        self.query_tower = (QueryTower.from_loaded(loaded, features=features, model=model)
                            if fast_queries and not mixed_precision else None)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """``n`` texts → ``[n, dim]`` float32 with the query tower."""
        if self.query_tower is not None and 0 < len(texts) <= FAST_QUERY_MAX_TEXTS and not isinstance(texts, str):
            fast = self.query_tower.embed(texts)
            if fast is not None:
                return fast
        return self._embed(self._embed_query, texts)

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        """``n`` texts → ``[n, dim]`` float32 with the document tower."""
        return self._embed(self._embed_document, texts)

    def featurize(self, texts: Sequence[str | bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The bags the SavedModel's towers read, computed by the SavedModel itself.

        Args:
            texts: ``n`` texts (``str`` or UTF-8 ``bytes``).

        Returns:
            ``n`` pairs ``(ids int64 [m], counts float32 [m])``, like ``Featurizer.bags_numpy``.

        Raises:
            ConfigError: the model was exported without a ``featurize`` signature (an older export).
        """
        if self._featurize is None:
            raise ConfigError("this model has no featurize signature (exported before it existed); re-export it")
        if isinstance(texts, (str, bytes)):
            raise InputError(f"expected a sequence of texts, got a single {type(texts).__name__}: {texts[:80]!r}")
        if len(texts) == 0:
            return []
        out = self._featurize(texts=tf.constant(_utf8(texts), tf.string))
        ids, counts, lengths = out["ids"].numpy(), out["counts"].numpy(), out["lengths"].numpy()
        return [(ids[i, :n], counts[i, :n]) for i, n in enumerate(lengths.tolist())]

    def _embed(self, fn: Any, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, (str, bytes)):
            raise InputError(f"expected a sequence of texts, got a single {type(texts).__name__}: {texts[:80]!r}")
        chunks = _chunks([len(t) for t in texts], max_texts=self.batch_size * _MAX_BATCHES_PER_CALL,
                         max_chars=self.batch_size * _CHARS_PER_TEXT)
        if len(chunks) == 1:  # the query path: one call, no copy
            return fn(tf.constant(_utf8(texts), tf.string)).numpy()
        out = np.empty((len(texts), self.dim), np.float32)
        for start, end in chunks:
            out[start:end] = fn(tf.constant(_utf8(texts[start:end]), tf.string)).numpy()
        return out


class QueryTower(_NumpyQueryTower):
    """:class:`dssm.query_numpy.QueryTower` whose table may also be a loaded ``tf.Variable``.

    A numpy copy of a loaded table is a second copy of it (157 MB at the default size): TensorFlow's
    gather switches a variable to copy-on-read, so ``.numpy()`` never shares its buffer. Its rows are
    read with one eager ``ResourceGather`` per call instead (:func:`row_reader`).
    """

    def __init__(self, *, table: np.ndarray | tf.Variable, bias: np.ndarray,
                 layers: Sequence[tuple[np.ndarray, np.ndarray]], features: FeatureConfig, model: ModelConfig,
                 side: np.ndarray | tf.Variable | None = None) -> None:
        super().__init__(table=table, bias=bias, layers=layers, features=features, model=model,
                         rows=row_reader(table), side=side, side_rows=row_reader(side) if side is not None else None)

    @classmethod
    def from_loaded(cls, loaded: Any, *, features: FeatureConfig, model: ModelConfig,
                    copy_table: bool = False) -> QueryTower | None:
        """The query tower of a loaded SavedModel (``tf.saved_model.load``), or ``None`` if its layout is unknown.

        Reads ``loaded.query_tower``'s ``bag.table``, ``bag_bias`` and ``hidden[i].kernel``/``.bias``
        (the attribute names :class:`_Serving` and ``dssm.model.Tower`` save); a model whose object
        graph lacks them (or does not match the config) is served by the signature alone.

        Args:
            loaded: the loaded SavedModel.
            features, model: its configs.
            copy_table: hold a numpy copy of the table (a second copy in memory) instead of
                gathering rows from the variable.
        """
        try:
            tower = loaded.query_tower
            table, side = tower.bag.table, tower.side.table if model.side_dim else None
            return cls(table=table.numpy() if copy_table else table, bias=tower.bag_bias.numpy(),
                       layers=[(dense.kernel.numpy(), dense.bias.numpy()) for dense in list(tower.hidden)],
                       features=features, model=model, side=side.numpy() if copy_table and side is not None else side)
        except (AttributeError, TypeError, ConfigError):
            return None


def row_reader(array: Any) -> Any:
    """``ids [n] int64 -> rows [n, ...]`` of a numpy array, or of a loaded ``tf.Variable`` without copying it.

    A numpy copy of a loaded variable is a second copy in memory (the tower table is ~157 MB): TensorFlow's
    gather switches a variable to copy-on-read, so ``.numpy()`` never shares its buffer. One eager
    ``ResourceGather`` per call reads just the rows.
    """
    if isinstance(array, np.ndarray):
        return array.__getitem__
    handle, dtype = array.handle, array.dtype

    def rows(ids: np.ndarray) -> np.ndarray:
        return tf.raw_ops.ResourceGather(resource=handle, indices=ids, dtype=dtype).numpy()

    return rows


def _flat_call(signature: Any) -> Any:
    """``texts tensor -> embedding tensor`` for an ``embed_*`` signature, with the least Python per call.

    A signature call maps keyword arguments onto its flat inputs, appends the captured variables and
    packs the flat outputs into a dict: ~0.1 ms of CPU of a ~0.6 ms single-query call (the serving hot
    path). The atomic function under it takes the flat inputs directly. It is a private attribute of
    TensorFlow's loaded functions, so anything unexpected falls back to the public call.
    """
    def public(texts: tf.Tensor) -> tf.Tensor:
        return signature(texts=texts)["embedding"]

    atomic = getattr(signature, "_inference_function", None)
    captured = tuple(getattr(signature, "captured_inputs", ()))
    outputs = getattr(signature, "structured_outputs", None)
    if (atomic is None or not hasattr(atomic, "call_flat") or not isinstance(outputs, dict)
            or list(outputs) != ["embedding"] or len(signature.inputs) != 1 + len(captured)):
        return public

    def flat(texts: tf.Tensor) -> tf.Tensor:
        return atomic.call_flat(texts, *captured)[0]

    return flat


# Bulk calls are cut by characters, not only texts: a call's memory follows its characters, and the
# graph makes each distinct word's strings once per call, so more texts per call share more. Up to
# 8 x batch_size texts or batch_size x 2,000 characters (2M by default, a tenth of 1,024 texts at
# max_chars): 10k debtags texts (451 characters) embed ~10% faster in ~2,000-text calls than in
# 1,024-text ones, short questions in 8,192-text calls.
_MAX_BATCHES_PER_CALL = 8
_CHARS_PER_TEXT = 2_000


def _chunks(lengths: Sequence[int], *, max_texts: int, max_chars: int) -> list[tuple[int, int]]:
    """``(start, end)`` ranges covering ``lengths`` in order: each at most ``max_texts`` texts and, unless
    it is one text, at most ``max_chars`` characters."""
    ranges, start, chars = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and (i - start == max_texts or chars + n > max_chars):
            ranges.append((start, i))
            start, chars = i, 0
        chars += n
    if start < len(lengths):
        ranges.append((start, len(lengths)))
    return ranges


def _utf8(texts: Sequence[str | bytes]) -> list[bytes]:
    # surrogatepass: a lone surrogate from a bad JSON escape reaches the featurizer, which replaces it.
    return [t.encode("utf-8", "surrogatepass") if isinstance(t, str) else bytes(t) for t in texts]


def load_encoder(model_dir: str | Path, *, batch_size: int = 1024, fast_queries: bool = True) -> Encoder:
    """Verify ``model_dir``'s manifest, then load its SavedModel.

    Args:
        model_dir: a directory written by :func:`export_model` (``dssm train``).
        batch_size: texts per call into the SavedModel; bulk calls take up to 8x as many while they stay
            under batch_size x 2,000 characters.
        fast_queries: embed up to :data:`FAST_QUERY_MAX_TEXTS` ASCII queries with :class:`QueryTower`
            (numpy) instead of the signature.

    Raises:
        IndexNotFoundError: no ``manifest.json`` (not a model directory, or an unfinished write).
        ChecksumError: a file is missing, truncated or changed.
    """
    verify_manifest(model_dir, kind="model")
    features, model, train = read_model_configs(model_dir)

    loaded = tf.saved_model.load(str(Path(model_dir) / SAVED_MODEL))
    return Encoder(loaded, features=features, model=model, batch_size=batch_size, fast_queries=fast_queries,
                   mixed_precision=bool(train.get("mixed_precision", False)))
