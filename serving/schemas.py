"""Request and response models of the HTTP API, with the size limits the service enforces.

The limits are module constants rather than per-process settings so that the OpenAPI document
(checked in as ``docs/openapi.json``) states exactly what every server accepts. Every text field is
checked to hold at least one non-whitespace character and to be encodable as UTF-8 (JSON may carry
lone surrogates, which TensorFlow's string ops cannot take).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from dssm.index.documents import check_document_id
from serving.reranking import MAX_RERANK

__all__ = [
    "MAX_K",
    "DEFAULT_K",
    "MAX_QUERY_CHARS",
    "MAX_BATCH_QUERIES",
    "MAX_BATCH_K",
    "MAX_DOCUMENTS_PER_REQUEST",
    "MAX_DOCUMENT_CHARS",
    "MAX_ID_CHARS",
    "MAX_BODY_BYTES",
    "MAX_RERANK",
    "SearchRequest",
    "BatchSearchRequest",
    "SimilarityRequest",
    "TagRequest",
    "TagOut",
    "TagResponse",
    "DocumentIn",
    "UpsertRequest",
    "DeleteRequest",
    "HitOut",
    "SearchResponse",
    "BatchSearchResponse",
    "SimilarityResponse",
    "DocumentOut",
    "DocumentResponse",
    "WriteResponse",
    "HealthResponse",
    "ReadyResponse",
    "ErrorResponse",
]

MAX_K = 1000
DEFAULT_K = 10
MAX_QUERY_CHARS = 2048
MAX_BATCH_QUERIES = 256
# A batch answer holds queries × k hits with their texts; this keeps it to 25,600 hits at most.
MAX_BATCH_K = 100
MAX_DOCUMENTS_PER_REQUEST = 1000
MAX_DOCUMENT_CHARS = 100_000
MAX_ID_CHARS = 512
# Bounds what one request may make the server buffer; checked before the JSON is parsed.
MAX_BODY_BYTES = 8 * 1024 * 1024

_NON_BLANK = re.compile(r"\S")
# The same set in the schema's ECMA-262 regex dialect: Python's \s also counts \x1c-\x1f and \x85 as
# whitespace, ECMA's does not, so a bare "\S" in the schema would call "\x1f" valid while we refuse it.
_NON_BLANK_ECMA = r"[^\s\x1c-\x1f\x85]"


def _checked_text(value: str) -> str:
    if not _NON_BLANK.search(value):
        raise ValueError("must contain a non-whitespace character (it is empty or only whitespace)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"is not encodable as UTF-8 ({exc.reason} at position {exc.start})") from exc
    return value


def _text(max_length: int, description: str) -> object:
    return Annotated[
        str,
        Field(min_length=1, max_length=max_length, description=description,
              json_schema_extra={"pattern": _NON_BLANK_ECMA}),
        AfterValidator(_checked_text),
    ]


Query = _text(MAX_QUERY_CHARS, f"search text: 1..{MAX_QUERY_CHARS} characters, not only whitespace")
DocText = _text(MAX_DOCUMENT_CHARS, f"document text: 1..{MAX_DOCUMENT_CHARS} characters, not only whitespace")
# Control characters (Unicode Cc) and line/paragraph separators are refused in ids: the pattern states
# it for clients and schema-driven tests, check_document_id enforces it with a reason.
_ID_CHAR_ECMA = r"[^\x00-\x1f\x7f-\x9f\u2028\u2029]"
_ID_PATTERN_ECMA = rf"^{_ID_CHAR_ECMA}*[^\s\x00-\x1f\x7f-\x9f\u2028\u2029]{_ID_CHAR_ECMA}*$"
DocId = Annotated[
    str,
    Field(min_length=1, max_length=MAX_ID_CHARS,
          description=f"document id: 1..{MAX_ID_CHARS} printable characters (no control characters or line breaks: "
                      "every stored id must be addressable in a URL path), not only whitespace",
          json_schema_extra={"pattern": _ID_PATTERN_ECMA}),
    AfterValidator(_checked_text),
    AfterValidator(check_document_id),
]


def _json_number(value: object) -> object:
    """JSON Schema's number: ``true`` and ``"0.5"`` are refused rather than read as 1.0 and 0.5 (null passes)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"must be a JSON number, got {value!r}")
    return value


def _json_integer(value: object) -> object:
    """JSON Schema's integer (OpenAPI 3.1): a number with no fractional part, so 5.0 is 5.

    ``true`` and ``"5"`` are refused rather than read as 1 and 5. An integral float must be accepted:
    the published schema says ``integer`` and 74.0 satisfies it, so refusing it would reject
    schema-valid requests (schemathesis ST202).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a JSON integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"must be a whole number, got {value!r}")
        return int(value)
    return value


# The bounds go on the int before the validator wraps it, so the schema shows minimum/maximum.
K = Annotated[int, Field(ge=1, le=MAX_K, description=f"number of hits, 1..{MAX_K}"), BeforeValidator(_json_integer)]
BatchK = Annotated[int, Field(ge=1, le=MAX_BATCH_K, description=f"number of hits per query, 1..{MAX_BATCH_K}"),
                   BeforeValidator(_json_integer)]
Rerank = Annotated[int, Field(ge=0, le=MAX_RERANK,
                              description=f"0..{MAX_RERANK}: re-order the first stage's top max(rerank, k) with the "
                                          "index's re-ranker (hit scores are then the fused scores, in [0, 1]); "
                                          "0 = no re-ranking; 409 when the index version has no re-ranker"),
                   BeforeValidator(_json_integer)]
Mode = Literal["dense", "bm25", "hybrid"]


class _Strict(BaseModel):
    # Unknown keys are refused so a misspelt field ("querry") is a 422, not a silently ignored default.
    model_config = ConfigDict(extra="forbid")


class SearchRequest(_Strict):
    """``POST /v1/search``."""

    query: Query  # type: ignore[valid-type]
    k: K = DEFAULT_K
    mode: Mode | None = Field(None, description="dense: DSSM + ScaNN; bm25: BM25 only; hybrid: DSSM and BM25 scores "
                                                "fused (bm25/hybrid need BM25 state in the index version); omitted: "
                                                "the index's default, hybrid with the weight `dssm index` chose "
                                                "(label-free) when the version stores one, else dense")
    rerank: Rerank = 0


class BatchSearchRequest(_Strict):
    """``POST /v1/search:batch``."""

    queries: list[Query] = Field(  # type: ignore[valid-type]
        min_length=1, max_length=MAX_BATCH_QUERIES, description=f"1..{MAX_BATCH_QUERIES} queries")
    k: BatchK = DEFAULT_K
    mode: Mode | None = Field(None, description="as in /v1/search")
    rerank: Rerank = 0


class SimilarityRequest(_Strict):
    """``POST /v1/similarity``."""

    text1: Query  # type: ignore[valid-type]
    text2: Query  # type: ignore[valid-type]


class TagRequest(_Strict):
    """``POST /v1/tag``: rank the labels of a tags index for a text."""

    text: Query  # type: ignore[valid-type]
    k: K = DEFAULT_K
    threshold: Annotated[float | None, BeforeValidator(_json_number)] = Field(
        None, ge=-1.0, le=1.0, allow_inf_nan=False,
        description="decision threshold (cosine); default the index's stored one")
    # Strict: JSON Schema's boolean is true/false only (0 and "yes" are 422, as schemathesis checks).
    predicted_only: StrictBool = Field(False, description="only the labels at or above the threshold")
    mode: Mode = Field("dense", description="dense: the towers' cosines; bm25: the text against the label "
                       "descriptions; hybrid: both, min-max fused per text (0.5 each). The index's stored "
                       "threshold is a cosine and applies to dense only")


class DocumentIn(_Strict):
    """One document to add or replace."""

    id: DocId  # type: ignore[valid-type]
    text: DocText  # type: ignore[valid-type]
    title: str = Field("", max_length=MAX_QUERY_CHARS)


class UpsertRequest(_Strict):
    """``PUT /v1/documents``."""

    # Duplicate ids are a 422 here, as in DeleteRequest (one code for the same mistake everywhere).
    documents: Annotated[list[DocumentIn], AfterValidator(_unique_documents)] = Field(
        min_length=1, max_length=MAX_DOCUMENTS_PER_REQUEST,
        description=f"1..{MAX_DOCUMENTS_PER_REQUEST} documents; ids unique")


def _unique_documents(documents: list[DocumentIn]) -> list[DocumentIn]:
    _unique_ids([d.id for d in documents])
    return documents


def _unique_ids(ids: list[str]) -> list[str]:
    seen: set[str] = set()
    for doc_id in ids:
        if doc_id in seen:
            raise ValueError(f"document id {doc_id!r} appears twice")
        seen.add(doc_id)
    return ids


class DeleteRequest(_Strict):
    """``POST /v1/documents:delete``."""

    ids: Annotated[list[DocId], AfterValidator(_unique_ids)] = Field(  # type: ignore[valid-type]
        min_length=1, max_length=MAX_DOCUMENTS_PER_REQUEST, json_schema_extra={"uniqueItems": True},
        description=f"1..{MAX_DOCUMENTS_PER_REQUEST} distinct document ids; all must exist or nothing is deleted")


class HitOut(BaseModel):
    """One search result."""

    id: str
    score: float = Field(description="cosine similarity (dense), BM25 score (bm25) or the fused score (hybrid)")
    text: str


class SearchResponse(BaseModel):
    """Hits, best first, and the index version that produced them."""

    version: str
    hits: list[HitOut]


class BatchSearchResponse(BaseModel):
    """One hit list per query, in request order, all from one index version."""

    version: str
    results: list[list[HitOut]]


class SimilarityResponse(BaseModel):
    """Cosine of the two texts' embeddings and, if the index has a calibrated threshold, the verdict."""

    version: str
    cosine: float
    is_duplicate: bool | None = Field(description="cosine >= threshold; null when the index has no threshold")
    threshold: float | None = Field(description="the index's duplicate_threshold, or null")


class TagOut(BaseModel):
    """One label for the text."""

    label: str
    score: float = Field(description="cosine of the text and the label's vector")
    predicted: bool | None = Field(description="score >= threshold; null when there is no threshold")


class TagResponse(BaseModel):
    """Labels best first, from one tags index version."""

    version: str
    threshold: float | None = Field(description="the threshold used (given, or the index's stored one), or null")
    labels: list[TagOut]


class DocumentOut(BaseModel):
    """A stored document."""

    id: str
    title: str
    text: str


class DocumentResponse(BaseModel):
    """``GET /v1/documents/{id}``."""

    version: str
    document: DocumentOut


class WriteResponse(BaseModel):
    """The result of an upsert or delete: the new live version."""

    version: str
    upserted: int = 0
    deleted: int = 0


class HealthResponse(BaseModel):
    """``GET /healthz``: the process is up."""

    status: Literal["ok"]


class ReadyResponse(BaseModel):
    """``GET /readyz``: whether an index is loaded."""

    ready: bool
    version: str | None
    documents: int | None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: a one-line reason and, for validation errors, where each problem is."""

    error: str
    status: int
    details: list[str] = Field(default_factory=list)
