"""``dssm index``: encode a corpus with the document tower (Beam RunInference), then build the ScaNN index.

Pipeline (one chain, so it runs the same on the DirectRunner, Dask and portable runners)::

    read plan (ReadRange per ~batch-size lines of a JSONL file; per CSV/TSV/Parquet file)
        ─ ReadBatches: read the range, validate_document, emit one keyed example per batch
        ─ RunInference (KeyedModelHandler over the SavedModel's embed_document; one example = one batch)
        ─ write_batch: embeddings-BBBBB-of-NNNNN.parquet + rejected-BBBBB-of-NNNNN.jsonl (dead letters)

Batches are formed where the records are read, so no document crosses a shuffle: on Beam's
DirectRunner the GroupByKey of every document (and the per-document steps around it) cost about
12 µs of CPU per document, a fifth of the job (1M quora texts, 2 workers: 64.5 → 52.8 µs/doc beyond
the fixed start-up; the tower itself takes about 40). A JSONL corpus is cut into
byte ranges at line boundaries (one range = one batch), so one big file is still spread over the
workers; a CSV/TSV/Parquet file is read by one worker in ``--batch-size`` chunks.

then :func:`dssm.index.build_index_from_shards` streams the Parquet shards (``id``, ``title``,
``text``, ``record``, ``embedding`` float32 list) into one preallocated matrix and the SQLite doc
store, builds ScaNN, checks recall, and publishes ``INDEX_DIR/versions/<version>/`` by flipping
``CURRENT``.

Documents that cannot be indexed (unparsable, no id, empty, not UTF-8) go to
``INDEX_DIR/rejected/<version>/rejected-*.jsonl`` with a reason; their counts are in the manifest.
A missing file, a missing id/text column, an empty corpus or a duplicate id stops the build with
an :class:`~dssm.errors.InputError` naming the record.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm import index as index_lib
from dssm.artifacts import read_history, read_manifest, verify_manifest
from dssm.config import add_config_arguments, config_from_args, config_to_dict
from dssm.data import beir_file, corpus_columns, document_text, read_columns, table_format
from dssm.errors import ChecksumError, ConfigError, IndexNotFoundError, InputError
from dssm.hybrid import HYBRID_FILE, label_free_weight
from pipelines.corpus_batches import CorpusColumns, ReadBatches, ReadRange, plan_reads
from pipelines.embedding_shards import write_batch
from pipelines.inference import EncodeBatches
from pipelines.windows_step import WINDOW_MODES, windows_only_finalize, windows_step

__all__ = ["resolve_corpus", "encode_pipeline", "run", "main"]


def resolve_corpus(corpus: str) -> list[str]:
    """The corpus file(s): a file, a glob, or a BEIR directory (its ``corpus.jsonl`` or ``corpus.jsonl.gz``).

    Raises:
        InputError: nothing matches.
    """
    path = Path(corpus)
    if path.is_dir():
        beir = beir_file(path, "corpus.jsonl")
        if not beir.is_file():
            raise InputError(f"--corpus {corpus} is a directory without corpus.jsonl (or corpus.jsonl.gz)")
        return [str(beir)]
    if path.is_file():
        return [str(path)]
    matches = sorted(p for p in glob.glob(corpus) if Path(p).is_file())
    if not matches:
        raise InputError(f"corpus not found: {corpus}")
    return matches


def _check_columns(paths: Sequence[str], columns: CorpusColumns, table: str | None) -> None:
    for path in paths:
        have = read_columns(path, table)
        missing = [c for c in (columns.id, columns.text) if c not in have]
        if missing:
            raise InputError(f"corpus {path} lacks column(s) {missing}; it has {have} "
                             "(rename with --id-column / --text-column)")


def encode_pipeline(p: beam.Pipeline, *, ranges: Sequence[ReadRange], columns: CorpusColumns, model_dir: str,
                    shards_dir: str, rejected_dir: str, batch_size: int, shard: tuple[int, int] | None = None,
                    use_run_inference: bool = True) -> beam.PCollection:
    """Add the encode job to pipeline ``p``: read + validate + batch → RunInference → Parquet + dead letters.

    Args:
        p: the pipeline.
        ranges: the read tasks (:func:`plan_reads`); their batch ids name the output files.
        columns: the corpus columns.
        model_dir: the model directory (``saved_model`` inside).
        shards_dir: where the ``embeddings-*.parquet`` shards go.
        rejected_dir: where the ``rejected-*.jsonl`` dead letters go.
        batch_size: records per batch of a whole-file range, as planned.
        shard: ``(i, N)``: keep only the documents of index shard i of N.
        use_run_inference: RunInference (else the same handler in a plain DoFn, for Dask).

    One chain with no multi-output steps, no shuffle of documents and no ``finish_bundle`` outputs, so it
    runs the same on the DirectRunner, the Dask runner and the portable runners. ``beam.Create``
    redistributes the read tasks (a reshuffle of a few small elements), so workers share them.

    Returns:
        ``(documents, rejected)`` counts per batch.
    """
    num_batches = ranges[-1].first_batch + ranges[-1].batches if ranges else 0
    stride = shard[1] if shard else 1
    return (
        p
        | "ReadTasks" >> beam.Create(list(ranges))
        | "ReadBatches" >> beam.ParDo(ReadBatches(columns=columns, batch_size=batch_size * stride, shard=shard))
        | "Encode" >> EncodeBatches(model_dir, use_run_inference=use_run_inference)
        | "Write" >> beam.Map(write_batch, shards_dir=shards_dir, rejected_dir=rejected_dir,
                              num_batches=num_batches)
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dssm index", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other flags go to Beam (e.g. --runner, --direct_num_workers, --direct_running_mode).")
    parser.add_argument("--model", required=True, help="model directory written by `dssm train`")
    parser.add_argument("--corpus", required=True,
                        help="corpus: BEIR directory or corpus.jsonl, or JSONL/CSV/TSV/Parquet file(s) (glob ok)")
    parser.add_argument("--output", required=True, help="index directory (a new version is added)")
    parser.add_argument("--format", default=None, choices=["csv", "tsv", "jsonl", "parquet"],
                        help="corpus table format (default: from the suffix)")
    parser.add_argument("--id-column", default=None, help="id column (default: _id, id or docid, the first present)")
    parser.add_argument("--text-column", default=None,
                        help="text column (default: text, else contents as in Pyserini's JsonCollection)")
    parser.add_argument("--title-column", default="title",
                        help="title column, joined before the text; '' for none (default: title; "
                             "a corpus without it gets empty titles)")
    parser.add_argument("--batch-size", type=int, default=4096,
                        help="documents per RunInference batch and per Parquet shard (lines of a JSONL file, "
                             "records of a CSV/TSV/Parquet file; with --shard i/N, about that many of every "
                             "N times as many)")
    parser.add_argument("--shards", default=None,
                        help="keep the embedding shards in this directory (default: a staging "
                             "directory removed after the build)")
    parser.add_argument("--keep-versions", type=int, default=index_lib.DEFAULT_KEEP_VERSIONS,
                        help="after publishing, delete all but the newest N versions, never the live one or one a "
                             "reader (a Searcher, a server) still holds; 0 keeps all (default: %(default)s)")
    parser.add_argument("--min-recall", dest="scann_min_recall", type=float, default=None,
                        help="same as --scann-min-recall")
    parser.add_argument("--shard", default=None, metavar="i/N",
                        help="index only the documents whose id hashes to shard i of N (sha1 of the id; "
                             "run N jobs into N index directories and search them with ShardedSearcher; "
                             "see docs/scaling.md)")
    parser.add_argument("--inference", choices=("auto", "runinference", "pardo"), default="auto",
                        help="runinference: Beam RunInference over the keyed model handler; pardo: the same "
                             "handler in a plain DoFn (a fallback for runners where RunInference misbehaves); "
                             "auto: runinference (default: auto)")
    parser.add_argument("--hybrid-weight", choices=("label-free", "none"), default="label-free",
                        help="label-free: choose the weight of DSSM in hybrid search (the default search mode) on "
                             "pseudo-queries cut from the corpus and store it in the version; it stays 0 (BM25's "
                             "ranking) unless the tower beats BM25 alone significantly on them (dssm.hybrid."
                             "label_free_weight). none: store nothing (hybrid then uses weight 0.5). Skipped with "
                             "--shard (default: label-free)")
    parser.add_argument("--hybrid-pairs", default=None, metavar="PAIRS_DIR",
                        help="choose the hybrid weight on the validation split of this `dssm pairs` output "
                             "(labelled query -> document pairs the model was not trained on) instead of "
                             "pseudo-queries cut from the corpus; the same significance rule keeps it or 0. "
                             "Pairs made with --format corpus (the towers' label-free pre-training) are not "
                             "queries: the pseudo-queries are then cut only from documents outside their "
                             "train split, which the towers never trained on (a `dssm lsa` fit is refitted "
                             "instead and cuts from every document). Without the flag, the model's own "
                             "training pairs are read the same way when they are --format corpus pairs")
    parser.add_argument("--bm25-tuning", choices=("pairs", "none"), default="pairs",
                        help="pairs: with labelled --hybrid-pairs, choose BM25's k1 and b on them too (a small grid, "
                             "kept only if it beats k1 1.5, b 0.75 significantly; dssm.bm25_tuning) and build "
                             "the index's BM25 with them; none: always k1 1.5, b 0.75. Label-free tuning never "
                             "changes them (default: %(default)s)")
    parser.add_argument("--windows", choices=WINDOW_MODES, default="auto",
                        help="score dense candidates by cosine + best 8-word window's cosine (window vectors "
                             "stored in the version; dssm.windows). auto: only when --hybrid-pairs' held-out "
                             "labelled pairs show a significant gain (never for a dssm lsa fit); on: always "
                             "(also for a fit, with --shard, on every shard alike, and --hybrid-weight none, "
                             "which decide nothing); off: never "
                             "(default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the build summary as JSON")
    add_config_arguments(parser, index_lib.ScannConfig, prefix="scann-")
    return parser


def label_free_finalize(*, seed: int = 0, queries: int = 500, max_docs: int = 50_000,
                        pairs: list[tuple[str, str, str]] | None = None, trained_on: frozenset[str] | None = None,
                        required: bool = True, tune_bm25: bool = True, windows: str = "auto") -> index_lib.Finalize:
    """The build step that stores the hybrid weight (``hybrid.json``) in the staged version.

    Reads the staged doc store, embeddings and model copy (a random ``max_docs`` of the documents on a
    larger corpus: the tuning corpus, so memory stays bounded at any size) and runs
    :func:`dssm.hybrid.label_free_weight` on pseudo-queries, or on ``pairs`` (labelled pairs held out
    from training) when given; its report goes to the manifest as ``hybrid_tuning``. With
    ``trained_on`` (ids of the documents the towers' corpus pairs trained on), trained towers'
    pseudo-queries are cut from the other documents only (when none is left: an error if
    ``required``, else weight 0); a fit is refitted to the tuning corpus and needs no such set.
    With ``pairs`` and ``tune_bm25``, BM25's ``k1`` and ``b`` are chosen on the same pairs first
    (:func:`dssm.bm25_tuning.tune_bm25`; kept only on a significant gain), the staged BM25 state is
    written with them, and the weight is tuned with that BM25 (``bm25_tuning`` in the manifest).
    Last, :func:`pipelines.windows_step.windows_step` (``windows``: ``auto``/``on``/``off``) decides on
    the same pairs whether the version stores window vectors (``windows`` in the manifest).
    """
    def finalize(stage: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        # deferred: TensorFlow, and scipy's sparse SVD (dssm.lsa), imported only when this runs
        from dssm.export import load_encoder
        from dssm.lsa import is_fit, refit_for

        store = index_lib.DocStore(stage / index_lib.DOCS_DB)
        embeddings = np.load(stage / index_lib.EMBEDDINGS, mmap_mode="r")
        rows = np.arange(len(store))
        if rows.size > max_docs:
            rows = np.sort(np.random.default_rng(seed).choice(rows.size, max_docs, replace=False))
        docs = store.get(rows.tolist())
        texts = [document_text(d.title, d.text) for d in docs]
        worded = _as_corpus_words(pairs, texts, store) if pairs is not None else None
        # A fitted tower is fitted again to the tuning corpus, which encodes everything: neither the
        # SavedModel nor the stored rows are read then. An ensemble's refit takes its trained half of
        # the corpus's documents from the stored rows (read only then).
        refit = refit_for(stage / index_lib.MODEL_DIR,
                          known=lambda: dict(zip(texts, np.asarray(embeddings[rows]), strict=True)))
        encoder = load_encoder(stage / index_lib.MODEL_DIR) if refit is None else None
        stored = np.asarray(embeddings[rows]) if refit is None else None  # read once: the weight and the windows
        # Trained towers (an ensemble's too) have seen their training documents' spans; a fit has not.
        query_rows = [i for i, d in enumerate(docs) if d.id not in trained_on] \
            if trained_on is not None and not is_fit(stage / index_lib.MODEL_DIR) else None
        if query_rows == [] and required:
            raise InputError(f"--hybrid-pairs: the towers trained on every document of this corpus ({len(docs):,}); "
                             "make the corpus pairs with `dssm pairs --format corpus --validation-fraction F`")
        if refit is None and worded is None and trained_on is None:
            print("note: the hybrid weight is tuned on spans cut from any document; towers pre-trained on this "
                  "corpus's own pairs have learnt those spans: pass those pairs (`dssm pairs --format corpus`) "
                  "with --hybrid-pairs to cut only from the documents they did not train on", file=sys.stderr)
        bm25_config, bm25_report = _tuned_bm25(stage, store, texts, worded, seed=seed) if worded and tune_bm25 \
            else (None, None)
        tick = time.perf_counter()
        hybrid, report = label_free_weight(texts=texts, embeddings=stored,
                                           embed_queries=encoder.embed_queries if encoder else None,
                                           embed_documents=encoder.embed_documents if encoder else None,
                                           queries=queries, seed=seed, pairs=worded, refit=refit,
                                           query_rows=query_rows, bm25_config=bm25_config)
        report.update(corpus_documents=len(store), seconds=round(time.perf_counter() - tick, 2))
        tuned_on = f"{report['pairs']} held-out labelled pairs" if worded is not None else \
            f"label-free, {report['pseudo_queries']} pseudo-queries × {report['rounds']} rounds" + (
                f" from {report['query_documents']} documents the towers did not train on" if query_rows is not None
                else "")
        print(f"hybrid weight {hybrid.weight:.2f} on DSSM ({tuned_on}; "
              f"best {report.get('best', 0.0):.2f}, gain {report.get('gain', 0.0):+.4f} MRR@10, "
              f"p {report.get('p', 1.0):.3g})",
              file=sys.stderr, flush=True)
        settings = config_to_dict(hybrid)
        window_report = windows_step(stage, mode=windows, encoder=encoder, texts=texts, embeddings=stored, pairs=worded,
                                     bm25_config=bm25_config, weight=hybrid.weight, normalization=hybrid.normalization,
                                     seed=seed)
        return {HYBRID_FILE: settings}, {"hybrid": settings, "hybrid_tuning": report, "windows": window_report} | (
            {"bm25_tuning": bm25_report} if bm25_report else {})

    return finalize


def _as_corpus_words(pairs: list[tuple[str, str, str]], texts: list[str], store: Any) -> list[tuple[str, str]]:
    """``(query, document text)`` of each tuning pair, its document worded as the corpus words it.

    The tuning steps find a pair's target row by its text. A pairs file may word a corpus document
    otherwise (a body without its title, other spacing); such a document would join the tuning corpus
    as one more document beside its own row, and the windows step, which needs the row, would drop the
    pair. So a pair whose text is not a corpus text and whose document id names a corpus document takes
    that document's text (title + text, as search reads it); a text the corpus holds is kept as it is,
    whatever its id says.
    """
    known = set(texts)
    unmatched = {doc_id for _, document, doc_id in pairs if document not in known and doc_id}
    found = {doc_id: document_text(doc.title, doc.text) for doc_id, doc in store.find(sorted(unmatched)).items()}
    if found:
        print(f"tuning pairs: {sum(d not in known and i in found for _, d, i in pairs)} documents worded otherwise "
              "than the corpus found by their id", file=sys.stderr)
    return [(query, document if document in known else found.get(doc_id, document))
            for query, document, doc_id in pairs]


def _tuned_bm25(stage: Path, store: Any, texts: list[str], pairs: list[tuple[str, str]], *,
                seed: int) -> tuple[Any, dict[str, Any]]:
    """BM25's settings chosen on the held-out ``pairs`` (:func:`dssm.bm25_tuning.tune_bm25`), and its report;
    the staged version's BM25 state is written with them (the build then writes none of its own)."""
    # deferred: bm25s, PyStemmer and scipy, imported only when this runs
    from dssm.bm25 import BM25Config, write_bm25_state
    from dssm.bm25_tuning import tune_bm25

    tick = time.perf_counter()
    config, report = tune_bm25(texts, pairs, base=BM25Config(), seed=seed)
    write_bm25_state(stage, (doc for _, doc in store.iter_all()), config=config)
    report["seconds"] = round(time.perf_counter() - tick, 2)
    best = report.get("best", {"k1": config.k1, "b": config.b})
    print(f"BM25 k1 {config.k1:g}, b {config.b:g} ({report['pairs']} held-out labelled pairs; best k1 "
          f"{best['k1']:g}, b {best['b']:g}, gain {report.get('gain', 0.0):+.4f} MRR@10 over k1 1.5, b 0.75, "
          f"p {report.get('p', 1.0):.3g})", file=sys.stderr, flush=True)
    return config, report


def _steady_rate(job: Any) -> dict[str, Any]:
    """Documents/s from the first batch read to the last shard written (Beam metrics), or ``{}`` if unknown.

    Leaves out what comes before the first batch: worker start-up, imports and model loading, a fixed
    cost of seconds that dominates a short job's whole-job rate.
    """

    try:
        metrics = job.metrics().query(MetricsFilter().with_namespace("dssm_encode"))
    except (NotImplementedError, AttributeError, KeyError):  # a runner without metrics
        return {}
    found = {m.key.metric.name: m.committed for kind in ("counters", "distributions") for m in metrics.get(kind, [])}
    start, end, encoded = found.get("batch_start_ms"), found.get("batch_written_ms"), found.get("encoded")
    if not (start and end and encoded and start.count and end.count and end.max > start.min):
        return {}
    seconds = (end.max - start.min) / 1000
    return {"steady_seconds": round(seconds, 3), "steady_docs_per_second": round(encoded / seconds, 1)}


def _count_rejected(prefix: str) -> tuple[int, dict[str, int], str | None]:
    reasons: Counter[str] = Counter()
    example = None
    for path in sorted(glob.glob(prefix + "*")):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    item = json.loads(line)
                    reasons[item["reason"]] += 1
                    if example is None:
                        example = f"{item['record']}: {item['detail']}"
    return sum(reasons.values()), dict(sorted(reasons.items())), example


@dataclass(frozen=True)
class _Inputs:
    """The checked inputs of a run: corpus files, their format and columns, the model, the index shard."""

    paths: list[str]
    table: str | None  # None: each file's suffix decides
    columns: CorpusColumns
    model_dir: Path
    shard: tuple[int, int] | None


def _check_inputs(args: argparse.Namespace) -> _Inputs:
    """Check the flags, corpus and model before anything is written (raises InputError/ConfigError)."""
    if args.keep_versions < 0:
        raise ConfigError(f"--keep-versions must be >= 0, got {args.keep_versions}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    shard = index_lib.parse_shard_spec(args.shard) if args.shard else None
    paths = resolve_corpus(args.corpus)
    table = args.format  # None: each file's suffix decides
    for path in paths:
        table_format(path, table)  # an unknown suffix fails here, not inside the pipeline
    first_columns = read_columns(paths[0], table)
    id_column, text_column = corpus_columns(first_columns, id_column=args.id_column, text_column=args.text_column)
    columns = CorpusColumns(id=id_column, text=text_column, title=args.title_column or None)
    _check_columns(paths, columns, table)
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise InputError(f"--model {model_dir}: no such directory (train one with `dssm train`)")
    verify_manifest(model_dir, kind="model")
    return _Inputs(paths=paths, table=table, columns=columns, model_dir=model_dir, shard=shard)


def _tuning_source(hybrid_pairs: str | None, model_dir: Path) -> tuple[
        list[tuple[str, str, str]] | None, frozenset[str] | None, bool]:
    """What the hybrid weight is tuned on: ``(labelled validation pairs, None, True)`` for ``--hybrid-pairs``;
    ``(None, ids of the documents trained on, required)`` for pairs cut from a corpus (``--format
    corpus``), given or, without the flag, the model's own training pairs (``history.json["pairs"]``,
    written by ``dssm train``); ``(None, None, False)`` for plain label-free tuning."""
    # deferred: TensorFlow, imported only when this runs
    from dssm.inputs import pair_files, read_document_ids, read_text_pairs_with_ids

    if not hybrid_pairs:
        own = _model_training_pairs(model_dir)
        if own is None:
            return None, None, False
        print(f"hybrid weight: pseudo-queries only from documents outside the train split of {own}, the "
              "corpus pairs the towers trained on", file=sys.stderr)
        return None, _trained_on(read_document_ids(pair_files(own, "train"), min_label=0.0)), False
    files = pair_files(hybrid_pairs, "validation")
    if _pairs_format(hybrid_pairs) == "corpus":
        if not read_document_ids(files, min_label=0.0).size:
            raise InputError(f"--hybrid-pairs {hybrid_pairs}: its validation split holds no document "
                             "(make the corpus pairs with `dssm pairs --format corpus --validation-fraction F`)")
        return None, _trained_on(read_document_ids(pair_files(hybrid_pairs, "train"), min_label=0.0)), True
    tuning_pairs = read_text_pairs_with_ids(files)
    if not tuning_pairs:
        raise InputError(f"--hybrid-pairs {hybrid_pairs}: its validation split holds no positive pair "
                         "(make it with `dssm pairs --validation-fraction F`)")
    return tuning_pairs, None, True


def _trained_on(ids: np.ndarray) -> frozenset[str]:
    return frozenset(i.decode("utf-8", "replace") if isinstance(i, bytes) else str(i) for i in ids.tolist())


def _model_training_pairs(model_dir: Path) -> str | None:
    """The corpus pairs (``--format corpus``) ``dssm train`` made this model from, if it says so and they are here."""
    try:
        pairs = read_history(model_dir).get("pairs")
        return pairs if isinstance(pairs, str) and Path(pairs).is_dir() and _pairs_format(pairs) == "corpus" else None
    except (ChecksumError, InputError):  # an unreadable history or manifest: nothing to rely on
        return None


def _pairs_format(pairs_dir: str) -> str | None:
    """The ``format`` a `dssm pairs` output directory was made with (``None`` if it does not say)."""
    try:
        return read_manifest(pairs_dir).get("format")
    except IndexNotFoundError:
        return None
    except ChecksumError as exc:
        raise InputError(f"--hybrid-pairs {pairs_dir}: {exc}") from exc


def _output_dirs(output: Path, stage: Path, version: str, keep_shards: str | None) -> tuple[Path, Path]:
    """``(shards_dir, rejected_dir)`` of a new version staged in ``stage``, both created."""
    shards_dir = Path(keep_shards) if keep_shards else stage / "shards"
    if keep_shards and any(shards_dir.glob("embeddings-*.parquet")):
        raise InputError(f"--shards {shards_dir} already holds embedding shards; give an empty directory")
    shards_dir.mkdir(parents=True, exist_ok=True)
    rejected_dir = output / "rejected" / version
    rejected_dir.mkdir(parents=True, exist_ok=True)
    return shards_dir, rejected_dir


def _encode(pipeline: beam.Pipeline, inputs: _Inputs, ranges: list[ReadRange], records: int, *,
            args: argparse.Namespace, beam_args: list[str], shards_dir: Path, rejected_dir: Path,
            use_run_inference: bool, started: float) -> tuple[dict[str, Any], list[Path]]:
    """Run the Beam job and count what it wrote: ``(the manifest's "encode" section, the shards)``."""
    shard = inputs.shard
    num_batches = ranges[-1].first_batch + ranges[-1].batches if ranges else 0
    encode_pipeline(pipeline, ranges=ranges, columns=inputs.columns, model_dir=str(inputs.model_dir),
                    shards_dir=str(shards_dir.resolve()), rejected_dir=str(rejected_dir.resolve()),
                    batch_size=args.batch_size, shard=shard, use_run_inference=use_run_inference)
    print(f"encoding {records:,} records of {', '.join(inputs.paths)} in {num_batches} batches with "
          f"{inputs.model_dir} ...", file=sys.stderr, flush=True)
    job = pipeline.run()
    job.wait_until_finish()
    encode_seconds = time.perf_counter() - started
    steady = _steady_rate(job)

    shards = sorted(shards_dir.glob("embeddings-*.parquet"))
    encoded, _ = index_lib.count_shard_rows(shards)
    rejected, by_reason, example = _count_rejected(str(rejected_dir / "rejected-"))
    if encoded == 0:
        detail = f"; {rejected} record(s) rejected, e.g. {example} (see {rejected_dir})" if rejected else ""
        raise InputError(f"corpus {args.corpus} has no documents to index{detail}")
    encode = {
        "corpus": [str(Path(p).resolve()) for p in inputs.paths],
        "columns": {"id": inputs.columns.id, "title": inputs.columns.title, "text": inputs.columns.text},
        "read": encoded + rejected,
        "encoded": encoded,
        "rejected": rejected,
        "rejected_by_reason": by_reason,
        "rejected_dir": str(rejected_dir),
        "seconds": round(encode_seconds, 3),
        "docs_per_second": round(encoded / encode_seconds, 1),
        **steady,
        "batches": num_batches,
        "beam_args": beam_args,
        "shard": None if shard is None else {"index": shard[0], "count": shard[1]},
        "inference": "runinference" if use_run_inference else "pardo",
    }
    return encode, shards


def _clean_up(rejected_dir: Path) -> None:
    """Remove the dead-letter directory when the job rejected nothing (the staging goes with its context)."""
    if not any(rejected_dir.glob("rejected-*.jsonl")):
        shutil.rmtree(rejected_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # only if empty: other builds may be using it
        rejected_dir.parent.rmdir()


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Run the encode job and build + publish a new index version.

    Args:
        argv: ``dssm index`` flags; unknown ones go to Beam's ``PipelineOptions``.
        test_pipeline: a ``TestPipeline`` to build the job on instead of a new pipeline.

    Returns:
        The build summary (also stored in the version's manifest).

    Raises:
        InputError: missing corpus/model, missing columns, empty corpus, duplicate ids.
        ConfigError: bad flags, or the built index's recall is below ``--min-recall``.
    """

    args, beam_args = _parser().parse_known_args(argv)
    config = config_from_args(index_lib.ScannConfig, args, prefix="scann-")
    inputs = _check_inputs(args)
    shard = inputs.shard
    tune = args.hybrid_weight == "label-free" and shard is None  # a shard stores no weight
    tuning_pairs, trained_on, required = _tuning_source(args.hybrid_pairs, Path(inputs.model_dir)) \
        if tune else (None, None, False)
    output = Path(args.output)
    version = index_lib.new_version_name()
    # The staging directory (shards, then the version) is owned while the job runs and removed after it,
    # whatever happens; a killed job's is removed by the next writer (dssm.index.versions.staging).
    with index_lib.staging(output, version) as stage:
        shards_dir, rejected_dir = _output_dirs(output, stage, version, args.shards)
        # auto was pardo on Dask while RunInference's BatchElements (not skipped through Beam 2.77's
        # KeyedModelHandler) lost the batches it emits from finish_bundle there; KeyedTowerHandler skips it.
        use_run_inference = args.inference in ("auto", "runinference")
        ranges, records = plan_reads(inputs.paths, inputs.table, batch_size=args.batch_size,
                                     stride=shard[1] if shard else 1)

        try:
            started = time.perf_counter()
            pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(beam_args))
            encode, shards = _encode(pipeline, inputs, ranges, records, args=args, beam_args=beam_args,
                                     shards_dir=shards_dir, rejected_dir=rejected_dir,
                                     use_run_inference=use_run_inference, started=started)
            extra: dict[str, Any] = {"encode": encode}
            if shard is not None:
                extra["shard"] = {"index": shard[0], "count": shard[1], "hash": "sha1(id)[:8] mod count"}
            finalize = label_free_finalize(seed=config.seed, pairs=tuning_pairs, trained_on=trained_on,
                                           required=required, tune_bm25=args.bm25_tuning == "pairs",
                                           windows=args.windows) if tune else \
                windows_only_finalize(seed=config.seed) if args.windows == "on" else None
            result = index_lib.build_index_from_shards(output, shards=shards, model_dir=inputs.model_dir,
                                                       config=config, version=version, extra=extra, finalize=finalize)
        finally:
            # The shards are scratch unless --shards asked to keep them; a failed job leaves no staging.
            _clean_up(rejected_dir)
    if not encode["rejected"]:
        encode["rejected_dir"] = None
    pruned = index_lib.prune_versions(output, keep=args.keep_versions) if args.keep_versions else []
    summary = result.summary()
    summary.update(encode=encode, pruned_versions=pruned, scann_config=config_to_dict(config),
                   shards=str(shards_dir) if args.shards else None)
    return summary


def _table(summary: dict[str, Any]) -> str:
    enc = summary["encode"]
    rows = [
        ("version", summary["version"]),
        ("index", summary["version_dir"]),
        ("documents", f"{summary['documents']:,} (dim {summary['dim']})"),
        ("rejected", f"{enc['rejected']:,}" + (f" {enc['rejected_by_reason']} → {enc['rejected_dir']}"
                                               if enc["rejected"] else "")),
        ("encode", f"{enc['seconds']:.1f} s, {enc['docs_per_second']:,.0f} docs/s"
                   + (f" (steady {enc['steady_docs_per_second']:,.0f} docs/s after start-up)"
                      if enc.get("steady_docs_per_second") else "")),
        ("scann", ", ".join(f"{k}={v}" for k, v in summary["scann"].items())),
        ("recall@10", f"{summary['recall_at_10']:.4f} vs exact"),
        ("build", ", ".join(f"{k} {v:.2f}s" for k, v in summary["seconds"].items())),
        ("peak RSS", f"{summary['peak_rss_bytes'] / 2**20:,.0f} MiB "
                     f"(matrix {summary['matrix_bytes'] / 2**20:,.1f} MiB)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    """``dssm index --model MODEL_DIR --corpus PATH --output INDEX_DIR [beam flags]``."""
    as_json = _parser().parse_known_args(argv)[0].json
    summary = run(argv)
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        print(_table(summary))
    return 0
