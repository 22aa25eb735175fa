"""Fitting: the run's named callbacks and `model.fit` in segments that resume exactly.

`Plan` is the length of the run (steps per epoch, total steps) and splits it into `fit`
segments from a restored step: Keras runs whole epochs, so a run resumed in the middle of epoch
`e` first finishes `e` with a `fit` call of the remaining steps, then runs the following epochs in
a second one. `RunCallbacks` names every callback of the run; `ordered()` gives them in the order
Keras must call them (the averaged BatchNorm statistics before anything saves or validates with
them, the logs of `RunMetrics` and the numerics monitor before `CSVLogger` and `TensorBoard`
write them, the progress bars last). `fit` runs the segments; on Ctrl-C it saves the backup at
the last finished step (one device or one machine's replicas) and raises `Interrupted`.
"""

from __future__ import annotations

import dataclasses
import time

import keras

import tf_revnet.callbacks
from training import data as data_lib
from training import replica_sync
from training import report as report_lib
from training.checkpoint import ExactBackup
from training.errors import StageError
from training.run_dir import atomic_write

__all__ = ["Plan", "RunCallbacks", "make_callbacks", "fit", "Interrupted", "RunMetrics",
           "AtomicWeightsCheckpoint", "EpochProgress"]


class Interrupted(Exception):
    """Training stopped by Ctrl-C (or SIGTERM).

    Attributes:
        step: int. The last global step finished.
        saved_step: int or None. The step of the backup a rerun resumes from.
        model_dir: str. The run directory a rerun resumes.
    """

    def __init__(self, step, saved_step, model_dir):
        self.step, self.saved_step, self.model_dir = step, saved_step, model_dir
        super().__init__(f"interrupted at step {step} (backup of step {saved_step})")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The length of a run.

    Attributes:
        steps_per_epoch: int.
        epochs: int.
    """

    steps_per_epoch: int
    epochs: int

    @classmethod
    def for_data(cls, num_train, recipe):
        """The plan of `recipe` on `num_train` training examples (its step cap applied)."""
        steps = data_lib.num_steps(num_train, recipe.batch_size)
        if recipe.steps_per_epoch is not None:
            steps = min(steps, recipe.steps_per_epoch)
        return cls(steps, recipe.epochs)

    @property
    def total_steps(self):
        return self.steps_per_epoch * self.epochs

    def segments(self, step):
        """`(first step, initial epoch, end step)` of the `fit` calls from global step `step`."""
        segments = []
        if step % self.steps_per_epoch:
            epoch = step // self.steps_per_epoch
            segments.append((step, epoch, (epoch + 1) * self.steps_per_epoch))
            step = (epoch + 1) * self.steps_per_epoch
        if step < self.total_steps:
            segments.append((step, step // self.steps_per_epoch, self.total_steps))
        return segments


class AtomicWeightsCheckpoint(keras.callbacks.Callback):
    """Saves the model's weights at the end of every epoch, atomically (`run_dir.atomic_write`).

    Args:
        filepath: str or path-like ending in `.weights.h5`.

    Raises:
        ValueError: if `filepath` does not end in `.weights.h5`.
    """

    def __init__(self, filepath):
        super().__init__()
        self.filepath = str(filepath)
        if not self.filepath.endswith(".weights.h5"):
            raise ValueError(
                f"`filepath` must end in `.weights.h5`. Received: filepath={self.filepath}"
            )

    def on_epoch_end(self, epoch, logs=None):
        with atomic_write(self.filepath) as tmp:
            self.model.save_weights(str(tmp), overwrite=True)


class RunMetrics(keras.callbacks.Callback):
    """Adds `learning_rate` and `images_per_second` to each epoch's logs.

    Args:
        batch_size: int. Global batch size.

    Attributes:
        images, seconds: the training images and seconds (training steps only) so far.
    """

    def __init__(self, batch_size):
        super().__init__()
        self.batch_size = batch_size
        self.images = 0
        self.seconds = 0.0
        self._start = self._last = time.perf_counter()
        self._steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not self._steps:
            return
        seconds = self._last - self._start  # training steps only, not validation
        self.images += self._steps * self.batch_size
        self.seconds += seconds
        logs["images_per_second"] = self._steps * self.batch_size / max(seconds, 1e-9)
        # The optimizer's current value of the schedule (the rate of the next step).
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class EpochProgress(keras.callbacks.ProgbarLogger):
    """Progress of `fit`: an `Epoch e/total` header always, a bar for training and one for the
    validation (Keras' own logger prints no header for a one-epoch run and nothing while it
    validates).

    Epochs are numbered out of the run's `total_epochs` (a resumed run makes two `fit` calls).
    With `verbose=2`, one line per epoch, as Keras.

    Args:
        total_epochs: int.
        validation_steps: int. Batches of the test split.
        validation_name: str. What the validation reads, e.g. "10000 test images".
        report: callable str -> None. Writes the header lines (the run's `Reporter.line`).
    """

    def __init__(self, total_epochs, validation_steps, validation_name, report=print):
        super().__init__()
        self.report = report
        self.total_epochs = total_epochs
        self.validation_steps, self.validation_name = validation_steps, validation_name
        self._bar = self._validation_bar = None
        self._tracing, self._traced = None, False

    def end_tracing(self):
        """Stops the heartbeat of the first step (if it runs)."""
        if self._tracing is not None:
            self._tracing.__exit__(None, None, None)
            self._tracing, self._traced = None, True

    def on_train_end(self, logs=None):
        self.end_tracing()  # a run stopped in its first step
        super().on_train_end(logs)

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.total_epochs

    def on_train_begin(self, logs=None):
        if self.verbose:
            self.report("(the first step also traces the training graph: it takes longer)")

    def on_epoch_begin(self, epoch, logs=None):
        if self.verbose:
            self.report(f"Epoch {epoch + 1}/{self.total_epochs}")
        self._bar = keras.utils.Progbar(self.target, verbose=self.verbose, unit_name="step")
        self._seen = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self.verbose and self._tracing is None and not self._traced:  # the run's first step
            self._tracing = report_lib.heartbeat(self.report, "tracing the training graph")
            self._tracing.__enter__()

    def on_train_batch_end(self, batch, logs=None):
        self.end_tracing()
        self._seen = batch + 1
        if self.verbose == 1:
            self._bar.update(self._seen, list((logs or {}).items()))

    def on_test_begin(self, logs=None):
        if self.verbose == 1:
            self._bar.update(self._seen, finalize=True)  # the training line, complete
            self.report(f"Validating on {self.validation_name}")
            self._validation_bar = keras.utils.Progbar(self.validation_steps, unit_name="step")

    def on_test_batch_end(self, batch, logs=None):
        if self._validation_bar is not None:
            self._validation_bar.update(batch + 1)

    def on_test_end(self, logs=None):
        if self._validation_bar is not None:
            self._validation_bar.update(self.validation_steps, finalize=True)
            self._validation_bar = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.verbose == 2:
            self._bar.update(self._seen, list(logs.items()), finalize=True)
        elif self.verbose == 1:
            values = " - ".join(f"{k}: {v:.4g}" for k, v in logs.items())
            self.report(f"Epoch {epoch + 1}/{self.total_epochs}: {values}")


@dataclasses.dataclass
class RunCallbacks:
    """Every callback of a run, by name (see `ordered` for the order Keras calls them in)."""

    replica_statistics: keras.callbacks.Callback
    backup: ExactBackup
    weights: AtomicWeightsCheckpoint
    metrics: RunMetrics
    numerics: keras.callbacks.Callback | None
    stream_range: keras.callbacks.Callback | None
    csv_log: keras.callbacks.CSVLogger
    tensorboard: keras.callbacks.TensorBoard
    progress: EpochProgress
    extra: tuple = ()

    def ordered(self):
        """The callbacks in calling order: statistics averaged before the backup, the weights
        and the validation use them; logs completed (metrics, numerics) before CSV and
        TensorBoard write them; the caller's extra callbacks, then the progress bars."""
        return [c for c in (self.replica_statistics, self.backup, self.weights, self.metrics,
                            self.numerics, self.stream_range, self.csv_log, self.tensorboard, *self.extra,
                            self.progress) if c is not None]


def _numerics_monitor(config, model, test_ds, model_dir):
    import tf_revnet.diagnostics

    if not tf_revnet.diagnostics.reversible_layers(model):
        raise StageError("monitor_numerics", config.monitor_numerics,
                          f"{config.model} has no reversible layers")
    x_val, y_val = next(iter(test_ds.unbatch().batch(16)))
    return tf_revnet.callbacks.ReversibleNumericsMonitor(
        x_val, y_val, every_n_steps=config.monitor_numerics,
        max_gradient_angle=config.max_gradient_angle,
        max_reconstruction_error=config.max_reconstruction_error,
        log_dir=str(model_dir / "logs" / "numerics"))


def make_callbacks(config, model, strategy, backup, test, extra=(), report=print):
    """The run's `RunCallbacks`.

    Args:
        config: `training.command_line.RunConfig` (its `model_dir` is this process' directory).
        model: the compiled model.
        strategy: the run's strategy.
        backup: `ExactBackup` of this process.
        test: `(test dataset, number of batches, description)`.
        extra: the caller's callbacks.
        report: callable str -> None for the progress headers.
    """
    import pathlib

    model_dir = pathlib.Path(config.model_dir)
    test_ds, test_steps, test_name = test
    return RunCallbacks(
        replica_statistics=replica_sync.AverageReplicaStatistics(strategy,
                                                                 config.save_every_steps),
        backup=backup,
        weights=AtomicWeightsCheckpoint(model_dir / "model.weights.h5"),
        metrics=RunMetrics(config.recipe.batch_size),
        numerics=(_numerics_monitor(config, model, test_ds, model_dir)
                  if config.monitor_numerics else None),
        # --coupling fixed_point: warn for each block whose stream left its exact range.
        stream_range=(tf_revnet.callbacks.StreamRangeMonitor()
                      if config.coupling == "fixed_point" else None),
        csv_log=keras.callbacks.CSVLogger(str(model_dir / "training_log.csv"), append=True),
        tensorboard=keras.callbacks.TensorBoard(str(model_dir / "logs"), write_graph=False),
        progress=EpochProgress(config.recipe.epochs, test_steps, test_name, report),
        extra=tuple(extra))


def _fit_segments(model, config, train_split, test_ds, plan, step, callbacks):
    recipe, history = config.recipe, {}
    for first, initial_epoch, end in plan.segments(step):
        epochs = -(-end // plan.steps_per_epoch)
        fit_history = model.fit(
            data_lib.train_dataset(train_split, recipe.batch_size, plan.steps_per_epoch,
                                   seed=config.seed,
                                   augment=recipe.preprocessing if recipe.augment else "none",
                                   image_size=recipe.image_size, start_step=first, end_step=end),
            initial_epoch=initial_epoch, epochs=epochs,
            steps_per_epoch=(end - first) // (epochs - initial_epoch),
            validation_data=test_ds, callbacks=callbacks.ordered(),
            shuffle=False,  # the order is train_dataset's (seeded, epoch-indexed)
            verbose=config.verbose)
        for key, values in fit_history.history.items():
            history.setdefault(key, []).extend(values)
    return history


def fit(model, config, datasets, test_ds, plan, step, callbacks, strategy, report):
    """Trains from global step `step` to the end of `plan`; returns `(history, test metrics)`.

    The last epoch's validation ran on the whole test split: it is the final evaluation. Only a
    run resumed after its last step evaluates (once).

    Raises:
        Interrupted: Ctrl-C (KeyboardInterrupt); the backup was saved at the last finished step
            first, except in a multi-worker run (the workers' last common backup stands).
    """
    try:
        with replica_sync.reporting_lost_workers(strategy):
            try:
                history = _fit_segments(model, config, datasets.train_split, test_ds, plan, step,
                                        callbacks)
            finally:  # stopped in the first step: no more heartbeat lines
                callbacks.progress.end_tracing()
    except KeyboardInterrupt:
        done = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        if done > step and not replica_sync.is_multi_worker(strategy):
            callbacks.backup.save()
        raise Interrupted(done, callbacks.backup.saved_step, config.model_dir) from None
    if "val_loss" in history:
        return history, {k[4:]: v[-1] for k, v in history.items() if k.startswith("val_")}
    report(f"Evaluating on the {datasets.num_test} {datasets.test_name} images")
    return history, model.evaluate(test_ds, verbose=config.verbose, return_dict=True)
