"""``dssm train-reranker``: train the interaction re-ranker on the first stage's own candidates.

Steps (each shows progress):

1. **Pairs.** The positive (query, document) pairs of the ``train`` split of a ``dssm pairs`` directory
   (label > 0). A hash of the query text (:func:`dssm.data.split_of`, salt ``rerank-fusion``) holds out
   ``--fusion-fraction`` of them to choose the fusion weights; the rest train. The ``validation`` split is
   read only with ``--fusion-split validation``, which chooses the weights on it instead (the towers did
   not train on those queries, so the first stage is not flattered there) and trains on every train-split
   query; by default it is never read, as it may be the queries a user evaluates on (quora-dev's
   ``--holdout``). Labelled pairs and label-free ones (``dssm pairs --format corpus``: sentence → rest of
   its document) both work.
2. **Candidates.** Every training query is searched in the index (``--mode``, the default search's
   ``hybrid``), so the negatives are the documents the re-ranker will really see at search time.
   A candidate is an *accidental positive*, never a negative, when it is the pair's document (same
   id, or same text) or contains the query verbatim (a corpus pair's query was cut from it).
   ``--negatives`` of the rest are drawn per query (seeded), once.
3. **Model.** :class:`dssm.rerank.Reranker` starts from the index model's first layer (its
   embedding table and bias) and takes BM25's idf of every word from the index's documents.
4. **Training.** ``--epochs`` passes, ``--batch-queries`` queries per step, each with its positive and
   negatives, listwise softmax loss (:func:`dssm.rerank.listwise_loss`), Adam.
5. **Fusion weights.** On up to ``--fusion-queries`` held-out queries (step 1), for each first-stage mode the
   index supports: the top ``--fusion-depth`` candidates, re-ranked with every first-stage share
   0, 0.1, ..., 1 (:func:`dssm.rerank_export.fuse_reranked`); the share with the best MRR@10 of the
   pair's document is stored if it beats the first stage's own order (share 1) by a paired
   randomisation test at p < 0.05 (:data:`FUSION_ALPHA`), else 1; ties go to the larger share. Queries
   whose document is not among the candidates carry no signal and are skipped. Evaluated queries are
   never used.
6. **Export** to ``--output`` (``dssm.rerank_export``), then ``dssm attach-reranker`` (or ``dssm index
   --reranker``) puts it into an index version.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dssm.artifacts import verify_manifest
from dssm.config import add_config_arguments, config_from_args, config_to_dict, field
from dssm.data import split_of
from dssm.errors import ConfigError, InputError
from dssm.hybrid import normalize_scores
from dssm.metrics import paired_randomization_test
from serving.searcher import Searcher

__all__ = ["RerankTrainConfig", "TrainingExample", "mine_examples", "is_accidental_positive", "held_out_candidates",
           "choose_fusion", "train_reranker", "main"]

FUSION_GRID = tuple(round(0.1 * i, 1) for i in range(11))
FUSION_SPLITS = ("train", "validation")
#: A share below 1 must beat the first stage's order on the held-out queries at this level (paired randomisation).
FUSION_ALPHA = 0.05


@dataclass(frozen=True)
class RerankTrainConfig:
    """How ``dssm train-reranker`` trains. Saved in the re-ranker's ``config.json["train"]``."""

    mode: str = field("hybrid", "first stage the negatives are mined from: dense, bm25 or hybrid")
    candidates: int = field(30, "first-stage candidates per training query the negatives are drawn from")
    negatives: int = field(7, "negatives per training query (a softmax over 1 + this many documents)")
    epochs: int = field(2, "passes over the training queries (fixed: nothing is selected on evaluated queries)")
    batch_queries: int = field(32, "training queries per step")
    learning_rate: float = field(3e-3, "Adam learning rate")
    max_queries: int = field(0, "use at most this many training queries (0 = all)")
    fusion_fraction: float = field(0.1, "share of the training queries held out (by a hash of the text) to choose "
                                   "the fusion weights on; they are not trained on")
    fusion_split: str = field("train", "where the fusion weights are chosen: 'train' = the held-out --fusion-fraction "
                              "of the train split; 'validation' = the pairs' validation split (queries the towers "
                              "did not train on, as `dssm index --hybrid-pairs` uses; then every train-split query "
                              "trains). Never name a split you evaluate on")
    fusion_queries: int = field(5000, "at most this many of the held-out queries are used (500 until 2026-12-06: "
                                "on debian-dev's 459 a +0.018 MRR@10 gain had p 0.14, and its 2,583 went unused)")
    fusion_depth: int = field(50, "candidates re-ranked per validation query when choosing the fusion weights")
    first_stage_term: bool = field(False, "train the re-ranker's score as the sum of its own and a learned weight "
                                   "(λ) times the first stage's min-max score over the candidates, so it learns "
                                   "what the first stage misses; search adds the same term (docs/rerank.md)")
    seed: int = field(0, "seed of the negative draw, the query order and the model's initialisation")
    cache_words: int = field(200_000, "the index's most widespread words whose vectors the exported model "
                             "precomputes (4 bytes x dim each), so re-ranking looks them up instead of hashing")
    word_vectors: str = field("", "a model directory whose first layer starts the word vectors instead of the "
                              "index model's: e.g. a `dssm lsa` fit of the corpus (corpus co-occurrence vectors; "
                              "made with --pairs of the same pairs, so it hashes alike; with --activation linear)")

    def __post_init__(self) -> None:
        if self.mode not in ("dense", "bm25", "hybrid"):
            raise ConfigError(f"mode must be dense, bm25 or hybrid, got {self.mode!r}")
        for name in ("candidates", "negatives", "epochs", "batch_queries", "fusion_queries", "fusion_depth",
                     "cache_words"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.fusion_split not in FUSION_SPLITS:
            raise ConfigError(f"fusion_split must be one of {FUSION_SPLITS}, got {self.fusion_split!r}")
        if not 0.0 < self.fusion_fraction < 1.0:
            raise ConfigError(f"fusion_fraction must be in (0, 1), got {self.fusion_fraction}")
        if self.max_queries < 0:
            raise ConfigError(f"max_queries must be >= 0, got {self.max_queries}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")


@dataclass(frozen=True)
class TrainingExample:
    """One training query: its positive document text first, then its negatives' texts.

    ``first_stage`` holds each document's first-stage score, min-max normalised over the query's
    candidates (the positive 0 when the first stage did not return it: below every candidate).
    """

    query: str
    documents: tuple[str, ...]
    first_stage: tuple[float, ...] = ()


def is_accidental_positive(*, query: str, positive_id: str, positive_text: str, candidate_id: str,
                           candidate_text: str) -> bool:
    """True when a first-stage candidate must not be used as the query's negative (see the module doc)."""
    return (candidate_id == positive_id and positive_id != "") or candidate_text == positive_text \
        or (len(query) >= 20 and query in candidate_text)


def mine_examples(pairs: Sequence[tuple[str, str, str]], search: Callable[[list[str]], list[list[Any]]], *,
                  negatives: int, seed: int, batch: int = 256, draw_from: int | None = None) -> list[TrainingExample]:
    """Training examples from ``(query, document_id, document_text)`` pairs and a first stage.

    Args:
        pairs: the positive pairs.
        search: ``queries -> per query [(id, score, text), ...]`` best first (``Searcher.search_batch``).
        negatives: how many negatives to draw per query (fewer when fewer candidates qualify).
        seed: the draw's seed.
        batch: queries per ``search`` call.
        draw_from: negatives come from the first this many hits (all when None); the first-stage scores
            are normalised over every hit, as search normalises over every re-ranked candidate.

    Returns:
        One example per pair that has at least one negative.
    """
    rng = np.random.default_rng(seed)
    examples = []
    for start in tqdm(range(0, len(pairs), batch), desc="mining candidates", unit="batch", leave=False):
        part = pairs[start:start + batch]
        for (query, doc_id, doc_text), hits in zip(part, search([q for q, _, _ in part]), strict=True):
            normalised = normalize_scores(np.asarray([hit[1] for hit in hits], np.float64))
            pool = [(hit[2], float(norm)) for hit, norm in zip(hits[:draw_from], normalised, strict=False)
                    if not is_accidental_positive(query=query, positive_id=doc_id, positive_text=doc_text,
                                                  candidate_id=hit[0], candidate_text=hit[2])]
            if not pool:
                continue
            own = next((float(norm) for hit, norm in zip(hits, normalised, strict=True)
                        if (hit[0] == doc_id and doc_id != "") or hit[2] == doc_text), 0.0)
            picked = [pool[i] for i in sorted(rng.choice(len(pool), size=min(negatives, len(pool)), replace=False))]
            examples.append(TrainingExample(query, (doc_text, *(text for text, _ in picked)),
                                            (own, *(norm for _, norm in picked))))
    return examples


def held_out_candidates(query: str, doc_id: str, doc_text: str, hits: Sequence[Any]) -> tuple[list[Any], int | None]:
    """A held-out query's first-stage hits without the query's own text, and where its positive is in them.

    A duplicate-question corpus holds the query itself: the first stage and the re-ranker both put it
    first, which caps the positive's reciprocal rank at 1/2 for every share (``dssm eval --skip-self``
    and the hybrid weight's tuning leave it out the same way).

    Returns:
        ``(hits kept, index of the first hit with the pair's id or text, or None)``.
    """
    kept = [hit for hit in hits if hit.text != query or hit.id == doc_id or hit.text == doc_text]
    positive = next((i for i, hit in enumerate(kept) if hit.id == doc_id or hit.text == doc_text), None)
    return kept, positive


def choose_fusion(ranked: Sequence[tuple[np.ndarray, np.ndarray, int]], *, grid: Sequence[float] = FUSION_GRID,
                  alpha: float = FUSION_ALPHA, first_stage_weight: float = 0.0) -> tuple[float, dict[str, float]]:
    """The first-stage share with the best MRR@10 of the known positive, if it beats the first stage.

    A share below 1 is kept only if its per-query reciprocal ranks beat the first stage's own order
    (share 1) by a paired randomisation test at ``alpha``, the rule ``dssm index`` applies to the
    hybrid weight: held-out training queries are few, and on corpora whose pseudo-queries the first
    stage already ranks almost perfectly a small, noisy gain there is no evidence for real queries.

    Args:
        ranked: per query ``(first-stage scores [n], re-ranker scores [n], position of the positive)``.
        grid: the shares tried (must include 1.0).
        alpha: the test's level.
        first_stage_weight: the re-ranker's λ (:func:`dssm.rerank_export.fuse_reranked`).

    Returns:
        ``(chosen share, {share: MRR@10, ..., "p_value": p of the best share against 1.0})``; ties go
        to the larger share (the first stage's order).
    """
    # deferred: TensorFlow (through dssm.rerank_export), imported only when this runs
    from dssm.rerank_export import fuse_reranked

    if 1.0 not in grid:
        raise ConfigError(f"the fusion grid must include 1.0 (the first stage's order), got {list(grid)}")
    curve, reciprocal = {}, {}
    for weight in grid:
        ranks = []
        for first, scores, positive in ranked:
            order, _ = fuse_reranked(first, scores, weight=weight, first_stage_weight=first_stage_weight)
            rank = int(np.flatnonzero(order == positive)[0]) + 1
            ranks.append(1.0 / rank if rank <= 10 else 0.0)
        reciprocal[weight] = dict(enumerate(ranks))
        curve[f"{weight:.1f}"] = float(np.mean(ranks)) if ranks else 0.0
    best = max(grid, key=lambda w: (round(curve[f"{w:.1f}"], 12), w))
    p = 1.0 if best == 1.0 or not ranked else paired_randomization_test(reciprocal[best], reciprocal[1.0])
    curve["p_value"] = p
    return (float(best) if p < alpha else 1.0), curve


def _read_pairs(files: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(query_text, document_id, document_text)`` of every positive pair (label > 0) in ``files``."""
    # deferred: TensorFlow, imported only when this runs
    import tensorflow as tf

    from dssm.inputs import VALIDATION_SPEC

    if not files:
        return []
    spec = {key: VALIDATION_SPEC[key] for key in ("query_text", "document_id", "document_text", "label")}
    out = []
    for batch in tf.data.TFRecordDataset(list(files), compression_type="GZIP").batch(1024).map(
            lambda records: tf.io.parse_example(records, spec)):
        for query, doc_id, doc, label in zip(batch["query_text"].numpy(), batch["document_id"].numpy(),
                                             batch["document_text"].numpy(), batch["label"].numpy(), strict=True):
            if label > 0 and query and doc:
                out.append((query.decode("utf-8", "replace"), doc_id.decode("utf-8", "replace"),
                            doc.decode("utf-8", "replace")))
    return out


def _split_pairs(pairs_dir: str | Path, config: RerankTrainConfig) -> tuple[list[tuple[str, str, str]],
                                                                           list[tuple[str, str, str]]]:
    """``(training pairs, fusion pairs)`` of a pairs directory, as ``config.fusion_split`` says."""
    from dssm.inputs import pair_files

    pairs = _read_pairs(pair_files(pairs_dir, "train"))
    if config.fusion_split == "validation":
        validation = _read_pairs(pair_files(pairs_dir, "validation"))
        if not validation:  # else no share is chosen and every re-ranked list keeps the first stage's order
            raise InputError(f"{pairs_dir} has no positive pairs in its validation split, which "
                             "--fusion-split validation chooses the fusion weights on")
        return pairs, validation
    held_out = [split_of(query, validation_fraction=config.fusion_fraction, salt="rerank-fusion") == "validation"
                for query, _, _ in pairs]
    return ([pair for pair, out in zip(pairs, held_out, strict=True) if not out],
            [pair for pair, out in zip(pairs, held_out, strict=True) if out])


def _build_model(searcher: Searcher, config: Any, *, cache_words: int,
                 word_vectors: str = "") -> tuple[Any, np.ndarray]:
    """A re-ranker shaped like the index's model, starting from its first layer, with the index's idf;
    and the index's ``cache_words`` most widespread words (for :meth:`Reranker.cache_vocabulary`)."""
    # deferred: TensorFlow, imported only when this runs
    import tensorflow as tf

    from dssm.data import document_text
    from dssm.export import SAVED_MODEL, read_model_configs
    from dssm.rerank import Reranker

    model_dir = searcher.index.model_dir
    if model_dir is None:
        raise InputError(f"index {searcher.index_dir} has no model/: the re-ranker starts from the index model's "
                         "embedding table")
    features, tower, _ = read_model_configs(model_dir)
    if word_vectors:
        verify_manifest(word_vectors, kind="model")
        vector_features, tower, _ = read_model_configs(word_vectors)
        if vector_features != features:
            raise ConfigError(f"--word-vectors {word_vectors} hashes texts unlike the index's model {model_dir}: "
                              "make it with the same pairs (`dssm lsa --pairs`)")
    model = Reranker(config, feature_config=features, embedding_dim=tower.embedding_dim)
    model((tf.constant(["a"]), tf.constant(["b"])))  # build
    loaded = tf.saved_model.load(str(Path(word_vectors or model_dir) / SAVED_MODEL))
    model.init_from_tower(loaded.query_tower.bag.table, loaded.query_tower.bag_bias.numpy())
    counts = tf.function(model.document_frequencies, reduce_retracing=True)
    distinct = tf.function(model.distinct_words, reduce_retracing=True)
    frequencies = np.zeros(features.num_buckets, np.int64)
    spread: Counter[bytes] = Counter()  # word -> batches of 1024 documents it occurs in
    texts: list[str] = []
    for i, (_, doc) in enumerate(tqdm(searcher.index.docs.iter_all(), total=len(searcher.index.docs),
                                      desc="document frequencies", unit="doc", leave=False)):
        texts.append(document_text(doc.title, doc.text))
        if len(texts) == 1024 or i == len(searcher.index.docs) - 1:
            frequencies += counts(tf.constant(texts)).numpy()
            spread.update(distinct(tf.constant(texts)).numpy().tolist())
            texts = []
    model.set_document_frequencies(frequencies, len(searcher.index.docs))
    return model, np.asarray([word for word, _ in spread.most_common(cache_words)], dtype=object)


def _fit(model: Any, examples: Sequence[TrainingExample], config: RerankTrainConfig) -> tuple[dict[str, Any], float]:
    """Listwise training; returns the per-epoch mean loss and seconds, and λ (0 without the first-stage term).

    With ``config.first_stage_term`` a pair scores ``model(query, document) + λ · first_stage``, λ a
    trainable scalar started at 0: the loss is then lowest when the model adds what the first stage's
    order lacks, instead of relearning what it already gets right.
    """
    # deferred: TensorFlow, imported only when this runs
    import tensorflow as tf

    from dssm.rerank import listwise_loss

    width = 1 + config.negatives
    documents = np.asarray([list(e.documents) + [""] * (width - len(e.documents)) for e in examples], dtype=object)
    valid = np.asarray([[i < len(e.documents) for i in range(width)] for e in examples])
    first = np.asarray([list(e.first_stage or (0.0,) * len(e.documents)) + [0.0] * (width - len(e.documents))
                        for e in examples], np.float32)
    queries = np.asarray([e.query for e in examples], dtype=object)
    optimizer = tf.keras.optimizers.Adam(config.learning_rate)
    lam = tf.Variable(0.0, trainable=config.first_stage_term, name="first_stage_weight")
    variables = [*model.trainable_variables, lam] if config.first_stage_term else model.trainable_variables

    @tf.function(reduce_retracing=True)
    def step(q: tf.Tensor, d: tf.Tensor, v: tf.Tensor, f: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            scores = tf.reshape(model((tf.repeat(q, width), tf.reshape(d, [-1])), training=True), [-1, width])
            loss = listwise_loss(scores + lam * f, v)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return loss

    rng = np.random.default_rng(config.seed)
    history: dict[str, list[float]] = {"loss": [], "epoch_seconds": []}
    steps = -(-len(examples) // config.batch_queries)
    for epoch in range(config.epochs):
        print(f"epoch {epoch + 1}/{config.epochs}")
        bar = tf.keras.utils.Progbar(steps, stateful_metrics=["loss"])
        order, losses, began = rng.permutation(len(examples)), [], time.perf_counter()
        for i, start in enumerate(range(0, len(order), config.batch_queries)):
            rows = order[start:start + config.batch_queries]
            loss = float(step(tf.constant(queries[rows].tolist()), tf.constant(documents[rows].tolist()),
                              tf.constant(valid[rows]), tf.constant(first[rows])))
            losses.append(loss)
            bar.update(i + 1, values=[("loss", float(np.mean(losses[-50:])))])
        history["loss"].append(float(np.mean(losses)))
        history["epoch_seconds"].append(time.perf_counter() - began)
    return history, float(lam.numpy())


def _fusion_weights(model: Any, searcher: Searcher, pairs: Sequence[tuple[str, str, str]],
                    config: RerankTrainConfig, *, first_stage_weight: float) -> tuple[dict[str, float], dict[str, Any]]:
    """Per first-stage mode the index supports: the chosen share and its MRR@10 curve on held-out training queries."""
    # deferred: TensorFlow, imported only when this runs
    import tensorflow as tf

    score = tf.function(lambda q, d: model((q, d), training=False), reduce_retracing=True)
    modes = ["dense", "bm25", "hybrid"] if searcher.supports_hybrid else ["dense"]
    rng = np.random.default_rng(config.seed)
    chosen = [pairs[i] for i in sorted(rng.permutation(len(pairs))[:config.fusion_queries])]
    weights, curves = {}, {}
    for mode in modes:
        ranked = []
        results = searcher.search_batch([q for q, _, _ in chosen], config.fusion_depth, mode=mode)
        for (query, doc_id, doc_text), hits in tqdm(list(zip(chosen, results, strict=True)),
                                                    desc=f"fusion weight ({mode})", unit="query", leave=False):
            hits, positive = held_out_candidates(query, doc_id, doc_text, hits)
            if positive is None or len(hits) < 2:
                continue
            rerank = score(tf.constant([query] * len(hits)), tf.constant([hit.text for hit in hits])).numpy()
            ranked.append((np.asarray([hit.score for hit in hits], np.float32), rerank, positive))
        if not ranked:
            weights[mode], curves[mode] = 1.0, {"queries": 0}
            continue
        weights[mode], curve = choose_fusion(ranked, first_stage_weight=first_stage_weight)
        curves[mode] = {"queries": len(ranked), "mrr_at_10": curve}
    return weights, curves


def train_reranker(*, pairs_dir: str | Path, index_dir: str | Path, output: str | Path, model_config: Any,
                   config: RerankTrainConfig, overwrite: bool = False) -> Path:
    """Mine, train, choose the fusion weights and export (the module doc has the steps)."""
    # deferred: TensorFlow (through the re-ranker modules), imported only when this runs
    import tensorflow as tf

    from dssm.rerank_export import export_reranker

    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise InputError(f"re-ranker directory {output} exists and is not empty (--overwrite replaces it)")
    train_pairs, validation = _split_pairs(pairs_dir, config)
    if not train_pairs:
        raise InputError(f"{pairs_dir} has no positive training pairs (label > 0) in its train split")
    if config.max_queries:
        rng = np.random.default_rng(config.seed)
        train_pairs = [train_pairs[i] for i in sorted(rng.permutation(len(train_pairs))[:config.max_queries])]
    tf.keras.utils.set_random_seed(config.seed)
    began = time.perf_counter()
    searcher = Searcher.load(index_dir)
    if config.mode != "dense" and not searcher.supports_hybrid:
        raise InputError(f"index {index_dir} holds no BM25 state: use --mode dense")
    # searched as deep as a re-ranked list (--fusion-depth), so the first-stage term is normalised over as
    # many candidates in training as at search time; negatives still come from the top --candidates
    depth = max(config.candidates, config.fusion_depth) if config.first_stage_term else config.candidates
    examples = mine_examples(
        train_pairs, lambda queries: searcher.search_batch(queries, depth, mode=config.mode),
        negatives=config.negatives, seed=config.seed, draw_from=config.candidates)
    if not examples:
        raise InputError(f"no training query of {pairs_dir} has a first-stage candidate that is not its own document")
    model, vocabulary = _build_model(searcher, model_config, cache_words=config.cache_words,
                                     word_vectors=config.word_vectors)
    history, lam = _fit(model, examples, config)
    model.cache_vocabulary(vocabulary)
    fusion, curves = (_fusion_weights(model, searcher, validation, config, first_stage_weight=lam)
                      if validation else ({}, {}))
    history.update(fusion_curves=curves, training_queries=len(examples), fusion_pairs=len(validation),
                   seconds=time.perf_counter() - began, first_stage_weight=lam)
    export_reranker(model, output, fusion=fusion, history=history, overwrite=overwrite, first_stage_weight=lam,
                    train={**config_to_dict(config), "pairs": str(pairs_dir), "index": str(index_dir),
                           "index_version": searcher.version})
    for mode, weight in fusion.items():
        best = curves[mode].get("mrr_at_10", {})
        print(f"fusion {mode}: first-stage share {weight:.1f} (validation MRR@10 {best.get(f'{weight:.1f}', 0):.4f}, "
              f"first stage alone {best.get('1.0', 0):.4f}, {curves[mode]['queries']} queries)")
    return output


def _parser() -> argparse.ArgumentParser:
    # deferred: TensorFlow (through dssm.rerank), only for the model config's flags
    from dssm.rerank import RerankConfig

    parser = argparse.ArgumentParser(prog="dssm train-reranker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", required=True, help="pairs directory written by `dssm pairs`")
    parser.add_argument("--index", required=True, help="index directory (first stage; its model starts the re-ranker)")
    parser.add_argument("--output", required=True, help="re-ranker directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    add_config_arguments(parser, RerankTrainConfig)
    add_config_arguments(parser, RerankConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``dssm train-reranker``."""
    from dssm.rerank import RerankConfig

    args = _parser().parse_args(argv)
    train_reranker(pairs_dir=args.pairs, index_dir=args.index, output=args.output, overwrite=args.overwrite,
                   model_config=config_from_args(RerankConfig, args), config=config_from_args(RerankTrainConfig, args))
    print(f"wrote {args.output}")
    return 0
