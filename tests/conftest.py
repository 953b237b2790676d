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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, adi_dir) -> Path:
    """A real exported model, trained for two epochs on adi's qrels pairs (tiny: 4096 buckets, 16 dims).

    Shared by the index, encode and searcher tests so the ~15 s of pairs + training runs once.
    """
    from dssm.export import export_model
    from dssm.model import ModelConfig
    from dssm.train import TrainConfig, train
    from pipelines import make_pairs

    work = tmp_path_factory.mktemp("tiny_model")
    make_pairs.main(["--input", str(adi_dir), "--format", "beir", "--output", str(work / "pairs"),
                     "--num-buckets", "4096", "--validation-fraction", "0.2"])
    train_config = TrainConfig(epochs=2, batch_size=32, verbose=0, validation=False)
    model, history = train(work / "pairs", model_config=ModelConfig(embedding_dim=32, hidden_dims=(32, 16)),
                           train_config=train_config)
    return export_model(model, work / "model", train_config=train_config, history=history)
