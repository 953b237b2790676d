"""Format ``tags`` of the pairs job: labelled texts → one (text, label description) pair per label.

A record is a text with a list of labels (:mod:`dssm.tag_data`'s formats: a list column in
JSONL/Parquet, a JSON array or ``--label-separator``-joined labels in CSV/TSV). With the label file
(``--label-file``, ``label<TAB>description``) each of its labels becomes a pair whose query is the
text and whose document is the label's description (``document_id`` = the label), so the towers learn
to put a text near the descriptions of its labels and in-batch negatives are other labels'
descriptions (same-label columns are masked as accidental hits by their document id). All pairs of a
text share its split (a hash of the text id), so no validation text is seen in training.

Dead letters (reason codes in :data:`pipelines.validate.REASONS`): a labels cell that is
neither a list nor a string, a label not in the label file, a text with no label (nothing to pair
it with), plus the usual missing column / not UTF-8 / empty / too long. ``stats.json`` counts
``paired_documents`` (texts that gave pairs): read = paired texts + rejected.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam

from dssm.data import read_columns, split_of, table_format
from dssm.errors import InputError
from dssm.tag_data import parse_labels, read_labels
from pipelines.records import as_text, reject
from pipelines.validate import PairLimits, SplitSpec, text_id

__all__ = ["TagSpec", "TagPairs", "resolve_tags"]


@dataclass(frozen=True)
class TagSpec:
    """Columns and labels of format tags."""

    text_column: str
    labels_column: str
    id_column: str | None
    separator: str
    descriptions: tuple[tuple[str, str], ...]  # (label, description), the label file's order


def resolve_tags(path: Path, *, label_file: str, text_column: str, labels_column: str, id_column: str,
                 separator: str) -> tuple[TagSpec, str]:
    """Check a format tags input before the job starts: ``(spec, table format)``.

    Raises:
        InputError: no ``--label-file``, a directory, or a table lacking the text or labels column
            (the message names the columns found); a bad label file (:func:`dssm.tag_data.read_labels`).
    """
    if not label_file:
        raise InputError("--format tags needs --label-file (label<TAB>description): each text is paired with "
                         "the descriptions of its labels")
    if path.is_dir():
        raise InputError(f"--format tags reads a table of labelled texts (CSV/TSV/JSONL/Parquet); {path} is a "
                         "directory")
    kind = table_format(path)
    found = read_columns(path, kind)
    missing = [c for c in (text_column, labels_column) if c not in found]
    if missing:
        raise InputError(f"{path} (tags format) lacks column(s) {missing}: it has {found} (rename with "
                         "--text-column/--labels-column)")
    if id_column and id_column not in found:
        raise InputError(f"{path} (tags format) lacks the id column {id_column!r}: it has {found}")
    chosen_id = id_column or next((c for c in ("_id", "id") if c in found), None)
    labels = read_labels(label_file)
    spec = TagSpec(text_column=text_column, labels_column=labels_column, id_column=chosen_id, separator=separator,
                   descriptions=tuple((label.id, label.text) for label in labels))
    return spec, kind


class TagPairs(beam.DoFn):
    """Raw labelled-text record → its (text, label description) pairs, or one dead letter.

    Also emits the text id on the ``paired`` output once per text with pairs (the job's accounting).
    """

    PAIRED = "paired"

    def __init__(self, *, spec: TagSpec, limits: PairLimits, split: SplitSpec) -> None:
        self._spec = spec
        self._limits = limits
        self._split = split
        self._descriptions = dict(spec.descriptions)

    def process(self, raw: dict[str, Any]) -> Iterator[Any]:
        if raw.get("reason"):
            yield reject(raw, raw["reason"], raw.get("error") or raw["reason"])
            return
        fields, spec = raw["fields"], self._spec
        missing = [c for c in (spec.text_column, spec.labels_column) if c not in fields]
        if missing:
            yield reject(raw, "missing_column", f"no column(s) {missing}; the record has {sorted(fields)}")
            return
        text = as_text(fields[spec.text_column])
        if isinstance(text, bytes):
            yield reject(raw, "query_not_utf8", f"text column {spec.text_column!r} is not valid UTF-8")
            return
        if text is None or not text.strip():
            yield reject(raw, "empty_query", f"text column {spec.text_column!r} is empty: {text!r}")
            return
        if len(text) > self._limits.max_query_chars:
            yield reject(raw, "query_too_long", f"text has {len(text)} characters, the limit is "
                                                f"{self._limits.max_query_chars}")
            return
        try:
            labels = parse_labels(fields[spec.labels_column], separator=spec.separator, location=raw["record"])
        except InputError as exc:
            yield reject(raw, "bad_labels", str(exc))
            return
        unknown = [label for label in labels if label not in self._descriptions]
        if unknown:
            yield reject(raw, "unknown_label", f"label(s) {unknown} are not in the label file")
            return
        if not labels:
            yield reject(raw, "no_label", "the text has no label")
            return
        identifier = as_text(fields.get(spec.id_column)) if spec.id_column else None
        text_key = identifier.strip() if isinstance(identifier, str) and identifier.strip() else text_id(text)
        split = split_of(text_key, validation_fraction=self._split.validation_fraction, salt=self._split.salt)
        for label in labels:
            yield {"record": raw["record"], "query_id": text_key, "document_id": label, "query_text": text,
                   "document_text": self._descriptions[label], "label": 1.0, "split": split}
        yield beam.pvalue.TaggedOutput(self.PAIRED, text_key)
