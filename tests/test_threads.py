"""``serving.threads.limit_threads``: the thread counts of a serving process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_limit_threads_reaches_blas_libraries_loaded_after_it() -> None:
    """The writer child calls it before anything has imported numpy: numpy's and scipy's OpenBLAS, loaded
    later, still run one thread (a fresh interpreter, so no earlier import hides the order)."""
    code = ("import json, threadpoolctl; from serving.threads import limit_threads; limit_threads(1); "
            "import numpy, scipy.linalg; "
            "print(json.dumps([(i['filepath'], i['num_threads']) for i in threadpoolctl.threadpool_info() "
            "if i['user_api'] == 'blas']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    libraries = json.loads(out.stdout.strip().splitlines()[-1])
    assert libraries and all(threads == 1 for _, threads in libraries), libraries
