"""Tagging: rank labels for a text, train the towers to tag, evaluate (``dssm tag``, ``train-tags``, ``eval-tags``).

A *tags index* is an ordinary index directory whose documents are the labels: id = the label,
text = its description (e.g. ``game::strategy`` → "game: strategy"). Tagging a text scores it
against every label vector of the index (:class:`serving.tagger.Tagger`). The vectors come from

* **zero-shot** — the document tower's embedding of each description (``dssm tag --labels --model``):
  no label needs a training example;
* **few-shot** — with ``--examples FILE --shots K``, the mean of the description's embedding and up to
  ``K`` example texts' embeddings per label (a prototype), normalised;
* **trained** — ``dssm train-tags`` trains the towers on labelled texts with the multi-label loss
  (:mod:`dssm.tag_train`) and publishes the tags index itself, with the vectors it learned and the
  decision threshold it chose on held-out *training* texts.

Labelled texts are JSONL/Parquet with a list column or CSV/TSV with a joined or JSON cell
(:mod:`dssm.tag_data`); label files are ``label<TAB>description``::

    dssm train-tags --train train.jsonl --labels labels.tsv --output work/tagger --index work/tags
    dssm tag --index work/tags --predicted "a chess engine with a GTK interface"
    dssm eval-tags --data dev.jsonl --index trained=work/tags --index zero-shot=work/tags0 --output work/report

Index builds run in this process (:func:`dssm.index.build_index`): label sets are small.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dssm.config import add_config_arguments, config_from_args
from dssm.data import Document
from dssm.errors import InputError
from dssm.index import build_index
from dssm.tag_data import TaggedText, label_matrix, read_labels, read_tagged
from dssm.teacher import TEACHERS, teacher_encoder
from serving.searcher import Searcher
from serving.tagger import TAG_MODES, Tagger, TagHit

__all__ = ["read_labels", "build_tag_index", "few_shot_examples", "train_tags", "rank_labels", "main",
           "train_main"]


def few_shot_examples(texts: Sequence[TaggedText], labels: Sequence[str], *, shots: int,
                      seed: int = 0) -> dict[str, list[str]]:
    """Up to ``shots`` example texts per label, a seeded random choice among the texts carrying it."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[str]] = {label: [] for label in labels}
    for item in texts:
        for label in item.labels:
            if label in by_label:
                by_label[label].append(item.text)
    out = {}
    for label, pool in by_label.items():
        chosen = rng.permutation(len(pool))[:shots] if shots > 0 else []
        out[label] = [pool[i] for i in sorted(chosen)]
    return out


def build_tag_index(index_dir: str | Path, *, labels: Sequence[Document], model_dir: str | Path,
                    examples: dict[str, list[str]] | None = None, vectors: np.ndarray | None = None,
                    tagging: dict[str, Any] | None = None) -> Any:
    """Publish a tags index version: one vector per label (see the module docstring for the three kinds).

    Args:
        index_dir: the tags index directory.
        labels: the labels (:func:`dssm.tag_data.read_labels`).
        model_dir: the model whose towers embed texts and descriptions (copied into the version).
        examples: few-shot example texts per label (prototype = mean of description and examples).
        vectors: ``[num_labels, dim]`` label vectors to store as they are (``dssm train-tags``).
        tagging: stored in the manifest under ``tagging`` (the threshold, how it was chosen).
    """
    # deferred: TensorFlow, imported only when this runs (tagging with a built index needs none)
    from dssm.export import load_encoder

    if vectors is None:
        encoder = load_encoder(model_dir)
        vectors = encoder.embed_documents([label.text for label in labels])
        if examples:
            # Every example text once, in one call: a text carrying several labels serves each of them.
            position = {text: i for i, text in enumerate(dict.fromkeys(t for ts in examples.values() for t in ts))}
            embedded = encoder.embed_documents(list(position)) if position else None
            for j, label in enumerate(labels):
                rows = [position[text] for text in examples.get(label.id, [])]
                if rows:
                    vectors[j] = vectors[j] + embedded[rows].sum(axis=0)
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    extra = {"tagging": tagging} if tagging else None
    return build_index(index_dir, embeddings=vectors, ids=[label.id for label in labels],
                       texts=[label.text for label in labels], model_dir=model_dir, extra=extra)


def train_tags(*, train_path: str | Path, labels_path: str | Path, output: str | Path, index_dir: str | Path,
               config: Any, text_column: str = "text", labels_column: str = "labels", separator: str = ",",
               overwrite: bool = False, teacher: str = "") -> dict[str, Any]:
    """Train the towers to tag (:func:`dssm.tag_train.train_tagger`), export them, publish the tags index.

    Args:
        teacher: with ``config.loss == "distill"`` (and only then), the teacher (``minilm``) whose
            cosines of each text with every description are learned (``softmax(cos / teacher_temperature)``,
            the ``distill`` loss of :mod:`dssm.tag_losses`); the file's labels are not read, so unlabelled
            texts train.

    Returns:
        The run's history (``tagging`` holds the threshold).

    Raises:
        InputError: ``distill`` without a teacher, or a teacher with another loss.
    """
    # deferred: TensorFlow, imported only when this runs (tagging with a built index needs none)
    from dssm.tag_train import export_tagger, train_tagger

    distill = config.loss == "distill"
    if distill != bool(teacher):
        raise InputError("--loss distill needs --teacher (the model whose zero-shot scores are learned), and "
                         f"--teacher needs --loss distill; got loss {config.loss!r}, teacher {teacher!r}")
    labels = read_labels(labels_path)
    names = [label.id for label in labels]
    texts = read_tagged(train_path, known_labels=names, text_column=text_column,
                        labels_column=None if distill else labels_column, separator=separator)
    if distill:
        encode = teacher_encoder(teacher)
        targets = encode([t.text for t in texts]) @ encode([label.text for label in labels]).T  # [texts, labels]
    else:
        targets = label_matrix(texts, names)
    trainer, history = train_tagger([t.text for t in texts], targets, ids=[t.id for t in texts],
                                    label_texts=[label.text for label in labels], config=config)
    history["tagging"].update(train=str(train_path), labels=str(labels_path), texts=len(texts),
                              **({"teacher": teacher} if distill else {}))
    export_tagger(trainer, output, history=history, overwrite=overwrite)
    result = build_tag_index(index_dir, labels=labels, model_dir=output, vectors=trainer.label_matrix(),
                             tagging=history["tagging"])
    history["index_version"] = result.version
    return history


def rank_labels(searcher: Any, text: str, *, k: int | None = None) -> list[tuple[str, float, str]]:
    """Labels for ``text``, best first: ``(label, cosine, description)``; all labels unless ``k`` is given."""
    return [(hit.label, hit.score, hit.description) for hit in Tagger(searcher).tag(text, k=k)]


def _print_hits(text: str, hits: list[TagHit], *, as_json: bool, threshold: float | None) -> None:
    if as_json:
        json.dump({"text": text, "threshold": threshold,
                   "labels": [{"label": h.label, "score": h.score, "predicted": h.predicted} for h in hits]},
                  sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        return
    width = max(5, *(len(h.label) for h in hits)) if hits else 5
    print(f"text: {text}" + ("" if threshold is None else f"   (threshold {threshold:.4f}; * = predicted)"))
    print(f"{'#':>3}  {'score':>7}  {'label':<{width}}  description")
    for rank, h in enumerate(hits, 1):
        mark = "*" if h.predicted else " "
        print(f"{rank:>3} {mark}{h.score:>7.4f}  {h.label:<{width}}  {' '.join(h.description.split())[:80]}")


def main(argv: list[str] | None = None) -> int:
    """``dssm tag --index TAGS_INDEX [--labels FILE --model MODEL_DIR [--examples F --shots K]] [-k N] ["text"]``."""
    parser = argparse.ArgumentParser(prog="dssm tag", description="Rank labels (short descriptions) for a text.")
    parser.add_argument("--index", required=True, type=Path, help="tags index directory")
    parser.add_argument("--labels", type=Path, help="labels file: (re)build the tags index from it first")
    parser.add_argument("--model", type=Path, help="model directory for --labels")
    parser.add_argument("--examples", type=Path, help="labelled texts: few-shot prototypes with --labels")
    parser.add_argument("--shots", type=int, default=5, help="examples per label taken from --examples (default 5)")
    parser.add_argument("-k", type=int, default=None, help="show the top k labels (default: all)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="decision threshold (cosine); default the one `dssm train-tags` stored")
    parser.add_argument("--predicted", action="store_true", help="only the labels at or above the threshold")
    parser.add_argument("--mode", choices=TAG_MODES, default="dense",
                        help="dense (the towers' cosines), bm25 (the text against the label descriptions) or "
                             "hybrid (both, fused per text); the stored threshold applies to dense only")
    parser.add_argument("--json", action="store_true",
                        help='print {"text", "threshold", "labels": [{"label", "score", "predicted"}]}')
    parser.add_argument("text", nargs="*", help="text to tag (several words are joined by spaces)")
    args = parser.parse_args(argv)
    if args.k is not None and args.k < 1:
        raise InputError(f"-k must be >= 1, got {args.k}")
    if args.labels is not None:
        if args.model is None:
            raise InputError("--labels needs --model (the model whose document tower embeds the descriptions)")
        labels = read_labels(args.labels)
        examples = None
        if args.examples is not None:
            tagged = read_tagged(args.examples, known_labels=[label.id for label in labels])
            examples = few_shot_examples(tagged, [label.id for label in labels], shots=args.shots)
        result = build_tag_index(args.index, labels=labels, model_dir=args.model, examples=examples)
        print(f"tags index {args.index}: {result.documents} labels, version {result.version}", file=sys.stderr)
    elif args.model is not None or args.examples is not None:
        raise InputError("--model and --examples are only used with --labels")
    if not args.text:
        if args.labels is None:
            raise InputError("give a text to tag (or --labels and --model to build the tags index)")
        return 0
    text = " ".join(args.text)
    tagger = Tagger(Searcher.load(args.index), mode=args.mode)
    threshold = tagger.threshold if args.threshold is None else args.threshold
    hits = tagger.tag(text, k=args.k, threshold=threshold, predicted_only=args.predicted)
    _print_hits(text, hits, as_json=args.json, threshold=threshold)
    return 0


def train_main(argv: list[str] | None = None) -> int:
    """``dssm train-tags --train FILE --labels FILE --output MODEL_DIR --index TAGS_INDEX [options]``."""
    # deferred: TensorFlow, imported only when this runs
    from dssm.tag_train import TagTrainConfig

    parser = argparse.ArgumentParser(prog="dssm train-tags", description="Train the towers to tag with the "
                                     "multi-label loss; export the model and publish a tags index.")
    parser.add_argument("--train", required=True, help="labelled texts (JSONL/Parquet list column, or CSV/TSV)")
    parser.add_argument("--labels", required=True, help="label file: label<TAB>description")
    parser.add_argument("--output", required=True, help="model directory to write")
    parser.add_argument("--index", required=True, help="tags index directory to publish (a new version)")
    parser.add_argument("--text-column", default="text", help="text column (default: text)")
    parser.add_argument("--labels-column", default="labels", help="labels column (default: labels)")
    parser.add_argument("--separator", default=",", help="between labels in a CSV/TSV cell (default: ,)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--teacher", default="", choices=["", *TEACHERS],
                        help="with --loss distill: learn this model's zero-shot label ranking of --train's texts "
                             "(their labels are not read; the [teacher] extra)")
    add_config_arguments(parser, TagTrainConfig)
    args = parser.parse_args(argv)
    history = train_tags(train_path=args.train, labels_path=args.labels, output=args.output, index_dir=args.index,
                         config=config_from_args(TagTrainConfig, args), text_column=args.text_column,
                         labels_column=args.labels_column, separator=args.separator, overwrite=args.overwrite,
                         teacher=args.teacher)
    tagging = history["tagging"]
    print(f"wrote {args.output} and tags index {args.index} (version {history['index_version']}): best epoch "
          f"{history['best_epoch']}, threshold {tagging['threshold']:.4f} ({tagging['threshold_source']})"
          + (f", held-out micro-F1 {tagging['val_micro_f1']:.4f}" if "val_micro_f1" in tagging else ""))
    return 0
