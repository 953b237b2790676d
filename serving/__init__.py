"""dssm-search serving. Importing it sets up the same TensorFlow environment as :mod:`dssm`."""

from __future__ import annotations

import dssm  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

__all__: list[str] = []
