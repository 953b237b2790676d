"""Resident-memory accounting of a build, stage by stage, from the kernel's own counters."""

from __future__ import annotations

import ctypes
import resource
from typing import Any

__all__ = ["MemoryTrace", "release_free_memory"]


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes ({} where /proc is missing)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024  # kB
    except OSError:
        pass
    return out


def _reset_peak_rss() -> bool:
    # Linux >= 4.0: writing 5 to clear_refs resets the high-water mark (VmHWM, and ru_maxrss with it).
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _load_build_libraries() -> None:
    # Imported before the memory baseline: ScaNN pulls in TensorFlow (~600 MB resident), which is
    # the process's, not the build's (`dssm index` has it loaded already to encode).
    from scann.scann_ops.py import scann_ops_pybind  # noqa: F401

    # deferred: bm25s and PyStemmer, imported only when this runs
    import dssm.bm25  # noqa: F401


class MemoryTrace:
    """Resident memory of a build, stage by stage, from the kernel's own counters.

    tracemalloc sees neither numpy's nor ScaNN's C++ allocations, so each stage boundary reads the
    process's VmRSS and high-water mark (VmHWM) from ``/proc/self/status`` and resets the mark, which
    makes each stage's peak exact (including memory allocated and freed inside the stage). Side effect:
    the process's ``ru_maxrss`` restarts at the build's start. Where the reset is refused (no ``/proc``),
    the peaks are the process's lifetime high-water mark and ``peak_is_lifetime`` says so.

    Attributes:
        baseline: RSS when the build started, after importing ScaNN (and TensorFlow with it) and
            bm25s: the interpreter, libraries and the caller's data, not the build's.
    """

    def __init__(self) -> None:
        _load_build_libraries()
        self.exact = _reset_peak_rss()
        self.baseline = _proc_status().get("VmRSS") or _peak_rss_bytes()
        self.stages: list[dict[str, Any]] = []

    def mark(self, stage: str) -> None:
        """Close ``stage``: record its peak and end RSS, and start the next stage's peak."""
        status = _proc_status()
        peak = status.get("VmHWM") if self.exact else None
        self.stages.append({"stage": stage, "peak_rss_bytes": peak or _peak_rss_bytes(),
                            "end_rss_bytes": status.get("VmRSS")})
        if self.exact:
            _reset_peak_rss()

    @property
    def peak(self) -> int:
        """The highest RSS seen during the build (bytes)."""
        return max([s["peak_rss_bytes"] for s in self.stages] or [self.baseline])

    def report(self, *, matrix_bytes: int, scann_bytes: int, bm25_bytes: int) -> dict[str, Any]:
        """The manifest's ``build.memory`` section.

        ``ratio`` = (peak − baseline − ScaNN's structures) / raw matrix: what the build holds beside
        ScaNN's own copy of the data, in units of the float32 matrix (budget: ≤ 1.5).
        """
        mib = 2**20
        peak = self.peak
        return {
            "baseline_rss_bytes": self.baseline,
            "peak_rss_bytes": peak,
            "peak_above_baseline_bytes": peak - self.baseline,
            "matrix_bytes": matrix_bytes,
            "scann_bytes": scann_bytes,
            "bm25_bytes": bm25_bytes,
            "ratio": round((peak - self.baseline - scann_bytes) / max(matrix_bytes, 1), 3),
            "peak_is_lifetime": not self.exact,
            "stages_mib": [{"stage": s["stage"], "peak": round((s["peak_rss_bytes"] - self.baseline) / mib, 1),
                            "end": None if s["end_rss_bytes"] is None else
                            round((s["end_rss_bytes"] - self.baseline) / mib, 1)} for s in self.stages],
        }


def release_free_memory() -> None:
    # glibc keeps freed heap (ScaNN's and numpy's temporaries) mapped; malloc_trim returns it to the
    # OS so the next stage starts from what is really held. A no-op elsewhere.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
