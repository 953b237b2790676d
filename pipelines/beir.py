"""The BEIR join (format beir): qrels + queries.jsonl + corpus.jsonl → one raw pair record per qrel line.

This module owns :class:`JoinBeir` and its steps: keying the queries and corpus lines by ``_id``,
turning a qrels line into a pair to complete (or a record already marked unusable), and copying the
matching query and document texts in through two ``CoGroupByKey`` joins. The pair records it emits
are checked by :class:`pipelines.validate.ValidatePairs` like any other raw record.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam

from pipelines.records import REJECTED, as_text, json_safe, label_of

__all__ = ["JoinBeir"]


def _keyed(raw: dict[str, Any], id_key: str, reason: str) -> Iterator[Any]:
    """BEIR queries/corpus line → ``(id, raw)``, or a dead letter if it has no usable id."""
    if raw.get("reason"):
        yield beam.pvalue.TaggedOutput(REJECTED, {"record": raw["record"], "reason": reason,
                                                 "detail": raw.get("error") or "", "row": raw["fields"]})
        return
    value = as_text(raw["fields"].get(id_key))
    if not isinstance(value, str) or not value.strip():
        yield beam.pvalue.TaggedOutput(REJECTED, {"record": raw["record"], "reason": reason,
                                                 "detail": f"no usable {id_key!r}: {json_safe(value)!r}",
                                                 "row": raw["fields"]})
        return
    yield value.strip(), raw


def _document_text(fields: dict[str, Any]) -> str | bytes | None:
    """``title + " " + text`` (the convention of :func:`dssm.bm25.document_text`)."""
    title, text = as_text(fields.get("title")), as_text(fields.get("text"))
    if isinstance(title, bytes) or isinstance(text, bytes):
        return (title.encode() if isinstance(title, str) else title or b"") + b" " + (
            text.encode() if isinstance(text, str) else text or b"")
    if title and title.strip():
        return f"{title} {text or ''}".strip()
    return text


def _qrel(raw: dict[str, Any]) -> Iterator[Any]:
    """qrels.tsv line → ``(query_id, raw pair)`` for the join, or the raw record straight through."""
    fields = raw["fields"]
    qid, did, score = (as_text(fields.get(c)) for c in ("query-id", "corpus-id", "score"))
    pair = {"record": raw["record"], "reason": raw.get("reason"), "error": raw.get("error"),
            "fields": {"query_id": qid, "document_id": did, "label": score}}
    if not pair["reason"]:
        label = label_of(score)
        if not isinstance(qid, str) or not qid.strip() or not isinstance(did, str) or not did.strip():
            pair.update(reason="unparsable", error=f"empty or non-UTF-8 query-id/corpus-id: {qid!r} {did!r}")
        elif label is None:
            pair.update(reason="bad_label", error=f"score {json_safe(score)!r} is not a finite number")
        elif label <= 0:
            pair.update(reason="non_positive_score", error=f"score {score} marks the document not relevant")
        else:
            pair["fields"]["label"] = label
    if pair["reason"]:
        yield beam.pvalue.TaggedOutput("done", pair)
    else:
        yield qid.strip(), pair


def _attach(grouped: tuple[str, dict[str, list[Any]]], *, side: str, source: str) -> Iterator[Any]:
    """One CoGroupByKey group: copy the single matching text into every pair of the group."""
    key, groups = grouped
    matches, pairs = list(groups["texts"]), groups["pairs"]
    for pair in pairs:
        pair = {**pair, "fields": dict(pair["fields"])}
        if not matches:
            pair.update(reason=f"unknown_{side}_id", error=f"{side} id {key!r} is not in {source}")
        elif len(matches) > 1:
            pair.update(reason="duplicate_id", error=f"{side} id {key!r} occurs {len(matches)} times in {source} "
                                                     f"({', '.join(m['record'] for m in matches[:3])})")
        else:
            fields = matches[0]["fields"]
            pair["fields"][side] = as_text(fields.get("text")) if side == "query" else _document_text(fields)
        if side == "query" and not pair["reason"]:
            yield pair["fields"]["document_id"].strip(), pair
        else:
            yield beam.pvalue.TaggedOutput("done", pair)


class JoinBeir(beam.PTransform):
    """Joins BEIR qrels with their query and document texts: one raw pair record per qrel line.

    Input: a dict of PCollections of raw records ``{"qrels", "queries", "corpus"}``. Output: a dict
    ``{"pairs": raw pair records, "rejected": dead letters for unusable queries/corpus lines}``. A pair
    record has fields ``query_id, query, document_id, document, label`` (document = title + " " +
    text) and its qrels line as ``record``; qrels with score <= 0 or unresolved ids come out with a
    ``reason``, so :class:`~pipelines.validate.ValidatePairs` sends them to the dead letter.
    """

    def __init__(self, *, queries_name: str = "queries.jsonl", corpus_name: str = "corpus.jsonl") -> None:
        super().__init__()
        self._queries_name = queries_name
        self._corpus_name = corpus_name

    def expand(self, inputs: dict[str, beam.PCollection]) -> dict[str, beam.PCollection]:
        queries = inputs["queries"] | "KeyQueries" >> beam.FlatMap(
            _keyed, "_id", "bad_query_record").with_outputs(REJECTED, main="keyed")
        corpus = inputs["corpus"] | "KeyCorpus" >> beam.FlatMap(
            _keyed, "_id", "bad_document_record").with_outputs(REJECTED, main="keyed")
        qrels = inputs["qrels"] | "KeyQrels" >> beam.FlatMap(_qrel).with_outputs("done", main="keyed")
        with_query = (
            {"texts": queries.keyed, "pairs": qrels.keyed}
            | "JoinQueries" >> beam.CoGroupByKey()
            | "AttachQuery" >> beam.FlatMap(_attach, side="query", source=self._queries_name).with_outputs(
                "done", main="keyed")
        )
        with_document = (
            {"texts": corpus.keyed, "pairs": with_query.keyed}
            | "JoinCorpus" >> beam.CoGroupByKey()
            | "AttachDocument" >> beam.FlatMap(_attach, side="document", source=self._corpus_name).with_outputs(
                "done", main="keyed")
        )
        pairs = (qrels.done, with_query.done, with_document.done) | "AllPairs" >> beam.Flatten()
        rejected = (queries[REJECTED], corpus[REJECTED]) | "BadTexts" >> beam.Flatten()
        return {"pairs": pairs, "rejected": rejected}
