"""Exact, atomic backups of a training run: `ExactBackup`, a Keras callback on public hooks.

Keras' `BackupAndRestore` (Keras 3.15) writes its files in place (a kill during the write leaves a
truncated file that the next start cannot read), and after a save in the middle of an epoch it
restarts that epoch from its first batch, so batches are trained twice. `ExactBackup` keeps its
file layout (`latest.weights.h5`, `training_metadata.json`) and is a plain
`keras.callbacks.Callback` using only public APIs (`on_train_batch_end`, `on_epoch_end`,
`Model.save_weights`/`load_weights`, `optimizer.iterations`):

- every file is written with `training.run_dir.atomic_write` (a temporary file renamed into place);
- a save happens when the global step (`optimizer.iterations`) is a multiple of `save_every_steps`,
  at the end of every epoch, and when the training script asks (`save()`, e.g. on Ctrl-C); the
  metadata records that step;
- restoring is an explicit `restore(model)` call made before `fit`, returning the global step:
  the training script needs it to build the data pipeline at the exact batch (see
  `training.data.train_dataset`) and to finish a partly trained epoch first. A backup that cannot
  be read, or was written by another model, raises `CheckpointError` (never a silent restart
  from scratch).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import keras

from training.errors import CheckpointError
from training.run_dir import atomic_write

__all__ = ["ExactBackup"]


class ExactBackup(keras.callbacks.Callback):
    """Atomic backups every epoch and every `save_every_steps` global steps; explicit restore.

    Args:
        backup_dir: str or path-like. Folder of the backup (created on the first save).
        save_every_steps: int or None. Also save when the global step is a multiple of this.

    Attributes:
        saved_step: int or None. The global step of the last backup written or restored.

    Example:

    ```python
    backup = ExactBackup("runs/x/backup", save_every_steps=500)
    step = backup.restore(model)  # 0 without a backup
    model.fit(data_from(step), initial_epoch=step // steps_per_epoch, callbacks=[backup], ...)
    backup.delete()  # when the run is complete
    ```
    """

    def __init__(self, backup_dir, save_every_steps=None):
        super().__init__()
        if save_every_steps is not None and save_every_steps < 1:
            raise ValueError(
                f"`save_every_steps` must be >= 1 or None. Received: {save_every_steps}"
            )
        self.save_every_steps = save_every_steps
        self.directory = pathlib.Path(backup_dir)
        self.weights_path = self.directory / "latest.weights.h5"
        self.metadata_path = self.directory / "training_metadata.json"
        self.saved_step = None
        self._epoch, self._batch = 0, 0

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
                "backup_dir", self.directory,
                f"cannot restore the backup {self.weights_path} ({reason[:160]}); it is truncated "
                "or was written by another model: delete that backup folder to start over, or "
                "use another run directory"
            ) from None
        self.saved_step = _step(model)
        return self.saved_step

    def metadata(self):
        """The metadata of the backup (`{"epoch", "batch", "step"}`), or None."""
        if not self.metadata_path.exists():
            return None
        return json.loads(self.metadata_path.read_text())

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._batch = epoch, 0

    def on_train_batch_end(self, batch, logs=None):
        self._batch = batch + 1
        if self.save_every_steps and _step(self.model) % self.save_every_steps == 0:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        self._epoch, self._batch = epoch + 1, 0
        self.save()

    def save(self):
        """Writes the backup of the model's current state (no-op if that step is saved)."""
        step = _step(self.model)
        if step == self.saved_step and self.exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        # The step counter inside the weights file is what restore() uses, so a kill between the
        # two renames leaves a consistent state.
        with atomic_write(self.weights_path) as tmp:
            self.model.save_weights(str(tmp), overwrite=True)
        with atomic_write(self.metadata_path) as tmp:
            tmp.write_text(json.dumps({"epoch": self._epoch, "batch": self._batch,
                                       "step": step}))
        self.saved_step = step

    def delete(self):
        """Removes the backup folder."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _step(model):
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))
