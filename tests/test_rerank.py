"""The interaction re-ranker (issue 13): the model on hand-built inputs, its loss, export/load, the
trainer on a tiny corpus, attaching it to an index and ``rerank=N`` searches."""

from __future__ import annotations

import json
import math
import shutil
import threading

import numpy as np
import pytest

import dssm  # noqa: F401
from dssm.errors import ChecksumError, ConfigError, IndexNotFoundError, InputError
from dssm.features import FeatureConfig

tf = pytest.importorskip("tensorflow")

from dssm.rerank import RerankConfig, Reranker, kernel_centres, listwise_loss  # noqa: E402
from dssm.rerank_export import export_reranker, fuse_reranked, load_reranker  # noqa: E402

FEATURES = FeatureConfig(num_buckets=512)


def tiny_model(design: str = "knrm", **overrides) -> Reranker:
    model = Reranker(RerankConfig(design=design, dim=8, **overrides), feature_config=FEATURES, embedding_dim=12)
    model((tf.constant(["a"]), tf.constant(["b"])))
    return model


def test_kernel_centres_are_exact_match_then_even_bins():
    np.testing.assert_allclose(kernel_centres(11), [1.0, 0.9, 0.7, 0.5, 0.3, 0.1, -0.1, -0.3, -0.5, -0.7, -0.9],
                               atol=1e-6)
    np.testing.assert_allclose(kernel_centres(3), [1.0, 0.5, -0.5])


def test_listwise_loss_by_hand():
    # -log softmax([2, 1, 0])[0] = log(1 + e^-1 + e^-2); a padded column takes no probability mass.
    scores = tf.constant([[2.0, 1.0, 0.0], [0.5, 3.0, 9.0]])
    valid = tf.constant([[True, True, True], [True, True, False]])
    expected = (math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(1 + math.exp(2.5))) / 2
    assert float(listwise_loss(scores, valid)) == pytest.approx(expected, rel=1e-6)


def test_kernel_pooling_counts_exact_matches_by_hand():
    model = tiny_model()
    q_mask, q_vectors, q_logits, _ = model._side(tf.constant(["apple"]), 32)
    d_mask, d_vectors, _, d_words = model._side(tf.constant(["apple apple pie"]), 200)
    pooled = model._pool(q_vectors, q_mask, d_vectors, d_mask, tf.ones_like(q_mask)).numpy()[0]
    # the ragged form (knrm's path) pools the same figures without padding
    np.testing.assert_allclose(model._pool_ragged(q_vectors, q_mask, d_words).numpy()[0], pooled, rtol=1e-5)
    # Two exact matches in the exact-match kernel: log(1 + 2); "pie" adds at most a sliver there.
    assert pooled[0] == pytest.approx(math.log(3.0), abs=1e-3)
    assert q_vectors.shape == (1, 1, 8) and q_logits.shape == (1, 1)


def test_a_padded_pair_scores_like_the_pair_alone():
    model = tiny_model()
    alone = model((tf.constant(["red apple"]), tf.constant(["an apple that is red"]))).numpy()[0]
    batch = model((tf.constant(["red apple", "x y z w v"]),
                   tf.constant(["an apple that is red", " ".join(["word"] * 50)]))).numpy()[0]
    assert batch == pytest.approx(alone, abs=1e-5)


def test_long_candidates_are_truncated_not_refused():
    model = tiny_model(max_document_words=20)
    words = [f"w{i}" for i in range(5000)]
    long_score = model((tf.constant(["w3 w7"]), tf.constant([" ".join(words)]))).numpy()[0]
    cut_score = model((tf.constant(["w3 w7"]), tf.constant([" ".join(words[:20])]))).numpy()[0]
    assert long_score == pytest.approx(cut_score, abs=1e-5)


@pytest.mark.parametrize("design", ["knrm", "conv-knrm"])
def test_the_vocabulary_cache_changes_cost_not_scores(design):
    model = tiny_model(design)
    queries = ["red apple pie", "red apple pie", "fast car"]
    documents = ["an apple pie that is red", "unseen words here zebra", "a fast red car"]
    before = model((tf.constant(queries), tf.constant(documents))).numpy()
    cached = model.distinct_words(tf.constant(["an apple pie that is red", "a fast red car"])).numpy()
    assert set(cached) == {b"an", b"apple", b"pie", b"that", b"is", b"red", b"a", b"fast", b"car"}
    model.cache_vocabulary(cached)
    # "unseen words here zebra" is not cached: computed as before, in the same call as cached words
    np.testing.assert_allclose(model((tf.constant(queries), tf.constant(documents))).numpy(), before, atol=1e-5)


def test_document_frequencies_and_idf():
    model = tiny_model()
    counts = model.document_frequencies(tf.constant(["apple pie apple", "apple tart", "pear"])).numpy()
    bucket = int(tf.strings.to_hash_bucket_fast(["\x01uapple"], FEATURES.num_buckets).numpy()[0])
    assert counts[bucket] == 2 and counts.sum() == 5  # apple, pie | apple, tart | pear (once per document)
    model.set_document_frequencies(counts, 3)
    assert float(model.idf[bucket]) == pytest.approx(math.log1p((3 - 2 + 0.5) / (2 + 0.5)), rel=1e-6)
    with pytest.raises(ConfigError, match="documents=1"):
        model.set_document_frequencies(counts, 1)


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="design"):
        RerankConfig(design="bert")
    with pytest.raises(ConfigError, match="kernels"):
        RerankConfig(kernels=1)
    with pytest.raises(ConfigError, match="tower table shape"):
        tiny_model().init_from_tower(np.zeros((10, 12), np.float32), np.zeros(12, np.float32))


@pytest.mark.parametrize("design", ["knrm", "conv-knrm"])
def test_both_designs_learn_to_prefer_the_matching_document(design):
    tf.keras.utils.set_random_seed(0)
    model = tiny_model(design)
    queries = ["red apple", "fast car", "green tea", "old book"] * 4
    positives = ["a red apple on a table", "the fast car races", "hot green tea cup", "an old book shelf"] * 4
    negatives = ["the fast car races", "hot green tea cup", "an old book shelf", "a red apple on a table"] * 4
    optimizer = tf.keras.optimizers.Adam(0.05)
    valid = tf.ones([len(queries), 2], tf.bool)
    losses = []
    for _ in range(30):
        with tf.GradientTape() as tape:
            pos = model((tf.constant(queries), tf.constant(positives)))
            neg = model((tf.constant(queries), tf.constant(negatives)))
            loss = listwise_loss(tf.stack([pos, neg], axis=1), valid)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    pos = model((tf.constant(queries[:4]), tf.constant(positives[:4]))).numpy()
    neg = model((tf.constant(queries[:4]), tf.constant(negatives[:4]))).numpy()
    assert (pos > neg).all()


def test_fuse_reranked_by_hand():
    first = np.array([3.0, 2.0, 1.0])
    rerank = np.array([0.0, 5.0, 10.0])
    order, fused = fuse_reranked(first, rerank, weight=1.0)
    assert order.tolist() == [0, 1, 2] and fused.tolist() == [1.0, 0.5, 0.0]
    order, _ = fuse_reranked(first, rerank, weight=0.0)
    assert order.tolist() == [2, 1, 0]
    # 0.6·minmax(first) + 0.4·minmax(rerank): [0.6, 0.5, 0.4]
    order, fused = fuse_reranked(first, rerank, weight=0.6)
    assert order.tolist() == [0, 1, 2]
    np.testing.assert_allclose(fused, [0.6, 0.5, 0.4], atol=1e-6)
    with pytest.raises(InputError, match="equal 1-d shapes"):
        fuse_reranked(first, rerank[:2], weight=0.5)


def test_a_reranker_trained_beside_the_first_stage_adds_its_term_by_hand():
    first = np.array([3.0, 2.0, 1.0])  # min-max: [1, 0.5, 0]
    rerank = np.array([0.0, 1.0, 1.5])
    # λ = 2: rerank + 2 · [1, 0.5, 0] = [2, 2, 1.5] -> the tie keeps the first stage's order
    order, fused = fuse_reranked(first, rerank, weight=0.0, first_stage_weight=2.0)
    assert order.tolist() == [0, 1, 2]
    np.testing.assert_allclose(fused, [1.0, 1.0, 0.0], atol=1e-6)
    # λ = 1: [1, 1.5, 1.5] -> min-max [0, 1, 1]; the first stage's share 0.5 breaks the tie: [0.5, 0.75, 0.5]
    order, fused = fuse_reranked(first, rerank, weight=0.5, first_stage_weight=1.0)
    assert order.tolist() == [1, 0, 2]
    np.testing.assert_allclose(fused, [0.75, 0.5, 0.5], atol=1e-6)
    # λ = 0 is the re-ranker alone
    assert fuse_reranked(first, rerank, weight=0.0, first_stage_weight=0.0)[0].tolist() == [2, 1, 0]


def test_the_joint_term_learns_a_weight_when_only_the_first_stage_knows():
    from dssm.rerank_train import RerankTrainConfig, TrainingExample, _fit

    tf.keras.utils.set_random_seed(0)
    # the texts carry no signal (the positive and the negatives are the same text); the first stage does
    examples = [TrainingExample(f"query {i}", ("same text",) * 4, (1.0, 0.6, 0.3, 0.0)) for i in range(32)]
    config = RerankTrainConfig(epochs=5, negatives=3, batch_queries=8, learning_rate=0.05, first_stage_term=True)
    history, lam = _fit(tiny_model(), examples, config)
    assert lam > 0.5 and history["loss"][-1] < history["loss"][0]
    # without the term λ stays 0 and the loss cannot fall below a uniform softmax's log(4)
    history, lam = _fit(tiny_model(), examples, RerankTrainConfig(epochs=1, negatives=3, batch_queries=8))
    assert lam == 0.0 and history["loss"][0] == pytest.approx(math.log(4), abs=1e-3)


def test_export_load_round_trip_and_a_corrupt_file_is_refused_by_name(tmp_path):
    model = tiny_model()
    model.set_document_frequencies(np.ones(FEATURES.num_buckets), 4)
    model.cache_vocabulary(np.asarray([b"apple", b"red", b"road"], dtype=object))
    out = export_reranker(model, tmp_path / "rr", fusion={"dense": 0.3}, train={"epochs": 1}, history={"loss": [1.0]})
    loaded = load_reranker(out)
    queries, documents = ["red apple", "car"], ["an apple, red", "a road with a car and a truck"]
    np.testing.assert_allclose(loaded.score_pairs(queries, documents),
                               model((tf.constant(queries), tf.constant(documents))).numpy(), atol=1e-5)
    assert loaded.weight("dense") == pytest.approx(0.3) and loaded.weight("bm25") == 1.0
    assert loaded.score("q", []).shape == (0,)
    with pytest.raises(InputError, match="exists"):
        export_reranker(model, out, fusion={}, train={}, history={})
    with pytest.raises(ConfigError, match="fusion"):
        export_reranker(model, tmp_path / "bad", fusion={"dense": 1.5}, train={}, history={})
    variables = next((out / "saved_model" / "variables").glob("variables.data*"))
    with open(variables, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\xff\x00\xff")
    with pytest.raises(ChecksumError, match="variables.data"):
        load_reranker(out)
    with pytest.raises(IndexNotFoundError, match="manifest"):
        load_reranker(tmp_path)


# ---- the numpy forward pass (dssm.rerank_fast) -----------------------------------------------------

_WORDS = ["apple", "red", "road", "car", "pie", "a", "the", "x1", "zebra", "q", "of", "debian", "lib", "2", "pies"]


def _random_text(rng: np.random.Generator, words: int) -> str:
    """ASCII text of ``words`` words, some upper-cased, with punctuation the split must drop."""
    marks = ["", ",", ".", " -", "!", "'s", " (", ")"]
    out = []
    for _ in range(words):
        word = str(rng.choice(_WORDS))
        out.append((word.upper() if rng.random() < 0.1 else word) + str(rng.choice(marks)))
    return " ".join(out)


def _exported(tmp_path, design: str, *, unigrams: bool = True, activation: str = "tanh", cache: bool = True,
              sigma: float = 0.1):
    features = FeatureConfig(num_buckets=512, word_unigrams=unigrams)
    model = Reranker(RerankConfig(design=design, dim=8, max_query_words=5, max_document_words=12,
                                  activation=activation, sigma=sigma), feature_config=features, embedding_dim=12)
    model((tf.constant(["a"]), tf.constant(["b"])))
    rng = np.random.default_rng(7)
    for weight in model.trainable_weights:  # random heads and layers: a zero-initialised head scores all ties
        weight.assign(rng.normal(0.0, 0.5, weight.shape).astype(np.float32))
    model.set_document_frequencies(rng.integers(0, 5, features.num_buckets), 4)
    if cache:
        model.cache_vocabulary(np.asarray([b"apple", b"red", b"road", b"the", b"pie"], dtype=object))
    return export_reranker(model, tmp_path / f"rr-{design}", fusion={"dense": 0.5}, train={}, history={},
                           overwrite=True)


@pytest.mark.parametrize(("design", "unigrams", "activation", "cache", "sigma"), [
    ("knrm", True, "tanh", True, 0.1), ("knrm", False, "relu", False, 0.1), ("conv-knrm", True, "tanh", True, 0.1),
    ("conv-knrm", False, "linear", True, 0.1), ("conv-knrm", True, "relu", False, 0.1),
    ("conv-knrm", True, "tanh", True, 0.03)])
def test_the_numpy_path_scores_as_the_saved_model(tmp_path, design, unigrams, activation, cache, sigma):
    # sigma 0.1 (the default) steps through the soft kernels as a chain of products, 0.03 computes
    # each one (the chain would leave float32's range; the same code for both designs)
    rng = np.random.default_rng(len(design) + unigrams)
    out = _exported(tmp_path, design, unigrams=unigrams, activation=activation, cache=cache, sigma=sigma)
    fast, graph = load_reranker(out), load_reranker(out, fast=False)
    assert fast.fast is not None and graph.fast is None
    assert (fast.fast._chain is None) == (sigma == 0.03)
    queries = [_random_text(rng, int(rng.integers(0, 8))) for _ in range(6)] + ["", "apple"]
    pairs_q = [queries[int(i)] for i in rng.integers(0, len(queries), 90)]
    # empty, punctuation-only, one word, longer than the 12-word cut, and ordinary candidates
    pairs_d = ["", "!!", "apple", " ".join(["red apple pie"] * 9)] + [_random_text(rng, int(rng.integers(0, 20)))
                                                                      for _ in range(86)]
    expected = graph.score_pairs(pairs_q, pairs_d)
    assert np.ptp(expected) > 0.1  # the weights make scores differ, so equality is a real check
    np.testing.assert_allclose(fast.fast.score_pairs(pairs_q, pairs_d), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fast.score_pairs(pairs_q, pairs_d), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("kernels", "sigma", "chained"), [(11, 0.1, True), (11, 0.2, True), (5, 0.1, True),
                                                       (21, 0.1, True), (3, 0.1, False), (21, 0.05, False)])
def test_the_kernel_chain_gives_the_kernels_exp_gives(kernels, sigma, chained):
    from dssm.rerank_math import NEGLIGIBLE, KernelChain, rbf_kernels

    mu = kernel_centres(kernels)
    widths = np.full(kernels, sigma, np.float32)
    widths[0] = 0.001
    neg = (-1.0 / (2.0 * widths**2)).astype(np.float32)
    chain = KernelChain.of(mu, sigma)
    assert (chain is not None) == chained
    rng = np.random.default_rng(kernels)
    special = [-1.0, 0.0, 1.0, 0.9995, *mu]
    cosine = np.concatenate([rng.uniform(-1, 1, 300 - len(special)), special]).astype(np.float32).reshape(-1, 3)
    exponent = np.square(cosine[None].astype(np.float64) - mu[:, None, None]) / (2.0 * widths[:, None, None] ** 2)
    expected = np.exp(-exponent)
    values, scale, used = rbf_kernels(cosine, mu=mu, neg_inv_two_sigma_sq=neg, chain=chain,
                                      out=np.empty((kernels, *cosine.shape), np.float32), step=np.empty_like(cosine))
    assert used == kernels  # cosines down to -1: every kernel counts
    got = values * (scale[:, None, None] if scale is not None else 1.0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert np.isfinite(values).all()
    # cosines of relu'd vectors (>= 0): the kernels centred far below them are left out, and were negligible
    positive = np.abs(cosine)
    values, scale, used = rbf_kernels(positive, mu=mu, neg_inv_two_sigma_sq=neg, chain=chain,
                                      out=np.empty((kernels, *cosine.shape), np.float32), step=np.empty_like(cosine))
    expected = np.exp(-np.square(positive[None].astype(np.float64) - mu[:, None, None])
                      / (2.0 * widths[:, None, None] ** 2))
    assert expected[used:].max(initial=0.0) < NEGLIGIBLE
    assert used < kernels if (chained and sigma <= 0.1 and kernels >= 11) else used <= kernels
    got = values[:used] * (scale[:used, None, None] if scale is not None else 1.0)
    np.testing.assert_allclose(got, expected[:used], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("design", ["knrm", "conv-knrm"])
def test_reused_work_arrays_carry_nothing_between_calls_or_threads(tmp_path, design):
    # The numpy path keeps its work arrays per thread and reuses them, and (conv-knrm) fills its cached
    # words' rows on first use: batches of other sizes in between, or another thread scoring at the same
    # time, must not change a score.
    out = _exported(tmp_path, design)
    fast, graph = load_reranker(out).fast, load_reranker(out, fast=False)
    rng = np.random.default_rng(3)
    batches = [([_random_text(rng, 4)] * n, [_random_text(rng, int(rng.integers(0, 20))) for _ in range(n)])
               for n in (60, 2, 25, 60, 7)]
    expected = [graph.score_pairs(q, d) for q, d in batches]
    errors: list[float] = []

    def score_all(order: list[int]) -> None:
        for _ in range(15):
            for i in order:
                errors.append(float(np.max(np.abs(fast.score_pairs(*batches[i]) - expected[i]))))

    threads = [threading.Thread(target=score_all, args=(order,)) for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 150 and max(errors) < 1e-3


@pytest.mark.parametrize("design", ["knrm", "conv-knrm"])
def test_non_ascii_texts_are_split_exactly_and_scored_the_same(tmp_path, design):
    # Python's NFKC_Casefold (dssm.hashing.unicode_words) splits these, the graph the one it declines
    # (the lone surrogate)
    out = _exported(tmp_path, design)
    fast, graph = load_reranker(out), load_reranker(out, fast=False)
    # NFKC (the ligature, full-width letters), full case folding (ß, Σ), accents, CJK, an emoji, a combining
    # mark and a lone surrogate (replaced by U+FFFD, a non-word character) beside plain ASCII
    queries = ["Café RED", "ﬁle ＡＰＰＬＥ", "straße", "red apple", "ΣΊΣΥΦΟΣ", "e\u0301te \ud800 pie"]
    documents = ["un café rouge, red", "the file: apple pie", "STRASSE road", "a red apple 🍎", "σίσυφος road",
                 "été pie", "日本語 the apple", ""]
    q = [queries[i % len(queries)] for i in range(24)]
    d = [documents[(i * 5) % len(documents)] for i in range(24)]
    np.testing.assert_allclose(fast.score_pairs(q, d), graph.score_pairs(q, d), rtol=1e-4, atol=1e-4)


# ---- the trainer, attaching, and rerank=N searches on adi -------------------------------------------

@pytest.fixture(scope="module")
def adi_index(tiny_model_dir, adi_dir, tmp_path_factory):
    from tests.serving_support import adi_rows, build_version

    index_dir = tmp_path_factory.mktemp("rerank_index") / "index"
    build_version(index_dir, tiny_model_dir, adi_rows(adi_dir))
    return index_dir


@pytest.fixture(scope="module")
def trained(adi_index, tiny_model_dir, tmp_path_factory):
    from dssm.rerank_train import RerankTrainConfig, train_reranker

    out = tmp_path_factory.mktemp("reranker") / "rr"
    config = RerankTrainConfig(epochs=3, candidates=10, negatives=3, batch_queries=8, fusion_queries=50,
                               fusion_depth=10, learning_rate=0.01)
    train_reranker(pairs_dir=tiny_model_dir.parent / "pairs", index_dir=adi_index, output=out,
                   model_config=RerankConfig(dim=8), config=config)
    return out


def test_trainer_writes_a_reranker_with_its_curves(trained):
    history = json.loads((trained / "history.json").read_text())
    config = json.loads((trained / "config.json").read_text())
    assert len(history["loss"]) == 3 and history["loss"][-1] < history["loss"][0]
    assert history["training_queries"] > 0
    assert set(config["fusion"]) == {"dense", "bm25", "hybrid"}
    assert all(0.0 <= w <= 1.0 for w in config["fusion"].values())
    for mode, curve in history["fusion_curves"].items():
        if curve["queries"]:
            # the stored share is the best of the curve (ties to the larger share) if it beat the
            # first stage's order significantly, else the first stage's order
            mrr = {share: value for share, value in curve["mrr_at_10"].items() if share != "p_value"}
            best = max(mrr.values())
            chosen = config["fusion"][mode]
            if curve["mrr_at_10"]["p_value"] < 0.05:
                assert mrr[f"{chosen:.1f}"] == pytest.approx(best) and chosen < 1.0, mode
            else:
                assert chosen == 1.0, mode
    assert config["train"]["index_version"]


def test_a_reranker_trained_beside_the_first_stage_serves_with_its_term(adi_index, tiny_model_dir, tmp_path):
    from dssm.index import attach_reranker
    from dssm.rerank_train import RerankTrainConfig, train_reranker
    from serving.searcher import Searcher

    out = tmp_path / "rr"
    config = RerankTrainConfig(epochs=2, candidates=10, negatives=3, batch_queries=8, fusion_queries=50,
                               fusion_depth=10, learning_rate=0.01, first_stage_term=True)
    train_reranker(pairs_dir=tiny_model_dir.parent / "pairs", index_dir=adi_index, output=out,
                   model_config=RerankConfig(dim=8), config=config)
    lam = json.loads((out / "config.json").read_text())["first_stage_weight"]
    assert lam != 0.0 and lam == json.loads((out / "history.json").read_text())["first_stage_weight"]
    assert load_reranker(out).first_stage_weight == pytest.approx(lam)
    index_dir = tmp_path / "index"
    shutil.copytree(adi_index, index_dir)
    attach_reranker(index_dir, out)
    searcher = Searcher.load(index_dir)
    query = "computer programs for information retrieval of documents"
    first = searcher.search(query, k=10, mode="bm25")
    scores = searcher.reranker.score(query, searcher.document_texts([h.id for h in first]))
    order, fused = fuse_reranked(np.asarray([h.score for h in first]), scores, weight=searcher.reranker.weight("bm25"),
                                 first_stage_weight=lam)
    hits = searcher.search(query, k=10, mode="bm25", rerank=10)
    assert [h.id for h in hits] == [first[i].id for i in order]
    np.testing.assert_allclose([h.score for h in hits], fused, atol=1e-5)
    # the term is what search adds: a λ that dwarfs the re-ranker's own scores gives back the first stage's order
    searcher.reranker.fusion["bm25"] = 0.0
    alone = [h.id for h in searcher.search(query, k=10, mode="bm25", rerank=10)]
    searcher.reranker.first_stage_weight = 1e4
    assert alone != [h.id for h in first]
    assert [h.id for h in searcher.search(query, k=10, mode="bm25", rerank=10)] == [h.id for h in first]


def test_the_fusion_split_is_held_out_training_queries_or_the_validation_split(tiny_model_dir):
    from dssm.inputs import pair_files
    from dssm.rerank_train import RerankTrainConfig, _read_pairs, _split_pairs

    pairs_dir = tiny_model_dir.parent / "pairs"
    train, validation = (_read_pairs(pair_files(pairs_dir, split)) for split in ("train", "validation"))
    assert train and validation
    trains, held_out = _split_pairs(pairs_dir, RerankTrainConfig())
    assert held_out and sorted(trains + held_out) == sorted(train) and not set(trains) & set(held_out)
    trains, fusion = _split_pairs(pairs_dir, RerankTrainConfig(fusion_split="validation"))
    assert trains == train and fusion == validation
    with pytest.raises(ConfigError, match="fusion_split"):
        RerankTrainConfig(fusion_split="test")


def test_validation_split_fusion_without_a_validation_split_is_refused_by_name(tiny_model_dir, tmp_path):
    from dssm.rerank_train import RerankTrainConfig, _split_pairs

    pairs_dir = tmp_path / "pairs"
    shutil.copytree(tiny_model_dir.parent / "pairs", pairs_dir)
    for path in pairs_dir.glob("validation-*"):
        path.unlink()
    assert _split_pairs(pairs_dir, RerankTrainConfig())[1]  # the default holds out training queries instead
    with pytest.raises(InputError, match=f"{pairs_dir}.*validation split"):
        _split_pairs(pairs_dir, RerankTrainConfig(fusion_split="validation"))


def test_choose_fusion_keeps_the_first_stage_unless_the_reranker_wins_significantly():
    from dssm.rerank_train import choose_fusion

    first = np.array([5.0, 4.0, 3.0, 2.0, 1.0], np.float32)  # the positive (position 2) ranks third
    helps = np.array([0.0, 0.0, 10.0, 0.0, 0.0], np.float32)  # the re-ranker puts it first
    agrees = first.copy()  # the re-ranker keeps the first stage's order
    share, curve = choose_fusion([(first, helps, 2)] * 30)
    assert share < 1.0 and curve["p_value"] < 0.05
    assert curve[f"{share:.1f}"] == pytest.approx(1.0) and curve["1.0"] == pytest.approx(1 / 3)
    # one query of 30 helped: the best share gains 0.022 MRR@10, no evidence: the first stage's order
    share, curve = choose_fusion([(first, helps, 2)] + [(first, agrees, 2)] * 29)
    assert share == 1.0 and curve["p_value"] >= 0.05
    assert max(v for k, v in curve.items() if k != "p_value") > curve["1.0"]
    with pytest.raises(ConfigError, match="1.0"):
        choose_fusion([(first, helps, 2)], grid=(0.0, 0.5))


def test_a_held_out_querys_own_text_is_left_out_of_its_candidates():
    from collections import namedtuple

    from dssm.rerank_train import held_out_candidates

    Hit = namedtuple("Hit", "id text")
    query = "how do I learn to sail"
    hits = [Hit("q7", query), Hit("d2", "sailing lessons for beginners"), Hit("d1", "how can I learn sailing")]
    kept, positive = held_out_candidates(query, "d1", "how can I learn sailing", hits)
    assert [hit.id for hit in kept] == ["d2", "d1"] and positive == 1
    # the pair's own document is kept even when its text is the query's (an exact duplicate)
    kept, positive = held_out_candidates(query, "q7", query, hits)
    assert [hit.id for hit in kept] == ["q7", "d2", "d1"] and positive == 0
    assert held_out_candidates(query, "d5", "absent", hits[1:])[1] is None


def test_accidental_positives_are_never_negatives():
    from dssm.rerank_train import is_accidental_positive, mine_examples

    pairs = [("what is an inverted index", "d1", "an index maps terms to documents")]
    hits = [[("d1", 0.9, "an index maps terms to documents"), ("d9", 0.8, "an index maps terms to documents"),
             ("d2", 0.7, "unrelated text"), ("d3", 0.6, "this contains what is an inverted index verbatim"),
             ("d4", 0.5, "more unrelated text")]]
    examples = mine_examples(pairs, lambda queries: hits, negatives=5, seed=0)
    assert len(examples) == 1
    assert examples[0].documents == ("an index maps terms to documents", "unrelated text", "more unrelated text")
    # first-stage scores min-max over every hit ([0.9 .. 0.5] -> [1 .. 0]), the positive's its own hit's
    assert examples[0].first_stage == pytest.approx((1.0, 0.5, 0.0))
    # negatives drawn from the first 3 hits only; a positive the first stage did not return gets 0 (below all)
    examples = mine_examples([("what is an inverted index", "d7", "absent")], lambda queries: hits, negatives=5,
                             seed=0, draw_from=3)
    assert examples[0].documents == ("absent", *(hit[2] for hit in hits[0][:3]))
    assert examples[0].first_stage == pytest.approx((0.0, 1.0, 0.75, 0.5))
    assert is_accidental_positive(query="q", positive_id="", positive_text="a", candidate_id="", candidate_text="b") \
        is False
    # a short query inside a candidate is a coincidence, not the candidate the query was cut from
    assert not is_accidental_positive(query="index", positive_id="d1", positive_text="a", candidate_id="d2",
                                      candidate_text="an index")


def test_attach_then_rerank_reorders_the_first_stage_top_n(adi_index, trained, tmp_path):
    from dssm.index import attach_reranker
    from serving.searcher import Searcher

    index_dir = tmp_path / "index"
    shutil.copytree(adi_index, index_dir)
    plain = Searcher.load(index_dir)
    with pytest.raises(IndexNotFoundError, match="no re-ranker"):
        plain.search("information retrieval", k=5, rerank=20)
    attach_reranker(index_dir, trained)
    searcher = Searcher.load(index_dir)
    assert searcher.reranker is not None
    query = "computer programs for information retrieval of documents"
    for mode in ("dense", "bm25", "hybrid"):
        first = searcher.search(query, k=20, mode=mode)
        hits = searcher.search(query, k=5, mode=mode, rerank=20)
        assert len(hits) == 5 and {h.id for h in hits} <= {h.id for h in first}
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert all(0.0 <= h.score <= 1.0 for h in hits)
        assert searcher.search(query, k=5, mode=mode) == first[:5]  # rerank=0: the first stage as is
    # k above rerank: the re-ranker reads max(rerank, k) candidates
    assert len(searcher.search(query, k=12, rerank=3)) == 12
    batch = searcher.search_batch([query, "!!!", "library"], k=4, rerank=10)
    alone = searcher.search(query, k=4, rerank=10)
    # one model call for the batch: padding to the longest text changes scores only by float rounding
    assert [h.id for h in batch[0]] == [h.id for h in alone] and batch[1] == []
    np.testing.assert_allclose([h.score for h in batch[0]], [h.score for h in alone], atol=1e-4)
    for bad in (-1, 10_000, True, 2.5):
        with pytest.raises(InputError, match="rerank"):
            searcher.search(query, k=5, rerank=bad)


def test_the_reranker_rides_along_upserts_and_a_corrupt_one_is_refused_unless_asked(adi_index, trained, tmp_path):
    from dssm.index import attach_reranker, current_version_dir
    from serving.searcher import Searcher

    index_dir = tmp_path / "index"
    shutil.copytree(adi_index, index_dir)
    attach_reranker(index_dir, trained)
    searcher = Searcher.load(index_dir)
    searcher.upsert([("new-1", "", "a brand new document about retrieval of information")])
    updated = Searcher.load(index_dir)
    assert updated.version != searcher.version and updated.reranker is not None
    assert updated.reranker is searcher.reranker  # the same hard-linked files: not loaded again per write
    assert updated.search("retrieval of information", k=3, rerank=10)
    config = current_version_dir(index_dir) / "reranker" / "config.json"
    config.write_text(config.read_text().replace('"fusion"', '"fusion" ', 1))
    with pytest.raises(ChecksumError, match="reranker/config.json"):
        Searcher.load(index_dir)
    degraded = Searcher.load(index_dir, reranker=False)
    assert degraded.reranker is None and degraded.search("retrieval", k=3)
    with pytest.raises(IndexNotFoundError, match="no re-ranker"):
        degraded.search("retrieval", k=3, rerank=10)


def test_document_rows_store_lookup_and_round_trip(tmp_path):
    from dssm.rerank_docs import DocumentRows, text_key

    texts = ["alpha beta", "gamma", "alpha beta", "has an unknown word", "", "café"]

    def word_rows(batch):
        return [None if "unknown" in t else np.arange(len(t.split()), dtype=np.int64) + len(t) for t in batch]

    done: list[int] = []
    store = DocumentRows.build(texts, word_rows, batch=4, progress=done.append)
    assert done == [4, 2] and len(store) == 4  # the duplicate once, the unknown-word text left out
    assert list(store.keys) == sorted(store.keys)
    found = store.lookup(["gamma", "alpha beta", "has an unknown word", "not stored", "", "café"])
    assert [None if f is None else f.tolist() for f in found] == [[5], [10, 11], None, None, [], [4]]
    store.save(tmp_path / "documents", owner="abc")
    loaded = DocumentRows.load(tmp_path / "documents", owner="abc")
    assert [f.tolist() for f in loaded.lookup(["alpha beta"])] == [[10, 11]]
    with pytest.raises(ChecksumError, match="another re-ranker|not this one's"):
        DocumentRows.load(tmp_path / "documents", owner="other")
    # the same fingerprint with another length is not the stored text
    odd = DocumentRows(keys=np.asarray([text_key("gamma")], np.uint64), lengths=np.asarray([99]),
                       offsets=np.asarray([0, 1]), rows=np.asarray([5], np.int32))
    assert odd.lookup(["gamma"]) == [None]
    (tmp_path / "documents" / "rows.npy").write_bytes(b"\x93NUMPY broken")
    with pytest.raises(ChecksumError, match="rows.npy"):
        DocumentRows.load(tmp_path / "documents", owner="abc")


def test_stored_word_ids_change_cost_not_scores_and_ride_along_writes(adi_index, trained, tmp_path):
    from dssm.index import attach_reranker, current_version_dir
    from serving.searcher import Searcher

    index_dir = tmp_path / "index"
    shutil.copytree(adi_index, index_dir)
    attach_reranker(index_dir, trained)
    searcher = Searcher.load(index_dir)
    fast = searcher.reranker.fast
    assert fast._store is not None and len(fast._store) == len(searcher)  # every adi document is stored
    texts = searcher.document_texts([h.id for h in searcher.search("information retrieval systems", k=30)])
    texts += ["a text written after the attach, about indexing", "Ünïcödé retrieval of documents", ""]
    assert [r is not None for r in fast._store.lookup(texts)] == [True] * 30 + [False] * 3
    query = "retrieval of information"
    store, stored = fast._store, fast.score_pairs([query] * len(texts), texts)
    fast.use_documents(None)
    try:
        np.testing.assert_allclose(stored, fast.score_pairs([query] * len(texts), texts), rtol=1e-6, atol=1e-6)
    finally:
        fast.use_documents(store)
    # upserts link reranker/ (documents/ with it); a new text is split as before
    searcher = Searcher.load(index_dir)
    searcher.upsert([("new-1", "", "a brand new document about retrieval of information")])
    updated = Searcher.load(index_dir)
    assert (current_version_dir(index_dir) / "reranker" / "documents" / "manifest.json").is_file()
    assert updated.reranker is searcher.reranker and updated.search(query, k=3, rerank=10)
    rows = current_version_dir(index_dir) / "reranker" / "documents" / "rows.npy"
    rows.write_bytes(rows.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    with pytest.raises(ChecksumError, match="documents/rows.npy"):
        Searcher.load(index_dir)
    # without the stored ids (--no-documents), the re-ranker splits every candidate
    plain = tmp_path / "plain"
    shutil.copytree(adi_index, plain)
    attach_reranker(plain, trained, documents=False)
    assert not (current_version_dir(plain) / "reranker" / "documents").exists()
    assert Searcher.load(plain).reranker.fast._store is None


def test_a_sharded_searcher_reads_every_shards_stored_word_ids(tiny_model_dir, adi_dir, trained, tmp_path):
    from dssm import index as ix
    from serving.searcher import ShardedSearcher
    from tests.serving_support import adi_rows, build_version

    rows = adi_rows(adi_dir)
    dirs = [tmp_path / f"s{shard}" for shard in range(2)]
    for shard, directory in enumerate(dirs):
        build_version(directory, tiny_model_dir, [r for r in rows if ix.shard_of(r["id"], 2) == shard])
        ix.attach_reranker(directory, trained)
    sharded = ShardedSearcher.load(dirs)
    store = sharded.reranker.fast._store
    # the first shard loads the re-ranker; every shard's documents are read from the stores
    assert len(store) == len(rows) == len(sharded) and min(len(s) for s in store.stores) > 0
    texts = sharded.document_texts([r["id"] for r in rows])
    assert all(found is not None for found in store.lookup(texts))
    hits = sharded.search("computer programs for information retrieval", k=5, mode="dense", rerank=20)
    assert len(hits) == 5 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_attach_refuses_what_is_not_a_reranker(adi_index, tiny_model_dir, tmp_path):
    from dssm.index import attach_reranker

    index_dir = tmp_path / "index"
    shutil.copytree(adi_index, index_dir)
    with pytest.raises(ChecksumError, match="'model' artifact, expected 'reranker'"):
        attach_reranker(index_dir, tiny_model_dir)
    with pytest.raises(IndexNotFoundError, match="manifest"):
        attach_reranker(index_dir, tmp_path)


def test_cli_train_attach_and_search(adi_index, tiny_model_dir, trained, tmp_path, capsys):
    from dssm.cli import main

    index_dir = tmp_path / "index"
    shutil.copytree(adi_index, index_dir)
    assert main(["attach-reranker", "--index", str(index_dir), "--reranker", str(trained)]) == 0
    assert "re-ranker attached" in capsys.readouterr().out
    assert main(["search", "--index", str(index_dir), "--rerank", "20", "--json", "-k", "3", "retrieval systems"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert len(answer["hits"]) == 3
    assert main(["train-reranker", "--pairs", str(tiny_model_dir.parent / "pairs"), "--index", str(index_dir),
                 "--output", str(trained), "--epochs", "1"]) == 2
    assert "exists" in capsys.readouterr().err


def test_word_vectors_from_a_corpus_fit_start_the_reranker(adi_index, tiny_model_dir, adi_dir, tmp_path):
    """`dssm train-reranker --word-vectors FIT`: the fit's table (frozen unless --train-table) is the
    re-ranker's word layer; a model hashed unlike the index's is refused by name."""
    import tensorflow as tf

    from dssm.lsa import main as lsa_main
    from dssm.query_numpy import QUERY_TOWER_DIR
    from dssm.rerank_train import RerankTrainConfig, train_reranker

    pairs = tiny_model_dir.parent / "pairs"
    fit = tmp_path / "fit"
    assert lsa_main(["--corpus", str(adi_dir / "corpus.jsonl"), "--output", str(fit), "--dim", "8",
                     "--pairs", str(pairs)]) == 0
    config = RerankTrainConfig(epochs=1, candidates=10, negatives=3, batch_queries=8, fusion_queries=50,
                               fusion_depth=10, word_vectors=str(fit))
    out = tmp_path / "rr"
    train_reranker(pairs_dir=pairs, index_dir=adi_index, output=out,
                   model_config=RerankConfig(dim=8, activation="linear"), config=config)
    assert json.loads((out / "config.json").read_text())["embedding_dim"] == 8  # the fit's width, not the tower's 32
    checkpoint = str(out / "saved_model" / "variables" / "variables")
    tables = [name for name, _ in tf.train.list_variables(checkpoint)
              if name.endswith("/table/.ATTRIBUTES/VARIABLE_VALUE")]
    assert len(tables) == 1
    np.testing.assert_allclose(tf.train.load_variable(checkpoint, tables[0]),
                               np.load(fit / QUERY_TOWER_DIR / "table.npy"))
    other = tmp_path / "other"  # the default 2^17 buckets, not the index model's 4,096
    assert lsa_main(["--corpus", str(adi_dir / "corpus.jsonl"), "--output", str(other), "--dim", "8"]) == 0
    with pytest.raises(ConfigError, match="hashes texts unlike the index's model"):
        train_reranker(pairs_dir=pairs, index_dir=adi_index, output=tmp_path / "rr2",
                       model_config=RerankConfig(dim=8), config=RerankTrainConfig(epochs=1, word_vectors=str(other)))
