"""Run the benchmark parts: ``python -m bench [--part NAME ...] [--quick] [--out DIR] [--readme]``.

Each part is a module ``bench/part_<name>.py`` with ``run(*, quick: bool) -> list[Figure]``, run in
its own Python process. A part that fails is reported as failed in the results, and the others still
run. Full runs write ``bench/results.json`` and ``bench/results.md``; quick runs (small sizes, fewer
repeats: a smoke check under 5 minutes) write ``work/bench-quick/`` so they never overwrite the measured table.
Running some parts keeps the other parts' figures already in the results file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.harness import ROOT, Figure, git_commit, results_markdown, run_part, update_readme, write_results

PARTS = ("featurize", "train", "encode", "index", "query", "rerank", "write", "cold", "quality")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, fewer repeats: a smoke check under 5 minutes")
    parser.add_argument("--out", type=Path, default=None,
                        help="where results.json/results.md go (default: bench/, or work/bench-quick/ with --quick)")
    parser.add_argument("--readme", action="store_true",
                        help="also put the table into README.md between the bench markers (not with --quick)")
    args = parser.parse_args(argv)
    if args.readme and args.quick:
        parser.error("--readme shows measured figures; a --quick run's are smoke-check sizes")
    out = args.out or (ROOT / "work" / "bench-quick" if args.quick else ROOT / "bench")
    figures: list[Figure] = []
    errors: dict[str, str] = {}
    parts: dict[str, dict[str, object]] = {}
    total = time.perf_counter()
    for part in dict.fromkeys(args.part):
        start = time.perf_counter()
        # The commit when the part starts: other work may land in a shared checkout during a long run.
        meta = {"time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "commit": git_commit(),
                "load_average": [round(x, 2) for x in os.getloadavg()]}
        print(f"\n### bench part {part}{' (quick)' if args.quick else ''}", flush=True)
        # Each part in its own process: one broken part must not hide (or disturb) the others' figures.
        found, error = run_part(part, quick=args.quick)
        figures.extend(found)
        if error:
            errors[part] = error
        meta["seconds"] = round(time.perf_counter() - start, 1)
        parts[part] = meta
        print(f"### {part} took {meta['seconds']:.0f} s", flush=True)
    data = write_results(figures, out_dir=out, quick=args.quick, errors=errors, parts=parts, order=PARTS)
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'} ({time.perf_counter() - total:.0f} s)", flush=True)
    if args.readme:
        if update_readme(ROOT / "README.md", results_markdown(data), command="make bench"):
            print("updated the benchmark table in README.md", flush=True)
        else:
            print("README.md has no bench markers; table not copied", file=sys.stderr)
    return 1 if errors else 0


raise SystemExit(main())
