"""dssm-search: DSSM query-document towers for retrieval.

Importing this package sets ``TF_USE_LEGACY_KERAS=1`` (only if the user has not set it). This is the
one import-time side effect we allow: tensorflow-recommenders 0.7.7 refuses Keras 3, and the variable
must be set before TensorFlow is first imported, so ``tf.keras`` resolves to ``tf_keras`` (Keras 2).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ INFO lines drown our progress output; users can still raise verbosity.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

__all__ = ["__version__"]
