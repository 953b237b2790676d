"""Zero-shot tagging: rank labels, each written as a short description, for a text. ``main`` = ``dssm tag``.

A *tags index* is an ordinary index directory whose documents are the labels: id = the label,
text = its description (e.g. ``python-programming`` → "learning and using the Python programming
language"). Tagging a text is a search over that index: the text goes through the query tower, the
descriptions were embedded by the document tower, and labels come back ranked by cosine. No label
needs a training example ("one-shot from our notes": a description is the only supervision).

Build the tags index once from a small labels file (CSV/TSV/JSONL with ``label`` and ``description``
columns, renamed by ``--label-column``/``--description-column``)::

    dssm tag --index work/tags --labels labels.tsv --model work/model
    dssm tag --index work/tags "how do I learn python"

The build runs in this process (:func:`dssm.index.build_index_from_documents`): label sets are
small, so the Beam job's start-up would dominate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dssm.data import Document, iter_corpus
from dssm.errors import InputError
from dssm.index import build_index_from_documents
from serving.searcher import Searcher

__all__ = ["read_labels", "build_tag_index", "rank_labels", "main"]


def read_labels(path: str | Path, *, label_column: str = "label",
                description_column: str = "description") -> list[Any]:
    """Labels as :class:`dssm.data.Document` (id = label, title empty, text = description).

    Raises:
        InputError: missing file or columns, an empty label or description, a repeated label (each
            naming the record).
    """

    labels: list[Document] = []
    seen: dict[str, int] = {}
    for doc in iter_corpus(path, id_column=label_column, text_column=description_column, title_column=None):
        if not doc.text.strip():
            raise InputError(f"{path}: label {doc.id!r} has an empty description")
        if doc.id in seen:
            raise InputError(f"{path}: label {doc.id!r} appears twice (records {seen[doc.id]} and {len(labels) + 1})")
        seen[doc.id] = len(labels) + 1
        labels.append(Document(doc.id, "", doc.text))
    if not labels:
        raise InputError(f"labels file {path} has no labels")
    return labels


def build_tag_index(index_dir: str | Path, *, labels_path: str | Path, model_dir: str | Path,
                    label_column: str = "label", description_column: str = "description") -> Any:
    """Embed the label descriptions with the model's document tower and publish a tags index version."""

    labels = read_labels(labels_path, label_column=label_column, description_column=description_column)
    return build_index_from_documents(index_dir, model_dir=model_dir, documents=labels, progress=False)


def rank_labels(searcher: Any, text: str, *, k: int | None = None) -> list[tuple[str, float, str]]:
    """Labels for ``text``, best first: ``(label, cosine, description)``; all labels unless ``k`` is given."""
    return [tuple(hit) for hit in searcher.search(text, k=k or len(searcher))]


def main(argv: list[str] | None = None) -> int:
    """``dssm tag --index TAGS_INDEX [--labels FILE --model MODEL_DIR] [-k N] [--json] ["text"]``."""
    parser = argparse.ArgumentParser(prog="dssm tag", description="Rank labels (short descriptions) for a text.")
    parser.add_argument("--index", required=True, type=Path, help="tags index directory")
    parser.add_argument("--labels", type=Path, help="labels file: (re)build the tags index from it first")
    parser.add_argument("--model", type=Path, help="model directory for --labels")
    parser.add_argument("--label-column", default="label", help="label column of --labels (default: label)")
    parser.add_argument("--description-column", default="description",
                        help="description column of --labels (default: description)")
    parser.add_argument("-k", type=int, default=None, help="show the top k labels (default: all)")
    parser.add_argument("--json", action="store_true", help='print {"text", "labels": [{"label", "score"}]}')
    parser.add_argument("text", nargs="*", help="text to tag (several words are joined by spaces)")
    args = parser.parse_args(argv)
    if args.k is not None and args.k < 1:
        raise InputError(f"-k must be >= 1, got {args.k}")
    if args.labels is not None:
        if args.model is None:
            raise InputError("--labels needs --model (the model whose document tower embeds the descriptions)")
        result = build_tag_index(args.index, labels_path=args.labels, model_dir=args.model,
                                 label_column=args.label_column, description_column=args.description_column)
        print(f"tags index {args.index}: {result.documents} labels, version {result.version}", file=sys.stderr)
    elif args.model is not None:
        raise InputError("--model is only used with --labels")
    if not args.text:
        if args.labels is None:
            raise InputError("give a text to tag (or --labels and --model to build the tags index)")
        return 0

    text = " ".join(args.text)
    ranked = rank_labels(Searcher.load(args.index), text, k=args.k)
    if args.json:
        json.dump({"text": text, "labels": [{"label": label, "score": score} for label, score, _ in ranked]},
                  sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    width = max(5, *(len(label) for label, _, _ in ranked))
    print(f"text: {text}")
    print(f"{'#':>3}  {'score':>7}  {'label':<{width}}  description")
    for rank, (label, score, description) in enumerate(ranked, 1):
        print(f"{rank:>3}  {score:>7.4f}  {label:<{width}}  {' '.join(description.split())[:80]}")
    return 0
