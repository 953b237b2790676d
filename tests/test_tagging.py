"""`dssm tag`: build a tags index from label descriptions, rank labels for a text."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dssm.errors import InputError
from dssm.tagging import main, read_labels

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "tags.tsv"


def test_tag_builds_and_ranks_every_label(tiny_model_dir, tmp_path, capsys):
    index = tmp_path / "tags"
    labels = [doc.id for doc in read_labels(EXAMPLE)]
    assert main(["--index", str(index), "--labels", str(EXAMPLE), "--model", str(tiny_model_dir)]) == 0
    assert main(["--index", str(index), "--json", "how", "to", "learn", "python", "programming"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == "how to learn python programming"
    assert sorted(x["label"] for x in out["labels"]) == sorted(labels)
    scores = [x["score"] for x in out["labels"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in scores)
    # A label's own description, as the text, ranks that label first (shared towers: cosine 1).
    assert main(["--index", str(index), "-k", "2", "jobs careers interviews companies and getting hired"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].split()[2] == "careers" and len(table) == 4


def test_tag_input_errors(tiny_model_dir, tmp_path):
    with pytest.raises(InputError, match="needs --model"):
        main(["--index", str(tmp_path / "t"), "--labels", str(EXAMPLE)])
    with pytest.raises(InputError, match="give a text"):
        main(["--index", str(tmp_path / "t")])
    twice = tmp_path / "twice.tsv"
    twice.write_text("label\tdescription\na\tone thing\na\tanother\n")
    with pytest.raises(InputError, match="label 'a' appears twice"):
        read_labels(twice)
    blank = tmp_path / "blank.tsv"
    blank.write_text("label\tdescription\nb\t  \n")
    with pytest.raises(InputError, match="'b' has an empty description"):
        read_labels(blank)


# --------------------------------------------------------------------------------------------------
# Issue 16: trained tagging (multi-label loss), few-shot prototypes, eval-tags, POST /v1/tag

DEBTAGS = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "debtags"


@pytest.fixture(scope="module")
def tiny_tags(tmp_path_factory):
    """200 real debtags training texts and the whole label file (148 labels)."""
    work = tmp_path_factory.mktemp("tiny_tags")
    lines = (DEBTAGS / "train.jsonl").read_text().splitlines()[:200]
    (work / "train.jsonl").write_text("\n".join(lines) + "\n")
    return SimpleNamespace(train=work / "train.jsonl", labels=DEBTAGS / "labels.tsv", work=work)


@pytest.fixture(scope="module")
def trained_tags(tiny_tags, tiny_model_dir):
    """``dssm train-tags`` on the tiny set, from the session's tiny model (fast), and a zero-shot index beside it."""
    from dssm.cli import main as cli_main

    model, index = tiny_tags.work / "model", tiny_tags.work / "tags"
    assert cli_main(["train-tags", "--train", str(tiny_tags.train), "--labels", str(tiny_tags.labels), "--output",
                     str(model), "--index", str(index), "--init-from", str(tiny_model_dir), "--epochs", "8",
                     "--batch-size", "16", "--learning-rate", "0.02", "--verbose", "0",
                     "--validation-fraction", "0.2"]) == 0
    zero = tiny_tags.work / "zero"
    assert cli_main(["tag", "--index", str(zero), "--labels", str(tiny_tags.labels), "--model",
                     str(tiny_model_dir)]) == 0
    return SimpleNamespace(model=model, index=index, zero=zero)


def test_train_tags_publishes_learned_vectors_and_its_threshold(trained_tags, tiny_tags):
    from dssm.tag_data import label_matrix, read_tagged
    from dssm.tag_metrics import tag_metrics
    from serving.searcher import Searcher
    from serving.tagger import Tagger

    history = json.loads((trained_tags.model / "history.json").read_text())
    trained = Tagger(Searcher.load(trained_tags.index))
    assert trained.threshold == pytest.approx(history["tagging"]["threshold"])
    assert history["tagging"]["threshold_source"] == "held-out training texts"
    assert history["loss"][-1] < history["loss"][0]
    texts = read_tagged(tiny_tags.train, known_labels=trained.labels)
    targets = label_matrix(texts, trained.labels)
    zero = Tagger(Searcher.load(trained_tags.zero))
    assert zero.threshold is None and zero.labels == trained.labels
    figures = {name: tag_metrics(name, t.scores([x.text for x in texts]), targets, text_ids=[x.id for x in texts],
                                 labels=t.labels, threshold=None).means for name, t in (("trained", trained),
                                                                                       ("zero", zero))}
    # Training on these texts must rank their labels far better than the descriptions alone do.
    assert figures["trained"]["p@1"] > figures["zero"]["p@1"] + 0.2, figures


def test_trained_model_scores_like_the_trainer(tiny_tags, tiny_model_dir, tmp_path):
    """Export round trip: the tags index (learned vectors) + exported query tower give the trainer's cosines."""
    from dssm.tag_data import label_matrix, read_labels, read_tagged
    from dssm.tag_train import TagTrainConfig, export_tagger, train_tagger
    from dssm.tagging import build_tag_index
    from serving.searcher import Searcher
    from serving.tagger import Tagger

    labels = read_labels(tiny_tags.labels)
    names = [label.id for label in labels]
    texts = read_tagged(tiny_tags.train, known_labels=names)[:60]
    config = TagTrainConfig(epochs=2, batch_size=16, verbose=0, init_from=str(tiny_model_dir), loss="sigmoid")
    trainer, history = train_tagger([t.text for t in texts], label_matrix(texts, names), ids=[t.id for t in texts],
                                    label_texts=[label.text for label in labels], config=config)
    export_tagger(trainer, tmp_path / "model", history=history)
    build_tag_index(tmp_path / "tags", labels=labels, model_dir=tmp_path / "model", vectors=trainer.label_matrix(),
                    tagging=history["tagging"])
    tagger = Tagger(Searcher.load(tmp_path / "tags"))
    sample = [t.text for t in texts[:10]]
    expected = (trainer.predict(sample) - history["tagging"]["bias"]) / config.scale
    np.testing.assert_allclose(tagger.scores(sample), expected, atol=2e-5)
    # sigmoid's natural threshold: logit 0 at cosine -bias/scale.
    assert history["tagging"]["natural_threshold"] == pytest.approx(-history["tagging"]["bias"] / config.scale)


def test_random_init_takes_the_tower_shape_from_the_config(tiny_tags):
    """Without init_from the towers get ``hidden_dims``/``activation``; a bad shape fails at config time."""
    from dssm.errors import ConfigError
    from dssm.hashing import FeatureConfig
    from dssm.tag_data import label_matrix, read_labels, read_tagged
    from dssm.tag_train import TagTrainConfig, train_tagger

    labels = read_labels(tiny_tags.labels)
    names = [label.id for label in labels]
    texts = read_tagged(tiny_tags.train, known_labels=names)[:40]
    config = TagTrainConfig(epochs=1, batch_size=16, verbose=0, hidden_dims=(24, 12), activation="gelu")
    trainer, _ = train_tagger([t.text for t in texts], label_matrix(texts, names), ids=[t.id for t in texts],
                              label_texts=[label.text for label in labels], config=config,
                              feature_config=FeatureConfig(num_buckets=997))
    assert trainer.model.config.hidden_dims == (24, 12) and trainer.model.config.activation == "gelu"
    assert trainer.label_matrix().shape == (len(names), 12)
    assert trainer.predict([texts[0].text]).shape == (1, len(names))
    with pytest.raises(ConfigError, match="hidden_dims"):
        TagTrainConfig(hidden_dims=(0,))
    with pytest.raises(ConfigError, match="swish"):
        TagTrainConfig(activation="swish")


def test_lexical_and_hybrid_tagging_modes(trained_tags, capsys):
    """bm25 = BM25 of the text over the descriptions; hybrid = 0.5·minmax(cosine) + 0.5·minmax(BM25) per text;
    the stored threshold (a cosine) is not applied to either."""
    from dssm.bm25 import BM25Index
    from dssm.cli import main as cli_main
    from dssm.errors import InputError
    from serving.searcher import Searcher
    from serving.tagger import Tagger

    searcher = Searcher.load(trained_tags.index)
    texts = ["a chess engine with a graphical interface", "library for parsing xml files", "zzzz qqqq"]
    dense = Tagger(searcher).scores(texts).astype(np.float64)
    lexical = Tagger(searcher, mode="bm25")
    state = BM25Index.build(lexical.labels, lexical.descriptions)
    sparse = np.stack([state.scores(t) for t in texts])
    np.testing.assert_allclose(lexical.scores(texts), sparse, rtol=1e-6)
    assert sparse[2].max() == 0.0  # no description word: all zero
    hybrid = Tagger(searcher, mode="hybrid")
    assert hybrid.threshold is None and lexical.threshold is None and Tagger(searcher).threshold is not None

    def minmax(row):
        return (row - row.min()) / (row.max() - row.min()) if row.max() > row.min() else np.zeros_like(row)

    expected = np.stack([0.5 * minmax(d) + 0.5 * minmax(b) for d, b in zip(dense, sparse, strict=True)])
    np.testing.assert_allclose(hybrid.scores(texts), expected, atol=1e-6)
    assert all(h.predicted is None for h in hybrid.tag(texts[0], k=3))
    with pytest.raises(InputError, match="'sparse'"):
        Tagger(searcher, mode="sparse")
    assert cli_main(["tag", "--index", str(trained_tags.index), "--mode", "hybrid", "-k", "2", "--json",
                     texts[0]]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [x["label"] for x in shown["labels"]] == [h.label for h in hybrid.tag(texts[0], k=2)]
    assert shown["threshold"] is None


def test_tag_predicted_only_and_json(trained_tags, capsys):
    assert main(["--index", str(trained_tags.index), "--predicted", "--json", "a", "chess", "game", "for", "gtk"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["threshold"] is not None
    assert all(x["predicted"] and x["score"] >= out["threshold"] for x in out["labels"])
    # A threshold above every cosine predicts nothing; the zero-shot index has none to use.
    assert main(["--index", str(trained_tags.index), "--predicted", "--threshold", "1.01", "--json", "chess"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == []
    with pytest.raises(InputError, match="stores no threshold"):
        main(["--index", str(trained_tags.zero), "--predicted", "chess"])


def test_few_shot_prototype_is_the_mean_of_description_and_examples(tiny_tags, tiny_model_dir, tmp_path):
    from dssm.export import load_encoder
    from dssm.tag_data import read_labels, read_tagged
    from dssm.tagging import few_shot_examples
    from serving.searcher import Searcher

    index = tmp_path / "few"
    assert main(["--index", str(index), "--labels", str(tiny_tags.labels), "--model", str(tiny_model_dir),
                 "--examples", str(tiny_tags.train), "--shots", "2"]) == 0
    labels = read_labels(tiny_tags.labels)
    chosen = few_shot_examples(read_tagged(tiny_tags.train), [label.id for label in labels], shots=2)
    label = next(label for label in labels if len(chosen[label.id]) == 2)
    encoder = load_encoder(tiny_model_dir)
    prototype = encoder.embed_documents([label.text, *chosen[label.id]]).sum(axis=0)
    searcher = Searcher.load(index)
    row = searcher.index.docs.row_of(label.id)
    np.testing.assert_allclose(searcher.index.embeddings()[row], prototype / np.linalg.norm(prototype), atol=1e-5)
    unused = next(label for label in labels if not chosen[label.id])  # no example: the description alone
    description = encoder.embed_documents([unused.text])[0]
    np.testing.assert_allclose(searcher.index.embeddings()[searcher.index.docs.row_of(unused.id)], description,
                               atol=1e-5)


def test_eval_tags_compares_systems_and_writes_the_report(trained_tags, tiny_tags, tmp_path, capsys):
    from dssm.tag_eval import main as eval_main

    report = tmp_path / "report"
    assert eval_main(["--data", str(tiny_tags.train), "--index", f"trained={trained_tags.index}",
                      "--index", f"zero={trained_tags.zero}", "--output", str(report)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[2].startswith("| trained |") and "trained vs zero: p@1 p = " in table
    metrics = json.loads((report / "metrics.json").read_text())
    assert [s["name"] for s in metrics["systems"]] == ["trained", "zero"]
    trained, zero = (s["means"] for s in metrics["systems"])
    assert "micro_f1" in trained and "micro_f1" not in zero  # the zero-shot index has no threshold
    assert set(metrics["significance"]["trained vs zero"]) == {"p@1"}  # per-text F1 needs both thresholds
    assert metrics["significance"]["trained vs zero"]["p@1"] < 0.05
    assert (report / "precision_recall_at_k.png").stat().st_size > 1000
    assert "## Per label: trained" in (report / "results.md").read_text()
    with pytest.raises(InputError, match="given twice"):
        eval_main(["--data", str(tiny_tags.train), "--index", f"a={trained_tags.index}", "--index",
                   f"a={trained_tags.zero}"])
    # --mode applies to every system; the trained index's stored (cosine) threshold is not used then
    assert eval_main(["--data", str(tiny_tags.train), "--index", f"zero={trained_tags.zero}", "--mode", "bm25",
                      "--json"]) == 0
    lexical = json.loads(capsys.readouterr().out)["systems"][0]["means"]
    assert "micro_f1" not in lexical and lexical["p@1"] != zero["p@1"]


def test_tag_over_http_against_a_real_server(trained_tags):
    import httpx
    from serving_support import ServerThread, wait_until

    from serving.app import create_app
    from serving.backend import Backend
    from serving.client import ClientError, SearchClient
    from serving.searcher import Searcher
    from serving.tagger import Tagger

    backend = Backend(trained_tags.index, watch_interval=0.1)
    local = Tagger(Searcher.load(trained_tags.index))
    text = "a chess engine with a graphical interface"
    with ServerThread(create_app(backend)) as server, SearchClient(server.url, retries=0) as client:
        wait_until(lambda: backend.snapshot is not None, timeout=60, what="the tags index to load")
        tags = client.tag(text, k=5)
        expected = local.tag(text, k=5)
        assert [t.label for t in tags.labels] == [h.label for h in expected]
        np.testing.assert_allclose([t.score for t in tags.labels], [h.score for h in expected], atol=1e-5)
        assert tags.threshold == pytest.approx(local.threshold) and tags.version == backend.current().version
        predicted = client.tag(text, k=50, predicted_only=True)
        assert all(t.predicted for t in predicted.labels)
        assert len(client.tag(text, k=3, threshold=1.0, predicted_only=True).labels) == 0
        bad = httpx.post(server.url + "/v1/tag", json={"text": text, "k": 0})
        assert bad.status_code == 422
        assert httpx.post(server.url + "/v1/tag", json={"text": "   "}).status_code == 422
    zero = Backend(trained_tags.zero, watch_interval=0.1)
    with ServerThread(create_app(zero)) as server, SearchClient(server.url, retries=0) as client:
        wait_until(lambda: zero.snapshot is not None, timeout=60, what="the zero-shot index to load")
        assert all(t.predicted is None for t in client.tag(text).labels)
        with pytest.raises(ClientError, match="409: .*stores no tagging threshold") as refused:
            client.tag(text, predicted_only=True)
        assert refused.value.status == 409
        assert httpx.post(server.url + "/v1/tag", json={"text": text, "predicted_only": 0}).status_code == 422
        assert httpx.post(server.url + "/v1/tag", json={"text": text, "threshold": False}).status_code == 422
        hybrid = client.tag(text, k=5, mode="hybrid")
        expected = Tagger(Searcher.load(trained_tags.zero), mode="hybrid").tag(text, k=5)
        assert [t.label for t in hybrid.labels] == [h.label for h in expected]
        np.testing.assert_allclose([t.score for t in hybrid.labels], [h.score for h in expected], atol=1e-5)
        assert httpx.post(server.url + "/v1/tag", json={"text": text, "mode": "sparse"}).status_code == 422


def test_bulk_scoring_loads_the_graph_and_gives_the_numpy_paths_scores(trained_tags, tiny_tags):
    """From BULK_TEXTS texts on, the SavedModel embeds them (faster in bulk); a few texts never load it."""
    from dssm.query_numpy import BULK_TEXTS
    from dssm.tag_data import read_tagged
    from serving.searcher import Searcher
    from serving.tagger import Tagger

    tagger = Tagger(Searcher.load(trained_tags.index))
    encoder = tagger.searcher.encoder
    assert type(encoder).__name__ == "NumpyQueryEncoder" and not encoder.graph_loaded
    texts = [t.text for t in read_tagged(tiny_tags.train)]
    texts = (texts * (BULK_TEXTS // len(texts) + 1))[:BULK_TEXTS]
    few = tagger.scores(texts[:3])
    assert not encoder.graph_loaded
    bulk = tagger.scores(texts)
    assert encoder.graph_loaded
    np.testing.assert_allclose(bulk[:3], few, atol=2e-5)


def test_train_tags_distills_a_teachers_zero_shot_ranking(tiny_tags, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """``train-tags --loss distill --teacher``: no label is read; the towers learn the teacher's ranking.

    The teacher is a stand-in (the real one is the optional MiniLM extra) that knows the texts' debtags:
    its vector of a text is the text's labels (multi-hot, normalised), of a description its label.
    Distilling it must teach the towers those labels as training on them does.
    """
    import dssm.teacher
    from dssm.cli import main as cli_main
    from dssm.tag_data import label_matrix, read_labels, read_tagged
    from dssm.tag_metrics import tag_metrics
    from serving.searcher import Searcher
    from serving.tagger import Tagger

    labels = read_labels(tiny_tags.labels)
    names = [label.id for label in labels]
    descriptions = {label.text: j for j, label in enumerate(labels)}
    tagged = read_tagged(tiny_tags.train, known_labels=names)
    known = {t.text: row for t, row in zip(tagged, label_matrix(tagged, names), strict=True)}

    def encode(texts):
        out = np.zeros((len(texts), len(labels)), np.float32)
        for i, text in enumerate(texts):
            if text in descriptions:
                out[i, descriptions[text]] = 1.0
            else:
                out[i] = known[text] / np.sqrt(max(known[text].sum(), 1))
        return out

    monkeypatch.setitem(dssm.teacher.TEACHERS, "minilm", (lambda: encode, lambda: True))
    unlabelled = tmp_path / "texts.jsonl"  # no labels column at all
    rows = [json.loads(line) for line in tiny_tags.train.read_text().splitlines()]
    unlabelled.write_text("".join(json.dumps({"_id": r["_id"], "text": r["text"]}) + "\n" for r in rows))
    common = ["train-tags", "--train", str(unlabelled), "--labels", str(tiny_tags.labels),
              "--init-from", str(tiny_model_dir), "--epochs", "8", "--batch-size", "16", "--learning-rate", "0.02",
              "--verbose", "0", "--validation-fraction", "0.2"]
    model, index = tmp_path / "model", tmp_path / "tags"
    assert cli_main([*common, "--output", str(model), "--index", str(index), "--loss", "distill",
                     "--teacher", "minilm"]) == 0
    history = json.loads((model / "history.json").read_text())
    assert history["tagging"]["teacher"] == "minilm" and history["tagging"]["loss"] == "distill"
    assert history["loss"][-1] < history["loss"][0]
    texts = [t.text for t in tagged]
    assert cli_main(["tag", "--index", str(tmp_path / "zero"), "--labels", str(tiny_tags.labels), "--model",
                     str(tiny_model_dir)]) == 0  # before: the same towers with the descriptions alone
    figures = {name: tag_metrics(name, Tagger(Searcher.load(path)).scores(texts), label_matrix(tagged, names),
                                 text_ids=[t.id for t in tagged], labels=names, threshold=None).means["p@1"]
               for name, path in (("zero", tmp_path / "zero"), ("distilled", index))}
    assert figures["distilled"] > figures["zero"] + 0.2, figures
    capsys.readouterr()
    # the loss and the teacher come together, or not at all; nothing is written otherwise
    assert cli_main([*common, "--output", str(tmp_path / "m2"), "--index", str(tmp_path / "t2"),
                     "--loss", "distill"]) == 2
    assert cli_main([*common, "--output", str(tmp_path / "m3"), "--index", str(tmp_path / "t3"),
                     "--teacher", "minilm"]) == 2
    assert capsys.readouterr().err.count("--loss distill needs --teacher") == 2
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()
