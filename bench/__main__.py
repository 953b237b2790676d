"""Run the benchmark parts: ``python -m bench [--part NAME ...] [--quick] [--out DIR]``.

Each part is a module ``bench/part_<name>.py`` with ``run(quick: bool) -> list[Figure]``. A part
that fails is reported as failed in the results, and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import time
import traceback
from pathlib import Path

from bench.harness import ROOT, Figure, write_results

PARTS = ("featurize", "train", "encode", "index", "query", "quality")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check under 5 minutes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench", help="where results.json/results.md go")
    args = parser.parse_args()
    figures: list[Figure] = []
    errors: dict[str, str] = {}
    for part in args.part:
        start = time.perf_counter()
        print(f"\n### bench part {part}{' (quick)' if args.quick else ''}", flush=True)
        try:
            module = importlib.import_module(f"bench.part_{part}")
            figures.extend(module.run(quick=args.quick))
        except Exception as exc:  # noqa: BLE001 - one broken part must not hide the others' figures
            traceback.print_exc()
            errors[part] = f"{type(exc).__name__}: {exc}"
        print(f"### {part} took {time.perf_counter() - start:.0f} s", flush=True)
    write_results(figures, out_dir=args.out, quick=args.quick, errors=errors)
    if errors:
        raise SystemExit(1)


main()
