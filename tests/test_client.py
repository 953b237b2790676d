"""serving/client.py against a real server on 127.0.0.1: typed results, the Searcher's method names,
exceptions with the server's reason, and retries only where they are safe (connection refused,
429, 503), never on other 4xx/5xx."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest
import serving_support as support
from serving_support import API_KEY, ServerThread, wait_until

from dssm import index as ix
from serving.app import create_app
from serving.backend import Backend
from serving.client import (
    AuthenticationError,
    BadRequestError,
    ClientError,
    ConnectionFailedError,
    Document,
    Hit,
    NotFoundError,
    SearchClient,
    SearchResults,
    ServerError,
    Similarity,
    UnavailableError,
    WriteResult,
)
from serving.searcher import Searcher


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir  # conftest's session model: trained once for the whole test run


@pytest.fixture(scope="module")
def rows(adi_dir):
    return support.adi_rows(adi_dir)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir, rows):
    index_dir = tmp_path_factory.mktemp("client") / "index"
    support.build_version(index_dir, model_dir, rows)
    backend = Backend(index_dir, watch_interval=0.1, loader=support.shared_encoder_loader(model_dir))
    with ServerThread(create_app(backend, api_key=API_KEY)) as running:
        wait_until(lambda: backend.snapshot is not None, timeout=60, what="the index to load")
        running.backend = backend
        running.index_dir = index_dir
        yield running


def test_remote_and_local_search_are_used_the_same_way(server, model_dir, rows):
    """Switching between Searcher and SearchClient is one line: same methods, same unpacking."""
    local = Searcher.load(server.index_dir, encoder=support.shared_encoder(model_dir))
    with SearchClient(server.url) as remote:
        for engine in (local, remote):
            hits = engine.search(rows[4]["text"], k=3)
            unpacked = [(doc_id, round(score, 4), text) for doc_id, score, text in hits]
            assert unpacked[0][0] == rows[4]["id"] and unpacked[0][2] == rows[4]["text"]
            batch = engine.search_batch([rows[4]["text"], rows[5]["text"]], k=2)
            assert [b[0].id for b in batch] == [rows[4]["id"], rows[5]["id"]]
        local_ids = [h.id for h in local.search("automatic indexing", k=10)]
        assert [h.id for h in remote.search("automatic indexing", k=10)] == local_ids
        # The other reads too: same names, same fields, same answers.
        for engine in (local, remote):
            doc = engine.get_document(rows[6]["id"])
            assert (doc.id, doc.title, doc.text) == (rows[6]["id"], rows[6]["title"], rows[6]["text"])
            with pytest.raises(KeyError if engine is local else NotFoundError):
                engine.get_document("missing-id")
        assert remote.similarity("libraries", "indexing").cosine == pytest.approx(
            local.similarity("libraries", "indexing").cosine, abs=1e-5)


def test_results_are_typed_dataclasses(server, rows):
    with SearchClient(server.url) as client:
        results = client.search("retrieval", k=4)
        assert isinstance(results, SearchResults) and isinstance(results, Sequence)
        assert len(results) == 4 and all(isinstance(h, Hit) for h in results)
        assert results[0] == results.hits[0] and results[1:] == results.hits[1:]
        assert all(isinstance(h.score, float) and isinstance(h.id, str) for h in results)
        with pytest.raises(dataclasses.FrozenInstanceError):
            results[0].score = 2.0
        batch = client.search_batch(["retrieval", "libraries"], k=2)
        assert batch.version == results.version == batch[1].version and len(batch) == 2
        sim = client.similarity("retrieval", "retrieval")
        assert isinstance(sim, Similarity) and sim.cosine == pytest.approx(1.0, abs=1e-5)
        doc = client.get_document(rows[2]["id"])
        assert isinstance(doc, Document)
        assert (doc.id, doc.title, doc.text) == (rows[2]["id"], rows[2]["title"], rows[2]["text"])
        assert doc.version == results.version


def test_errors_carry_the_servers_reason_and_are_not_retried(server):
    with SearchClient(server.url, retries=5, backoff=0.01) as client:
        with pytest.raises(BadRequestError) as caught:
            client.search("x", k=5000)
        error = caught.value
        assert error.status == 422 and "less than or equal to 1000" in error.reason
        assert error.details and "k:" in error.details[0]
        with pytest.raises(NotFoundError, match="'missing-id' is not in index version"):
            client.get_document("missing-id")
        with pytest.raises(AuthenticationError, match="401"):
            client.delete("1")
        with pytest.raises(BadRequestError, match="list of query texts"):
            client.search_batch("one string")  # refused before sending
        assert client.attempts == 3


def test_writes_send_the_api_key_and_check_documents_before_sending(server):
    with SearchClient(server.url, api_key=API_KEY, retries=0) as client:
        with pytest.raises(NotFoundError, match="nope"):  # past auth, then the id is unknown
            client.delete("nope")
        with pytest.raises(BadRequestError, match="'id' and 'text'"):
            client.upsert([{"id": "x", "body": "wrong key"}])
        with pytest.raises(BadRequestError, match="cannot send"):
            client.upsert([42])
        with pytest.raises(BadRequestError, match="non-blank"):
            client.get_document("  ")
        with pytest.raises(BadRequestError, match="appears twice"):
            client.upsert([Document(id="a", text="one"), ("a", "title", "two")])
        assert client.attempts == 2  # the three local refusals sent nothing


def test_upsert_returns_the_new_live_version(server):
    with SearchClient(server.url, api_key=API_KEY, retries=0) as client:
        before = client.search("retrieval", k=1).version
        result = client.upsert([("client-doc", "t", "a document written through the client")])
        assert isinstance(result, WriteResult) and result.upserted == 1 and result.version != before
        assert client.get_document("client-doc").version == result.version


def test_connection_refused_is_retried_with_backoff_then_reported():
    with ServerThread(create_app(Backend("unused", watch_interval=0), manage_backend=False), start=False) as idle:
        # The port is bound but not listening: every connection is refused.
        with SearchClient(idle.url, retries=3, backoff=0.05, max_backoff=0.2) as client:
            tick = time.perf_counter()
            with pytest.raises(ConnectionFailedError, match="after 4 attempts"):
                client.search("x")
            assert client.attempts == 4
            assert time.perf_counter() - tick >= 0.05 + 0.1 + 0.2  # three waits, doubling, capped


def test_client_rides_out_a_server_that_comes_up_late(server):
    late = ServerThread(create_app(server.backend, manage_backend=False), start=False)
    try:
        threading.Timer(0.4, late.start).start()
        with SearchClient(late.url, retries=10, backoff=0.1, max_backoff=0.4) as client:
            assert len(client.search("retrieval", k=2)) == 2
            assert client.attempts > 1
    finally:
        wait_until(lambda: late.server.started, timeout=30, what="the late server")
        late.stop()


def test_503_is_retried_until_an_index_is_published(tmp_path, model_dir, rows):
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    backend = Backend(index_dir, watch_interval=0.05, loader=support.shared_encoder_loader(model_dir))
    with ServerThread(create_app(backend)) as empty:
        with SearchClient(empty.url, retries=2, backoff=0.01) as impatient:
            with pytest.raises(UnavailableError, match="no index version") as caught:
                impatient.search("x")
            assert caught.value.status == 503 and impatient.attempts == 3
        threading.Timer(0.3, support.build_version, args=(index_dir, model_dir, rows[:20])).start()
        with SearchClient(empty.url, retries=40, backoff=0.05, max_backoff=0.25) as patient:
            hits = patient.search("retrieval", k=50)
            assert len(hits) == 20 and hits.version == ix.current_version_dir(index_dir).name
            assert patient.attempts > 1


def test_server_errors_are_not_retried(tmp_path):
    # A vector-only index (no model/) cannot embed text: a server-side fault, reported once as 500.
    index_dir = tmp_path / "vectors"
    vectors = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    ix.build_index(index_dir, embeddings=vectors, ids=[f"v{i}" for i in range(30)], texts=["t"] * 30)
    backend = Backend(index_dir, watch_interval=0, warmup_query="")
    with ServerThread(create_app(backend)) as broken:
        wait_until(lambda: backend.snapshot is not None, timeout=30, what="the index to load")
        with SearchClient(broken.url, retries=5, backoff=0.01) as client:
            with pytest.raises(ServerError, match="has no model") as caught:
                client.search("text")
            assert caught.value.status == 500 and client.attempts == 1
            assert client.get_document("v3").text == "t"  # the rest of the service works
            # Without a query model there is no hybrid either: a 409 naming the mode, not a 500.
            with pytest.raises(ClientError, match="mode='hybrid'") as caught:
                client.search("text", mode="hybrid")
            assert caught.value.status == 409
