"""serving/searcher.py: text → query tower → ScaNN → doc store; the ``dssm search`` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dssm import index as ix
from dssm.errors import IndexNotFoundError, InputError
from dssm.index.documents import as_documents
from serving.search_cli import format_hits, hits_json
from serving.searcher import DocumentNotFoundError, Hit, Searcher


class LookupEncoder:
    """Stand-in query tower for the searcher's own logic: a fixed vector per known text."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table
        self.calls = 0

    def embed_queries(self, texts):
        self.calls += 1
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


@pytest.fixture()
def small_index(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((300, 16)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    ids = [f"d{i}" for i in range(300)]
    texts = [f"body {i}" for i in range(300)]
    ix.build_index(tmp_path / "idx", embeddings=matrix, ids=ids, texts=texts, titles=[f"t{i}" for i in ids])
    return tmp_path / "idx", matrix


def test_query_with_a_documents_embedding_finds_that_document(small_index):
    index_dir, matrix = small_index
    encoder = LookupEncoder({"q17": matrix[17], "q250": matrix[250]})
    searcher = Searcher.load(index_dir, encoder=encoder)
    hits = searcher.search("q17", k=5)
    assert len(hits) == 5 and all(isinstance(h, Hit) for h in hits)
    doc_id, score, text = hits[0]
    assert (doc_id, text) == ("d17", "body 17")
    assert score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # Scores are cosines with the query: the second hit's equals the exact dot product.
    second = int(hits[1].id[1:])
    assert hits[1].score == pytest.approx(float(matrix[17] @ matrix[second]), abs=1e-5)
    assert encoder.calls == 1

    batch = searcher.search_batch(["q250", "q17"], k=5)
    assert encoder.calls == 2  # one model call for the whole batch
    assert [b[0].id for b in batch] == ["d250", "d17"]
    assert [h.id for h in batch[1]] == [h.id for h in hits]
    assert searcher.search_batch([], k=3) == []
    assert len(searcher.search("q17", k=1000)) == 300
    assert len(searcher) == 300 and searcher.version == ix.current_version_dir(index_dir).name


def test_bad_queries_are_refused(small_index):
    index_dir, matrix = small_index
    searcher = Searcher.load(index_dir, encoder=LookupEncoder({"q": matrix[0]}))
    with pytest.raises(InputError, match="empty"):
        searcher.search("   ")
    with pytest.raises(InputError, match="must be a string"):
        searcher.search_batch(["q", None])
    with pytest.raises(InputError, match="list of query texts"):
        searcher.search_batch("q")
    with pytest.raises(InputError, match="k must be"):
        searcher.search("q", k=0)


def test_model_and_index_dimension_mismatch_is_reported(small_index):
    index_dir, _ = small_index
    searcher = Searcher.load(index_dir, encoder=LookupEncoder({"q": np.ones(8, np.float32)}))
    with pytest.raises(InputError, match=r"\[1, 16\]"):
        searcher.search("q")


def test_vector_only_index_needs_an_encoder_for_text(small_index):
    index_dir, matrix = small_index
    searcher = Searcher.load(index_dir)
    assert searcher.encoder is None
    with pytest.raises(IndexNotFoundError, match="no model"):
        searcher.search("anything")
    assert searcher.search_vectors(matrix[[3]], k=1)[0][0].id == "d3"


def test_get_document_by_id(small_index):
    index_dir, _ = small_index
    searcher = Searcher.load(index_dir)
    doc = searcher.get_document("d42")
    assert (doc.id, doc.title, doc.text) == ("d42", "td42", "body 42")
    with pytest.raises(DocumentNotFoundError, match="'d300' is not in index version") as caught:
        searcher.get_document("d300")
    # The client raises NotFoundError; in process a missing id is both a KeyError and an IndexNotFoundError.
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, IndexNotFoundError)
    for bad in ("", "  ", None, 42):
        with pytest.raises(InputError, match="non-blank string"):
            searcher.get_document(bad)


def test_documents_are_accepted_in_the_clients_forms():
    from serving.client import Document

    forms = [("a", "title a", "text a"), ("b", "text b"), {"id": "c", "text": "text c"},
             {"id": "d", "title": "title d", "text": "text d"}, Document(id="e", text="text e", title="title e"),
             ix.Doc("f", "title f", "text f")]
    assert as_documents(forms) == [("a", "title a", "text a"), ("b", "", "text b"), ("c", "", "text c"),
                                   ("d", "title d", "text d"), ("e", "title e", "text e"), ("f", "title f", "text f")]
    for bad in ([{"id": "x", "body": "y"}], [("only-id",)], [42]):
        with pytest.raises(InputError, match="document"):
            as_documents(bad)
    with pytest.raises(InputError, match="list of documents"):
        as_documents({"id": "x", "text": "y"})


def test_output_formats():
    hits = [Hit("a1", 0.91234, "first\ndocument"), Hit("b2", 0.5, "x" * 500)]
    assert hits_json("q", hits) == {"query": "q", "hits": [{"id": "a1", "score": 0.91234, "text": "first\ndocument"},
                                                           {"id": "b2", "score": 0.5, "text": "x" * 500}]}
    table = format_hits("q", hits, width=80).splitlines()
    assert table[0] == "query: q"
    assert table[2].split()[:4] == ["1", "0.9123", "a1", "first"]
    assert all(len(line) <= 80 for line in table)
    assert "(no results)" in format_hits("q", [], width=80)


@pytest.fixture(scope="module")
def adi_index(tiny_model_dir, adi_dir, tmp_path_factory):
    """adi encoded in process with the real tiny model (the Beam path is tested in test_encode_corpus)."""
    from dssm.data import iter_corpus

    docs = list(iter_corpus(adi_dir / "corpus.jsonl"))
    out = tmp_path_factory.mktemp("adi_index") / "idx"
    ix.build_index_from_documents(out, model_dir=tiny_model_dir, documents=docs, progress=False)
    return out, docs


def test_real_model_finds_a_document_by_its_own_text(adi_index):
    from dssm.data import document_text

    index_dir, docs = adi_index
    searcher = Searcher.load(index_dir)
    assert searcher.index.manifest["model"]["files"] > 0 and len(searcher) == len(docs)
    # Shared towers: a query equal to a document's title + text embeds exactly like that document.
    picked = docs[::20]
    results = searcher.search_batch([document_text(d.title, d.text) for d in picked], k=3)
    for doc, hits in zip(picked, results, strict=True):
        assert hits[0].id == doc.id and hits[0].text == doc.text
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    single = searcher.search(document_text(picked[1].title, picked[1].text), k=3)
    assert [h.id for h in single] == [h.id for h in results[1]]


def test_cli_json_and_table(adi_index, capsys):
    from serving.search_cli import main

    index_dir, docs = adi_index
    assert main(["--index", str(index_dir), "-k", "4", "--json", "computer", "indexing"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"query", "hits"} and out["query"] == "computer indexing"
    assert len(out["hits"]) == 4
    texts = {d.id: d.text for d in docs}
    for hit in out["hits"]:
        assert set(hit) == {"id", "score", "text"} and isinstance(hit["score"], float)
        assert hit["text"] == texts[hit["id"]]
    assert [h["score"] for h in out["hits"]] == sorted((h["score"] for h in out["hits"]), reverse=True)

    assert main(["--index", str(index_dir), "-k", "2", "computer indexing"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "query: computer indexing" and len(table) == 4
    assert table[2].split()[2] == out["hits"][0]["id"]


def test_cli_errors_go_through_dssm(tmp_path, capsys):
    from dssm.cli import main as dssm_main

    assert dssm_main(["search", "--index", str(tmp_path / "none"), "q"]) == 2
    assert "error: no index at" in capsys.readouterr().err


def test_in_process_writes_and_reads_match_the_clients_methods(adi_index, tmp_path):
    """upsert/delete/get_document as SearchClient offers them, on a copy of the index (writes publish versions)."""
    import shutil

    source, docs = adi_index
    index_dir = tmp_path / "idx"
    shutil.copytree(source, index_dir)
    searcher = Searcher.load(index_dir)
    version = searcher.upsert([{"id": "new-a", "text": "zebra quagga okapi"}, ("new-b", "striped horses")])
    updated = Searcher.load(index_dir)
    assert updated.version == version != searcher.version and len(updated) == len(docs) + 2
    assert updated.get_document("new-b") == ix.Doc("new-b", "", "striped horses")
    assert updated.search("zebra quagga okapi", k=1)[0].id == "new-a"
    with pytest.raises(DocumentNotFoundError):
        searcher.get_document("new-a")  # the old object keeps serving the version it loaded

    after_one = Searcher.load(index_dir).delete("new-a")  # one bare id, not its characters
    after_two = Searcher.load(index_dir).delete(["new-b", docs[0].id])
    final = Searcher.load(index_dir)
    assert final.version == after_two != after_one and len(final) == len(docs) - 1
    for gone in ("new-a", "new-b", docs[0].id):
        with pytest.raises(DocumentNotFoundError):
            final.get_document(gone)
    with pytest.raises(InputError, match="no document ids"):
        final.delete([])
    with pytest.raises(InputError, match="non-blank"):
        final.delete(["ok", " "])


def test_model_files_are_hashed_once_where_they_are_read(adi_index, monkeypatch):
    """The index manifest's model/ entries are not hashed by load_index: load_encoder checks model/ against its
    own manifest, and a searcher given an encoder (a hot swap reusing the live model) never reads model/."""
    import dssm.artifacts as artifacts

    hashed: list[str] = []
    original = artifacts.sha256_file

    def recording(path, **kwargs):
        hashed.append(str(path))
        return original(path, **kwargs)

    monkeypatch.setattr(artifacts, "sha256_file", recording)
    index_dir, _ = adi_index
    searcher = Searcher.load(index_dir)
    model_files = [p for p in hashed if "/model/" in p]
    assert model_files and len(model_files) == len(set(model_files))  # each once, by load_encoder
    hashed.clear()
    Searcher.load(index_dir, encoder=searcher.encoder)
    # Nothing at all: the index files are the inodes the first load verified (its base is reused).
    assert hashed == []
