"""Keras callbacks for reversible networks: numerical-fidelity monitoring during `model.fit`."""

import math
import warnings

import keras
import numpy as np

from tf_revnet import diagnostics
from tf_revnet.layers import backend

if backend.BACKEND == "tensorflow":
    import tensorflow as tf
else:
    tf = backend.tensorflow_only(
        "tf_revnet.callbacks", "they run tf_revnet.diagnostics and write tf.summary scalars")

__all__ = ["ReversibleNumericsMonitor", "StreamRangeMonitor"]

# Log keys written by `ReversibleNumericsMonitor` (CSVLogger columns, TensorBoard scalar tags).
GRADIENT_ANGLE = "revnet_gradient_angle_deg"
GRADIENT_RELATIVE_ERROR = "revnet_gradient_relative_error"
GRADIENT_NORM_DIFFERENCE = "revnet_gradient_relative_norm_difference"
RECONSTRUCTION_RELATIVE_ERROR = "revnet_reconstruction_relative_error"
RECONSTRUCTION_MAX_ABS_ERROR = "revnet_reconstruction_max_abs_error"
NONFINITE = "revnet_nonfinite"
STREAM_OUT_OF_RANGE = "revnet_stream_out_of_range"  # written by `StreamRangeMonitor`
LOG_KEYS = (GRADIENT_ANGLE, GRADIENT_RELATIVE_ERROR, GRADIENT_NORM_DIFFERENCE,
            RECONSTRUCTION_RELATIVE_ERROR, RECONSTRUCTION_MAX_ABS_ERROR, NONFINITE)


def _check_threshold(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"`{name}` must be a non-negative number or None. Received: {name}={value!r}")
    return float(value)


class ReversibleNumericsMonitor(keras.callbacks.Callback):
    """Measures reconstruction error and gradient angle of a reversible model during `fit`.

    At the start of training and then every `every_n_steps` training steps, runs
    `tf_revnet.diagnostics.reconstruction_error` and `tf_revnet.diagnostics.gradient_angle` on one
    fixed held-out batch `(x, y)` (side-effect free: training is not changed) and

    - adds the latest figures to the logs at the end of every epoch (and to the batch logs of the steps
      where it measured), so `keras.callbacks.CSVLogger`, `TensorBoard` and `History` record them:
      `revnet_gradient_angle_deg` (degrees), `revnet_gradient_relative_error`,
      `revnet_gradient_relative_norm_difference`, `revnet_reconstruction_relative_error` and
      `revnet_reconstruction_max_abs_error` (worst block), `revnet_nonfinite` (count of inf/NaN
      values seen). Put this callback before CSVLogger and TensorBoard in the `callbacks` list: Keras
      calls callbacks in that order with the same logs dict.
    - with `log_dir`, also writes every measurement as TensorBoard scalars (`tf.summary`, step = global
      training step), so the figures are plotted per measurement rather than per epoch;
    - warns once per threshold (`warnings.warn`, `RuntimeWarning`) naming the block or variable and the
      figures, when the gradient angle exceeds `max_gradient_angle`, a block's reconstruction relative
      error exceeds `max_reconstruction_error`, or a value is inf or NaN.

    Args:
        x: the held-out batch's inputs, as the model takes them (e.g. NHWC images `(N, H, W, C)`).
            Keep it small (8 to 32 examples): each measurement costs about three training steps, run
            eagerly.
        y: the batch's targets, as `loss` expects them.
        every_n_steps: int >= 1. Measure every this many training steps (over all epochs).
            Defaults to 100.
        loss: a Keras loss name or callable. Defaults to None: the model's compiled loss.
        max_gradient_angle: float or None. Warning threshold in degrees. Defaults to 1.0 (the
            tolerance of the paper authors' tests). None: never warn about the angle.
        max_reconstruction_error: float or None. Warning threshold of the relative reconstruction
            error of any block. Defaults to 1e-2. None: never warn about it.
        log_dir: str or None. Directory for `tf.summary` scalars (e.g. the TensorBoard callback's
            `log_dir + "/numerics"`). Defaults to None.
        verbose: int. 1 prints one line per measurement. Defaults to 0.

    Attributes:
        history: list of dicts, one per measurement: `{"step": int, <log keys>: float}`.
        last_reconstruction: the latest `tf_revnet.diagnostics.ReconstructionReport`, or None.
        last_gradient_angle: the latest `tf_revnet.diagnostics.GradientAngle`, or None.

    Raises:
        ValueError: if `every_n_steps` is not a positive int or a threshold is negative.

    Examples:
        >>> monitor = ReversibleNumericsMonitor(x_val[:16], y_val[:16], every_n_steps=50)
        >>> model.fit(x, y, epochs=2, callbacks=[monitor, keras.callbacks.CSVLogger("log.csv")])
    """

    def __init__(self, x, y, every_n_steps=100, loss=None, max_gradient_angle=1.0,
                 max_reconstruction_error=1e-2, log_dir=None, verbose=0):
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, (int, np.integer)) or (
            every_n_steps < 1
        ):
            raise ValueError(
                f"`every_n_steps` must be an int >= 1. Received: every_n_steps={every_n_steps!r}"
            )
        self.x = x
        self.y = y
        self.every_n_steps = int(every_n_steps)
        self.loss = loss
        self.max_gradient_angle = _check_threshold("max_gradient_angle", max_gradient_angle)
        self.max_reconstruction_error = _check_threshold(
            "max_reconstruction_error", max_reconstruction_error
        )
        self.log_dir = log_dir
        self.verbose = verbose
        self.history = []
        self.last_reconstruction = None
        self.last_gradient_angle = None
        self._step = 0
        self._warned = set()
        self._writer = None

    def on_train_begin(self, logs=None):
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        if not self.history:
            self._measure(logs)

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every_n_steps == 0:
            self._measure(logs)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.history:
            logs.update({k: v for k, v in self.history[-1].items() if k != "step"})

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()

    def measure(self):
        """Measures now on the held-out batch; returns the dict of figures (also in `history`)."""
        reconstruction = diagnostics.reconstruction_error(self.model, self.x)
        angle = diagnostics.gradient_angle(self.model, self.x, self.y, self.loss)
        self.last_reconstruction, self.last_gradient_angle = reconstruction, angle
        figures = {
            "step": self._step,
            GRADIENT_ANGLE: angle.degrees,
            GRADIENT_RELATIVE_ERROR: angle.relative_error,
            GRADIENT_NORM_DIFFERENCE: angle.relative_norm_difference,
            RECONSTRUCTION_RELATIVE_ERROR: reconstruction.max_relative_error,
            RECONSTRUCTION_MAX_ABS_ERROR: reconstruction.max_abs_error,
            NONFINITE: float(reconstruction.nonfinite + angle.nonfinite),
        }
        self.history.append(figures)
        self._warn(reconstruction, angle)
        if self._writer is not None:
            with self._writer.as_default(step=self._step):
                for key in LOG_KEYS:
                    tf.summary.scalar(key, figures[key])
        if self.verbose:
            print(
                f"\nReversibleNumericsMonitor step {self._step}: gradient angle "
                f"{angle.degrees:.3g} deg, reconstruction error {reconstruction.max_relative_error:.3g}"
                f" (block '{reconstruction.worst().name}')",
                flush=True,
            )
        return figures

    def _measure(self, logs):
        figures = self.measure()
        if logs is not None:
            logs.update({k: v for k, v in figures.items() if k != "step"})

    def _warn_once(self, kind, message):
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _warn(self, reconstruction, angle):
        step = self._step
        if not (reconstruction.finite and angle.finite):
            bad = [b.name for b in reconstruction.blocks if not b.finite]
            where = f"block '{bad[0]}'" if bad else f"variable '{angle.worst_variable}'"
            self._warn_once(
                "nonfinite",
                f"ReversibleNumericsMonitor: inf or NaN at step {step} in {where}: "
                f"{reconstruction.nonfinite} non-finite rebuilt/forward input values, "
                f"{angle.nonfinite} non-finite gradient values. Under mixed_float16 check the loss "
                "scale and the size of the activations, or train in float32 or mixed_bfloat16.",
            )
        worst = reconstruction.worst()
        limit = self.max_reconstruction_error
        if limit is not None and worst.finite and worst.relative_error > limit:
            self._warn_once(
                "reconstruction",
                f"ReversibleNumericsMonitor: at step {step}, block '{worst.name}' (sequence "
                f"'{worst.sequence}', index {worst.index}) rebuilds its inputs with relative error "
                f"{worst.relative_error:.3g} (max abs {worst.max_abs_error:.3g}; "
                f"{worst.local_relative_error:.3g} from its own exact output), above "
                f"max_reconstruction_error={limit:g}.",
            )
        limit = self.max_gradient_angle
        if limit is not None and not math.isnan(angle.degrees) and angle.degrees > limit:
            self._warn_once(
                "angle",
                f"ReversibleNumericsMonitor: at step {step}, the reversible gradient is "
                f"{angle.degrees:.3g} degrees from the stored-activation gradient (relative error "
                f"{angle.relative_error:.3g}), above max_gradient_angle={limit:g}; worst variable "
                f"'{angle.worst_variable}' at {angle.per_variable[angle.worst_variable]:.3g} degrees.",
            )


class StreamRangeMonitor(keras.callbacks.Callback):
    """Warns when a fixed-point residual stream leaves its exact range during `model.fit`.

    Blocks with a range-checked fixed-point stream (`coupling="fixed_point"`) count the training
    steps in which a stream value was not below the grid's exact range (a non-trainable variable per
    block, updated inside the compiled step, so it works with `tf.function`, XLA and distribution
    strategies). Every `every_n_steps` steps and at the end of each epoch this callback reads the
    counts (`tf_revnet.diagnostics.stream_out_of_range`: no computation) and, for each block whose
    count grew, warns (`warnings.warn`, `RuntimeWarning`) once per block naming it, its count and
    the fix. It adds `revnet_stream_out_of_range` (the number of steps-and-blocks out of range
    so far, summed over blocks) to the epoch logs. `python -m training.train --coupling fixed_point`
    adds it.

    Args:
        every_n_steps: int >= 1. Read the counters every this many training steps. Defaults to 100.

    Raises:
        ValueError: if `every_n_steps` is not a positive int.
    """

    def __init__(self, every_n_steps=100):
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or (
                every_n_steps < 1):
            raise ValueError(
                f"`every_n_steps` must be a positive int. Received: every_n_steps={every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.counts = {}
        self._warned = set()
        self._step = 0

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every_n_steps == 0:
            self.check()

    def on_epoch_end(self, epoch, logs=None):
        self.check()
        if logs is not None:
            logs[STREAM_OUT_OF_RANGE] = float(sum(self.counts.values()))

    def check(self):
        """Reads the counters now and warns for each block newly out of range; returns the counts."""
        self.counts = diagnostics.stream_out_of_range(self.model)
        for name, count in self.counts.items():
            if count > 0 and name not in self._warned:
                self._warned.add(name)
                warnings.warn(
                    f"StreamRangeMonitor: block '{name}' left the exact range of its fixed-point "
                    f"stream in {count:g} training step(s) by step {self._step}: its sums rounded, "
                    "so reversible backprop rebuilt inputs that are not bit-identical (the gradient "
                    "is as inexact as a floating point stream's, not wrong). Fix: a larger range, "
                    "coupling=tf_revnet.AdditiveCoupling.fixed_point(max_abs=...), or a smaller "
                    "learning rate.",
                    RuntimeWarning, stacklevel=2,
                )
        return self.counts
