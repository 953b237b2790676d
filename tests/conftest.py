"""Shared fixtures: paths to the real datasets beside the project (../shared/datasets)."""

from __future__ import annotations

from pathlib import Path

import pytest

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before any test imports TensorFlow)

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ROOT.parent / "shared" / "datasets"


def dataset(name: str) -> Path:
    """Path of a shared dataset; skips the test if the datasets are not beside the project."""
    path = DATASETS / name
    if not path.exists():
        pytest.skip(f"dataset {name} not found at {path}")
    return path


@pytest.fixture(scope="session")
def adi_dir() -> Path:
    return dataset("adi")


@pytest.fixture(scope="session")
def quora_dir() -> Path:
    return dataset("quora-dev")
