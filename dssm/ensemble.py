"""Trained towers and a corpus fit joined into one tower (``dssm ensemble``).

The label-free recipe has two candidate towers for a corpus (docs/quality.md): towers trained on its
own pairs (``dssm train``) and towers fitted to it without training (``dssm lsa``). They fail
differently: the fit keeps the corpus's own word geometry, the trained towers what the pairs taught
them. Their cosines added retrieve better than either alone on three of five label-free collections
and on debian-dev, though the default (hybrid) search does not gain (docs/quality.md, "Both towers
at once"). ``dssm ensemble`` makes that sum one tower, so
the index, the numpy query path and every service take it unchanged:

    embedding(x) = [ t(x) ; sqrt(w) · f(x) ] / sqrt(1 + w)
    cosine       = (cos_t + w · cos_f) / (1 + w)

``t`` is the trained towers' unit output, ``f`` the fit's (a second embedding bag, the tower's *side
branch*, ``ModelConfig.side_dim``; training never changes it), ``w`` the side weight. The output is
``t``'s width plus the fit's.

``dssm index`` tunes an ensemble's hybrid weight as it does each member's: the side branch is fitted
again to the tuning corpus (:func:`dssm.lsa.refit_for`), so spans cut out of documents are unseen by
it, and they are cut only from documents the trained towers did not train on.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from dssm.artifacts import load_npy, read_history, refuse_filled_output, verify_manifest
from dssm.config import config_from_dict, config_to_dict
from dssm.errors import ConfigError
from dssm.lsa import is_fit
from dssm.query_numpy import QUERY_TOWER_DIR

__all__ = ["ensemble_towers", "main"]


def ensemble_towers(*, towers: str | Path, fit: str | Path, output: str | Path, side_weight: float = 1.0,
                    overwrite: bool = False) -> Path:
    """Write ``output``: the model of ``towers`` with ``fit``'s table as its side branch.

    Args:
        towers: a model directory of trained towers (``dssm train``), without a side branch.
        fit: a ``dssm lsa`` model directory hashed like ``towers`` (``dssm lsa --pairs`` the same pairs).
        output: the model directory to write.
        side_weight: ``w`` above, > 0.
        overwrite: replace an existing ``output``.

    Returns:
        ``output`` as a Path.

    Raises:
        ConfigError: ``fit`` is not a fit, ``towers`` already has a side branch, the two hash texts
            differently, or ``side_weight`` is not positive.
        IndexNotFoundError / ChecksumError: a member directory is unfinished or altered.
    """
    # deferred: TensorFlow, which the module's importers (the CLI's help) do not need
    import tensorflow as tf

    from dssm.export import export_model, read_model_configs
    from dssm.train import TrainConfig, build_model, load_towers

    towers, fit = Path(towers), Path(fit)
    verify_manifest(fit, kind="model")
    if not is_fit(fit):
        raise ConfigError(f"{fit} is not a `dssm lsa` fit (its history.json has no 'lsa' entry)")
    features, model_config, train = read_model_configs(towers)
    fit_features, fit_model, fit_train = read_model_configs(fit)
    if fit_features != features:
        raise ConfigError(f"{fit} hashes texts as {config_to_dict(fit_features)}, {towers} as "
                          f"{config_to_dict(features)}: fit it with `dssm lsa --pairs` the towers' pairs")
    if model_config.side_dim:
        raise ConfigError(f"{towers} already has a side branch (side_dim {model_config.side_dim})")
    if not side_weight > 0:
        raise ConfigError(f"side_weight must be > 0, got {side_weight}")
    train_config = config_from_dict(TrainConfig, train)
    plain = build_model(model_config, features, train_config)
    load_towers(plain, towers, batch=None)  # verifies the towers' manifest; every variable must match
    joined = dataclasses.replace(model_config, side_dim=fit_model.embedding_dim, side_weight=float(side_weight))
    model = build_model(joined, features, train_config)
    side = load_npy(fit / QUERY_TOWER_DIR / "table.npy")
    for name in ("query_tower", "document_tower"):
        source, target = getattr(plain, name), getattr(model, name)
        target.embed_texts(tf.constant(["x"]))  # builds the variables
        target.bag.table.assign(source.bag.table)
        target.bag_bias.assign(source.bag_bias)
        for src, dst in zip(source.hidden, target.hidden, strict=True):
            dst.kernel.assign(src.kernel)
            dst.bias.assign(src.bias)
        target.side.table.assign(side)
    history: dict[str, Any] = {"ensemble": {"towers": str(towers.resolve()), "fit": str(fit.resolve()),
                                            "side_weight": float(side_weight), "fit_config": fit_train,
                                            "fit_summary": read_history(fit).get("lsa", {})}}
    own_pairs = read_history(towers).get("pairs")
    if own_pairs is not None:  # `dssm index` finds the documents the towers trained on here
        history["pairs"] = own_pairs
    return export_model(model, output, train_config=train_config, history=history, overwrite=overwrite)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dssm ensemble", description=__doc__.split("\n\n")[0])
    parser.add_argument("--towers", required=True, help="trained towers (`dssm train` output)")
    parser.add_argument("--fit", required=True, help="a `dssm lsa` fit of the corpus, hashed like the towers "
                        "(`dssm lsa --pairs` the towers' pairs)")
    parser.add_argument("--output", required=True, help="model directory to write (as `dssm train` writes)")
    parser.add_argument("--side-weight", type=float, default=1.0,
                        help="the fit's share: cosine = (towers' cosine + w x fit's cosine) / (1 + w) (default: 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``dssm ensemble``: join ``--towers`` and ``--fit`` into one tower at ``--output``."""
    args = _parser().parse_args(argv)
    output = refuse_filled_output(args.output, overwrite=args.overwrite)
    out = ensemble_towers(towers=args.towers, fit=args.fit, output=output, side_weight=args.side_weight,
                          overwrite=args.overwrite)
    print(f"wrote {out}: {args.towers} + {args.side_weight:g} x {args.fit} (cosines added)")
    return 0
