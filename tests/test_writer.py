"""`dssm serve`'s writer child (serving.writer): the same versions and errors as an in-process write."""

from __future__ import annotations

import numpy as np
import pytest
import serving_support as support
from serving_support import API_KEY, ServerThread, wait_until

from dssm import index as ix
from dssm.data import document_text
from dssm.errors import ConfigError, IndexNotFoundError, InputError
from serving.app import create_app
from serving.backend import Backend
from serving.client import BadRequestError, NotFoundError, SearchClient
from serving.searcher import Searcher
from serving.writer import WriterCrashedError, WriterProcess


def _searcher(index_dir, model_dir):
    return Searcher.load(index_dir, encoder=support.shared_encoder(model_dir))


@pytest.fixture(scope="module")
def rows(adi_dir):
    return support.adi_rows(adi_dir)


def test_the_child_publishes_upserts_and_deletes_encoded_like_the_in_process_tower(tmp_path, tiny_model_dir, rows,
                                                                                    capfd):
    index_dir = tmp_path / "index"
    v1 = support.build_version(index_dir, tiny_model_dir, rows[:30])
    writer = WriterProcess(index_dir)
    try:
        text = "zebra quagga okapi: striped animals"
        v2 = writer.upsert([("new-1", "animals", text), (rows[0]["id"], "", "replaced text")])
        assert v2 != v1 and ix.current_version_dir(index_dir).name == v2
        searcher = _searcher(index_dir, tiny_model_dir)
        assert len(searcher) == 31 and searcher.get_document(rows[0]["id"]).text == "replaced text"
        # The child's vector is the document tower's: the row scores 1 against the tower's own encoding.
        expected = support.shared_encoder(tiny_model_dir).embed_documents([document_text("animals", text)])
        found, scores = searcher.index.search_vectors(np.asarray(expected, dtype=np.float32), 1)
        assert searcher.index.docs.get(found[0].tolist())[0].id == "new-1"
        assert scores[0, 0] == pytest.approx(1.0, abs=1e-4)

        # Errors come back as the library's types, and nothing is published.
        with pytest.raises(InputError, match="'nope' is not in index version"):
            writer.delete(["new-1", "nope"])
        with pytest.raises(InputError, match="no documents"):
            writer.upsert([])
        assert ix.current_version_dir(index_dir).name == v2
        # A failure that is not bad input is a 500 (WriterCrashedError names it), its traceback in the log.
        with pytest.raises(WriterCrashedError, match="KeyError: 'documents'"):
            writer._call({"op": "upsert"})
        assert "writer: upsert failed" in capfd.readouterr().err
        v3 = writer.delete(["new-1"])
        assert v3 != v2 and len(_searcher(index_dir, tiny_model_dir)) == 30
    finally:
        writer.close()
    assert writer._child is None

    nowhere = WriterProcess(tmp_path / "no-index")
    try:
        with pytest.raises(IndexNotFoundError, match="no-index"):
            nowhere.upsert([("x", "", "text")])
    finally:
        nowhere.close()


def test_the_child_prunes_old_versions_after_it_answers(tmp_path, tiny_model_dir, rows):
    """Retention runs in a thread of the child once a write's answer has gone (deleting a replaced base's
    files held writes 0.2-0.3 s at 1M); the service still keeps the default number of versions."""
    index_dir = tmp_path / "index"
    support.build_version(index_dir, tiny_model_dir, rows[:30])
    writer = WriterProcess(index_dir)
    try:
        published = [writer.upsert([(f"new-{i}", "", f"text number {i}")])
                     for i in range(ix.DEFAULT_KEEP_VERSIONS + 3)]
        wait_until(lambda: len(ix.list_versions(index_dir)) == ix.DEFAULT_KEEP_VERSIONS, timeout=20,
                   what="the child to prune down to the default number of versions")
        assert ix.list_versions(index_dir) == published[-ix.DEFAULT_KEEP_VERSIONS:]
    finally:
        writer.close()
    staging = index_dir / ".staging"
    assert not staging.exists() or not list(staging.iterdir())


def test_the_child_compacts_inline_only_past_its_hard_limit(tmp_path, tiny_model_dir, rows):
    index_dir = tmp_path / "index"
    support.build_version(index_dir, tiny_model_dir, rows[:20])
    writer = WriterProcess(index_dir, max_delta=5)
    try:
        writer.upsert([(f"a{i}", "", f"first batch {i}") for i in range(3)])
        assert ix.load_index(index_dir).layout.delta_rows == 3  # a delta segment
        writer.upsert([(f"b{i}", "", f"second batch {i}") for i in range(3)])  # 6 > 5: folded into the base
        layout = ix.load_index(index_dir).layout
        assert layout.plain and layout.base_documents == 26
    finally:
        writer.close()
    with pytest.raises(ConfigError, match="-1"):
        WriterProcess(index_dir, max_delta=-1)


class _DiesOnFirstWrite(WriterProcess):
    """A child that exits with 3 on its first request (a crash mid-write), then the real child."""

    crashes = 1

    def _ensure(self):
        if self.crashes and (self._child is None or self._child.poll() is not None):
            import subprocess
            import sys

            self.crashes -= 1
            self._child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline(); sys.exit(3)"],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            return self._child
        return super()._ensure()


def test_a_child_that_dies_mid_write_is_an_error_and_the_next_write_restarts_it(tmp_path, tiny_model_dir, rows):
    index_dir = tmp_path / "index"
    v1 = support.build_version(index_dir, tiny_model_dir, rows[:10])
    writer = _DiesOnFirstWrite(index_dir)
    try:
        with pytest.raises(WriterCrashedError, match="exited with 3 during a upsert"):
            writer.upsert([("a", "", "first try")])
        assert ix.current_version_dir(index_dir).name == v1
        assert writer.upsert([("a", "", "second try")]) != v1
        assert _searcher(index_dir, tiny_model_dir).get_document("a").text == "second try"
    finally:
        writer.close()


def test_http_writes_through_the_child_are_live_when_answered_and_keep_their_status_codes(tmp_path, tiny_model_dir,
                                                                                          rows, monkeypatch):
    index_dir = tmp_path / "index"
    support.build_version(index_dir, tiny_model_dir, rows[:20])
    warmed = []
    search = Searcher.search
    monkeypatch.setattr(Searcher, "search", lambda self, text, *a, **kw: (
        warmed.append(self.version) if text == "warm-up probe" else None, search(self, text, *a, **kw))[1])
    backend = Backend(index_dir, watch_interval=0.1, loader=support.shared_encoder_loader(tiny_model_dir),
                      writer=WriterProcess(index_dir), warmup_query="warm-up probe")
    with ServerThread(create_app(backend, api_key=API_KEY)) as server:
        wait_until(lambda: backend.snapshot is not None, timeout=30, what="the index to load")
        with SearchClient(server.url, api_key=API_KEY, retries=0) as client:
            text = "zebra quagga okapi: striped animals"
            written = client.upsert([("new-1", "animals", text)])
            assert backend.current().version == written.version  # read-your-writes
            assert client.search(document_text("animals", text), k=1)[0].id == "new-1"
            with pytest.raises(NotFoundError, match="'nope'"):
                client.delete(["new-1", "nope"])
            with pytest.raises(BadRequestError, match="appears twice"):
                client.upsert([("x", "one"), ("x", "two")])
            gone = client.delete(["new-1"])
            assert backend.current().version == gone.version and len(backend.current().searcher) == 20
            # Only the first version was warmed up: the writes' versions share its base and encoder.
            assert len(warmed) == 1 and warmed[0] != gone.version
    assert backend._writer._child is None  # the server's shutdown ended the child


def test_the_child_state_loads_the_tower_once_and_freezes_it_out_of_the_collector(tmp_path, tiny_model_dir, rows):
    import gc

    from serving.writer import _ChildState

    index_dir = tmp_path / "index"
    support.build_version(index_dir, tiny_model_dir, rows[:5])
    state = _ChildState(index_dir, None)
    try:
        encoder = state.encoder()
        # A full collection would walk TensorFlow's objects inside a write; frozen, it skips them.
        assert gc.get_freeze_count() > 0
        assert state.encoder() is encoder  # same model: not loaded again
        assert state.limit() == 4 * 20_000  # HARD_LIMIT_FACTOR x default_max_delta of a small base
    finally:
        gc.unfreeze()
