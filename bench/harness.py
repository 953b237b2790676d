"""Measurement helpers for ``make bench``: repeated timing with warm-up, peak memory, machine facts.

Every figure is the median of repeated runs after a warm-up, with min and max, and is reported beside
its peer (the tool a user would otherwise pick) as a ratio, because these machines are shared and
noisy: a ratio measured in one run survives the noise better than an absolute number.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Stats", "Figure", "measure", "machine_facts", "peak_rss_mb", "write_results", "ROOT", "DATASETS"]

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ROOT.parent / "shared" / "datasets"


@dataclass(frozen=True)
class Stats:
    """Median, min and max of repeated measurements, in ``unit``."""

    median: float
    min: float
    max: float
    runs: int

    def to_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.min, "max": self.max, "runs": self.runs}


@dataclass(frozen=True)
class Figure:
    """One benchmark figure: ours, the peer's, and ours / peer (higher is better when ``higher_is_better``)."""

    part: str
    name: str
    unit: str
    ours: Stats
    peer_name: str | None = None
    peer: Stats | None = None
    higher_is_better: bool = True
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.peer is None or self.peer.median == 0:
            return None
        return self.ours.median / self.peer.median

    def to_dict(self) -> dict[str, Any]:
        return {
            "part": self.part, "name": self.name, "unit": self.unit, "ours": self.ours.to_dict(),
            "peer_name": self.peer_name, "peer": self.peer.to_dict() if self.peer else None,
            "ratio": self.ratio, "higher_is_better": self.higher_is_better, "note": self.note,
        }


def measure(fn: Callable[[], float | None], *, repeats: int, warmup: int = 1,
            rate_of: float | None = None) -> Stats:
    """Time ``fn`` ``repeats`` times after ``warmup`` calls.

    Args:
        fn: the work; if it returns a number, that number is the measurement (e.g. its own rate),
            otherwise the wall time in seconds is.
        repeats: measured calls.
        warmup: unmeasured calls first (graph tracing, caches).
        rate_of: if given, report ``rate_of / seconds`` (items per second) instead of seconds.
    """
    for _ in range(warmup):
        fn()
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        if isinstance(result, int | float) and not isinstance(result, bool):
            values.append(float(result))
        elif rate_of is not None:
            values.append(rate_of / seconds)
        else:
            values.append(seconds)
    return Stats(statistics.median(values), min(values), max(values), len(values))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - a missing optional peer is reported as None
        return None


def machine_facts() -> dict[str, Any]:
    """CPU model, cores, memory, Python and library versions."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        mem_gb = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    packages = ["tensorflow", "tf-keras", "tensorflow-recommenders", "scann", "apache-beam", "bm25s", "torch",
                "hnswlib", "faiss-cpu", "numpy", "fastapi", "uvicorn"]
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1) if mem_gb else None,
        "python": sys.version.split()[0], "platform": platform.platform(), "commit": commit,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {p: _version(p) for p in packages},
    }


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


def write_results(figures: list[Figure], *, out_dir: Path, quick: bool, errors: dict[str, str]) -> None:
    """Write ``results.json`` and ``results.md`` (one table row per figure) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine_facts(), "quick": quick, "figures": [f.to_dict() for f in figures],
            "errors": errors}
    (out_dir / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        f"Measured by `make bench{' QUICK=1' if quick else ''}` on {data['machine']['cpu']} "
        f"({data['machine']['cores']} cores), commit {data['machine']['commit']}, {data['machine']['time']}. "
        "Each figure: median of repeated runs after a warm-up (min–max).",
        "",
        "| part | figure | ours | peer | peer's | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        ours = f"{_fmt(f.ours.median)} {f.unit} ({_fmt(f.ours.min)}–{_fmt(f.ours.max)})"
        peer = f"{_fmt(f.peer.median)} {f.unit} ({_fmt(f.peer.min)}–{_fmt(f.peer.max)})" if f.peer else ""
        ratio = f"{f.ratio:.2f}×" if f.ratio is not None else ""
        name = f.name + (f" — {f.note}" if f.note else "")
        lines.append(f"| {f.part} | {name} | {ours} | {f.peer_name or ''} | {peer} | {ratio} |")
    for part, message in errors.items():
        lines.append(f"| {part} | **failed**: {message} | | | | |")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
