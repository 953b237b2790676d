"""train: DSSM training pairs/s on CPU (batch 1024, default tower) vs a plain PyTorch DSSM of the same shape.

Ours and the naive-Keras peer come from :func:`bench.train_throughput.run` (our ``train_step`` on
in-memory batches of quora-dev's 10,000 pairs; see that module). The PyTorch peer
(:mod:`bench.torch_reference`: ``EmbeddingBag(mode="sum", per_sample_weights=counts)`` + Linear/tanh,
shared towers, in-batch softmax with the same temperature, Adagrad with a sparse table gradient) is
trained in the same run on the same batches: the same pairs in the same order, cut at the same batch
size and hashed by the same :class:`~dssm.features.Featurizer`. Its figure is pairs per wall-clock
second over whole passes through the batches, after a warm-up pass, like ours.

The PyTorch step is not steady from the start: on this machine its first steps take ~0.7 s and it
settles near 2 s per 1024-pair step within two passes (the sparse EmbeddingBag gradient of ~130k
rows x 300 and the sparse Adagrad update dominate), so whole passes after a warm-up pass are timed,
and the quick run's figure (2 batches) overstates it.
"""

from __future__ import annotations

import csv

from bench.harness import DATASETS, Figure, Stats, measure

__all__ = ["run", "torch_pairs_per_second"]

BATCH = 1024


def _pairs() -> list[tuple[str, str, str]]:
    with open(DATASETS / "quora-dev" / "pairs.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["text1"], r["text2"], r["id"]) for r in rows]


def torch_pairs_per_second(*, repeats: int, batch_size: int = BATCH, limit: int | None = None) -> Stats:
    """pairs/s of the PyTorch reference over passes through quora-dev's batches (default configs' shape).

    Args:
        repeats: measured passes (after one warm-up pass).
        batch_size: pairs per batch.
        limit: use only the first ``limit`` pairs (tests).
    """
    import dssm  # noqa: F401
    from dssm.features import FeatureConfig, Featurizer
    from dssm.model import ModelConfig
    from dssm.train import TrainConfig

    import torch  # noqa: E402  isort: skip

    from bench import torch_reference as ref

    feature_config, model_config, train_config = FeatureConfig(), ModelConfig(), TrainConfig()
    pairs = _pairs()[:limit]
    batches = ref.make_batches(pairs, featurizer=Featurizer(feature_config), batch_size=batch_size,
                               combiner=model_config.bag_combiner)
    if not batches:
        raise ValueError(f"need at least {batch_size} pairs for one batch, got {len(pairs)}")
    ref.set_threads()
    torch.manual_seed(0)
    model = ref.TorchDSSM(num_buckets=feature_config.num_buckets, embedding_dim=model_config.embedding_dim,
                          hidden_dims=model_config.hidden_dims, init_stddev=model_config.embedding_init_stddev)
    optimizer = ref.make_optimizer(model, learning_rate=train_config.learning_rate)
    losses: list[float] = []

    def one_pass() -> None:
        for batch in batches:
            loss = ref.train_step(model, optimizer, batch, temperature=model_config.temperature)
        losses.append(float(loss))

    stats = measure(one_pass, repeats=repeats, warmup=1, rate_of=sum(b.pairs for b in batches))
    print(f"  torch reference: {stats.median:,.0f} pairs/s, loss after each pass {[round(x, 3) for x in losses]}",
          flush=True)
    return stats


def run(*, quick: bool) -> list[Figure]:
    """Ours and the naive Keras peer (train_throughput.run), then the PyTorch reference on the same batches."""
    from bench import train_throughput

    figures = train_throughput.run(quick=quick)
    ours = next(f for f in figures if f.unit == "pairs/s")
    # Quick: the first 2 of the same batches (a smoke check; the PyTorch step takes seconds here).
    torch_stats = torch_pairs_per_second(repeats=2 if quick else 5, limit=2 * BATCH if quick else None)
    from importlib.metadata import version

    return figures + [Figure(
        "train", f"train step, batch {BATCH}, default tower (CPU) vs PyTorch", "pairs/s", ours.ours,
        f"PyTorch {version('torch')} EmbeddingBag(sum, per_sample_weights = counts, divided per bag as "
        "the default bag_combiner pools) + Linear/tanh, sparse Adagrad",
        torch_stats, note="same batches: quora-dev's 10,000 pairs, default FeatureConfig/ModelConfig"
        + ("; quick: PyTorch on the first 2 batches only, not its steady state" if quick else ""))]
