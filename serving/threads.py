"""Thread counts of a serving process (``dssm serve`` and its writer child): TensorFlow's and numpy BLAS's."""

from __future__ import annotations

import logging
import os
import sys

import threadpoolctl

__all__ = ["limit_threads"]

log = logging.getLogger(__name__)


def limit_threads(threads: int) -> None:
    """TensorFlow intra- and inter-op threads and numpy's BLAS threads, all ``threads``.

    BLAS gets the same count as TensorFlow: requests already run side by side, and OpenBLAS's extra
    threads spin-waiting for a busy core slowed each search's delta scoring and each query encoding
    under load (``bench/write_http.py``).
    """
    threadpoolctl.threadpool_limits(limits=threads, user_api="blas")  # the BLAS libraries loaded so far
    if "numpy" not in sys.modules:
        # The writer child calls this before anything imported numpy: OpenBLAS reads this when numpy's
        # and scipy's copies load (importing them here instead put ~0.15-0.2 s of scipy.linalg into
        # every server's start, which never needs it).
        os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    if "tensorflow" not in sys.modules:
        # Queries need no TensorFlow (dssm.query_numpy); it may never be imported. If it is (a write,
        # a query the Python hasher declines), it reads its thread counts from these at start.
        os.environ["TF_NUM_INTRAOP_THREADS"] = os.environ["TF_NUM_INTEROP_THREADS"] = str(threads)
        return
    import tensorflow as tf  # noqa: PLC0415  (already imported: this costs nothing)

    try:
        # Only possible before TensorFlow runs its first op; the index loads after this.
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as exc:  # called inside a process that already ran TensorFlow
        log.warning("%d TensorFlow threads not applied: %s", threads, exc)
