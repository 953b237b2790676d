"""1M real-text embeddings for ANN measurements: distinct word windows of the shared datasets, one tower.

Texts: every corpus document (title + text) of ``../shared/datasets/*/corpus.jsonl`` and debtags'
training texts, split on white space; each text is a window of 4-24 consecutive words at a random
place of a document drawn in proportion to its length (seed 0), kept if not seen before, until
``n`` distinct windows (about 87 characters on average at 1M). Neighbouring windows of one document
overlap, as passages of a chunked corpus do. Queries: 1,000 of the datasets' ``queries.jsonl``
texts (distinct, not among the windows). Vectors: ``embed_documents`` / ``embed_queries`` of an
exported model (e.g. ``work/demo/model`` after ``make demo``). Writes ``OUT.npy`` [n, dim] and
``OUT.queries.npy`` [1000, dim] float32::

    python -m bench.real_vectors work/demo/model work/real1m.npy

The ``index`` and ``query`` parts use :func:`trained_tower` (no ``make demo`` needed): the default-shape
towers trained for a fixed 3 epochs on debian-dev's pairs, so the vectors are a trained tower's, not
the nearly tied embeddings of initial weights. Their ANN and latency figures do not depend on how good
that tower is, only on the shape of the embeddings it makes of real text.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np

from bench.harness import DATASETS

__all__ = ["main", "windows", "embedded_windows", "trained_tower"]

#: Epochs of :func:`trained_tower` (fixed: nothing is selected, the tower only shapes the vectors).
EPOCHS = 3


def trained_tower(workdir: Path, *, epochs: int = EPOCHS) -> Path:
    """The default-shape towers trained ``epochs`` epochs on debian-dev's pairs (seed 0), exported to
    ``workdir/model``; their pairs go to ``workdir/pairs``. About a minute on 2 cores."""
    import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
    from dssm.export import export_model
    from dssm.model import ModelConfig
    from dssm.train import TrainConfig, train
    from pipelines.make_pairs import run as make_pairs

    make_pairs(["--input", str(DATASETS / "debian-dev" / "pairs.tsv"), "--format", "pairs", "--query-column", "query",
                "--document-column", "document", "--document-id-column", "doc_id", "--validation-fraction", "0",
                "--output", str(workdir / "pairs"), "--direct_running_mode=in_memory"])
    config = TrainConfig(epochs=epochs, seed=0, verbose=0)
    model, history = train(workdir / "pairs", model_config=ModelConfig(), train_config=config)
    return export_model(model, workdir / "model", train_config=config, history=history, overwrite=True)


def embedded_windows(model_dir: Path, n: int) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """``(texts, queries, [n, dim] document vectors, [1000, dim] query vectors)``: :func:`windows` encoded by
    the exported model's document and query towers (float32)."""
    import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
    from dssm.export import load_encoder

    texts, queries = windows(n)
    encoder = load_encoder(model_dir)
    return (texts, queries, encoder.embed_documents(texts).astype(np.float32),
            encoder.embed_queries(queries).astype(np.float32))


def windows(n: int, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """(``n`` distinct document windows, 1,000 queries not among them); see the module doc."""
    docs = [((r.get("title") or "") + " " + r.get("text", "")).split()
            for path in sorted(DATASETS.glob("*/corpus.jsonl")) for r in map(json.loads, open(path))]
    docs += [json.loads(line)["text"].split() for line in open(DATASETS / "debtags" / "train.jsonl")]
    queries = [json.loads(line)["text"] for path in sorted(DATASETS.glob("*/queries.jsonl")) for line in open(path)]
    rng = random.Random(seed)
    weights = np.array([len(d) for d in docs], float)
    seen: dict[str, None] = {}
    draws = np.random.default_rng(seed)
    while len(seen) < n:
        for i in draws.choice(len(docs), size=n, p=weights / weights.sum()).tolist():
            words, size = docs[i], rng.randint(4, 24)
            start = rng.randint(0, max(0, len(words) - size))
            if text := " ".join(words[start:start + size]):
                seen.setdefault(text)
            if len(seen) == n:
                break
    picked = [q for q in dict.fromkeys(queries) if q not in seen]
    rng.shuffle(picked)
    return list(seen), picked[:1000]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        print(__doc__)
        return 2
    _, _, docs, queries = embedded_windows(Path(args[0]), int(args[2]) if len(args) == 3 else 1_000_000)
    out = Path(args[1])
    np.save(out, docs, allow_pickle=False)
    np.save(out.with_suffix(".queries.npy"), queries, allow_pickle=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
