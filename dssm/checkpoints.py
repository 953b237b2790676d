"""Checkpoints of a training run, and the checks that let an interrupted run resume.

This module owns a run's checkpoint directory: :class:`Checkpoints` saves the model, the optimizer,
the epoch counter and the run state after every epoch (``last/``) and at every new best (``best/``)
and restores them; ``run.json`` (:data:`RUN_CONFIG`) records what the run computes, and
:func:`check_resumable` refuses to resume it under another configuration or other pairs
(:func:`pairs_digest`); :func:`build_for_restore` creates the variables a restore fills.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.errors import ConfigError, InputError
from dssm.model import DSSMModel

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["RUN_CONFIG", "Checkpoints", "pairs_digest", "check_resumable", "build_for_restore"]

# Written in the checkpoint directory when a run starts; `resume` compares the new run against it.
RUN_CONFIG = "run.json"
# TrainConfig fields that may change when a run is resumed: they decide how far it goes and what it
# prints, not what the epochs already trained computed.
_RESUMABLE_CHANGES = frozenset({"epochs", "verbose", "early_stopping_patience"})
# Fields added after runs were checkpointed: a run.json without one recorded its value below.
_ADDED_LATER = {("model", "side_dim"): 0, ("model", "side_weight"): 1.0}


class Checkpoints:
    """One run's checkpoints: ``DIR/last/`` after every epoch, ``DIR/best/`` at every new best, ``DIR/run.json``.

    A checkpoint holds the model (towers, loss state), the optimizer (slots, iteration count), the
    number of completed epochs and the run state as JSON (history so far, best epoch, epochs without
    improvement, wall time), so a resumed run carries on exactly where the last one saved.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.checkpoint: tf.train.Checkpoint | None = None
        self._last: tf.train.CheckpointManager | None = None
        self._best: tf.train.CheckpointManager | None = None

    def exists(self) -> bool:
        """Whether the directory holds (part of) a run: its run.json or a checkpoint."""
        return (self.directory / RUN_CONFIG).exists() or tf.train.latest_checkpoint(str(self.directory / "last")) \
            is not None

    def completed_epochs(self) -> int:
        """Epochs completed by the last checkpoint (read without building a model); 0 without one."""
        path = tf.train.latest_checkpoint(str(self.directory / "last"))
        if path is None:
            return 0
        return int(tf.train.load_checkpoint(path).get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE"))

    def clear(self) -> None:
        """Delete this run's files (run.json, last/, best/), nothing else in the directory."""
        (self.directory / RUN_CONFIG).unlink(missing_ok=True)
        for name in ("last", "best"):
            shutil.rmtree(self.directory / name, ignore_errors=True)

    def attach(self, model: DSSMModel) -> None:
        """Track ``model`` and its optimizer; a restore needs their variables built (:func:`build_for_restore`).

        Called outside the strategy's scope: the counters are plain variables (a string variable
        cannot be mirrored onto GPUs).
        """
        self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self._state = tf.Variable("{}", dtype=tf.string, trainable=False, name="run_state")
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=self._epoch,
                                              state=self._state)
        self._last = tf.train.CheckpointManager(self.checkpoint, str(self.directory / "last"), max_to_keep=1)
        self._best = tf.train.CheckpointManager(self.checkpoint, str(self.directory / "best"), max_to_keep=1)

    def save(self, *, epoch: int, state: dict[str, Any], best: bool) -> None:
        """Save after ``epoch`` (1-based) completed; ``best`` also replaces the best checkpoint."""
        assert self._last is not None and self._best is not None, "attach() first"
        self._epoch.assign(epoch)
        self._state.assign(json.dumps(state))
        # Best before last: a crash in between leaves `last` one epoch behind, whose state names an
        # older best, and re-running that epoch saves the best again. The other order could leave
        # `last` naming a best epoch that `best/` does not hold.
        if best:
            self._best.save(checkpoint_number=epoch)
        self._last.save(checkpoint_number=epoch)

    def restore_last(self) -> tuple[int, dict[str, Any]]:
        """Load the last checkpoint into the attached objects; returns ``(completed epochs, run state)``."""
        assert self._last is not None and self.checkpoint is not None, "attach() first"
        if self._last.latest_checkpoint is None:
            raise InputError(f"no checkpoint in {self.directory / 'last'}")
        self.checkpoint.restore(self._last.latest_checkpoint).assert_existing_objects_matched()
        return int(self._epoch.numpy()), json.loads(self._state.numpy().decode())

    def restore_best(self) -> None:
        """Load the best checkpoint's weights (and optimizer state) into the attached model."""
        assert self._best is not None and self.checkpoint is not None, "attach() first"
        if self._best.latest_checkpoint is None:
            raise InputError(f"no best checkpoint in {self.directory / 'best'}")
        self.checkpoint.restore(self._best.latest_checkpoint).assert_existing_objects_matched()


def pairs_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a pairs manifest's file list: the same shards wherever the directory lives."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a run under a different configuration (only :data:`_RESUMABLE_CHANGES` may differ).

    Raises:
        ConfigError: naming the first differing field, with both values.
    """
    if saved.get("pairs_sha256") != current["pairs_sha256"]:
        raise ConfigError(f"cannot resume: the pairs differ from the checkpointed run's (their manifest sha256 "
                          f"{current['pairs_sha256'][:12]} vs {str(saved.get('pairs_sha256'))[:12]} in {path})")
    for section in sorted((set(saved) | set(current)) - {"pairs_sha256"}):
        old, new = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(old) | set(new)):
            if section == "train" and key in _RESUMABLE_CHANGES:
                continue
            if old.get(key, _ADDED_LATER.get((section, key))) != new.get(key):
                raise ConfigError(f"cannot resume: {section}.{key} is {new.get(key)!r} but the checkpointed run used "
                                  f"{old.get(key)!r} ({path}); resume with the same setting or start a new run")


def build_for_restore(model: DSSMModel, batch: dict[str, tf.Tensor]) -> None:
    """Create every variable a train step creates (one forward pass, no update), then the optimizer's slots.

    A checkpoint restores into existing variables; the optimizer's slots otherwise appear only in
    the first ``apply_gradients``.
    """
    model.compute_loss(batch, training=False)
    model.optimizer.build(model.trainable_variables)

