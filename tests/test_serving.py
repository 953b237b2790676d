"""The HTTP service against a real uvicorn server on 127.0.0.1, a real (tiny, trained) model and adi.

Covers every endpoint, every kind of bad input, auth, load shedding (429), the event loop staying
responsive, metrics, hot swaps under concurrent load (no failed request, no mixed versions), a broken
version being skipped, the ``dssm serve`` command, the checked-in OpenAPI document and a bounded
schemathesis run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import serving_support as support
from prometheus_client import generate_latest
from serving_support import API_KEY, ServerThread, metric_value, wait_until

from dssm import index as ix
from dssm.cli import main as cli_main
from dssm.errors import ConfigError, InputError
from serving.app import create_app, openapi_document
from serving.backend import Backend, RerankerNotAvailableError
from serving.client import (
    AuthenticationError,
    BadRequestError,
    ClientError,
    Document,
    ForbiddenError,
    NotFoundError,
    OverloadedError,
    SearchClient,
)
from serving.guard import Guard
from serving.schemas import MAX_BATCH_QUERIES, MAX_BODY_BYTES, MAX_K, MAX_QUERY_CHARS, MAX_RERANK
from serving.searcher import Searcher

ROOT = Path(__file__).resolve().parent.parent
ODD_ID = "odd/id ü %20?#"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir  # conftest's session model: trained once for the whole test run


@pytest.fixture(scope="module")
def rows(adi_dir):
    extra = {"id": ODD_ID, "title": "an odd id", "text": "a document whose id needs percent-encoding in a URL"}
    return support.adi_rows(adi_dir) + [extra]


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_dir, rows):
    """The main server: default loader (loads the version's own model/), API key for writes."""
    index_dir = tmp_path_factory.mktemp("served") / "index"
    version = support.build_version(index_dir, model_dir, rows)
    backend = Backend(index_dir, max_in_flight=16, watch_interval=0.1)
    with ServerThread(create_app(backend, api_key=API_KEY)) as server:
        wait_until(lambda: backend.snapshot is not None, timeout=60, what="the index to load")
        with SearchClient(server.url, api_key=API_KEY, retries=0) as client:
            yield SimpleNamespace(url=server.url, backend=backend, index_dir=index_dir, version=version,
                                  client=client)


@pytest.fixture(scope="module")
def reranked(tmp_path_factory, model_dir, rows):
    """A server whose index gains a re-ranker while it serves: ``attach_reranker`` publishes a new
    version and the backend hot-swaps to it. ``local`` is an in-process Searcher of that version."""
    work = tmp_path_factory.mktemp("reranked")
    index_dir = work / "index"
    plain = support.build_version(index_dir, model_dir, rows)
    reranker_dir = support.untrained_reranker(model_dir, work / "reranker")
    backend = Backend(index_dir, max_in_flight=16, watch_interval=0.1, loader=support.shared_encoder_loader(model_dir))
    with ServerThread(create_app(backend)) as server:
        wait_until(lambda: backend.snapshot is not None, timeout=60, what="the index to load")
        assert backend.current().version == plain and backend.current().searcher.reranker is None
        version = ix.attach_reranker(index_dir, reranker_dir)
        wait_until(lambda: backend.current().version == version, timeout=60, what="the swap to the re-ranker")
        assert backend.current().searcher.reranker is not None
        local = Searcher.load(index_dir, encoder=support.shared_encoder(model_dir))
        assert local.version == version and local.reranker is not None
        with SearchClient(server.url, retries=0) as client:
            yield SimpleNamespace(url=server.url, backend=backend, index_dir=index_dir, version=version, local=local,
                                  client=client)


def post_raw(url: str, path: str, content: bytes, content_type: str | None = "application/json",
             headers: dict[str, str] | None = None) -> httpx.Response:
    all_headers = dict(headers or {})
    if content_type is not None:
        all_headers["content-type"] = content_type
    return httpx.post(url + path, content=content, headers=all_headers, timeout=30)


# ---- reads ---------------------------------------------------------------------------------------


def test_search_matches_the_in_process_searcher_and_finds_documents_by_their_text(served, rows):
    client, searcher = served.client, served.backend.current().searcher
    for row in rows[:5]:
        remote = client.search(row["text"], k=5)
        local = searcher.search(row["text"], k=5)
        assert remote.version == served.version
        assert [h.id for h in remote] == [h.id for h in local]
        assert [h.score for h in remote] == pytest.approx([h.score for h in local], abs=1e-6)
        # Shared towers: a document's own text embeds to the same vector (cosine 1) and ranks first.
        doc_id, score, text = remote[0]
        assert (doc_id, text) == (row["id"], row["text"])
        assert score == pytest.approx(1.0, abs=1e-4)
        assert [h.score for h in remote] == sorted((h.score for h in remote), reverse=True)
    assert len(client.search("computer indexing", k=MAX_K)) == len(rows)  # k is clipped to the corpus


def test_batch_search_answers_each_query_in_order_from_one_version(served, rows):
    texts = [rows[3]["text"], "library automation", rows[10]["text"]]
    batch = served.client.search_batch(texts, k=4)
    assert batch.version == served.version and len(batch) == 3
    assert [r[0].id for r in (batch[0], batch[2])] == [rows[3]["id"], rows[10]["id"]]
    local = served.backend.current().searcher.search_batch(texts, k=4)
    assert [[h.id for h in r] for r in batch] == [[h.id for h in r] for r in local]


def test_bm25_and_hybrid_modes_match_the_in_process_searcher(served, rows):
    searcher = served.backend.current().searcher
    query = rows[12]["text"]
    for mode in ("bm25", "hybrid"):
        remote = served.client.search(query, k=5, mode=mode)
        local = searcher.search(query, k=5, mode=mode)
        assert [h.id for h in remote] == [h.id for h in local] and remote[0].id == rows[12]["id"]
        assert [h.score for h in remote] == pytest.approx([h.score for h in local], abs=1e-6)
        batch = served.client.search_batch([query, "library catalogues"], k=3, mode=mode)
        assert [h.id for h in batch[0]] == [h.id for h in local[:3]]


# ---- re-ranking (issue 13): rerank=N over HTTP and through the client ------------------------------

RERANK_QUERIES = ["library catalogues and computer indexing", "information retrieval systems",
                  "automatic abstracting of documents"]


def _hit_tuples(hits) -> list[tuple[str, float]]:
    return [(h["id"], h["score"]) if isinstance(h, dict) else (h.id, h.score) for h in hits]


def _assert_same_hits(remote, local) -> None:
    remote, local = _hit_tuples(remote), _hit_tuples(local)
    assert [i for i, _ in remote] == [i for i, _ in local]
    assert [s for _, s in remote] == pytest.approx([s for _, s in local], abs=1e-5)


def test_rerank_search_matches_the_in_process_searcher(reranked, rows):
    local, changed = reranked.local, 0
    for mode in ("dense", "hybrid", "bm25"):
        for query in RERANK_QUERIES + [rows[12]["text"]]:
            expected = local.search(query, k=5, mode=mode, rerank=20)
            response = httpx.post(reranked.url + "/v1/search",
                                  json={"query": query, "k": 5, "mode": mode, "rerank": 20}, timeout=60)
            assert response.status_code == 200, response.text
            assert response.json()["version"] == reranked.version
            _assert_same_hits(response.json()["hits"], expected)
            remote = reranked.client.search(query, k=5, mode=mode, rerank=20)
            assert remote.version == reranked.version
            _assert_same_hits(remote, expected)
            assert all(0.0 <= h.score <= 1.0 for h in remote)  # fused scores
            first_stage = local.search(query, k=5, mode=mode)
            changed += [h.id for h in remote] != [h.id for h in first_stage]
    assert changed  # the re-ranker was applied, not silently dropped
    # k above rerank: the re-ranker reads max(rerank, k) candidates and k come back.
    remote = reranked.client.search(RERANK_QUERIES[0], k=8, rerank=3)
    assert len(remote) == 8
    _assert_same_hits(remote, local.search(RERANK_QUERIES[0], k=8, rerank=3))
    # rerank=0 (sent or not) is the first stage as is.
    plain = httpx.post(reranked.url + "/v1/search", json={"query": RERANK_QUERIES[1], "k": 5, "rerank": 0})
    _assert_same_hits(plain.json()["hits"], local.search(RERANK_QUERIES[1], k=5))
    _assert_same_hits(reranked.client.search(RERANK_QUERIES[1], k=5), local.search(RERANK_QUERIES[1], k=5))


def test_rerank_batch_search_matches_the_in_process_searcher(reranked):
    local = reranked.local
    queries = RERANK_QUERIES + ["?! --"]  # the last one has nothing to search: no hits
    for mode in ("dense", "hybrid"):
        expected = local.search_batch(queries, k=4, mode=mode, rerank=15)
        assert expected[-1] == []
        response = httpx.post(reranked.url + "/v1/search:batch",
                              json={"queries": queries, "k": 4, "mode": mode, "rerank": 15}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["version"] == reranked.version
        results = response.json()["results"]
        assert len(results) == len(queries)
        for got, want in zip(results, expected, strict=True):
            _assert_same_hits(got, want)
        batch = reranked.client.search_batch(queries, k=4, mode=mode, rerank=15)
        assert batch.version == reranked.version
        for got, want in zip(batch, expected, strict=True):
            _assert_same_hits(got, want)
        # One query of a batch gets what it gets alone.
        _assert_same_hits(batch[0], local.search(queries[0], k=4, mode=mode, rerank=15))


def test_rerank_requests_skip_the_coalesced_model_thread(reranked):
    """A re-ranked single query runs whole in the worker pool, like a hybrid one; plain dense ones queue."""
    def coalesced() -> float:
        return metric_value(reranked.client.metrics(), "dssm_search_batch_size_count")

    before = coalesced()
    for query in RERANK_QUERIES:
        assert len(reranked.client.search(query, k=3, mode="dense", rerank=10)) == 3
    assert reranked.backend.default_mode() == "dense"
    assert len(reranked.client.search(RERANK_QUERIES[0], k=3, rerank=10)) == 3  # default mode, re-ranked
    assert coalesced() == before
    reranked.client.search(RERANK_QUERIES[0], k=3, mode="dense")
    assert coalesced() == before + 1


def test_rerank_without_a_reranker_is_a_409_naming_it(served):
    assert served.backend.current().searcher.reranker is None
    for path, body in (("/v1/search", {"query": "retrieval", "rerank": 5}),
                       ("/v1/search", {"query": "retrieval", "mode": "hybrid", "rerank": MAX_RERANK}),
                       ("/v1/search:batch", {"queries": ["retrieval", "library"], "rerank": 1})):
        response = httpx.post(served.url + path, json=body)
        assert response.status_code == 409, response.text
        payload = response.json()
        assert payload["status"] == 409 and "re-ranker" in payload["error"], payload
        assert served.version in payload["error"] and str(served.index_dir) not in payload["error"]
    # rerank=0 is no re-ranking: served as before.
    assert httpx.post(served.url + "/v1/search", json={"query": "retrieval", "rerank": 0}).status_code == 200
    with pytest.raises(RerankerNotAvailableError, match="no re-ranker"):
        served.backend.search("retrieval", 3, rerank=5)
    with pytest.raises(RerankerNotAvailableError, match="no re-ranker"):
        served.backend.search_batch(["retrieval"], 3, mode="bm25", rerank=5)
    with SearchClient(served.url, retries=3) as client:
        for call in (lambda: client.search("retrieval", k=3, rerank=5),
                     lambda: client.search_batch(["retrieval"], k=3, rerank=5)):
            with pytest.raises(ClientError, match="re-ranker") as caught:
                call()
            assert caught.value.status == 409 and "re-ranker" in caught.value.reason
        assert client.attempts == 2  # a 409 is not retried
        assert len(client.search("retrieval", k=3, rerank=0)) == 3


def test_client_checks_rerank_and_the_server_names_it(served):
    with SearchClient(served.url, retries=3) as client:
        for bad in (-1, True, "5", 2.5, None):
            with pytest.raises(BadRequestError, match="rerank"):
                client.search("retrieval", rerank=bad)
            with pytest.raises(BadRequestError, match="rerank"):
                client.search_batch(["retrieval"], rerank=bad)
        assert client.attempts == 0  # refused before sending
        with pytest.raises(BadRequestError, match=f"less than or equal to {MAX_RERANK}") as caught:
            client.search("retrieval", rerank=MAX_RERANK + 1)  # the limit is the server's
        assert caught.value.status == 422 and caught.value.details[0].startswith("rerank:")


def _without_the_fast_path(app) -> None:
    """Turn off the guard's hot path, so valid searches are answered by the FastAPI routes."""
    layer = app.middleware_stack  # built by the lifespan call at startup
    while not isinstance(layer, Guard):
        layer = layer.app
    layer._fast = None  # noqa: SLF001


def test_the_routes_answer_rerank_as_the_guards_fast_path_does(served, reranked):
    bodies = [("/v1/search", {"query": RERANK_QUERIES[0], "k": 4, "rerank": 12}),
              ("/v1/search", {"query": RERANK_QUERIES[1], "k": 4, "mode": "hybrid", "rerank": 12}),
              ("/v1/search", {"query": RERANK_QUERIES[2], "k": 4}),
              ("/v1/search:batch", {"queries": RERANK_QUERIES, "k": 3, "mode": "dense", "rerank": 7})]
    for fast in (served, reranked):
        app = create_app(fast.backend, manage_backend=False)
        with ServerThread(app) as routes_only:
            _without_the_fast_path(app)
            for path, body in bodies:
                via_guard = httpx.post(fast.url + path, json=body, timeout=60)
                via_route = httpx.post(routes_only.url + path, json=body, timeout=60)
                assert via_route.status_code == via_guard.status_code, via_route.text
                assert via_guard.status_code == (409 if fast is served and "rerank" in body else 200)
                assert via_route.json() == via_guard.json()


def test_openapi_documents_rerank_and_its_409():
    document = openapi_document()
    for name in ("SearchRequest", "BatchSearchRequest"):
        field = document["components"]["schemas"][name]["properties"]["rerank"]
        assert (field["type"], field["minimum"], field["maximum"], field["default"]) == ("integer", 0, MAX_RERANK, 0)
        assert "max(rerank, k)" in field["description"] and "re-ranker" in field["description"]
    for path in ("/v1/search", "/v1/search:batch"):
        assert "re-ranker" in document["paths"][path]["post"]["responses"]["409"]["description"]


def test_similarity_is_the_cosine_of_the_query_embeddings(served, model_dir):
    encoder = support.shared_encoder(model_dir)
    a, b = "information retrieval systems", "automatic indexing of documents"
    result = served.client.similarity(a, b)
    vectors = encoder.embed_queries([a, b])
    assert result.cosine == pytest.approx(float(vectors[0] @ vectors[1]), abs=1e-5)
    assert served.client.similarity(b, a).cosine == pytest.approx(result.cosine, abs=1e-6)
    assert served.client.similarity(a, a).cosine == pytest.approx(1.0, abs=1e-5)
    # This index carries no calibrated threshold, so there is no verdict.
    assert (result.is_duplicate, result.threshold, result.version) == (None, None, served.version)


def test_get_document_including_an_id_that_needs_escaping(served, rows):
    doc = served.client.get_document(rows[7]["id"])
    assert (doc.id, doc.title, doc.text, doc.version) == (rows[7]["id"], rows[7]["title"], rows[7]["text"],
                                                          served.version)
    assert served.client.get_document(ODD_ID).id == ODD_ID
    with pytest.raises(NotFoundError, match="no-such-doc") as caught:
        served.client.get_document("no-such-doc")
    assert caught.value.status == 404 and "no-such-doc" in caught.value.reason


def test_head_answers_where_get_does(served, rows):
    doc_id = rows[0]["id"]
    response = httpx.head(served.url + f"/v1/documents/{doc_id}")
    assert response.status_code == 200 and response.content == b""
    assert int(response.headers["content-length"]) == len(httpx.get(served.url + f"/v1/documents/{doc_id}").content)
    assert httpx.head(served.url + "/v1/documents/not-there").status_code == 404


def test_a_query_with_nothing_to_search_has_no_hits(served, rows):
    """Punctuation only embeds as the towers' bias: arbitrary neighbours, so no hits (issue 14)."""
    response = httpx.post(served.url + "/v1/search", json={"query": "?! --", "mode": "dense"})
    assert response.status_code == 200 and response.json()["hits"] == []
    response = httpx.post(served.url + "/v1/search:batch", json={"queries": ["?!", rows[0]["text"]], "k": 3})
    assert response.status_code == 200
    results = response.json()["results"]
    assert results[0] == [] and results[1][0]["id"] == rows[0]["id"]
    searcher = served.backend.current().searcher
    for mode in ("dense", "bm25", "hybrid"):
        assert searcher.search("...", k=3, mode=mode) == [], mode


def test_health_ready_and_metrics(served):
    assert httpx.get(served.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(served.url + "/readyz")
    assert ready.status_code == 200
    size = len(served.backend.current().searcher)
    assert ready.json() == {"ready": True, "version": served.version, "documents": size}

    def sample(name, **labels):
        return metric_value(served.client.metrics(), name, labels)

    before = sample("dssm_requests_total", method="POST", route="/v1/search", status="200")
    hist_before = sample("dssm_request_duration_seconds_count", method="POST", route="/v1/search")
    for _ in range(3):
        served.client.search("retrieval", k=2)
    served.client.get_document("1")
    assert sample("dssm_requests_total", method="POST", route="/v1/search", status="200") == before + 3
    assert sample("dssm_request_duration_seconds_count", method="POST", route="/v1/search") == hist_before + 3
    # Path parameters are collapsed into the route template, so ids do not explode the label space.
    assert sample("dssm_requests_total", method="GET", route="/v1/documents/{doc_id}", status="200") >= 1
    assert sample("dssm_index_version_info", version=served.version) == 1
    assert sample("dssm_index_documents") == len(served.backend.current().searcher)
    text = served.client.metrics()
    assert "# TYPE dssm_request_duration_seconds histogram" in text


def test_concurrent_single_queries_are_coalesced_into_batches(served, rows):
    backend = served.backend
    searcher = backend.current().searcher
    texts = [r["text"] for r in rows[:40]]
    count_before = metric_value(served.client.metrics(), "dssm_search_batch_size_count")
    futures = [backend.submit_search(t, 3) for t in texts]
    answers = [f.result(timeout=30) for f in futures]
    for text, (version, hits) in zip(texts, answers, strict=True):
        assert version == served.version
        assert [h.id for h in hits] == [h.id for h in searcher.search(text, k=3)]
    calls = metric_value(served.client.metrics(), "dssm_search_batch_size_count") - count_before
    assert 1 <= calls < len(texts)  # fewer model calls than queries
    # A query that fails does not fail the others coalesced with it.
    bad, good = backend.submit_search("   ", 3), backend.submit_search(texts[0], 3)
    with pytest.raises(InputError, match="whitespace"):
        bad.result(timeout=30)
    assert good.result(timeout=30)[1][0].id == rows[0]["id"]
    # Over HTTP, concurrent clients get exactly what they would get alone.
    with ThreadPoolExecutor(8) as pool:
        remote = list(pool.map(lambda t: served.client.search(t, k=3), texts))
    assert [[h.id for h in r] for r in remote] == [[h.id for h in searcher.search(t, k=3)] for t in texts]


def test_http_queries_waiting_together_share_one_model_call(served, rows):
    """Single queries over HTTP queue for the model thread; those waiting when it frees up are one batch."""
    import asyncio

    from serving.schemas import SearchResponse

    backend = served.backend
    release, blocked = threading.Event(), threading.Event()

    def hold_the_model_thread():
        blocked.set()
        release.wait(30)

    async def occupy():
        try:
            await backend.call_async(hold_the_model_thread)
        finally:
            backend.close_mailboxes()

    holder = threading.Thread(target=asyncio.run, args=(occupy(),))
    holder.start()
    try:
        assert blocked.wait(30)
        before = served.client.metrics()
        texts = [r["text"] for r in rows[:8]]
        with ThreadPoolExecutor(8) as pool:
            answers = pool.map(lambda t: httpx.post(served.url + "/v1/search", json={"query": t, "k": 3}, timeout=30),
                               texts)
            wait_until(lambda: backend._model.queue.qsize() == 8, timeout=30, what="8 queued queries")  # noqa: SLF001
            release.set()
            answers = list(answers)
    finally:
        release.set()
        holder.join(30)
    after = served.client.metrics()

    def grew(name):
        return metric_value(after, name) - metric_value(before, name)

    # One model call answered all eight, each with its own hits.
    assert (grew("dssm_search_batch_size_count"), grew("dssm_search_batch_size_sum")) == (1, 8)
    searcher = backend.current().searcher
    for text, response in zip(texts, answers, strict=True):
        assert response.status_code == 200
        body = SearchResponse.model_validate_json(response.content)  # the hand-encoded JSON fits the model
        assert body.version == served.version
        assert [h.id for h in body.hits] == [h.id for h in searcher.search(text, k=3)]


def test_batch_window_lets_later_queries_join_a_batch(tmp_path, model_dir, rows):
    index_dir = tmp_path / "index"
    support.build_version(index_dir, model_dir, rows[:30])
    backend = Backend(index_dir, watch_interval=0, batch_window=0.5, loader=support.shared_encoder_loader(model_dir))
    backend.reload()
    try:
        first = backend.submit_search(rows[0]["text"], 2)
        time.sleep(0.05)  # well inside the window
        second = backend.submit_search(rows[1]["text"], 2)
        assert first.result(timeout=30)[1][0].id == rows[0]["id"]
        assert second.result(timeout=30)[1][0].id == rows[1]["id"]
        text = generate_latest(backend.metrics.registry).decode()
        assert (metric_value(text, "dssm_search_batch_size_count"), metric_value(text, "dssm_search_batch_size_sum")) \
            == (1, 2)
    finally:
        backend.stop()
    with pytest.raises(ConfigError, match="batch_window"):
        Backend(index_dir, batch_window=2.0)


# ---- bad input: always a 4xx with a reason, never a 500 -----------------------------------------

LONG = "x" * (MAX_QUERY_CHARS + 1)
BAD_REQUESTS = [
    # (path, body or raw bytes, content type, status, words in the reason)
    ("/v1/search", {"query": ""}, "application/json", 422, "query"),
    ("/v1/search", {"query": " \t\n "}, "application/json", 422, "whitespace"),
    ("/v1/search", {"query": "x", "k": 0}, "application/json", 422, "k"),
    ("/v1/search", {"query": "x", "k": -3}, "application/json", 422, "greater than or equal to 1"),
    ("/v1/search", {"query": "x", "k": MAX_K + 1}, "application/json", 422, f"less than or equal to {MAX_K}"),
    ("/v1/search", {"query": "x", "k": "ten"}, "application/json", 422, "k"),
    ("/v1/search", {"query": "x", "k": 2.5}, "application/json", 422, "k"),
    # k is a JSON integer (issue 14): no bool or numeric string slips through as a number.
    ("/v1/search", {"query": "x", "k": True}, "application/json", 422, "JSON integer"),
    ("/v1/search", {"query": "x", "k": "5"}, "application/json", 422, "JSON integer"),
    ("/v1/search", {"query": "x", "k": 1e300}, "application/json", 422, f"less than or equal to {MAX_K}"),
    ("/v1/search:batch", {"queries": ["a"], "k": "5"}, "application/json", 422, "k"),
    ("/v1/search", {"query": LONG}, "application/json", 422, f"at most {MAX_QUERY_CHARS}"),
    ("/v1/search", {"k": 3}, "application/json", 422, "query: Field required"),
    ("/v1/search", {"query": "x", "querry": "y"}, "application/json", 422, "querry"),
    ("/v1/search", {"query": "x", "mode": "sparse"}, "application/json", 422, "mode"),
    ("/v1/search", ["x"], "application/json", 422, "object"),
    ("/v1/search", {"query": 42}, "application/json", 422, "string"),
    ("/v1/search", b'{"query": "x",', "application/json", 400, "not valid JSON"),
    ("/v1/search", b'{"query": "caf\xe9"}', "application/json", 400, "not valid UTF-8: byte 0xe9 at offset 14"),
    ("/v1/search", b'{"query": "\\ud800"}', "application/json", 422, "valid string"),
    ("/v1/search", b'{"query": "x"}', "text/plain", 415, "application/json"),
    ("/v1/search", b'{"query": "x"}', None, 415, "application/json"),
    ("/v1/search", b"query=x", "application/x-www-form-urlencoded", 415, "application/json"),
    ("/v1/search:batch", {"queries": []}, "application/json", 422, "at least 1"),
    ("/v1/search:batch", {"queries": ["a"] * (MAX_BATCH_QUERIES + 1)}, "application/json", 422,
     f"at most {MAX_BATCH_QUERIES}"),
    ("/v1/search:batch", {"queries": ["a", "  "]}, "application/json", 422, "queries.1"),
    ("/v1/search:batch", {"queries": "a single string"}, "application/json", 422, "list"),
    ("/v1/search:batch", {"queries": ["a"], "k": 101}, "application/json", 422, "k"),
    # rerank is a JSON integer in 0..MAX_RERANK (issue 13), checked before the index is asked.
    ("/v1/search", {"query": "x", "rerank": -1}, "application/json", 422, "rerank: Input should be greater than or "
                                                                           "equal to 0"),
    ("/v1/search", {"query": "x", "rerank": MAX_RERANK + 1}, "application/json", 422,
     f"rerank: Input should be less than or equal to {MAX_RERANK}"),
    ("/v1/search", {"query": "x", "rerank": True}, "application/json", 422, "rerank: must be a JSON integer"),
    ("/v1/search", {"query": "x", "rerank": "5"}, "application/json", 422, "rerank: must be a JSON integer"),
    ("/v1/search", {"query": "x", "rerank": 2.5}, "application/json", 422, "rerank: must be a whole number"),
    ("/v1/search", {"query": "x", "rerank": None}, "application/json", 422, "rerank"),
    ("/v1/search:batch", {"queries": ["a"], "rerank": -1}, "application/json", 422, "rerank"),
    ("/v1/search:batch", {"queries": ["a"], "rerank": MAX_RERANK + 1}, "application/json", 422, "rerank"),
    ("/v1/search:batch", {"queries": ["a"], "rerank": True}, "application/json", 422, "rerank"),
    ("/v1/search:batch", {"queries": ["a"], "rerank": "5"}, "application/json", 422, "rerank"),
    ("/v1/search:batch", {"queries": ["a"], "rerank": 2.5}, "application/json", 422, "rerank"),
    ("/v1/similarity", {"text1": "a", "text2": ""}, "application/json", 422, "text2"),
    ("/v1/similarity", {"text1": "a"}, "application/json", 422, "text2: Field required"),
]


@pytest.mark.parametrize(("path", "body", "content_type", "status", "reason"), BAD_REQUESTS,
                         ids=[f"{i}-{r[0]}-{r[3]}" for i, r in enumerate(BAD_REQUESTS)])
def test_bad_input_is_a_4xx_with_a_reason(served, path, body, content_type, status, reason):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = post_raw(served.url, path, raw, content_type)
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["status"] == status
    assert reason in payload["error"], payload


def test_integral_float_k_is_the_integer_the_schema_says_it_is(served):
    # OpenAPI 3.1 uses JSON Schema, where 5.0 is an integer: refusing it rejects a schema-valid request.
    as_int = post_raw(served.url, "/v1/search", json.dumps({"query": "library", "k": 5}).encode())
    as_float = post_raw(served.url, "/v1/search", json.dumps({"query": "library", "k": 5.0}).encode())
    assert as_int.status_code == as_float.status_code == 200, as_float.text
    assert as_float.json()["hits"] == as_int.json()["hits"] and len(as_int.json()["hits"]) == 5


def test_oversized_bodies_are_refused_before_parsing(served):
    big = json.dumps({"query": "x" * (MAX_BODY_BYTES + 10)}).encode()
    response = post_raw(served.url, "/v1/search", big)
    assert response.status_code == 413 and "exceeds" in response.json()["error"]

    def chunks():  # no Content-Length: the server counts while reading
        yield b'{"query": "'
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"y" * 65536
        yield b'"}'

    response = httpx.post(served.url + "/v1/search", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_wrong_paths_and_methods(served):
    assert httpx.get(served.url + "/v1/nothing").status_code == 404
    response = httpx.get(served.url + "/v1/search")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    response = httpx.request("PATCH", served.url + "/v1/documents/1")
    assert response.status_code == 405 and response.headers["allow"] == "DELETE, GET, HEAD"


def test_client_raises_bad_request_with_the_servers_reason_without_retrying(served):
    with SearchClient(served.url, retries=3) as client:
        with pytest.raises(BadRequestError, match="whitespace") as caught:
            client.search("   ")
        assert caught.value.status == 422 and client.attempts == 1
        with pytest.raises(BadRequestError, match="k"):
            client.search("x", k=0)
        assert client.attempts == 2


# ---- auth ---------------------------------------------------------------------------------------


def test_writes_need_the_key_and_change_nothing_without_it(served, rows):
    versions = ix.list_versions(served.index_dir)
    doc = {"documents": [{"id": rows[0]["id"], "text": "replaced text"}]}
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        response = httpx.put(served.url + "/v1/documents", json=doc, headers=headers)
        assert response.status_code == 401 and "API key" in response.json()["error"]
        assert response.headers["www-authenticate"] == "Bearer"
        assert httpx.delete(served.url + f"/v1/documents/{rows[0]['id']}", headers=headers).status_code == 401
    with SearchClient(served.url, api_key="wrong", retries=0) as client:
        with pytest.raises(AuthenticationError):
            client.upsert([{"id": "new", "text": "new text"}])
        with pytest.raises(AuthenticationError):
            client.delete(rows[0]["id"])
    assert ix.list_versions(served.index_dir) == versions
    assert served.backend.current().version == served.version
    assert served.client.get_document(rows[0]["id"]).text == rows[0]["text"]
    # Both header forms pass auth: these reach the backend and fail on their own merits.
    response = httpx.delete(served.url + "/v1/documents/not-there", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 404
    dup = {"documents": [{"id": "a", "text": "one"}, {"id": "a", "text": "two"}]}
    response = httpx.put(served.url + "/v1/documents", json=dup, headers={"X-API-Key": API_KEY})
    # 422 as for documents:delete (issue 14: one code for the same mistake everywhere).
    assert response.status_code == 422 and "'a' appears twice" in response.json()["error"]
    response = httpx.post(served.url + "/v1/documents:delete", json={"ids": ["a", "a"]},
                          headers={"X-API-Key": API_KEY})
    assert response.status_code == 422 and "'a' appears twice" in response.json()["error"]
    # An id that could be stored but never addressed by URL path is refused (issue 14).
    for bad_id in ("line\nbreak", "tab\there", "nul\x00"):
        response = httpx.put(served.url + "/v1/documents", json={"documents": [{"id": bad_id, "text": "t"}]},
                             headers={"X-API-Key": API_KEY})
        assert response.status_code == 422 and "control character" in response.json()["error"], bad_id
    assert ix.list_versions(served.index_dir) == versions


def test_server_without_a_key_refuses_writes_and_can_require_the_key_for_reads(served):
    with ServerThread(create_app(served.backend, manage_backend=False)) as open_server:
        with SearchClient(open_server.url, api_key=API_KEY, retries=0) as client:
            with pytest.raises(ForbiddenError, match="without an API key"):
                client.upsert([{"id": "new", "text": "new text"}])
            assert client.search("retrieval", k=1).version == served.version
    app = create_app(served.backend, api_key=API_KEY, require_key_for_reads=True, manage_backend=False)
    with ServerThread(app) as locked:
        with SearchClient(locked.url, retries=0) as anonymous:
            with pytest.raises(AuthenticationError):
                anonymous.search("retrieval")
            with pytest.raises(AuthenticationError):
                anonymous.get_document("1")
            assert anonymous.health() and anonymous.ready()["ready"]  # probes stay open
            assert "dssm_requests_total" in anonymous.metrics()
        with SearchClient(locked.url, api_key=API_KEY, retries=0) as client:
            assert len(client.search("retrieval", k=2)) == 2
        spec = httpx.get(locked.url + "/openapi.json").json()
        assert spec["paths"]["/v1/search"]["post"]["security"] == [{"ApiKey": []}]


def test_upsert_and_delete_publish_new_versions(tmp_path, model_dir, rows):
    index_dir = tmp_path / "index"
    support.build_version(index_dir, model_dir, rows[:40])
    backend = Backend(index_dir, watch_interval=0.1, loader=support.shared_encoder_loader(model_dir))
    with ServerThread(create_app(backend, api_key=API_KEY)) as server:
        wait_until(lambda: backend.snapshot is not None, timeout=30, what="the index to load")
        with SearchClient(server.url, api_key=API_KEY, retries=0) as client:
            v1 = backend.current().version
            text = "zebra quagga okapi: a new document about striped animals"
            written = client.upsert([{"id": "new-1", "text": text, "title": "new"},
                                     (rows[0]["id"], "replaced title", "replaced text of the first document")])
            assert written.upserted == 2 and written.version != v1
            assert backend.current().version == written.version  # live before the call returned
            assert client.get_document("new-1").text == text
            assert client.get_document(rows[0]["id"]).text == "replaced text of the first document"
            assert client.search(text, k=1)[0].id == "new-1"
            assert len(backend.current().searcher) == 41
            deleted = client.delete("new-1")
            assert deleted.deleted == 1 and deleted.version not in (v1, written.version)
            with pytest.raises(NotFoundError):
                client.get_document("new-1")
            assert "new-1" not in [h.id for h in client.search(text, k=10)]


            # Several ids in one request: one new version, all gone, and the in-process Searcher agrees.
            more = client.upsert([(f"bulk-{i}", f"bulk document number {i}") for i in range(3)])
            versions = ix.list_versions(index_dir)
            bulk = client.delete(["bulk-0", "bulk-2"])
            assert (bulk.deleted, bulk.upserted) == (2, 0) and bulk.version != more.version
            assert ix.list_versions(index_dir) == versions + [bulk.version]  # one version for both ids
            assert backend.current().version == bulk.version and len(backend.current().searcher) == 41
            for gone in ("bulk-0", "bulk-2"):
                with pytest.raises(NotFoundError):
                    client.get_document(gone)
            assert client.get_document("bulk-1").text == "bulk document number 1"
            assert backend.current().searcher.get_document("bulk-1").text == "bulk document number 1"

            # All or nothing: one unknown id deletes none of them (404 naming it).
            with pytest.raises(NotFoundError, match="'nope'"):
                client.delete(["bulk-1", "nope"])
            with pytest.raises(BadRequestError, match="'bulk-1' appears twice") as caught:
                client.delete(["bulk-1", "bulk-1"])
            assert caught.value.status == 422
            assert backend.current().version == bulk.version and client.get_document("bulk-1").id == "bulk-1"
            with pytest.raises(BadRequestError, match="at least one"):
                client.delete([])  # refused before sending

            # Bad bodies are 4xx with a reason; without the key, 401 and nothing runs.
            key = {"X-API-Key": API_KEY}
            for body, status, reason in (({"ids": []}, 422, "at least 1"), ({"ids": "bulk-1"}, 422, "list"),
                                         ({"ids": ["ok", "  "]}, 422, "ids.1"), ({"id": ["bulk-1"]}, 422, "ids"),
                                         ({"ids": ["x"] * 1001}, 422, "at most 1000")):
                response = post_raw(server.url, "/v1/documents:delete", json.dumps(body).encode(), headers=key)
                assert response.status_code == status and reason in response.json()["error"], response.text
            response = post_raw(server.url, "/v1/documents:delete", b'{"ids": ["bulk-1"]}')
            assert response.status_code == 401
            response = post_raw(server.url, "/v1/documents:delete", b'{"ids": ["bulk-1"]}', "text/plain", key)
            assert response.status_code == 415
            assert backend.current().version == bulk.version and ix.list_versions(index_dir)[-1] == bulk.version


# ---- load shedding and responsiveness ------------------------------------------------------------


def test_overload_gets_429_at_once_and_the_client_retries(tmp_path, model_dir, rows):
    index_dir = tmp_path / "index"
    support.build_version(index_dir, model_dir, rows)
    backend = Backend(index_dir, max_in_flight=2, watch_interval=0.1, loader=support.shared_encoder_loader(model_dir))
    with ServerThread(create_app(backend)) as server:
        wait_until(lambda: backend.snapshot is not None, timeout=30, what="the index to load")
        assert backend.try_acquire() and backend.try_acquire()  # the two slots are taken
        tick = time.perf_counter()
        response = httpx.post(server.url + "/v1/search", json={"query": "x"})
        assert response.status_code == 429 and time.perf_counter() - tick < 1.0
        assert response.headers["retry-after"] == "1" and "in flight" in response.json()["error"]
        assert httpx.get(server.url + "/healthz").status_code == 200  # probes are never shed
        with SearchClient(server.url, retries=2, backoff=0.01, max_backoff=0.05) as client:
            with pytest.raises(OverloadedError, match="429"):
                client.search("retrieval")
            assert client.attempts == 3
            threading.Timer(0.3, lambda: (backend.release(), backend.release())).start()
            with SearchClient(server.url, retries=20, backoff=0.05, max_backoff=0.1) as patient:
                assert len(patient.search("retrieval", k=3)) == 3
                assert patient.attempts > 1
        text = httpx.get(server.url + "/metrics").text
        assert metric_value(text, "dssm_overload_rejections_total") >= 3 + 1

        # A real burst: one slot, eight clients at once. Some are shed, none fail otherwise.
        backend.max_in_flight = 1
        barrier, statuses = threading.Barrier(8), []
        body = {"queries": [r["text"] for r in rows[:64]], "k": 50}

        def burst():
            barrier.wait()
            for _ in range(3):
                statuses.append(httpx.post(server.url + "/v1/search:batch", json=body, timeout=30).status_code)

        threads = [threading.Thread(target=burst) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(statuses) == {200, 429}, statuses
        assert backend.in_flight == 0


def test_event_loop_answers_while_searches_run_in_worker_threads(served, rows):
    # Long texts and k=1: the time goes into the model and the index, not into JSON on the loop.
    body = {"queries": [(r["text"] * 3)[:MAX_QUERY_CHARS] for r in rows[:64]] * 4, "k": 1}
    durations, probes, statuses = [], [], []

    def heavy():
        for _ in range(3):
            tick = time.perf_counter()
            statuses.append(httpx.post(served.url + "/v1/search:batch", json=body, timeout=60).status_code)
            durations.append(time.perf_counter() - tick)

    # Two heavy clients, so that a blocked loop would be blocked nearly all the time.
    workers = [threading.Thread(target=heavy, daemon=True) for _ in range(2)]
    for worker in workers:
        worker.start()
    with httpx.Client(base_url=served.url, timeout=30) as probe:
        while any(w.is_alive() for w in workers):
            tick = time.perf_counter()
            assert probe.get("/healthz").status_code == 200
            probes.append(time.perf_counter() - tick)
    assert statuses == [200] * 6
    # If searches ran on the event loop, a probe would wait for the rest of a running batch: half a
    # batch's time or more. Medians, so one scheduling hiccup on a shared machine does not decide.
    assert len(probes) >= 5
    assert np.median(probes) < 0.35 * np.median(durations), (np.median(probes), durations)


# ---- hot swap -----------------------------------------------------------------------------------


def test_hot_swap_under_load_never_fails_or_mixes_versions(tmp_path, model_dir, rows):
    index_dir = tmp_path / "index"
    v1 = support.build_version(index_dir, model_dir, rows)
    marker = {"id": "swap-marker", "title": "", "text": "zebra quagga okapi marker document"}
    removed = {r["id"] for r in rows[:10]}
    # Default loader: the first load reads the version's model/; the swap reuses that encoder.
    backend = Backend(index_dir, max_in_flight=64, watch_interval=0.05)
    with ServerThread(create_app(backend)) as server:
        wait_until(lambda: backend.snapshot is not None, timeout=60, what="the index to load")
        assert backend.current().version == v1
        removed_query = rows[0]["text"]
        observations, errors, stop = [], [], threading.Event()

        def load(seed: int):
            with SearchClient(server.url, retries=0, timeout=30) as client:
                i = seed
                while not stop.is_set():
                    try:
                        if i % 2:
                            r = client.search(marker["text"], k=5)
                            observations.append((seed, r.version, "single", [h.id for h in r]))
                        else:
                            b = client.search_batch([marker["text"], removed_query], k=5)
                            observations.append((seed, b.version, "batch", [[h.id for h in x] for x in b]))
                    except Exception as exc:  # noqa: BLE001 - every failure is a test failure
                        errors.append(repr(exc))
                    i += 1

        threads = [threading.Thread(target=load, args=(s,), daemon=True) for s in range(6)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            v2 = support.build_version(index_dir, model_dir, [r for r in rows if r["id"] not in removed] + [marker],
                                       extra={"duplicate_threshold": 0.999})
            wait_until(lambda: backend.current().version == v2, timeout=30, what="the swap to v2")
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)

        assert not errors, errors[:5]
        seen = {version for _, version, _, _ in observations}
        assert seen == {v1, v2}
        # The reused encoder would load its SavedModel (if ever needed) from the live version, not v1's.
        live = backend.current().searcher
        assert live.encoder.model_dir == live.index.version_dir / "model"
        for _, version, kind, ids in observations:
            lists = [ids] if kind == "single" else ids
            flat = {i for hits in lists for i in hits}
            if version == v1:
                assert "swap-marker" not in flat
            else:
                assert lists[0][0] == "swap-marker" and not flat & removed
            if kind == "batch" and version == v1:
                assert lists[1][0] == rows[0]["id"]  # the removed document is still there in v1
        for seed in range(6):  # once a client has seen v2 it never sees v1 again
            versions = [v for s, v, _, _ in observations if s == seed]
            assert versions == sorted(versions, key=lambda v: v == v2)

        with SearchClient(server.url, retries=0) as client:
            # v2 carries a calibrated threshold: similarity now gives a verdict.
            same = client.similarity(marker["text"], marker["text"])
            assert (same.is_duplicate, same.threshold, same.version) == (True, 0.999, v2)
            assert client.similarity("zebra", "indexing of chemical patents").is_duplicate is False
            text = client.metrics()
            assert metric_value(text, "dssm_index_version_info", {"version": v2}) == 1
            assert metric_value(text, "dssm_index_version_info", {"version": v1}) == 0
            assert metric_value(text, "dssm_index_documents") == len(rows) - 10 + 1
            assert metric_value(text, "dssm_index_swaps_total") == 2

            # A corrupted version is refused; v2 keeps serving and the failure is counted.
            other = tmp_path / "other"
            broken = support.build_version(other, model_dir, rows[:20])
            embeddings = other / "versions" / broken / "embeddings.npy"
            embeddings.write_bytes(embeddings.read_bytes()[:-64])
            ix.publish_version(index_dir, other / "versions" / broken, broken)
            wait_until(lambda: metric_value(client.metrics(), "dssm_index_load_failures_total") == 1, timeout=30,
                       what="the broken version to be tried")
            assert client.search(marker["text"], k=1).version == v2
            assert client.ready() == {"ready": True, "version": v2, "documents": len(rows) - 10 + 1}
            assert "embeddings.npy" in backend.last_error
            v4 = support.build_version(index_dir, model_dir, rows[:30])
            wait_until(lambda: backend.current().version == v4, timeout=30, what="the swap to v4")
            assert client.search("retrieval", k=50).version == v4 and len(client.search("retrieval", k=50)) == 30


def test_not_ready_until_a_version_exists(tmp_path, model_dir, rows):
    index_dir = tmp_path / "empty"
    index_dir.mkdir()
    backend = Backend(index_dir, watch_interval=0.05, loader=support.shared_encoder_loader(model_dir))
    with ServerThread(create_app(backend)) as server:
        response = httpx.get(server.url + "/readyz")
        assert response.status_code == 503 and response.json()["ready"] is False
        response = httpx.post(server.url + "/v1/search", json={"query": "x"})
        assert response.status_code == 503 and "no index version" in response.json()["error"]
        # Error bodies name the index by a placeholder, not the server's absolute path (issue 14).
        assert str(index_dir) not in response.text and "<index>" in response.json()["error"]
        assert httpx.get(server.url + "/healthz").status_code == 200
        version = support.build_version(index_dir, model_dir, rows[:25])
        wait_until(lambda: httpx.get(server.url + "/readyz").status_code == 200, timeout=30, what="readiness")
        assert httpx.post(server.url + "/v1/search", json={"query": "x"}).json()["version"] == version


# ---- the command, the OpenAPI document, schemathesis ----------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dssm_serve_command(served, tmp_path, capsys):
    assert cli_main(["serve", "--index", str(tmp_path / "nowhere")]) == 2
    assert "no index at" in capsys.readouterr().err
    assert cli_main(["serve", "--index", str(served.index_dir), "--require-key-for-reads", "--api-key", ""]) == 2
    assert "needs an API key" in capsys.readouterr().err

    port = _free_port()
    dssm = shutil.which("dssm", path=str(Path(sys.executable).parent)) or "dssm"
    env = dict(os.environ, DSSM_API_KEY=API_KEY)
    proc = subprocess.Popen([dssm, "serve", "--index", str(served.index_dir), "--port", str(port),
                             "--require-key-for-reads", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                return httpx.get(url + "/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout=90, what="`dssm serve` to become ready", interval=0.2)
        assert httpx.post(url + "/v1/search", json={"query": "retrieval"}).status_code == 401
        with SearchClient(url, api_key=API_KEY) as client:  # key from $DSSM_API_KEY
            assert client.search("retrieval", k=3).version == served.version
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status reports it.
    assert proc.returncode in (0, -signal.SIGTERM), err[-2000:]
    assert "Traceback" not in err, err[-2000:]


def test_checked_in_openapi_document_is_the_served_one(served, tmp_path):
    checked_in = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert httpx.get(served.url + "/openapi.json").json() == checked_in
    assert openapi_document() == checked_in
    # `dssm serve --write-openapi docs/openapi.json` regenerates it.
    assert cli_main(["serve", "--write-openapi", str(tmp_path / "openapi.json")]) == 0
    assert (tmp_path / "openapi.json").read_text() == (ROOT / "docs" / "openapi.json").read_text()


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path, model_dir, rows):
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.fail("schemathesis is not installed: pip install -e '.[dev]'")
    # Its own index: with the key, schemathesis' writes really upsert and delete documents.
    index_dir = tmp_path / "index"
    support.build_version(index_dir, model_dir, rows)
    backend = Backend(index_dir, watch_interval=0.1, loader=support.shared_encoder_loader(model_dir))
    with ServerThread(create_app(backend, api_key=API_KEY)) as server:
        wait_until(lambda: backend.snapshot is not None, timeout=30, what="the index to load")
        proc = subprocess.run([st, "run", server.url + "/openapi.json", "--max-examples", "8", "--seed", "7",
                               "--workers", "1", "--checks", "all", "--no-shrink", "--request-timeout", "60",
                               "-H", f"X-API-Key: {API_KEY}", "--report", "junit", "--report-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
        assert "passed" in proc.stdout
        # The server's own count agrees: every operation was exercised and none answered 5xx.
        from prometheus_client.parser import text_string_to_metric_families

        samples = [s for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
                   for s in f.samples if s.name == "dssm_requests_total"]
        statuses = {s.labels["status"] for s in samples}
        assert {"200", "401", "404", "422"} <= statuses and not any(s.startswith("5") for s in statuses), statuses
        answered = {(s.labels["method"], s.labels["route"]) for s in samples if s.labels["status"] == "200"}
        assert {("POST", "/v1/search"), ("POST", "/v1/search:batch"), ("POST", "/v1/similarity"),
                ("PUT", "/v1/documents"), ("GET", "/metrics")} <= answered, answered


@pytest.mark.slow
def test_dssm_serve_workers_share_the_port_and_every_worker_follows_a_write(tmp_path, model_dir, rows, capsys):
    from prometheus_client.parser import text_string_to_metric_families

    from serving.app import worker_app

    assert cli_main(["serve", "--index", str(tmp_path), "--workers", "0"]) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="DSSM_SERVE_WORKER_CONFIG"):
        worker_app()  # only `dssm serve --workers N` configures it

    index_dir = tmp_path / "index"
    v1 = support.build_version(index_dir, model_dir, rows)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    dssm = shutil.which("dssm", path=str(Path(sys.executable).parent)) or "dssm"
    env = {k: v for k, v in os.environ.items() if k.lower() != "prometheus_multiproc_dir"}
    proc = subprocess.Popen([dssm, "serve", "--index", str(index_dir), "--port", str(port), "--workers", "2",
                             "--watch-interval", "0.2", "--log-level", "warning"],
                            env=dict(env, DSSM_API_KEY=API_KEY), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)

    def versions_by_worker() -> dict[str, str]:
        """{pid: version} of every live worker, from the summed /metrics (version_info has one series per pid)."""
        out = {}
        for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
            for sample in family.samples:
                if sample.name == "dssm_index_version_info" and sample.value == 1:
                    out[sample.labels["pid"]] = sample.labels["version"]
        return out

    def all_on(version: str) -> bool:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            found = versions_by_worker()
        except httpx.TransportError:
            return False
        return len(found) == 2 and set(found.values()) == {version}

    try:
        wait_until(lambda: all_on(v1), timeout=120, what="both workers to load the index", interval=0.2)
        workers = set(versions_by_worker())
        assert len(workers) == 2 and str(proc.pid) not in workers  # two processes besides the supervisor
        searches = 24
        for _ in range(searches):  # a new connection each time: the kernel hands them to either worker
            answer = httpx.post(url + "/v1/search", json={"query": "information retrieval", "k": 3})
            assert answer.status_code == 200 and answer.json()["version"] == v1 and len(answer.json()["hits"]) == 3
        # Counters are summed over the workers.
        text = httpx.get(url + "/metrics").text
        assert metric_value(text, "dssm_requests_total", {"route": "/v1/search", "status": "200"}) == searches

        # A write lands in one worker, which answers after swapping; the other follows through CURRENT.
        # The worker's first write loads TensorFlow and the SavedModel (queries never needed them):
        # seconds on a busy 2-core machine, past httpx's 5 s default.
        put = httpx.put(url + "/v1/documents", headers={"X-API-Key": API_KEY}, timeout=60,
                        json={"documents": [{"id": "fresh-doc", "text": "a brand new document about jet engines"}]})
        assert put.status_code == 200, put.text
        v2 = put.json()["version"]
        assert v2 != v1
        wait_until(lambda: all_on(v2), timeout=60, what="both workers to swap in the written version", interval=0.1)
        assert set(versions_by_worker()) == workers  # swapped in place, no worker restarted
        for _ in range(12):
            got = httpx.get(url + "/v1/documents/fresh-doc")
            assert got.status_code == 200 and got.json()["version"] == v2, got.text
        assert httpx.get(url + "/readyz").json()["version"] == v2
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGTERM), err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_search_without_a_mode_uses_the_index_default_hybrid_weight(tmp_path, model_dir, rows):
    """Issue 11: once the version stores a hybrid weight (``dssm index`` stores its label-free one), a
    request that names no mode is answered in hybrid mode with it; before, in dense mode."""
    from dssm.hybrid import HYBRID_FILE
    from dssm.index import publish_index_files

    index_dir = tmp_path / "index"
    support.build_version(index_dir, model_dir, rows)
    backend = Backend(index_dir, max_in_flight=4, watch_interval=0.1)
    query = "library catalogues and computer indexing"
    with ServerThread(create_app(backend)) as server, SearchClient(server.url, retries=0) as client:
        wait_until(lambda: backend.snapshot is not None, timeout=60, what="the index to load")
        assert [h.id for h in client.search(query, k=5)] == [h.id for h in client.search(query, k=5, mode="dense")]
        version = publish_index_files(index_dir, files={HYBRID_FILE: {"weight": 0.0, "normalization": "minmax",
                                                                      "candidates": 100}},
                                      manifest_updates={})
        wait_until(lambda: backend.current().version == version, timeout=30, what="the swap")
        default, hybrid = client.search(query, k=5), client.search(query, k=5, mode="hybrid")
        assert default.version == version
        assert [h.id for h in default] == [h.id for h in hybrid]
        assert [h.score for h in default] == pytest.approx([h.score for h in hybrid], abs=1e-9)
        # Weight 0: the documents with a query term come in BM25's order.
        bm25 = client.search(query, k=5, mode="bm25")
        assert [h.id for h in default][:len(bm25)] == [h.id for h in bm25]
        batch = client.search_batch([query], k=5)
        assert [h.id for h in batch[0]] == [h.id for h in hybrid]


def test_writes_queue_on_their_own_threads_and_a_full_queue_is_429_while_reads_stay_fast(tmp_path, model_dir, rows):
    """Issue 14: writers waiting on the index's write lock used to hold the threads reads run on (a GET
    took 15.7 s during a write burst). Writes now wait on threads of their own, at most
    ``max_pending_writes`` admitted, and commit one at a time; the rest get 429 with Retry-After at once."""
    index_dir = tmp_path / "index"
    support.build_version(index_dir, model_dir, rows)
    backend = Backend(index_dir, watch_interval=0.1, loader=support.shared_encoder_loader(model_dir))
    release = threading.Event()
    running, started = [], []
    commit = backend._writes._commit

    def slow_commit(method, items):  # a write that takes long to commit
        running.append(1)
        started.append(len(running))  # how many commits run at this moment
        release.wait(30)
        try:
            return commit(method, items)
        finally:
            running.pop()

    backend._writes._commit = slow_commit
    with ServerThread(create_app(backend, api_key=API_KEY, worker_threads=2, max_pending_writes=2)) as server:
        wait_until(lambda: backend.snapshot is not None, timeout=60, what="the index to load")
        headers = {"x-api-key": API_KEY}
        bodies = [{"documents": [{"id": f"w{i}", "text": "a new document"}]} for i in range(3)]
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(httpx.put, server.url + "/v1/documents", json=bodies[0], headers=headers, timeout=60)
            wait_until(lambda: len(started) == 1, timeout=10, what="the first write to start")
            second = pool.submit(httpx.put, server.url + "/v1/documents", json=bodies[1], headers=headers, timeout=60)
            wait_until(lambda: len(backend._writes._queue) == 1, timeout=10, what="the second write to queue")
            refused = httpx.put(server.url + "/v1/documents", json=bodies[2], headers=headers, timeout=10)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert "max_pending_writes=2" in refused.json()["error"]
            # two worker threads, two writes admitted: reads still answer at once
            tick = time.perf_counter()
            for _ in range(5):
                assert httpx.get(server.url + f"/v1/documents/{rows[0]['id']}", timeout=10).status_code == 200
                assert httpx.post(server.url + "/v1/search:batch", json={"queries": ["library"], "k": 3},
                                  timeout=10).status_code == 200
            assert time.perf_counter() - tick < 5.0
            assert started == [1]  # the second write waits for the first to commit
            release.set()
            assert [first.result().status_code, second.result().status_code] == [200, 200]
        assert started == [1, 1]  # one commit at a time
        assert backend.current().documents == len(rows) + 2


def test_read_your_writes_across_server_processes_with_min_version(tmp_path, model_dir, rows):
    """Issue 14: with --workers 2 a DELETE right after a PUT of the same id hit the other worker, which
    had not swapped yet: 404. A write's version now travels back as X-Min-Version (the client sends it
    itself), and a process that is behind loads that version before answering."""
    index_dir = tmp_path / "index"
    support.build_version(index_dir, model_dir, rows)
    loader = support.shared_encoder_loader(model_dir)
    # Two "workers" on one index that never poll CURRENT on their own during the test.
    first = Backend(index_dir, watch_interval=3600, loader=loader)
    second = Backend(index_dir, watch_interval=3600, loader=loader)
    with ServerThread(create_app(first, api_key=API_KEY)) as one, ServerThread(create_app(second,
                                                                                      api_key=API_KEY)) as two:
        wait_until(lambda: first.snapshot is not None and second.snapshot is not None, timeout=60,
                   what="both processes to load")
        with SearchClient(one.url, api_key=API_KEY, retries=0) as writer:
            written = writer.upsert([Document(id="fresh", text="a document written through the first process")])
            assert writer.min_version == written.version
        behind = second.current().version
        assert behind < written.version
        # Without the header the second process answers from its old version: the stale 404 of the issue.
        assert httpx.get(two.url + "/v1/documents/fresh", timeout=10).status_code == 404
        with SearchClient(two.url, api_key=API_KEY, retries=0) as other:
            other.min_version = written.version  # what a client behind a --workers 2 port carries over
            assert other.get_document("fresh").version == written.version
            deleted = other.delete("fresh")
            assert other.min_version == deleted.version > written.version
        assert second.current().version == deleted.version
        # Malformed and unreachable versions: 400, and 503 with Retry-After (retried by clients).
        answer = httpx.get(two.url + "/v1/documents/1", headers={"X-Min-Version": "../x"}, timeout=10)
        assert answer.status_code == 400 and "X-Min-Version" in answer.json()["error"]
        answer = httpx.get(two.url + "/v1/documents/1", headers={"X-Min-Version": "99991231T000000Z-ffffff"},
                           timeout=10)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"


def test_backend_freezes_the_heap_after_loading_a_model(tmp_path, model_dir, rows, monkeypatch):
    """What the first load brought (TensorFlow, the tower, the version) is out of the cyclic collector's reach;
    a write that keeps the model does not freeze again (a frozen reference cycle would never be collected)."""
    import gc

    import serving.backend as backend_module

    calls = []
    freeze = backend_module._freeze_heap
    monkeypatch.setattr(backend_module, "_freeze_heap", lambda: (calls.append(1), freeze()))
    index_dir = tmp_path / "index"
    support.build_version(index_dir, model_dir, rows[:20])
    backend = Backend(index_dir, watch_interval=0, loader=support.shared_encoder_loader(model_dir))
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        assert backend.reload()
        assert len(calls) == 1 and gc.get_freeze_count() > 0
        backend.upsert([("new", "", "a new document about retrieval")])
        assert backend.current().documents == 21 and len(calls) == 1
    finally:
        gc.unfreeze()


def test_concurrent_puts_queued_behind_a_write_share_one_version(tmp_path, model_dir, rows):
    """Group commit over HTTP: six PUTs, five of them queued while the first commits, publish two versions;
    each answer names the version its documents are live in, and every document is there."""
    index_dir = tmp_path / "index"
    support.build_version(index_dir, model_dir, rows[:20])
    backend = Backend(index_dir, watch_interval=0.1, loader=support.shared_encoder_loader(model_dir))
    commit, first = backend._writes._commit, threading.Event()

    def held(method, items):  # the first commit waits until the other five writes are queued
        if not first.is_set():
            first.set()
            wait_until(lambda: len(backend._writes._queue) == 5, timeout=60, what="five queued writes")
        return commit(method, items)

    backend._writes._commit = held
    with ServerThread(create_app(backend, api_key=API_KEY)) as server:
        wait_until(lambda: backend.snapshot is not None, timeout=30, what="the index to load")
        before = set(ix.list_versions(index_dir))

        def put(i: int) -> str:
            if i:
                first.wait(60)
            with SearchClient(server.url, api_key=API_KEY, retries=0, timeout=120) as client:
                return client.upsert([(f"g{i}-{j}", f"group commit document {i} {j} about libraries")
                                      for j in range(2)]).version

        with ThreadPoolExecutor(6) as pool:
            versions = list(pool.map(put, range(6)))
        assert len(set(versions[1:])) == 1 and versions[0] != versions[1]
        assert set(ix.list_versions(index_dir)) - before == set(versions)
        with SearchClient(server.url, api_key=API_KEY, retries=0) as client:
            assert all(client.get_document(f"g{i}-{j}").text.startswith("group commit")
                       for i in range(6) for j in range(2))
            assert metric_value(client.metrics(), "dssm_merged_writes_total") == 5
        assert backend.current().documents == 32
