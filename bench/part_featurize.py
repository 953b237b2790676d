"""featurize: hashed-trigram featurization rows/s, the Beam pairs job vs the TF featurizer in-process.

Both sides featurize the same pairs: quora-dev's 10,000 real pairs repeated to 200,000 (40,000 in
quick mode). The peer is the TensorFlow featurizer (``Featurizer.bags``, the graph training and the
SavedModel run; TensorFlow's own threads on both cores) called in one process with no I/O. The job
(DirectRunner, 2 worker processes) reads, checks, featurizes and writes GZIP TFRecord shards; its
workers hash with the pure-Python featurizer (:class:`dssm.hashing.TokenBagger`, the same bags,
tested) and never import TensorFlow. So the ratio is what the whole job costs over hashing alone.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
import time
from pathlib import Path

from bench.harness import DATASETS, Figure, Stats, measure


def _write_pairs(path: Path, rows: int) -> list[tuple[str, str]]:
    source = list(csv.DictReader(open(DATASETS / "quora-dev" / "pairs.tsv", newline=""), delimiter="\t",
                                 quoting=csv.QUOTE_NONE))
    pairs = []
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerow(["id", "text1", "text2", "is_duplicate"])
        for i in range(rows):
            r = source[i % len(source)]
            writer.writerow([f"p{i}", r["text1"], r["text2"], r["is_duplicate"]])
            pairs.append((r["text1"], r["text2"]))
    return pairs


def run(*, quick: bool) -> list[Figure]:
    import dssm  # noqa: F401
    from dssm.features import FeatureConfig, Featurizer
    from pipelines import make_pairs

    import tensorflow as tf  # noqa: E402  isort: skip

    rows = 40_000 if quick else 200_000
    repeats = 1 if quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="bench-featurize-"))
    try:
        pairs = _write_pairs(tmp / "pairs.tsv", rows)
        featurizer = Featurizer(FeatureConfig())
        texts = [t for pair in pairs for t in pair]

        def in_process() -> None:
            for start in range(0, len(texts), 2048):
                ids, _ = featurizer.bags(tf.constant(texts[start:start + 2048]))
                ids.flat_values.numpy()

        ours_runs = []

        def beam() -> float:
            out = tmp / f"out-{time.monotonic_ns()}"
            start = time.perf_counter()
            make_pairs.run(["--input", str(tmp / "pairs.tsv"), "--format", "quora", "--output", str(out),
                            "--direct_num_workers=2", "--direct_running_mode=multi_processing"])
            rate = rows / (time.perf_counter() - start)
            shutil.rmtree(out, ignore_errors=True)
            ours_runs.append(rate)
            return rate

        peer = measure(in_process, repeats=repeats, warmup=1, rate_of=rows)
        ours = measure(beam, repeats=repeats, warmup=0)
        return [Figure("featurize", f"pairs job, {rows:,} pairs → TFRecord", "pairs/s", ours,
                       "TF featurizer in one process (no I/O)", peer)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["run", "Stats"]
