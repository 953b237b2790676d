"""Single-query latency of an exported model's query tower, in-process (featurization included).

    python bench/encoder_latency.py MODEL_DIR [--calls 100] [--repeats 15]

Prints the best (least disturbed) mean over ``repeats`` rounds of ``calls`` calls, for
``Encoder.embed_queries([text])`` and for the bare ``embed_query`` signature; this machine is shared,
so the minimum is the figure least inflated by other jobs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dssm  # noqa: E402, F401

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)

    from dssm.export import load_encoder

    import tensorflow as tf  # noqa: E402  isort: skip

    encoder = load_encoder(args.model_dir)
    text = ["how do i learn python quickly"]
    signature = encoder._loaded.signatures["embed_query"]  # noqa: SLF001 - the bare signature, for comparison
    constant = tf.constant(text)
    candidates = {"Encoder.embed_queries": lambda: encoder.embed_queries(text),
                  "embed_query signature": lambda: signature(texts=constant)}
    for fn in candidates.values():
        for _ in range(50):
            fn()
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(args.repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / args.calls)
    for name, seconds in best.items():
        print(f"{name:<24} {seconds * 1e3:.3f} ms per single-query call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
