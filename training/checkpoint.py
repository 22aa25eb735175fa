"""Exact, atomic backups of a training run: `ExactBackup`, a `keras.callbacks.BackupAndRestore`.

Keras' `BackupAndRestore` saves the weights and the optimizer (so the step counter and the schedule
position) every epoch or every N batches, but (Keras 3.15) it writes files in place (a kill during
the write leaves a truncated file that the next start cannot read), and after a save in the middle
of an epoch it restarts that epoch from its first batch, so batches are trained twice. `ExactBackup`
keeps Keras' file layout (`latest.weights.h5`, `training_metadata.json`) and its callback hooks and
changes three things, which is why this code exists:

- every file is written to a temporary name in the same folder and `os.replace`d into place;
- a save happens when the global step (`optimizer.iterations`) is a multiple of `save_every_steps`
  and at the end of every epoch, and the metadata records that step;
- restoring is an explicit `restore(model)` call made before `fit`, returning the global step:
  the training script needs it to build the data pipeline at the exact batch (see
  `training.data.train_dataset`) and to finish a partly trained epoch first. A checkpoint that
  cannot be read, or was written by another model, raises `CheckpointError` (never a silent
  restart from scratch).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import keras

__all__ = ["CheckpointError", "ExactBackup"]


class CheckpointError(ValueError):
    """A backup exists but cannot be restored; the message is one line with the fix."""


class ExactBackup(keras.callbacks.BackupAndRestore):
    """Atomic backups every epoch and every `save_every_steps` global steps; explicit restore.

    Args:
        backup_dir: str or path-like. Folder of the backup (created on the first save).
        save_every_steps: int or None. Also save when the global step is a multiple of this.

    Example:

    ```python
    backup = ExactBackup("runs/x/backup", save_every_steps=500)
    step = backup.restore(model)  # 0 without a backup
    model.fit(data_from(step), initial_epoch=step // steps_per_epoch, callbacks=[backup], ...)
    backup.delete()  # when the run is complete
    ```
    """

    def __init__(self, backup_dir, save_every_steps=None):
        super().__init__(str(backup_dir), save_freq="epoch", delete_checkpoint=False)
        if save_every_steps is not None and save_every_steps < 1:
            raise ValueError(
                f"`save_every_steps` must be >= 1 or None. Received: {save_every_steps}"
            )
        self.save_every_steps = save_every_steps
        self.directory = pathlib.Path(backup_dir)
        self.weights_path = self.directory / "latest.weights.h5"
        self.metadata_path = self.directory / "training_metadata.json"

    def exists(self):
        """Whether a backup was written."""
        return self.weights_path.exists()

    def restore(self, model):
        """Loads the backup (weights, optimizer, step counter) into a compiled `model`.

        Args:
            model: the compiled `keras.Model` of the run (same architecture as the backup).

        Returns:
            int. The global step of the backup, or 0 if there is none.

        Raises:
            CheckpointError: the backup is truncated, unreadable or from another model.
        """
        if not self.exists():
            return 0
        try:
            if model.optimizer is not None and not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            model.load_weights(str(self.weights_path))
        except Exception as e:  # h5py OSError (truncated), ValueError (other model), ...
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(
                f"cannot restore the backup {self.weights_path} ({reason[:160]}); it is truncated "
                "or was written by another model: delete that backup folder to start over, or "
                "use another run directory"
            ) from None
        return int(keras.ops.convert_to_numpy(model.optimizer.iterations))

    def metadata(self):
        """The metadata of the backup (`{"epoch", "batch", "step"}`), or None."""
        if not self.metadata_path.exists():
            return None
        return json.loads(self.metadata_path.read_text())

    def _step(self):
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def on_train_begin(self, logs=None):
        pass  # restore() was called before fit (see the module docstring)

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._last_batch_seen = batch + 1
        if self.save_every_steps and self._step() % self.save_every_steps == 0:
            self._save_model()

    def on_epoch_end(self, epoch, logs=None):
        self._current_epoch = epoch + 1
        self._last_batch_seen = 0
        self._save_model()

    def on_train_end(self, logs=None):
        pass  # the training script deletes the backup when the whole run is complete

    def _save_model(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        tmp_weights = self.directory / f".tmp-{pid}-latest.weights.h5"
        tmp_metadata = self.directory / f".tmp-{pid}-training_metadata.json"
        self.model.save_weights(str(tmp_weights), overwrite=True)
        metadata = {"epoch": self._current_epoch, "batch": self._last_batch_seen,
                    "step": self._step()}
        tmp_metadata.write_text(json.dumps(metadata))
        # The step counter inside the weights file is what restore() uses, so a kill between the
        # two renames leaves a consistent state.
        os.replace(tmp_weights, self.weights_path)
        os.replace(tmp_metadata, self.metadata_path)

    def delete(self):
        """Removes the backup folder."""
        shutil.rmtree(self.directory, ignore_errors=True)
