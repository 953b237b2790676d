"""The query tower without TensorFlow: numpy weights beside the SavedModel, and an encoder that reads them.

``dssm train`` (:func:`dssm.export.export_model`) writes the query tower's weights as plain ``.npy``
files (no pickle) into ``MODEL_DIR/query_tower/``, checksummed by the model's manifest::

    table.npy            [num_buckets, embedding_dim] float32   (memory-mapped when loaded)
    bias.npy             [embedding_dim]
    dense_{i}_kernel.npy [in, out], dense_{i}_bias.npy [out]    one pair per hidden layer

:class:`QueryTower` is the tower's forward pass in numpy (the same computation as
``dssm.model.Tower.call`` at inference). :func:`load_query_encoder` serves queries with it and the
pure-Python hasher (:meth:`dssm.hashing.TokenBagger.bag_ids`), so ``dssm search``, the ``Searcher`` and each
server worker answer queries with numpy + ScaNN alone: no TensorFlow import (~8 s here), no CUDA
probing on stderr, and only the table rows queries touch resident (the table is memory-mapped).
TensorFlow is loaded, once and lazily, only for what needs the graph: the rare query the Python
hasher declines (a code point newer than Python's Unicode tables) or documents (writes). Results
equal the SavedModel's to float32 rounding (``tests/test_query_numpy.py``).
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dssm.artifacts import load_npy, verify_manifest
from dssm.config import config_from_dict
from dssm.errors import ConfigError, InputError
from dssm.hashing import FeatureConfig, TokenBagger

__all__ = ["QUERY_TOWER_DIR", "TowerShape", "QueryTower", "NumpyQueryEncoder", "write_query_tower",
           "load_query_encoder", "l2_normalize_rows", "numpy_activation", "relu", "FAST_QUERY_MAX_TEXTS", "BULK_TEXTS"]

QUERY_TOWER_DIR = "query_tower"
# Up to this many texts per call take the numpy path even when the graph is loaded: beyond a few rows
# one graph call (whose overhead is per call, not per text) is cheaper than Python hashing per text.
FAST_QUERY_MAX_TEXTS = 4
# From this many texts per call the SavedModel embeds them, loaded first if need be: in bulk the
# graph is faster than the numpy path (debtags texts, 451 characters: 3,879 vs 2,550 texts/s at
# 4,096 per call; Quora questions: 33,316 vs 22,173; the graph ~2.5x faster again since
# Featurizer.token_ids, docs/tagging.md), so the load pays off. Above the 256 queries an
# HTTP request may carry, so a server's requests never load it.
BULK_TEXTS = 1024
# Texts per numpy pass when the graph is not loaded: bounds the gathered rows ([tokens, embedding_dim]).
_CHUNK = 64


@dataclass(frozen=True)
class TowerShape:
    """What the forward pass needs of a ``dssm.model.ModelConfig`` (which imports TensorFlow)."""

    embedding_dim: int
    hidden_dims: tuple[int, ...]
    activation: str
    bag_combiner: str
    side_dim: int = 0
    side_weight: float = 1.0

    @classmethod
    def from_dict(cls, model: dict[str, Any]) -> TowerShape:
        """From ``config.json["model"]``."""
        return cls(int(model["embedding_dim"]), tuple(int(d) for d in model["hidden_dims"]), str(model["activation"]),
                   str(model.get("bag_combiner", "sum")), int(model.get("side_dim", 0)),
                   float(model.get("side_weight", 1.0)))

    @property
    def output_dim(self) -> int:
        return (self.hidden_dims[-1] if self.hidden_dims else self.embedding_dim) + self.side_dim


def l2_normalize_rows(x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """``[n, d]`` → rows divided by their norm as ``tf.math.l2_normalize`` does: ``x / sqrt(max(sum(x^2), 1e-12))``
    (an all-zero row stays zero); into ``out`` if given (``x`` itself normalises in place)."""
    return np.divide(x, np.sqrt(np.maximum(np.einsum("ij,ij->i", x, x), np.float32(1e-12)))[:, None], out=out)


def relu(x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """``max(x, 0)`` elementwise (into ``out`` if given). Against a row of zeros broadcast over ``x``,
    not a scalar 0: numpy 2.4 takes a ~3x slower path for the scalar (a 5,900 x 128 float32 array,
    the re-ranker's bigram vectors: 0.29 vs 0.14 ms here)."""
    return np.maximum(x, np.zeros(x.shape[-1:], x.dtype), out=out)


def numpy_activation(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """Keras's activation ``name`` on float32 arrays (``gelu`` is Keras's exact, erf form)."""
    if name == "tanh":
        return np.tanh
    if name == "relu":
        return relu
    if name == "linear":
        return lambda x: x
    if name == "gelu":
        # deferred: scipy, imported only when this runs
        from scipy.special import erf  # noqa: PLC0415  (only gelu models pay for the import)

        return lambda x: (np.float32(0.5) * x * (np.float32(1) + erf(x / np.float32(np.sqrt(2))))).astype(np.float32)
    raise ConfigError(f"no numpy form of activation {name!r}")


class QueryTower:
    """The query tower's forward pass in numpy, for ASCII texts (no graph call).

    Count-weighted sum of the bag's table rows (divided by the total count or its root for
    ``mean``/``sqrtn``), + bias, activation, the dense layers, L2 normalisation; all in float32.

    Args:
        table: ``[num_buckets, embedding_dim]`` float32: a numpy array (or memory map), or anything
            with ``shape``/``dtype`` when ``rows`` reads it (a loaded ``tf.Variable``, :mod:`dssm.export`).
        bias: ``[embedding_dim]`` float32.
        layers: ``(kernel [in, out], bias [out])`` float32 per dense layer.
        features: the hashing the weights belong to.
        model: the tower's shape (a :class:`TowerShape` or a ``ModelConfig``).
        rows: ``ids [n] int64 -> [n, embedding_dim]``; default indexes ``table``.
        side: ``[num_buckets, side_dim]`` float32, an ensemble's side table (``model.side_dim > 0`` only),
            like ``table`` a numpy array or memory map, or anything ``side_rows`` reads.
        side_rows: ``ids [n] int64 -> [n, side_dim]``; default indexes ``side``.

    Raises:
        ConfigError: a weight's shape or dtype does not match the configs.
    """

    def __init__(self, *, table: Any, bias: np.ndarray, layers: Sequence[tuple[np.ndarray, np.ndarray]],
                 features: FeatureConfig, model: Any, rows: Callable[[np.ndarray], np.ndarray] | None = None,
                 side: Any = None, side_rows: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        expected = [(features.num_buckets, model.embedding_dim), (model.embedding_dim,)]
        widths = (model.embedding_dim, *model.hidden_dims)
        expected += [shape for i, d in enumerate(model.hidden_dims) for shape in ((widths[i], d), (d,))]
        if getattr(model, "side_dim", 0):
            expected.append((features.num_buckets, model.side_dim))
        arrays = [bias, *(a for layer in layers for a in layer)]
        got = [_shape_and_dtype(table), *((a.shape, a.dtype) for a in arrays)]
        got += [_shape_and_dtype(side)] if side is not None else []
        if [shape for shape, _ in got] != expected or any(dtype != np.float32 for _, dtype in got):
            raise ConfigError(f"query tower weights {[(shape, str(dtype)) for shape, dtype in got]} do not match "
                              f"the model config (expected float32 {expected})")
        # A memory map indexed through its subclass costs a view object per gather; the plain array over
        # the same pages does not.
        self._rows = rows if rows is not None else functools.partial(np.asarray(table).take, axis=0)
        self._side_rows = side_rows if side_rows is not None or side is None else functools.partial(
            np.asarray(side).take, axis=0)
        self.table, self.bias, self.layers, self.side = table, bias, list(layers), side
        self.features, self.model = features, model
        # The query path's word cache (a few MB at 32k words): a query's words are hashed once.
        self._bagger = TokenBagger(features, cache_words=1 << 15)
        self._activation = numpy_activation(model.activation)

    def embed(self, texts: Sequence[str]) -> np.ndarray | None:
        """``n`` texts → ``[n, dim]`` float32 L2-normalised, or ``None`` if the graph must featurize a text.

        Args:
            texts: ``n >= 1`` strings.

        Returns:
            ``[n, output_dim]`` float32, equal to the ``embed_query`` signature's rows to float32
            rounding; ``None`` when a text needs the graph (:func:`dssm.hashing.unicode_words` declines
            it: a lone surrogate or a code point newer than Python's Unicode tables).
        """
        bags = [self._bagger.bag_ids(text) for text in texts]
        if any(buckets is None for buckets in bags):
            return None
        # One gather for all texts. Every token's row once, repeats included: the count-weighted sum
        # of the bag's rows without counting (the bag's total count is the number of tokens).
        lengths = [len(buckets) for buckets in bags]
        ids = np.concatenate(bags)
        pooled = _sums(self._rows(ids), lengths)
        if self.model.bag_combiner != "sum":
            totals = np.asarray(lengths, np.float32)
            scale = totals if self.model.bag_combiner == "mean" else np.sqrt(totals)
            pooled /= np.maximum(scale, np.float32(1))[:, None]
        x = self._activation(pooled + self.bias)
        for kernel, bias in self.layers:
            x = self._activation(x @ kernel + bias)
        x = l2_normalize_rows(x).astype(np.float32, copy=False)
        if self.side is None:
            return x
        # dssm.model.Tower._join_side: the side sums normalised, scaled by sqrt(w), the row by 1/sqrt(1 + w).
        weight = np.float32(self.model.side_weight)
        side = l2_normalize_rows(_sums(self._side_rows(ids), lengths)) * np.sqrt(weight)
        return (np.concatenate([x, side], axis=1) / np.sqrt(np.float32(1) + weight)).astype(np.float32, copy=False)


def _shape_and_dtype(array: Any) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, numpy dtype)`` of a numpy array, memory map or loaded ``tf.Variable``."""
    return tuple(array.shape), np.dtype(getattr(array.dtype, "as_numpy_dtype", array.dtype))


def _sums(rows: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """``[sum(lengths), d]`` rows → ``[len(lengths), d]`` sums of consecutive runs of ``lengths`` rows."""
    if len(lengths) == 1:  # the common single query: no split and stack
        return rows.sum(axis=0, keepdims=True)
    return np.stack([part.sum(axis=0) for part in np.split(rows, np.cumsum(lengths)[:-1])])


def write_query_tower(directory: str | Path, *, table: np.ndarray, bias: np.ndarray,
                      layers: Sequence[tuple[np.ndarray, np.ndarray]], side: np.ndarray | None = None) -> None:
    """Save the query tower's weights as ``.npy`` files in ``directory`` (created; see the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True)
    if side is not None:
        np.save(directory / "side_table.npy", np.ascontiguousarray(side, dtype=np.float32), allow_pickle=False)
    np.save(directory / "table.npy", np.ascontiguousarray(table, dtype=np.float32), allow_pickle=False)
    np.save(directory / "bias.npy", np.asarray(bias, dtype=np.float32), allow_pickle=False)
    for i, (kernel, layer_bias) in enumerate(layers):
        np.save(directory / f"dense_{i}_kernel.npy", np.asarray(kernel, dtype=np.float32), allow_pickle=False)
        np.save(directory / f"dense_{i}_bias.npy", np.asarray(layer_bias, dtype=np.float32), allow_pickle=False)


class NumpyQueryEncoder:
    """A model directory's query encoder that needs TensorFlow only for documents and texts Python declines.

    Same interface as :class:`dssm.export.Encoder` (``embed_queries``, ``embed_documents``, ``dim``,
    ``features``). The SavedModel (``dssm.export.load_encoder``, which verifies it first) is loaded on
    the first call that needs it, once, thread-safely.
    """

    def __init__(self, model_dir: Path, *, tower: QueryTower, features: FeatureConfig, batch_size: int = 1024,
                 shared_towers: bool = False) -> None:
        self.model_dir = model_dir
        self.shared_towers = shared_towers  # one tower for queries and documents: documents in numpy too
        self.query_tower = tower
        self.features = features
        self.dim = tower.model.output_dim
        self.batch_size = batch_size
        self._graph: Any = None
        self._lock = threading.Lock()

    @property
    def graph_loaded(self) -> bool:
        """Whether the SavedModel (and TensorFlow) has been loaded."""
        return self._graph is not None

    def graph(self) -> Any:
        """The model's :class:`dssm.export.Encoder` (loaded on first use)."""
        with self._lock:
            if self._graph is None:
                # deferred: TensorFlow, only for what the numpy path cannot do
                from dssm.export import load_encoder

                self._graph = load_encoder(self.model_dir, batch_size=self.batch_size)
            return self._graph

    def follow(self, model_dir: str | Path) -> None:
        """Load the SavedModel, when it is first needed, from ``model_dir``: the same model (same
        manifest) in a newer index version. A server reuses its encoder across hot swaps, and the
        version it came from may be pruned before anything needs the graph."""
        with self._lock:
            self.model_dir = Path(model_dir)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """``n`` texts → ``[n, dim]`` float32 with the query tower: numpy, or the graph for bulk
        (``BULK_TEXTS``+ texts, or more than ``FAST_QUERY_MAX_TEXTS`` once it is loaded) and for a text
        Python declines."""
        if isinstance(texts, (str, bytes)):
            raise InputError(f"expected a sequence of texts, got a single {type(texts).__name__}: {texts[:80]!r}")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        # Checked first, so a batch with a non-string goes to the graph without hashing the rest.
        strings = all(isinstance(t, str) for t in texts)
        few = len(texts) <= FAST_QUERY_MAX_TEXTS or (self._graph is None and len(texts) < BULK_TEXTS)
        if strings and few:
            parts = [self.query_tower.embed(texts[i:i + _CHUNK]) for i in range(0, len(texts), _CHUNK)]
            if all(part is not None for part in parts):
                return parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self.graph().embed_queries(texts)

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        """``n`` texts → ``[n, dim]`` float32 with the document tower: with shared towers (the default)
        it is the query tower, so as :meth:`embed_queries` (a server embedding a few windows of a
        document written after its index, :mod:`dssm.windows`, stays free of TensorFlow); else the
        SavedModel."""
        if self.shared_towers:
            return self.embed_queries(texts)
        return self.graph().embed_documents(texts)


def load_query_encoder(model_dir: str | Path, *, verify: bool = True,
                       batch_size: int = 1024) -> NumpyQueryEncoder | None:
    """The TensorFlow-free query encoder of ``model_dir``, or ``None`` if the model has no ``query_tower/``.

    Only what the numpy path reads is verified here (``config.json``, ``query_tower/``); the SavedModel
    is verified when it is first loaded. A mixed-precision model (its graph computes in bfloat16) gets
    ``None``: numpy in float32 would not match it.

    Raises:
        IndexNotFoundError / ChecksumError: not a finished model directory, or a changed file.
        ConfigError: weights that do not match the configs.
    """
    model_dir = Path(model_dir)
    if not (model_dir / QUERY_TOWER_DIR).is_dir():
        return None
    if verify:
        verify_manifest(model_dir, kind="model", skip=("saved_model",))
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("train", {}).get("mixed_precision"):
        return None
    features = config_from_dict(FeatureConfig, config["features"])
    shape = TowerShape.from_dict(config["model"])
    weights = model_dir / QUERY_TOWER_DIR
    table = load_npy(weights / "table.npy", mmap_mode="r")
    layers = [(load_npy(weights / f"dense_{i}_kernel.npy"),
               load_npy(weights / f"dense_{i}_bias.npy")) for i in range(len(shape.hidden_dims))]
    side = load_npy(weights / "side_table.npy", mmap_mode="r") if shape.side_dim else None
    tower = QueryTower(table=table, bias=load_npy(weights / "bias.npy"), layers=layers,
                       features=features, model=shape, side=side)
    return NumpyQueryEncoder(model_dir, tower=tower, features=features, batch_size=batch_size,
                             shared_towers=bool(config["model"].get("shared_towers", False)))
