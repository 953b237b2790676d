"""Export → load round trips: the SavedModel embeds raw strings exactly like the in-memory model."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import dssm  # noqa: F401
from dssm.errors import ChecksumError, IndexNotFoundError, InputError
from dssm.export import SAVED_MODEL, _chunks, export_model, load_encoder, read_model_configs
from dssm.features import FeatureConfig
from dssm.model import DSSMModel, ModelConfig
from dssm.train import TrainConfig, build_model

import tensorflow as tf  # noqa: E402  isort: skip

# max_chars well under the longest test text, so cutting is part of every comparison below.
FEATURES = FeatureConfig(num_buckets=4096, max_chars=200)
SMALL = ModelConfig(embedding_dim=16, hidden_dims=(16, 8))
TRAIN = TrainConfig(epochs=1, batch_size=32, verbose=0)
EXTRA_TEXTS = ["", "   ", "ÉCOLE Straße ﬁne", "🙂🙂 emoji", "עברית ימין לשמאל", "a" * 5000, "\x00\x07 control"]


def _texts(quora_dir: Path, n: int) -> tuple[list[str], list[str]]:
    with open(quora_dir / "pairs.tsv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)][:n]
    return [r["text1"] for r in rows], [r["text2"] for r in rows]


def _trained(config: ModelConfig, queries: list[str], documents: list[str]) -> DSSMModel:
    """A model after a few real optimizer steps (so biases and tables are not at their init)."""
    model = build_model(config, FEATURES, TRAIN)
    q_ids, q_counts = model.featurizer.bags(tf.constant(queries))
    d_ids, d_counts = model.featurizer.bags(tf.constant(documents))
    batch = {"query_ids": q_ids, "query_counts": q_counts, "document_ids": d_ids, "document_counts": d_counts}
    for _ in range(3):
        model.train_step(batch)
    return model


@pytest.fixture(scope="module")
def exported(quora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[DSSMModel, Path, list[str]]:
    queries, documents = _texts(quora_dir, 40)
    model = _trained(dataclasses.replace(SMALL, shared_towers=False), queries, documents)
    model_dir = export_model(model, tmp_path_factory.mktemp("export") / "model", train_config=TRAIN,
                             history={"loss": [1.0]})
    return model, model_dir, queries + documents + EXTRA_TEXTS


def test_round_trip_gives_identical_embeddings_for_both_towers(exported: tuple) -> None:
    model, model_dir, texts = exported
    encoder = load_encoder(model_dir)
    assert encoder.dim == SMALL.output_dim
    for in_memory, loaded in ((model.embed_queries, encoder.embed_queries),
                              (model.embed_documents, encoder.embed_documents)):
        expected = in_memory(tf.constant(texts)).numpy()
        got = loaded(texts)
        assert got.dtype == np.float32 and got.shape == (len(texts), SMALL.output_dim)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    # Separate towers: the two signatures really are different functions.
    assert not np.allclose(encoder.embed_queries(texts[:5]), encoder.embed_documents(texts[:5]), atol=1e-3)


def test_signatures_take_raw_strings(exported: tuple) -> None:
    import tensorflow_text  # noqa: F401

    _, model_dir, texts = exported
    loaded = tf.saved_model.load(str(model_dir / SAVED_MODEL))
    assert set(loaded.signatures) == {"embed_query", "embed_document", "featurize"}
    for name in ("embed_query", "embed_document"):
        signature = loaded.signatures[name]
        spec = signature.structured_input_signature[1]["texts"]
        assert spec.dtype == tf.string and spec.shape.as_list() == [None]
        out = signature(texts=tf.constant(texts[:3]))
        assert set(out) == {"embedding"} and out["embedding"].shape == (3, SMALL.output_dim)
        np.testing.assert_allclose(np.linalg.norm(out["embedding"].numpy(), axis=1), 1.0, rtol=1e-5)


def test_encoder_batches_internally_and_handles_empty_input(exported: tuple) -> None:
    _, model_dir, texts = exported
    whole = load_encoder(model_dir).embed_queries(texts)
    # batch_size 1: calls of at most 8 texts or 2,000 characters, so these texts take several
    assert len(texts) > 8
    chunked = load_encoder(model_dir, batch_size=1).embed_queries(texts)
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    empty = load_encoder(model_dir).embed_documents([])
    assert empty.shape == (0, SMALL.output_dim)
    with pytest.raises(InputError, match="single str"):
        load_encoder(model_dir).embed_queries("one string, not a list")


def test_bulk_calls_are_cut_by_texts_and_by_characters() -> None:
    assert _chunks([], max_texts=3, max_chars=10) == []
    assert _chunks([1] * 7, max_texts=3, max_chars=100) == [(0, 3), (3, 6), (6, 7)]
    # 4 + 5 fits 10, 4 + 5 + 2 does not; a text longer than the budget is a call of its own
    assert _chunks([4, 5, 2, 30, 1, 9], max_texts=5, max_chars=10) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert _chunks([30], max_texts=5, max_chars=10) == [(0, 1)]


def test_model_directory_layout_and_configs(exported: tuple) -> None:
    model, model_dir, _ = exported
    assert {p.name for p in model_dir.iterdir()} == {SAVED_MODEL, "config.json", "history.json", "manifest.json",
                                                     "query_tower"}
    features, model_config, train_config = read_model_configs(model_dir)
    assert features == FEATURES and model_config == model.config
    assert train_config["batch_size"] == TRAIN.batch_size
    assert json.loads((model_dir / "history.json").read_text()) == {"loss": [1.0]}
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["kind"] == "model" and manifest["dim"] == SMALL.output_dim
    assert any(name.startswith(f"{SAVED_MODEL}/variables/") for name in manifest["files"])


def test_shared_tower_export_has_one_table(quora_dir: Path, tmp_path: Path) -> None:
    queries, documents = _texts(quora_dir, 20)
    model = _trained(SMALL, queries, documents)
    model_dir = export_model(model, tmp_path / "model", train_config=TRAIN)
    encoder = load_encoder(model_dir)
    np.testing.assert_allclose(encoder.embed_queries(queries), encoder.embed_documents(queries), atol=1e-6)
    np.testing.assert_allclose(encoder.embed_queries(queries), model.embed_queries(tf.constant(queries)).numpy(),
                               atol=1e-5)
    stored = tf.train.list_variables(str(model_dir / SAVED_MODEL / "variables" / "variables"))
    tables = [name for name, shape in stored if tuple(shape) == (FEATURES.num_buckets, SMALL.embedding_dim)]
    assert len(tables) == 1, stored


def test_corrupted_or_missing_files_are_refused(exported: tuple, tmp_path: Path) -> None:
    import shutil

    _, model_dir, _ = exported
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    data_file = next((copy / SAVED_MODEL / "variables").glob("variables.data-*"))
    blob = bytearray(data_file.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    data_file.write_bytes(bytes(blob))
    with pytest.raises(ChecksumError, match="variables.data"):
        load_encoder(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(IndexNotFoundError, match="manifest.json"):
        load_encoder(copy)
    with pytest.raises(IndexNotFoundError):
        load_encoder(tmp_path / "does-not-exist")


def test_export_refuses_to_overwrite_unless_asked(exported: tuple, tmp_path: Path) -> None:
    model, _, texts = exported
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("user file")
    with pytest.raises(InputError, match="exists"):
        export_model(model, target, train_config=TRAIN)
    export_model(model, target, train_config=TRAIN, overwrite=True)
    assert not (target / "keep.txt").exists()
    np.testing.assert_allclose(load_encoder(target).embed_queries(texts[:4]),
                               model.embed_queries(tf.constant(texts[:4])).numpy(), atol=1e-5)


# Texts where a second featurizer implementation would most likely drift: NFKC compatibility forms
# (ligatures, full-width, circled, squared units, superscripts), case folding beyond ASCII (ß, final
# sigma, dotted İ, Cherokee), combining marks, emoji with ZWJ and skin tones, RTL, CJK, punctuation
# runs, and texts longer than max_chars, including one whose NFKC form grows past it.
PARITY_TEXTS = [
    "Hello, World!! How ARE you?", "ﬁne ﬂour ﬃ ﬄ", "ＦＵＬＬ－ＷＩＤＴＨ ｌｅｔｔｅｒｓ １２３",
    "Straße STRASSE ΣΊΣΥΦΟΣ ὀδυσσεύς", "İstanbul ıi Ꭰ", "Ⓐⓑⓒ ㎏ ㎞ x² H₂O ½ ⅻ",
    "cafe\u0301 café naïve Å Å", "👩\u200d👩\u200d👧 family 👍🏽 ok 🚀🚀", "مرحبا بالعالم שלום עולם",
    "東京都 の 天気 はどう？", "a-b_c.d/e\\f (g) [h] {i} <j> «k» „l“ ‘m’", "tabs\tand\nnew lines\r\n  spaced",
    "word " * 100, "ﬃ" * 150, "MiXeD CaSe " + "É" * 300,
]


@pytest.mark.slow  # one small Beam job (~5 s)
def test_savedmodel_bags_equal_the_pair_shards_ids(exported: tuple, tmp_path: Path) -> None:
    """The ids `dssm pairs` writes into its shards are the ids the exported model computes (issue 2)."""
    from pipelines.make_pairs import run as make_pairs

    model, model_dir, _ = exported
    assert any(len(t) > FEATURES.max_chars for t in PARITY_TEXTS)
    # Each text is a query once and a document once, with ids to find its example again.
    n = len(PARITY_TEXTS)
    rows = [{"query": PARITY_TEXTS[i], "document": PARITY_TEXTS[(i + 1) % n], "qid": f"q{i}", "did": f"d{i}"}
            for i in range(n)]
    source = tmp_path / "tricky.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "pairs"
    stats = make_pairs(["--input", str(source), "--format", "pairs", "--output", str(out),
                        "--query-id-column", "qid", "--document-id-column", "did", "--validation-fraction", "0",
                        "--num-buckets", str(FEATURES.num_buckets), "--max-chars", str(FEATURES.max_chars)])
    assert (stats["written"], stats["rejected"]) == (n, 0)

    spec = {f"{side}_{key}": tf.io.VarLenFeature(dtype) for side in ("query", "document")
            for key, dtype in (("ids", tf.int64), ("counts", tf.float32))}
    spec.update({key: tf.io.FixedLenFeature([], tf.string) for key in ("query_id", "query_text", "document_text")})
    shard_bags = {}  # text -> (ids, counts) as written by the pipeline
    for path in sorted(out.glob("train-*.tfrecord.gz")):
        for record in tf.data.TFRecordDataset(str(path), compression_type="GZIP"):
            example = tf.io.parse_single_example(record, spec)
            i = int(example["query_id"].numpy().decode()[1:])
            for side, text in (("query", PARITY_TEXTS[i]), ("document", PARITY_TEXTS[(i + 1) % n])):
                assert example[f"{side}_text"].numpy().decode() == text  # the raw text, untouched
                shard_bags.setdefault(side, {})[text] = (example[f"{side}_ids"].values.numpy(),
                                                         example[f"{side}_counts"].values.numpy())
    assert set(shard_bags["query"]) == set(shard_bags["document"]) == set(PARITY_TEXTS)

    encoder = load_encoder(model_dir)
    saved = encoder.featurize(PARITY_TEXTS)
    for text, (ids, counts) in zip(PARITY_TEXTS, saved, strict=True):
        for side in ("query", "document"):
            shard_ids, shard_counts = shard_bags[side][text]
            assert ids.dtype == np.int64 and counts.dtype == np.float32
            np.testing.assert_array_equal(ids, shard_ids, err_msg=repr(text[:40]))  # same ids, same order
            np.testing.assert_array_equal(counts, shard_counts, err_msg=repr(text[:40]))
        assert len(ids) > 0 and ids.min() >= 0 and ids.max() < FEATURES.num_buckets

    # And those bags are what the SavedModel's towers embed: the shards' bags fed to the in-memory
    # towers give the signatures' embeddings of the raw texts.
    bags = [shard_bags["query"][t] for t in PARITY_TEXTS]
    ragged_ids = tf.ragged.constant([b[0] for b in bags], dtype=tf.int64)
    ragged_counts = tf.ragged.constant([b[1] for b in bags], dtype=tf.float32)
    for tower, embed in ((model.query_tower, encoder.embed_queries), (model.document_tower, encoder.embed_documents)):
        np.testing.assert_allclose(embed(PARITY_TEXTS), tower((ragged_ids, ragged_counts)).numpy(), atol=1e-5)


def test_featurize_signature_pads_rows_and_refuses_a_single_string(exported: tuple) -> None:
    _, model_dir, _ = exported
    encoder = load_encoder(model_dir)
    out = encoder._featurize(texts=tf.constant(["a", "a much longer text with many words", ""]))  # noqa: SLF001
    lengths = out["lengths"].numpy()
    assert lengths[2] == 0 and lengths[0] < lengths[1] == out["ids"].shape[1]
    assert (out["ids"].numpy()[0, lengths[0]:] == -1).all() and (out["counts"].numpy()[0, lengths[0]:] == 0).all()
    assert encoder.featurize([]) == []
    with pytest.raises(InputError, match="single str"):
        encoder.featurize("one string")


def test_encoder_fast_call_path_matches_the_public_signature_call(exported: tuple) -> None:
    # Encoder calls the signatures' flat functions (no kwargs/dict packing); it must give exactly what
    # the public signature call gives, for one text (the serving path) and for a batch.
    _, model_dir, texts = exported
    encoder = load_encoder(model_dir, fast_queries=False)  # one ASCII query would skip the signature
    # TensorFlow 2.20's loaded signatures do have the flat function (else this test checks nothing new).
    assert encoder._embed_query.__name__ == encoder._embed_document.__name__ == "flat"  # noqa: SLF001
    for name, embed in (("embed_query", encoder.embed_queries), ("embed_document", encoder.embed_documents)):
        signature = encoder._loaded.signatures[name]  # noqa: SLF001
        for chunk in (texts[:1], texts[:7]):
            expected = signature(texts=tf.constant(chunk))["embedding"].numpy()
            np.testing.assert_array_equal(embed(chunk), expected)
