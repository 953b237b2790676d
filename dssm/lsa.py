"""Towers fitted to a corpus without training: latent semantic analysis of its hashed bags (``dssm lsa``).

On a small corpus the trained towers overfit (issue 11: a 39M-weight table and a few thousand
documents), while the corpus's own geometry is already a good retriever: the cosine of
idf-weighted letter-trigram bags is within 0.88–1.05× BM25's nDCG@10 on cranfield, cisi and adi. A
rank-``dim`` truncated SVD of those weighted bags keeps that geometry in ``dim`` dense dimensions
when the corpus is small (``dim`` is then a large share of its rank) and loses it on a large one
(debian-dev's 34k descriptions: 0.38× BM25 at 128 dimensions). docs/quality.md has the figures.

The fit is a tower of the usual kind, so everything downstream (``dssm index``, serving, the numpy
query path, ``dssm train --init-from``) takes it unchanged: one embedding bag whose row ``b`` is
``idf_b^p · V_b`` (``V`` the right singular vectors), no hidden layer, a linear activation, zero bias,
L2 normalisation. The tower's output is then ``normalise((counts ⊙ idf^p) · V)``: the weighted bag's
projection on the corpus's top ``dim`` singular directions, and cosine in that space is LSA's.
``dssm train --init-from`` can fine-tune it on pairs; the trainer's keep-best guard keeps the fit
when no epoch beats it on the pairs' validation split.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from dssm.artifacts import read_history, refuse_filled_output
from dssm.config import add_config_arguments, config_from_args, config_from_dict, config_to_dict, field
from dssm.errors import ConfigError, InputError
from dssm.hashing import FeatureConfig, TokenBagger
from dssm.query_numpy import l2_normalize_rows

__all__ = ["LsaConfig", "LsaFit", "bag_matrix", "fit_lsa", "fit_texts", "fitted_encoder", "is_fit", "refit_for",
           "lsa_model_config", "main"]


@dataclass(frozen=True)
class LsaConfig:
    """How ``dssm lsa`` fits towers to a corpus. Saved as ``config.json["train"]`` beside the model."""

    dim: int = field(128, "width of the towers' output (the index's vectors); the fitted rank is at most the "
                     "corpus's documents - 1, and the towers are then only as wide as the rank (rounded up to a "
                     "multiple of 8, the rest zero). Wider fits retrieve better on debian-dev's samples and worse "
                     "on cranfield and cisi (512: nDCG@10 0.401 -> 0.356 and 0.404 -> 0.348; docs/quality.md); "
                     "`dssm select` scores a wider fit on its first 128 dimensions")
    idf_power: float = field(3.0, "each bucket's count is weighted by idf^p before the SVD (and in the table): 0 "
                             "raw counts, 1 tf-idf; 3 (default) was best of 1-5 on debian-dev's dev queries "
                             "(nDCG@10 0.219/0.270/0.295/0.221/0.161) and of 0-3 on cranfield's and cisi's corpus-"
                             "pair validation splits (docs/quality.md)")
    max_documents: int = field(100_000, "fit on at most this many documents (a seeded sample of a larger corpus)")
    seed: int = field(0, "seed of the sample and of the SVD's start vector")

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ConfigError(f"dim must be positive, got {self.dim}")
        if not 0.0 <= self.idf_power <= 8.0:
            raise ConfigError(f"idf_power must be in [0, 8], got {self.idf_power}")
        if self.max_documents < 2:
            raise ConfigError(f"max_documents must be at least 2, got {self.max_documents}")


@dataclass(frozen=True)
class LsaFit:
    """A fitted projection: ``table`` ``[num_buckets, dim]`` float32 and what the fit saw."""

    table: np.ndarray
    singular_values: np.ndarray  # [rank], descending
    documents: int
    rank: int
    energy: float  # share of the weighted, row-normalised bags' squared norm the rank keeps

    def summary(self) -> dict[str, Any]:
        """The fit's figures for ``history.json`` (no arrays but the singular values)."""
        return {"documents": self.documents, "rank": self.rank, "energy": round(self.energy, 6),
                "singular_values": [round(float(s), 6) for s in self.singular_values]}


def bag_matrix(bags: Sequence[tuple[np.ndarray, np.ndarray]], *, num_buckets: int) -> sp.csr_matrix:
    """``[len(bags), num_buckets]`` float32 counts from ``(ids, counts)`` bags (duplicate ids summed)."""
    lengths = np.fromiter((len(ids) for ids, _ in bags), dtype=np.int64, count=len(bags))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([np.asarray(ids, np.int64) for ids, _ in bags]) if bags else np.zeros(0, np.int64)
    data = np.concatenate([np.asarray(c, np.float32) for _, c in bags]) if bags else np.zeros(0, np.float32)
    if indices.size and (indices.min() < 0 or indices.max() >= num_buckets):
        raise InputError(f"bag ids must lie in [0, {num_buckets}); found {int(indices.min())}..{int(indices.max())}")
    matrix = sp.csr_matrix((data, indices, indptr), shape=(len(bags), num_buckets), dtype=np.float32)
    matrix.sum_duplicates()
    return matrix


def fit_lsa(counts: sp.csr_matrix, *, config: LsaConfig) -> LsaFit:
    """Truncated SVD of the corpus's idf^p-weighted, row-normalised bags.

    Args:
        counts: ``[documents, num_buckets]`` bag counts (:func:`bag_matrix`), one row per document.
        config: dim, idf power, seed (``max_documents`` is the caller's sampling).

    Returns:
        The fit; ``table[b] = idf_b^p · V[:, b]`` for the ``rank`` singular directions, ``[num_buckets,
        width]`` with ``width = min(dim, rank rounded up to a multiple of 8)`` (columns past the rank zero),
        so a fit of a few hundred documents does not carry a table of mostly zero columns.

    Raises:
        InputError: fewer than 2 non-empty documents, or too few distinct buckets for rank 1.
    """
    counts = counts.tocsr().astype(np.float32)
    counts = counts[np.diff(counts.indptr) > 0]
    n, buckets = counts.shape
    df = np.bincount(counts.indices, minlength=buckets)
    used = int(np.count_nonzero(df))
    rank = min(config.dim, n - 1, used - 1)
    if rank < 1:
        raise InputError(f"LSA needs at least 2 non-empty documents and 2 distinct buckets; got {n} documents, "
                         f"{used} buckets")
    # The usual smoothed idf (never 0, so a bucket in every document keeps a little weight).
    weight = ((np.log((n + 1) / (df + 1)) + 1.0) ** config.idf_power).astype(np.float32)
    weighted = counts.multiply(weight[None, :]).tocsr()
    norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=1)).ravel())
    weighted = sp.diags((1.0 / norms).astype(np.float32)) @ weighted
    start = np.random.default_rng(config.seed).standard_normal(min(weighted.shape)).astype(np.float64)
    _, values, vt = svds(weighted.astype(np.float64), k=rank, v0=start, solver="arpack")
    order = np.argsort(-values)
    values, vt = values[order], vt[order]
    # A singular vector's sign is arbitrary; fixing it makes the table a function of the corpus alone.
    signs = np.sign(vt[np.arange(rank), np.argmax(np.abs(vt), axis=1)])
    vt = vt * signs[:, None]
    table = np.zeros((buckets, min(config.dim, -(-rank // 8) * 8)), dtype=np.float32)
    table[:, :rank] = (vt.T * weight[:, None]).astype(np.float32)
    energy = float(np.sum(values**2) / n)  # each weighted row has unit norm: ||X||_F^2 = n
    return LsaFit(table=table, singular_values=values.astype(np.float32), documents=n, rank=rank, energy=energy)


def fit_texts(texts: Sequence[str], *, config: LsaConfig, features: FeatureConfig) -> LsaFit:
    """The fit of a corpus of ``texts`` (a seeded sample of ``config.max_documents`` if larger), hashed by
    ``features``: what ``dssm lsa`` exports and what a refit makes of a tuning corpus."""
    bags = TokenBagger(features).bags_numpy(_sample(list(texts), config))
    return fit_lsa(bag_matrix(bags, num_buckets=features.num_buckets), config=config)


def fitted_encoder(fit: LsaFit, features: FeatureConfig) -> Callable[[Sequence[str]], np.ndarray]:
    """``texts -> [len, dim]`` unit rows: the fit's tower in numpy (what the exported model computes).

    A sparse product per batch, not :class:`dssm.query_numpy.QueryTower`'s gather of one table row per
    token, which is sized for queries: a tuning corpus of long documents would gather gigabytes.
    """
    bagger = TokenBagger(features)

    def encode(texts: Sequence[str]) -> np.ndarray:
        projected = bag_matrix(bagger.bags_numpy(list(texts)), num_buckets=features.num_buckets) @ fit.table
        return l2_normalize_rows(np.asarray(projected, dtype=np.float32))

    return encode


def is_fit(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` is a ``dssm lsa`` fit as exported (one fine-tuned by ``dssm train`` is trained towers)."""
    return "lsa" in read_history(model_dir)


def refit_for(model_dir: str | Path, *, known: Callable[[], Mapping[str, np.ndarray]] | None = None,
              ) -> Callable[[list[str]], tuple[Any, Any]] | None:
    """For a ``dssm lsa`` model: ``texts -> (embed_queries, embed_documents)`` of the same fit made on ``texts``
    (for a ``dssm ensemble`` model, its side branch made on ``texts``, its trained towers unchanged).

    ``dssm index`` hands it to :func:`dssm.hybrid.label_free_weight`, so the pseudo-queries cut out of
    documents are unseen by the fit that ranks them. ``None`` for any other model (trained towers, or a
    fit fine-tuned by ``dssm train``), read from the model's ``config.json`` and ``history.json``.

    Args:
        model_dir: the model directory.
        known: gives ``document text -> its [dim] row as the index stores it``; called only for an
            ensemble, whose refit takes a known document's trained half from there instead of running
            the towers on it again (a fit's refit encodes everything: all of its rows change).
    """
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    features = config_from_dict(FeatureConfig, config["features"])
    history = read_history(model_dir)
    if "ensemble" in history:
        fit_config = config_from_dict(LsaConfig, history["ensemble"]["fit_config"])
        return _ensemble_refit(model_dir, config["model"], fit_config, features,
                               known=known() if known is not None else {})
    if "lsa" not in history:  # is_fit, on the history already read
        return None
    lsa_config = config_from_dict(LsaConfig, config["train"])

    def refit(texts: list[str]) -> tuple[Any, Any]:
        encode = fitted_encoder(fit_texts(texts, config=lsa_config, features=features), features)
        return encode, encode

    return refit


def _ensemble_refit(model_dir: Path, model: dict[str, Any], lsa_config: LsaConfig, features: FeatureConfig, *,
                    known: Mapping[str, np.ndarray]) -> Callable[[list[str]], tuple[Any, Any]]:
    """:func:`refit_for` of a ``dssm ensemble`` model: its trained towers as they are (a ``known`` document's
    from its stored row), its side branch (the fit) made again on the tuning texts; the rows joined as
    ``dssm.model.Tower`` joins them."""
    from dssm.export import load_encoder  # deferred: TensorFlow

    encoder = load_encoder(model_dir)
    side_dim, weight = int(model["side_dim"]), float(model["side_weight"])
    towers_dim = encoder.dim - side_dim

    def stored_or_encoded(batch: Sequence[str]) -> np.ndarray:
        # Every round's tuning corpus is mostly the index's own documents, whose trained half is stored.
        towers = np.empty((len(batch), towers_dim), np.float32)
        missing = []
        for i, text in enumerate(batch):
            row = known.get(text)
            if row is None:
                missing.append(i)
            else:
                towers[i] = row[:towers_dim]
        if missing:
            towers[missing] = encoder.embed_documents([batch[i] for i in missing])[:, :towers_dim]
        return towers

    def refit(texts: list[str]) -> tuple[Any, Any]:
        side = fitted_encoder(fit_texts(texts, config=lsa_config, features=features), features)

        def joined(towers_of: Callable[[Sequence[str]], np.ndarray]) -> Callable[[Sequence[str]], np.ndarray]:
            def encode(batch: Sequence[str]) -> np.ndarray:
                # The stored rows carry the towers' unit rows scaled by 1/sqrt(1 + w); the side is refitted.
                refitted = side(batch) * np.sqrt(weight) / np.sqrt(1.0 + weight)
                return np.concatenate([towers_of(batch), refitted], axis=1).astype(np.float32)
            return encode

        return joined(lambda batch: encoder.embed_queries(batch)[:, :towers_dim]), joined(stored_or_encoded)

    return refit


def lsa_model_config(dim: int) -> Any:
    """The towers' shape of a fit: one ``dim``-wide bag, no hidden layer, linear (a :class:`ModelConfig`)."""
    from dssm.model import ModelConfig  # deferred: TensorFlow, which fit_lsa does not need

    return replace(ModelConfig(), embedding_dim=dim, hidden_dims=(), activation="linear")


def _sample(texts: list[str], config: LsaConfig) -> list[str]:
    if len(texts) <= config.max_documents:
        return texts
    keep = np.sort(np.random.default_rng(config.seed).choice(len(texts), config.max_documents, replace=False))
    return [texts[i] for i in keep]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dssm lsa", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="the corpus to fit (BEIR corpus.jsonl or any "
                        "CSV/TSV/JSONL/Parquet table with id and text columns)")
    parser.add_argument("--output", required=True, help="model directory to write (as `dssm train` writes)")
    parser.add_argument("--pairs", default=None, metavar="PAIRS_DIR",
                        help="take the hashing settings from these pairs' features.json, so `dssm train "
                        "--init-from OUTPUT --pairs PAIRS_DIR` can fine-tune the fit (default: the default hashing)")
    parser.add_argument("--format", default=None, choices=["csv", "tsv", "jsonl", "parquet"],
                        help="corpus table format (default: from the suffix)")
    parser.add_argument("--id-column", default=None, help="id column (default: _id, id or docid, the first present)")
    parser.add_argument("--text-column", default=None,
                        help="text column (default: text, else contents as in Pyserini's JsonCollection)")
    parser.add_argument("--title-column", default="title", help="title column, joined before the text ('' for none)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    add_config_arguments(parser, LsaConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``dssm lsa``: fit towers to ``--corpus`` by truncated SVD and export them to ``--output``."""
    from dssm.data import corpus_columns, document_text, iter_corpus, read_columns
    from dssm.export import export_model
    from dssm.inputs import read_feature_config

    args = _parser().parse_args(argv)
    config = config_from_args(LsaConfig, args)
    output = refuse_filled_output(args.output, overwrite=args.overwrite)
    features = read_feature_config(args.pairs) if args.pairs else FeatureConfig()
    start = time.perf_counter()
    id_column, text_column = corpus_columns(read_columns(args.corpus, args.format), id_column=args.id_column,
                                            text_column=args.text_column)
    texts = [document_text(doc.title, doc.text) for doc in iter_corpus(
        args.corpus, id_column=id_column, text_column=text_column,
        title_column=args.title_column or None, format=args.format)]
    if not texts:
        raise InputError(f"corpus {args.corpus} is empty")
    fit = fit_texts(texts, config=config, features=features)
    model = _lsa_model(fit, features)
    history = {"lsa": fit.summary() | {
        "corpus": str(Path(args.corpus).resolve()), "format": args.format, "id_column": id_column,
        "text_column": text_column, "title_column": args.title_column or None, "corpus_documents": len(texts),
        "seconds": round(time.perf_counter() - start, 3)}}
    export_model(model, output, train_config=config, history=history, overwrite=args.overwrite)
    print(f"wrote {output}: LSA of {fit.documents:,} documents, rank {fit.rank} (dim {fit.table.shape[1]}), "
          f"energy kept {fit.energy:.3f}, idf^{config.idf_power:g} ({history['lsa']['seconds']:.1f} s); "
          f"config {config_to_dict(config)}")
    return 0


def _lsa_model(fit: LsaFit, features: FeatureConfig) -> Any:
    """A :class:`~dssm.model.DSSMModel` whose (shared) tower computes the fit's projection."""
    import tensorflow as tf

    from dssm.model import DSSMModel

    model = DSSMModel(lsa_model_config(fit.table.shape[1]), feature_config=features)
    model.query_tower.embed_texts(tf.constant(["x"]))  # builds the variables
    model.query_tower.bag.table.assign(fit.table)
    return model
